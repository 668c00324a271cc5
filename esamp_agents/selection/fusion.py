"""Fusing several rewards' scores over one group of N candidates into one ranking.

Rewards live on unrelated scales (a judge's 1..10, a classifier's logit, a hidden-state
reward near 0), so each reward's scores are first made comparable *within the group*:

- ``"zscore"`` (default): standardise each reward (population std), then a weighted sum.
  A constant reward (std 0) contributes 0, so it cannot move the choice.
- ``"minmax"`` (the ELHSR paper's "scaling"): min-max normalise each reward to [0, 1]
  (a constant reward reads 0.5), then a weighted average.
- ``"worst_rank"`` (the paper's "ranking"): rank the candidates under each reward (1 =
  best; equal scores share the better rank), and judge a candidate by its worst rank over
  the rewards with a non-zero weight; the fused value is ``-worst_rank``. Ties are broken by
  the weighted z-score sum, then by index.

Ties under ``zscore``/``minmax`` go to the lowest index, so the order is stable.

Non-finite scores (NaN, +inf, -inf) are treated as *failures of that reward on that
candidate*: the score is replaced by a value strictly below the reward's finite scores in
the group (``min - max(max - min, 1)``), making the candidate the worst for that reward, and
a warning is recorded. A reward whose every score is non-finite becomes constant (it drops
out) with a warning; when every score of every reward is non-finite, :func:`fuse` raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

FUSIONS: tuple[str, ...] = ("zscore", "minmax", "worst_rank")

Scores = Mapping[str, Sequence[float]] | Sequence[Sequence[float]]


@dataclass(frozen=True)
class Fusion:
    """One group's fused scores (higher is better), the ranking (best first) and warnings."""

    fused: list[float]
    order: list[int]
    warnings: list[str] = field(default_factory=list)


def _columns(scores: Scores) -> tuple[list[str], list[list[float]]]:
    if isinstance(scores, Mapping):
        names = [str(k) for k in scores]
        cols = [[float(v) for v in scores[k]] for k in scores]
    else:
        cols = [[float(v) for v in col] for col in scores]
        names = [f"reward {i}" for i in range(len(cols))]
    if not cols:
        raise ValueError("scores is empty; allowed: at least one reward's scores")
    size = len(cols[0])
    if size == 0:
        raise ValueError("scores has 0 candidates; allowed: at least 1 candidate per reward")
    for name, col in zip(names, cols, strict=True):
        if len(col) != size:
            raise ValueError(
                f"{name} has {len(col)} scores but {names[0]} has {size}; allowed: one score per candidate"
            )
    return names, cols


def check_weights(weights: Sequence[float] | Mapping[str, float] | None, names: Sequence[str]) -> list[float]:
    """Weights aligned with ``names`` (default all 1): finite, >= 0, not all 0."""
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"weights name unknown reward(s) {unknown}; allowed: {list(names)}")
        values = [weights.get(name, 1.0) for name in names]
    else:
        values = list(weights)
        if len(values) != len(names):
            raise ValueError(
                f"weights has {len(values)} value(s) for {len(names)} reward(s) {list(names)}; "
                "allowed: exactly one weight per reward"
            )
    out: list[float] = []
    for name, w in zip(names, values, strict=True):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight {w!r} for {name} is invalid; allowed: a finite number >= 0")
        out.append(float(w))
    if not any(out):
        raise ValueError(f"weights={out} are all 0; allowed: at least one weight > 0")
    return out


def sanitize(scores: Scores) -> tuple[list[str], list[list[float]], list[str]]:
    """Replace non-finite scores by a value strictly worse than the reward's finite ones."""
    names, cols = _columns(scores)
    warnings: list[str] = []
    clean: list[list[float]] = []
    for name, col in zip(names, cols, strict=True):
        bad = [i for i, v in enumerate(col) if not math.isfinite(v)]
        if not bad:
            clean.append(col)
            continue
        finite = [v for v in col if math.isfinite(v)]
        if not finite:
            warnings.append(f"{name}: every score is non-finite; it is ignored for this group")
            clean.append([0.0] * len(col))
            continue
        low, high = min(finite), max(finite)
        floor = low - max(high - low, 1.0)
        warnings.append(f"{name}: non-finite score(s) for candidate(s) {bad}; ranked worst for this reward")
        clean.append([floor if i in bad else v for i, v in enumerate(col)])
    return names, clean, warnings


