"""The evaluation harness on the real embedded model, kept tiny: 2 problems x n=2 x 2 samplers."""

from __future__ import annotations

import pytest

from esamp_agents.evaluation.harness import (
    check_ks,
    check_selectors,
    default_ks,
)
from esamp_agents.evaluation.samplers import Sampler, parse_sampler, parse_samplers


def test_sampler_strings() -> None:
    assert parse_sampler("vanilla") == Sampler("vanilla")
    assert (
        parse_sampler("esamp") == parse_sampler("esamp:0.10:warm20") == Sampler("esamp", beta=0.1, warm_start_steps=20)
    )
    assert parse_sampler("esamp:0.250") == Sampler("esamp", beta=0.25)  # the paper's recipe: no warm start
    assert parse_sampler("esamp:0.5:warm4").name == "esamp:0.5:warm4"
    assert parse_sampler("esamp:0.5:warm4").folder == "esamp_0.5_warm4"
    assert parse_sampler("esamp:1").name == "esamp:1" and parse_sampler("minp:0.05").folder == "minp_0.05"
    assert parse_sampler("minp:0.05").sampling_params(
        n=2, temperature=0.7, top_k=0, top_p=1.0, max_tokens=8, seed=0
    ).min_p == pytest.approx(0.05)
    assert parse_sampler("esamp:0.5:warm4").esamp_params().warm_start_steps == 4
    for kind, kw in (("esamp", {}), ("vanilla", {"min_p": 0.1}), ("minp", {"min_p": 1.0}), ("topk", {})):
        with pytest.raises(ValueError, match="not a valid sampler"):
            Sampler(kind, **kw)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("greedy", "not understood"),
        ("esamp:0", "0 < BETA <= 100"),
        ("esamp:-1", "out of range"),
        ("esamp:101", "out of range"),
        ("esamp:abc", "not a number"),
        ("esamp:nan", "not finite"),
        ("esamp:0.25:4", "warmSTEPS"),
        ("esamp:0.25:warm-1", "warmSTEPS"),
        ("minp", "not understood"),
        ("minp:1", "0 < P < 1"),
        ("minp:0", "0 < P < 1"),
        ("vanilla:0.1", "not understood"),
    ],
)
def test_bad_sampler_strings_are_rejected(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_sampler(spec)
    assert repr(spec) in str(info.value)


def test_bad_lists_are_rejected() -> None:
    with pytest.raises(ValueError, match="same sampler"):
        parse_samplers(["esamp", "esamp:0.1:warm20"])
    with pytest.raises(ValueError, match="non-empty"):
        parse_samplers([])
    for ks, message in (([0], "1 <= k <= n = 2"), ([3], "1 <= k <= n = 2"), ([], "non-empty"), ([1, 1], "twice")):
        with pytest.raises(ValueError, match=message):
            check_ks(ks, 2)
    assert check_ks([4, 1, 2], 4) == [1, 2, 4] and default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="needs a reward head"):
        check_selectors(["argmax:reward"], has_reward=False)
    with pytest.raises(ValueError, match="not understood"):
        check_selectors(["argmax:novelty"], has_reward=True)
    with pytest.raises(ValueError, match="twice"):
        check_selectors(["random", "random"], has_reward=False)
