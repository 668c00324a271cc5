"""Best-of-N selectors and their estimates on hand-made groups."""

from __future__ import annotations

import numpy as np
import pytest

from esamp_agents.evaluation.selectors import Group, best_of_n, select_accuracy, unbiased_pass_at_k


def eq(a, b):
    return a is not None and a == b


GROUP = Group(
    problem_id="p",
    correct=[False, True, False, True],
    answers=["3", "4", "3", "4"],
    reference="4",
    scores={"r": [0.1, 2.0, -1.0, 0.5], "lp": [-0.1, -0.9, -0.2, -0.8]},
)


def test_selectors_on_all_candidates():
    idx, rng = np.arange(4), np.random.default_rng(0)
    assert select_accuracy(GROUP, "random", idx, rng, eq) == 0.5
    assert select_accuracy(GROUP, "oracle", idx, rng, eq) == 1.0
    assert select_accuracy(GROUP, "argmax:r", idx, rng, eq) == 1.0
    assert select_accuracy(GROUP, "argmax:lp", idx, rng, eq) == 0.0
    # weights sigmoid(r): "4" has 0.88 + 0.62 > "3" with 0.52 + 0.27
    assert select_accuracy(GROUP, "vote:r", idx, rng, eq) == 1.0
    assert select_accuracy(GROUP, "zvote:r", idx, rng, eq) == 1.0
    assert select_accuracy(GROUP, "zvote:lp", idx, rng, eq) == 0.0  # logprob favours the wrong "3"


def test_majority_tie_is_broken_at_random_but_seeded():
    idx = np.arange(4)
    results = {select_accuracy(GROUP, "majority", idx, np.random.default_rng(s), eq) for s in range(20)}
    assert results == {0.0, 1.0}  # 2 votes each: both answers win sometimes


def test_missing_answers_do_not_vote():
    g = Group("q", [False, True, False], [None, "2", None], "2")
    assert select_accuracy(g, "majority", np.arange(3), np.random.default_rng(0), eq) == 1.0
    g = Group("q", [False, False], [None, None], "2")
    assert select_accuracy(g, "majority", np.arange(2), np.random.default_rng(0), eq) == 0.0


def test_best_of_n_k1_random_equals_mean_and_oracle_at_full_size():
    out = best_of_n([GROUP], ["random", "oracle", "argmax:r"], [1, 4], matches=eq, draws=200, resamples=50)
    assert out["random"][1]["mean"] == pytest.approx(0.5, abs=0.1)
    assert out["random"][4]["mean"] == 0.5  # k = group size: every candidate, exactly
    assert out["argmax:r"][1]["mean"] == pytest.approx(0.5, abs=0.1)  # k=1: any selector is a random pick
    assert out["oracle"][4]["mean"] == 1.0
    assert out["argmax:r"][4]["low"] <= out["argmax:r"][4]["mean"] <= out["argmax:r"][4]["high"]


def test_unbiased_pass_at_k():
    assert unbiased_pass_at_k([GROUP], [1, 2, 4]) == pytest.approx({1: 0.5, 2: 1 - 1 / 6, 4: 1.0})


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="k=5 is out of range"):
        best_of_n([GROUP], ["random"], [5], matches=eq)
    with pytest.raises(ValueError, match="needs score 'nope'"):
        select_accuracy(GROUP, "argmax:nope", np.arange(4), np.random.default_rng(0), eq)
    with pytest.raises(ValueError, match="3 answers for 2 candidates"):
        Group("x", [True, False], ["1", "2", "3"], "1")
    with pytest.raises(ValueError, match="unknown selector"):
        select_accuracy(GROUP, "best:r", np.arange(4), np.random.default_rng(0), eq)


def test_fused_selectors_fuse_within_the_subset():
    # a and b disagree; z-score fusion with equal weights picks the candidate good under both
    g = Group(
        "p",
        correct=[False, True, False],
        answers=["1", "2", "3"],
        reference="2",
        scores={"a": [3.0, 2.0, -5.0], "b": [-5.0, 2.0, 3.0]},
    )
    rng = np.random.default_rng(0)
    full = np.arange(3)
    assert select_accuracy(g, "argmax:a", full, rng, str.__eq__) == 0.0
    assert select_accuracy(g, "argmax:b", full, rng, str.__eq__) == 0.0
    assert select_accuracy(g, "fuse:zscore:a+b", full, rng, str.__eq__) == 1.0
    assert select_accuracy(g, "fuse:worst_rank:a+b", full, rng, str.__eq__) == 1.0
    assert select_accuracy(g, "fusevote:minmax:a+b", full, rng, str.__eq__) == 1.0
    # a weight of 0 on b leaves a alone in charge
    assert select_accuracy(g, "fuse:zscore:a+b@1,0", full, rng, str.__eq__) == 0.0
    # within the subset {1, 2} b prefers 2, a prefers 1: equal z-scores tie, the lower index wins
    assert select_accuracy(g, "fuse:zscore:a+b", np.array([1, 2]), rng, str.__eq__) == 1.0
    with pytest.raises(ValueError, match="needs two or more known scores"):
        select_accuracy(g, "fuse:zscore:a+c", full, rng, str.__eq__)
    with pytest.raises(ValueError, match="fusion='median' is unknown"):
        select_accuracy(g, "fuse:median:a+b", full, rng, str.__eq__)
