"""A grammar composes with the rest of the sampler: stop strings, max_new_tokens, top
logprobs, streaming; and a bad grammar fails before any decoding."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import pytest
import torch

from esamp_agents import ESampParams, SamplingParams
from esamp_agents.constrained.grammar import Grammar, GrammarError
from esamp_agents.decoding.engine import ESampEngine

from .conftest import assert_complete_and_valid, chat

FIXED = Grammar.regex(r"alpha, beta, gamma, delta")  # one sentence: every token is forced


def test_a_stop_string_cuts_a_constrained_row_unsatisfied(engine: ESampEngine) -> None:
    sampling = SamplingParams(n=2, max_new_tokens=20, stop=(", gamma",), seed=1)
    out = engine.generate([chat(engine, "Name Greek letters.")], sampling, grammar=FIXED)
    for c in out[0].candidates:
        assert c.text == "alpha, beta" and c.stop_sequence == ", gamma"
        assert c.finish_reason == "stop"
        assert c.extras["constraint_satisfied"] is False  # cut before the grammar was complete


def test_max_new_tokens_cuts_a_constrained_row_as_length(engine: ESampEngine) -> None:
    out = engine.generate([chat(engine, "Name Greek letters.")], SamplingParams(n=2, max_new_tokens=3, seed=1),
                          ESampParams(beta=0.25), grammar=FIXED)  # fmt: skip
    for c in out[0].candidates:
        assert len(c.token_ids) == 3 and c.finish_reason == "length"
        assert c.extras["constraint_satisfied"] is False
        assert "alpha, beta, gamma, delta".startswith(c.text) and c.text


def test_complete_fixed_grammar_ends_with_stop_and_no_end_token_needed(engine: ESampEngine) -> None:
    out = engine.generate([chat(engine, "Name Greek letters.")], SamplingParams(n=1, max_new_tokens=20), grammar=FIXED)
    (c,) = out[0].candidates
    assert c.text == "alpha, beta, gamma, delta" and c.finish_reason == "stop"
    assert c.extras["constraint_satisfied"] is True
    assert c.token_ids[-1] not in engine.loaded.eos_token_ids  # the grammar, not an end token, ended it


def test_top_logprobs_with_a_constraint_are_finite_and_at_most_zero(engine: ESampEngine) -> None:
    grammar = Grammar.regex(r"The answer is [0-9]{1,3}\.")
    sampling = SamplingParams(n=2, max_new_tokens=16, temperature=0.8, seed=4, top_logprobs=3)
    out = engine.generate([chat(engine, "What is 6 times 7?")], sampling, ESampParams(beta=0.25), grammar=grammar)
    for c in out[0].candidates:
        assert re.fullmatch(r"The answer is [0-9]{1,3}\.", c.text) and c.extras["constraint_satisfied"]
        assert len(c.logprobs) == len(c.token_ids) and all(math.isfinite(x) and x <= 0 for x in c.logprobs)
        assert c.top_logprobs is not None and len(c.top_logprobs) == len(c.token_ids)
        for chosen, top in zip(c.logprobs, c.top_logprobs, strict=True):
            assert len(top) == 3
            values = [v for _, v in top]
            assert values == sorted(values, reverse=True)
            assert math.isfinite(values[0]) and chosen <= values[0] <= 0  # the best is at least the sampled one


def _model_logprobs(engine: ESampEngine, prompt: list[int], ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = engine.loaded.model(torch.tensor([prompt + ids])).logits[0].float().log_softmax(-1)
    return [logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids)]


def test_constrained_logprobs_are_the_models_own(engine: ESampEngine) -> None:
    prompt = chat(engine, "Name Greek letters.")
    out = engine.generate([prompt], SamplingParams(n=1, max_new_tokens=20, top_logprobs=2), grammar=FIXED)
    (c,) = out[0].candidates
    own = _model_logprobs(engine, prompt, c.token_ids)
    assert c.logprobs == pytest.approx(own, abs=1e-3)
    assert all(math.isfinite(v) for top in c.top_logprobs or [] for _, v in top)


def test_streaming_with_a_grammar(engine: ESampEngine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
              "temp_c": {"type": "integer", "minimum": -40, "maximum": 50}}, "required": ["city", "temp_c"],
              "additionalProperties": False}  # fmt: skip
    events = list(
        engine.stream(chat(engine, "Report the weather as JSON."), SamplingParams(n=1, max_new_tokens=40, seed=8),
                      ESampParams(beta=0.25), grammar=Grammar.json_schema(schema))
    )  # fmt: skip
    final = events[-1].candidate
    assert final is not None and all(e.candidate is None for e in events[:-1])
    assert len(events) > 3  # it really streamed, piece by piece
    assert "".join(e.text for e in events) == final.text
    assert_complete_and_valid(final, schema, 40)


def test_bad_grammar_arguments_fail_before_any_forward(engine: ESampEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(engine, "_forward", lambda *a, **k: calls.append(a) or pytest.fail("a forward ran"))
    prompt = chat(engine, "Hi")
    good = Grammar.json_object()
    sampling = SamplingParams(n=2, max_new_tokens=8)
    cases: list[tuple[Any, type[Exception], str]] = [
        ([good, good, good], ValueError, "grammar has 3 entries; allowed: one Grammar, or 1 (one per prompt) or 2"),
        ("{}", TypeError, "grammar must be a Grammar or a list of them, got str"),
        ([good, {"type": "object"}], TypeError, "grammar entries must be Grammar or None, got dict"),
    ]
    for grammar, error, message in cases:
        start = time.perf_counter()
        with pytest.raises(error, match=re.escape(message)):
            engine.generate([prompt], sampling, grammar=grammar)
        assert time.perf_counter() - start < 2.0
    with pytest.raises(TypeError, match="got str"):
        engine.stream(prompt, SamplingParams(n=1, max_new_tokens=8), grammar="{}")  # type: ignore[arg-type]
    with pytest.raises(GrammarError, match="uniqueItems"):  # a bad schema never even becomes a Grammar
        engine.generate([prompt], sampling, grammar=Grammar.json_schema({"type": "array", "uniqueItems": True}))
    assert calls == []


def test_json_object_grammar_with_esamp(engine: ESampEngine) -> None:
    out = engine.generate([chat(engine, "Describe a cat as a JSON object with two keys.")],
                          SamplingParams(n=4, max_new_tokens=64, temperature=0.7, seed=21), ESampParams(beta=0.25),
                          grammar=Grammar.json_object())  # fmt: skip
    for c in out[0].candidates:
        if c.finish_reason == "length":  # free keys and values: a long object may not fit, then it is not valid
            assert len(c.token_ids) == 64 and c.extras["constraint_satisfied"] is False
            continue
        assert isinstance(json.loads(c.text), dict) and c.extras["constraint_satisfied"] is True
    assert any(c.finish_reason == "stop" for c in out[0].candidates)
