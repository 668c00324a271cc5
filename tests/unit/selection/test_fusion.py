"""Score fusion: hand-computed z-score, min-max and worst-rank cases, ties, NaN policy, bad weights."""

from __future__ import annotations

import math

import pytest

from esamp_agents.selection.fusion import check_weights, fuse, minmax, sanitize, worst_rank, zscore

A = [1.0, 2.0, 3.0]  # z = [-1.2247, 0, 1.2247]; min-max = [0, .5, 1]; ranks = [3, 2, 1]
B = [3.0, 3.0, 0.0]  # z = [.7071, .7071, -1.4142]; min-max = [1, 1, 0]; ranks = [1, 1, 3]
S32 = math.sqrt(1.5)
S2 = math.sqrt(2.0)


def test_zscore_weighted_sum_by_hand():
    fused = zscore({"a": A, "b": B}, [1.0, 2.0])
    expected = [-S32 + 2 / S2, 0 + 2 / S2, S32 - 2 * S2]
    assert fused == pytest.approx(expected)
    assert fuse({"a": A, "b": B}, [1.0, 2.0]).order == [1, 0, 2]


def test_minmax_weighted_average_by_hand():
    fused = minmax({"a": A, "b": B}, [1.0, 2.0])
    assert fused == pytest.approx([2 / 3, 2.5 / 3, 1 / 3])
    assert fuse({"a": A, "b": B}, [1.0, 2.0], "minmax").order == [1, 0, 2]


def test_worst_rank_by_hand_with_zscore_tie_break():
    # worst ranks: [3, 2, 3]; candidates 0 and 2 tie, the z-sum (0.19 vs -1.60) puts 0 first
    assert worst_rank({"a": A, "b": B}) == [-3.0, -2.0, -3.0]
    result = fuse({"a": A, "b": B}, [1.0, 2.0], "worst_rank")
    assert result.fused == [-3.0, -2.0, -3.0]
    assert result.order == [1, 0, 2]


def test_worst_rank_ignores_zero_weight_rewards_and_shares_ranks():
    # with b's weight 0 only a counts; equal scores share the better rank
    assert worst_rank({"a": [5.0, 5.0, 1.0], "b": [0.0, 9.0, 9.0]}, [1.0, 0.0]) == [-1.0, -1.0, -3.0]


def test_ties_go_to_the_lowest_index():
    for method in ("zscore", "minmax", "worst_rank"):
        assert fuse({"a": [2.0, 5.0, 5.0, 1.0]}, method=method).order == [1, 2, 0, 3]
        assert fuse({"a": [7.0, 7.0, 7.0]}, method=method).order == [0, 1, 2]


def test_constant_reward_contributes_nothing():
    assert zscore({"a": A, "c": [4.0, 4.0, 4.0]}) == pytest.approx(zscore({"a": A}))
    assert minmax({"c": [4.0, 4.0]}) == [0.5, 0.5]
    assert zscore({"a": [3.0]}) == [0.0]  # a single candidate


def test_non_finite_scores_rank_worst_with_a_warning():
    names, cols, warnings = sanitize({"a": [1.0, math.nan, 3.0], "b": [math.inf, 0.0, 0.5]})
    assert names == ["a", "b"]
    assert cols == [[1.0, -1.0, 3.0], [-1.0, 0.0, 0.5]]  # min - max(range, 1)
    assert len(warnings) == 2 and "[1]" in warnings[0] and "[0]" in warnings[1]
    result = fuse({"a": [5.0, math.nan, 4.0]})
    assert result.order == [0, 2, 1]
    assert result.warnings


def test_all_non_finite_reward_is_ignored_but_all_non_finite_everything_raises():
    result = fuse({"a": [math.nan, math.nan], "b": [1.0, 2.0]})
    assert result.order == [1, 0]
    assert any("every score is non-finite" in w for w in result.warnings)
    with pytest.raises(ValueError, match="non-finite"):
        fuse({"a": [math.nan, -math.inf], "b": [math.nan, math.nan]})


def test_weights_must_match_the_rewards():
    with pytest.raises(ValueError, match=r"2 value\(s\) for 3 reward"):
        fuse({"a": A, "b": B, "c": A}, [1.0, 1.0])
    with pytest.raises(ValueError, match="finite number >= 0"):
        check_weights([1.0, -1.0], ["a", "b"])
    with pytest.raises(ValueError, match="finite number >= 0"):
        check_weights([math.nan], ["a"])
    with pytest.raises(ValueError, match="all 0"):
        check_weights([0.0, 0.0], ["a", "b"])
    with pytest.raises(ValueError, match="unknown reward"):
        check_weights({"z": 1.0}, ["a"])
    assert check_weights({"b": 3.0}, ["a", "b"]) == [1.0, 3.0]


def test_bad_shapes_and_methods():
    with pytest.raises(ValueError, match="allowed: 'zscore'"):
        fuse({"a": A}, method="mean")
    with pytest.raises(ValueError, match="one score per candidate"):
        fuse({"a": A, "b": [1.0]})
    with pytest.raises(ValueError, match="at least one reward"):
        fuse({})
    with pytest.raises(ValueError, match="0 candidates"):
        fuse({"a": []})


def test_sequence_input_is_accepted():
    assert zscore([A, B], [1.0, 2.0]) == pytest.approx(zscore({"a": A, "b": B}, [1.0, 2.0]))