def _zscores(col: Sequence[float]) -> list[float]:
    mean = sum(col) / len(col)
    var = sum((v - mean) ** 2 for v in col) / len(col)
    std = math.sqrt(var)
    if std <= 1e-12 * max(1.0, abs(mean)):
        return [0.0] * len(col)
    return [(v - mean) / std for v in col]


def _minmax(col: Sequence[float]) -> list[float]:
    low, high = min(col), max(col)
    if high - low <= 1e-12 * max(1.0, abs(high), abs(low)):
        return [0.5] * len(col)
    return [(v - low) / (high - low) for v in col]


def _ranks(col: Sequence[float]) -> list[int]:
    """1 = best; equal scores share the better (smaller) rank."""
    return [1 + sum(1 for u in col if u > v) for v in col]


def _weighted_sum(cols: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    return [sum(w * col[i] for w, col in zip(weights, cols, strict=True)) for i in range(len(cols[0]))]


def zscore(scores: Scores, weights: Sequence[float] | Mapping[str, float] | None = None) -> list[float]:
    """Weighted sum of per-reward z-scores (a constant reward contributes 0)."""
    names, cols, _ = sanitize(scores)
    return _weighted_sum([_zscores(c) for c in cols], check_weights(weights, names))


def minmax(scores: Scores, weights: Sequence[float] | Mapping[str, float] | None = None) -> list[float]:
    """Weighted average of per-reward min-max normalised scores, in [0, 1]."""
    names, cols, _ = sanitize(scores)
    w = check_weights(weights, names)
    total = sum(w)
    return [v / total for v in _weighted_sum([_minmax(c) for c in cols], w)]


def worst_rank(scores: Scores, weights: Sequence[float] | Mapping[str, float] | None = None) -> list[float]:
    """``-(worst rank over the rewards with weight > 0)``: higher is better."""
    names, cols, _ = sanitize(scores)
    w = check_weights(weights, names)
    ranks = [_ranks(c) for c, wi in zip(cols, w, strict=True) if wi > 0]
    return [-float(max(r[i] for r in ranks)) for i in range(len(cols[0]))]


def fuse(
    scores: Scores, weights: Sequence[float] | Mapping[str, float] | None = None, method: str = "zscore"
) -> Fusion:
    """Fused scores and the full ranking (ties resolved as documented in the module)."""
    if method not in FUSIONS:
        raise ValueError(f"fusion={method!r} is unknown; allowed: {', '.join(map(repr, FUSIONS))}")
    names, raw = _columns(scores)
    if all(not math.isfinite(v) for col in raw for v in col):
        raise ValueError(f"every score of every reward ({', '.join(names)}) is non-finite; nothing to choose from")
    names, cols, warnings = sanitize(dict(zip(names, raw, strict=True)))
    w = check_weights(weights, names)
    zsum = _weighted_sum([_zscores(c) for c in cols], w)
    indices = range(len(cols[0]))
    if method == "zscore":
        fused = zsum
        order = sorted(indices, key=lambda i: (-fused[i], i))
    elif method == "minmax":
        total = sum(w)
        fused = [v / total for v in _weighted_sum([_minmax(c) for c in cols], w)]
        order = sorted(indices, key=lambda i: (-fused[i], i))
    else:
        ranks = [_ranks(c) for c, wi in zip(cols, w, strict=True) if wi > 0]
        fused = [-float(max(r[i] for r in ranks)) for i in indices]
        order = sorted(indices, key=lambda i: (-fused[i], -zsum[i], i))
    return Fusion(fused=fused, order=order, warnings=warnings)


__all__ = ["FUSIONS", "Fusion", "check_weights", "fuse", "minmax", "sanitize", "worst_rank", "zscore"]
