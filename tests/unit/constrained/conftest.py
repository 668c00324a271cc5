"""The embedded model's tokenizer (no weights: ~4 s to read from the GGUF, once per session)
and a helper that asks a grammar whether it accepts a text, token by token."""

from __future__ import annotations

from typing import Any

import llguidance
import pytest

from esamp_agents.constrained.grammar import Grammar
from esamp_agents.constrained.matcher import engine_tokenizer

VOCAB = 49152  # SmolLM2's vocabulary (and its LM head's rows)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    import transformers

    from esamp_agents.decoding.loading import embedded_model_file

    f = embedded_model_file()
    return transformers.AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)


@pytest.fixture(scope="session")
def eos_id(tokenizer: Any) -> int:
    return int(tokenizer.eos_token_id)


@pytest.fixture(scope="session")
def accepts(tokenizer: Any, eos_id: int) -> Any:
    """``accepts(grammar, text)``: whether ``grammar`` takes ``text``'s tokens and is then complete."""
    ll_tok = engine_tokenizer(tokenizer, VOCAB, [eos_id])

    def check(grammar: Grammar, text: str) -> bool:
        matcher = llguidance.LLMatcher(ll_tok, grammar.engine_text(), log_level=0)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return bool(matcher.consume_tokens(ids)) and not matcher.is_error() and matcher.is_accepting()

    return check
