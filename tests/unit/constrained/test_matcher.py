"""GrammarConstraint on the real SmolLM2 tokenizer: the mask allows exactly what the grammar
allows, finished and unconstrained rows are untouched, and (property) any token sequence the
mask allows keeps the matcher valid and ends in a text the grammar accepts."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esamp_agents.constrained.grammar import Grammar, GrammarError
from esamp_agents.constrained.matcher import GrammarConstraint, _mask_bias, engine_tokenizer

from .conftest import VOCAB


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The reference reading of a bitmask: ``[rows, ceil(vocab / 32)]`` int32 -> ``[rows, vocab]`` bool."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


DIGITS = Grammar.regex(r"[0-9]{1,3}")


def constraint(grammars: list[Grammar | None], tokenizer: Any, eos_id: int) -> GrammarConstraint:
    return GrammarConstraint(grammars, tokenizer, VOCAB, [eos_id])


def allowed(c: GrammarConstraint, rows: int, vocab: int = VOCAB) -> torch.Tensor:
    """[rows, vocab] bool: the tokens each row may take now."""
    return torch.isfinite(c.apply(torch.zeros(rows, vocab)))


def step(c: GrammarConstraint, tokens: list[int]) -> torch.Tensor | None:
    return c.advance(torch.tensor(tokens), torch.ones(len(tokens), dtype=torch.bool))


def test_regex_mask_allows_only_tokens_that_can_continue_a_match(tokenizer: Any, eos_id: int) -> None:
    c = constraint([DIGITS], tokenizer, eos_id)
    ok = allowed(c, 1)[0].nonzero().flatten().tolist()
    assert sorted(tokenizer.decode([t]) for t in ok) == list("0123456789")  # nothing yet: no end token either
    assert eos_id not in ok


def test_mask_follows_the_text_and_allows_the_end_token_once_accepting(tokenizer: Any, eos_id: int) -> None:
    c = constraint([DIGITS], tokenizer, eos_id)
    seven = tokenizer.convert_tokens_to_ids("7")
    assert step(c, [seven]) is None and c.accepted(0)  # "7" is a complete match, and could go on
    mask = allowed(c, 1)[0]
    assert mask[eos_id] and mask[seven]
    assert step(c, [seven]) is None
    assert step(c, [seven]) is not None  # "777": nothing but the end could follow, the row is done
    assert c.done == [True] and c.accepted(0)


def test_finished_row_allows_everything_and_other_rows_keep_their_masks(tokenizer: Any, eos_id: int) -> None:
    yes = Grammar.regex("yes")
    c = constraint([yes, DIGITS], tokenizer, eos_id)
    token = tokenizer("yes", add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    done = step(c, [token[0], tokenizer.convert_tokens_to_ids("1")])
    assert done is not None and done.tolist() == [True, False]
    mask = allowed(c, 2)
    assert mask[0].all()  # a finished row's token is dropped anyway
    assert 0 < int(mask[1].sum()) < 20  # digits and the end token


def test_unconstrained_rows_are_untouched(tokenizer: Any, eos_id: int) -> None:
    c = constraint([None, DIGITS, None], tokenizer, eos_id)
    assert c.rows == [1]
    logits = torch.randn(3, VOCAB)
    out = c.apply(logits.clone())
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert int(torch.isfinite(out[1]).sum()) == 10
    assert c.accepted(0) is None  # unconstrained: no verdict
    assert c.advance(torch.tensor([5, 5, 5]), torch.tensor([True, False, True])) is None
    assert GrammarConstraint([None, None], tokenizer, VOCAB, [eos_id]).apply(logits) is logits


def test_padded_model_vocabulary_never_allows_the_padding(tokenizer: Any, eos_id: int) -> None:
    c = constraint([Grammar.json_object()], tokenizer, eos_id)
    mask = allowed(c, 1, vocab=VOCAB + 64)[0]
    assert mask[:VOCAB].any() and not mask[VOCAB:].any()


def test_many_rows_in_parallel_get_the_same_masks_as_one_at_a_time(tokenizer: Any, eos_id: int) -> None:
    grammars = [DIGITS, Grammar.json_object(), Grammar.regex("(yes|no)")]
    together = allowed(constraint(grammars, tokenizer, eos_id), 3)  # the executor's path
    one_by_one = torch.stack([allowed(constraint([g], tokenizer, eos_id), 1)[0] for g in grammars])
    assert torch.equal(together, one_by_one)


def test_mask_keeps_the_logits_of_allowed_tokens(tokenizer: Any, eos_id: int) -> None:
    c = constraint([DIGITS, DIGITS], tokenizer, eos_id)
    logits = torch.randn(2, VOCAB)
    out = c.apply(logits)
    keep = torch.isfinite(out)
    assert torch.equal(out[keep], logits[keep]) and torch.isneginf(out[~keep]).all()


def test_a_refused_token_ends_the_row_unsatisfied(tokenizer: Any, eos_id: int) -> None:
    c = constraint([DIGITS], tokenizer, eos_id)
    letter = tokenizer.convert_tokens_to_ids("a")
    done = step(c, [letter])
    assert done is not None and done.tolist() == [True]
    assert 0 in c.errors and c.accepted(0) is False


def test_unpack_reads_bits_low_first() -> None:
    bitmask = torch.tensor([[0b101, -1]], dtype=torch.int32)
    unpacked = _unpack(bitmask, 40)
    assert unpacked.shape == (1, 40)
    assert unpacked[0, :3].tolist() == [True, False, True] and not unpacked[0, 3:32].any()
    assert unpacked[0, 32:].all()  # -1: every bit, including the sign bit's token 63 (cut at 40)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 200),
    extra=st.integers(-8, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_mask_bias_matches_the_bit_unpacking(rows: int, vocab: int, extra: int, seed: int) -> None:
    """The byte-table bias ``apply`` adds is 0 exactly where the reference unpacking allows a
    token, -inf elsewhere, and -inf for every column past the tokenizer's vocabulary."""
    words = (vocab + 31) // 32
    gen = torch.Generator().manual_seed(seed)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32, generator=gen)
    width = max(1, vocab + extra)
    bias = _mask_bias(bitmask, vocab, width, torch.device("cpu"))
    assert bias.shape == (rows, width) and bias.dtype == torch.float32
    allowed = _unpack(bitmask, vocab)[:, :width]
    assert torch.equal(bias[:, : allowed.shape[1]] == 0, allowed)
    assert torch.isneginf(bias[:, : allowed.shape[1]][~allowed]).all()
    assert torch.isneginf(bias[:, vocab:]).all()


