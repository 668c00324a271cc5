"""Grammars as the decode loop's per-row constraints: one grammar, one per prompt, or one per row.

The engine calls this once per request before any decoding, so a malformed ``grammar``
argument fails before work starts; rows without a grammar stay unconstrained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esamp_agents.constrained.grammar import Grammar
from esamp_agents.constrained.matcher import GrammarConstraint


def row_constraints(
    grammar: Grammar | Sequence[Grammar | None] | None, prompts: int, n: int, loaded: Any
) -> tuple[GrammarConstraint, ...]:
    """One :class:`GrammarConstraint` over the ``prompts x n`` rows that have a grammar (none: ``()``).

    ``grammar``: one :class:`Grammar` for every row, ``prompts`` entries (one per prompt, shared
    by its n samples) or ``prompts * n`` entries (one per row); ``None`` entries leave a row free.
    The grammar's end tokens are ``loaded``'s, also under ``ignore_eos``.
    """
    if grammar is None:
        return ()
    rows = prompts * n
    if isinstance(grammar, Grammar):
        per_row: list[Grammar | None] = [grammar] * rows
    elif isinstance(grammar, Sequence) and not isinstance(grammar, (str, bytes)):
        items = list(grammar)
        bad = [type(g).__name__ for g in items if g is not None and not isinstance(g, Grammar)]
        if bad:
            raise TypeError(f"grammar entries must be Grammar or None, got {bad[0]}")
        if len(items) == prompts:
            per_row = [g for g in items for _ in range(n)]
        elif len(items) == rows:
            per_row = items
        else:
            raise ValueError(
                f"grammar has {len(items)} entries; allowed: one Grammar, or {prompts} (one per prompt) "
                f"or {rows} (one per row: prompts x n)"
            )
    else:
        raise TypeError(f"grammar must be a Grammar or a list of them, got {type(grammar).__name__}")
    if all(g is None for g in per_row):
        return ()
    return (GrammarConstraint(per_row, loaded.tokenizer, loaded.vocab_size, loaded.eos_token_ids),)


__all__ = ["row_constraints"]