def test_apply_keeps_the_logits_dtype_and_leaves_its_input_alone(tokenizer: Any, eos_id: int) -> None:
    c = constraint([None, DIGITS], tokenizer, eos_id)
    logits = torch.randn(2, VOCAB).to(torch.bfloat16)
    before = logits.clone()
    out = c.apply(logits)
    assert out.dtype == torch.bfloat16 and torch.equal(logits, before)
    assert torch.equal(out[0], logits[0]) and int(torch.isfinite(out[1]).sum()) == 10
    full = constraint([DIGITS, DIGITS], tokenizer, eos_id)
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    full.apply(logits)
    assert torch.equal(logits, before)  # out of place: the engine may still read the raw logits


def test_slow_tokenizer_is_refused_with_a_clear_error() -> None:
    class Slow:
        pass

    with pytest.raises(GrammarError, match="needs a fast \\(Rust\\) Hugging Face tokenizer; Slow"):
        engine_tokenizer(Slow(), VOCAB, [0])


# ------------------------------------------------------------------ property tests
def walk(data: Any, c: GrammarConstraint, tokenizer: Any, eos_id: int, max_steps: int) -> tuple[list[int], bool]:
    """Sample random allowed tokens until the row ends: (tokens, ended by the grammar or an end token)."""
    ids: list[int] = []
    for _ in range(max_steps):
        ok = allowed(c, 1)[0].nonzero().flatten().tolist()
        assert ok, "the mask allowed nothing: a dead end"
        token = data.draw(st.sampled_from(ok), label="token")
        if token == eos_id:
            assert c.accepted(0), "the end token was allowed before the grammar was complete"
            return ids, True
        ids.append(token)
        done = step(c, [token])
        assert not c.errors, f"a token the mask allowed was refused: {c.errors}"
        if done is not None:
            return ids, True
    return ids, False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_regex_walk_stays_a_prefix_and_ends_in_a_match(data: Any, tokenizer: Any, eos_id: int) -> None:
    pattern = r"(ab|cd){1,3}-[0-9]{2}( ok)?"
    c = constraint([Grammar.regex(pattern)], tokenizer, eos_id)
    ids, ended = walk(data, c, tokenizer, eos_id, max_steps=20)
    assert ended  # at most 12 characters: every walk ends within 20 tokens
    assert re.fullmatch(pattern, tokenizer.decode(ids))


SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["a", "b"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["kind", "n"],
    "additionalProperties": False,
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_schema_walk_ends_in_valid_json(data: Any, tokenizer: Any, eos_id: int) -> None:
    c = constraint([Grammar.json_schema(SCHEMA)], tokenizer, eos_id)
    ids, ended = walk(data, c, tokenizer, eos_id, max_steps=80)
    assert ended  # bounded schema: every allowed walk completes within 80 tokens
    value = json.loads(tokenizer.decode(ids))
    jsonschema.validate(value, SCHEMA)
