"""Best-of-N accuracy of selectors over groups of graded candidates, with honest baselines.

A problem contributes one group: its candidates' correctness labels, extracted final answers,
and any number of per-candidate scores. Best-of-N@k is estimated by drawing ``draws``
random subsets of size ``k`` from each group (all of them once ``k`` equals the group size)
and asking each selector which candidate (or which answer) it keeps. The per-problem means
are what bootstrap intervals resample, so the intervals say how much the result depends
on which problems were drawn.

Selectors:

- ``random``: the expected accuracy of a uniform pick (the subset's mean correctness);
- ``majority``: the most frequent extracted answer; ties broken uniformly at random
  (seeded); candidates without an answer do not vote;
- ``argmax:<score>``: the candidate with the highest score (ties: the first drawn);
- ``vote:<score>``: answers weighted by ``sigmoid(score)`` (a BCE-trained reward is a logit
  of "correct"), the heaviest answer wins;
- ``zvote:<score>``: answers weighted by ``softmax(z(score))`` within the subset, as
  :class:`~esamp_agents.selection.best_of_n.BestOfN`'s ``vote`` strategy does with one reward and
  ``vote_temperature=1`` (it needs no calibrated reward);
- ``oracle``: 1 if any candidate of the subset is correct (pass@k without the estimator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from esamp_agents.evaluation.metrics import bootstrap_ci, pass_at_k


@dataclass
class Group:
    """One problem's candidates: labels, extracted answers, and named scores (same order)."""

    problem_id: str
    correct: Sequence[bool]
    answers: Sequence[str | None]
    reference: str
    scores: Mapping[str, Sequence[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.correct)
        if n == 0:
            raise ValueError(f"group {self.problem_id!r} has no candidates; allowed: at least one")
        if len(self.answers) != n:
            raise ValueError(f"group {self.problem_id!r}: {len(self.answers)} answers for {n} candidates")
        for name, values in self.scores.items():
            if len(values) != n:
                raise ValueError(f"group {self.problem_id!r}: score {name!r} has {len(values)} values for {n}")


AnswerMatcher = Callable[[str | None, str], bool]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _vote(
    idx: np.ndarray, answers: Sequence[str | None], weights: Sequence[float] | None, rng: np.random.Generator
) -> str | None:
    totals: dict[str, float] = {}
    for i in idx:
        a = answers[i]
        if a is None:
            continue
        totals[a] = totals.get(a, 0.0) + (1.0 if weights is None else weights[i])
    if not totals:
        return None
    best = max(totals.values())
    tied = sorted(a for a, w in totals.items() if w == best)
    return tied[int(rng.integers(len(tied)))] if len(tied) > 1 else tied[0]


def select_accuracy(
    group: Group, selector: str, idx: np.ndarray, rng: np.random.Generator, matches: AnswerMatcher
) -> float:
    """Accuracy (0..1) of ``selector`` on the candidates ``idx`` of ``group``."""
    correct = np.asarray(group.correct, dtype=bool)
    if selector == "random":
        return float(correct[idx].mean())
    if selector == "oracle":
        return float(correct[idx].any())
    if selector == "majority":
        return float(matches(_vote(idx, group.answers, None, rng), group.reference))
    kind, _, name = selector.partition(":")
    if kind in ("fuse", "fusevote"):
        return _fused_accuracy(group, kind, name, idx, rng, matches)
    if name not in group.scores:
        raise ValueError(f"selector {selector!r} needs score {name!r}; this group has {sorted(group.scores)}")
    scores = np.asarray(group.scores[name], dtype=np.float64)
    if kind == "argmax":
        sub = scores[idx]
        sub = np.where(np.isfinite(sub), sub, -np.inf)
        return float(correct[idx[int(np.argmax(sub))]])
    if kind == "vote":
        weights = [_sigmoid(float(s)) if math.isfinite(s) else 0.0 for s in scores]
        return float(matches(_vote(idx, group.answers, weights, rng), group.reference))
    if kind == "zvote":
        return _zvote(group, scores[idx], idx, rng, matches)
    raise ValueError(f"unknown selector {selector!r}; allowed: {ALLOWED_SELECTORS}")


ALLOWED_SELECTORS = (
    "random, majority, oracle, argmax:<score>, vote:<score>, zvote:<score>, "
    "fuse:<zscore|minmax|worst_rank>:<score>+<score>[@w1,w2], fusevote:<method>:<score>+<score>[@w1,w2]"
)


def _zvote(group: Group, sub: np.ndarray, idx: np.ndarray, rng: np.random.Generator, matches: AnswerMatcher) -> float:
    """Vote weighted by the softmax of the z-scored ``sub`` (the scores of ``idx``), as BestOfN's vote."""
    sub = np.where(np.isfinite(sub), sub, np.nan)
    sub = np.nan_to_num(sub, nan=np.nanmin(sub) if np.isfinite(sub).any() else 0.0)
    std = sub.std()
    z = (sub - sub.mean()) / std if std > 1e-12 else np.zeros_like(sub)
    w = np.exp(z - z.max())
    weights = np.zeros(len(group.correct))
    weights[idx] = w / w.sum()
    return float(matches(_vote(idx, group.answers, list(weights), rng), group.reference))


def _fused_accuracy(
    group: Group, kind: str, spec: str, idx: np.ndarray, rng: np.random.Generator, matches: AnswerMatcher
) -> float:
    """Several scores fused WITHIN the subset (as BestOfN fuses its N candidates), then argmax or vote."""
    from esamp_agents.selection.fusion import fuse

    method, _, rest = spec.partition(":")
    names_text, _, weights_text = rest.partition("@")
    names = names_text.split("+")
    missing = [n for n in names if n not in group.scores]
    if len(names) < 2 or missing:
        raise ValueError(
            f"selector {kind}:{spec!r} needs two or more known scores; this group has {sorted(group.scores)}"
        )
    weights = [float(w) for w in weights_text.split(",")] if weights_text else None
    sub = {n: [float(group.scores[n][i]) for i in idx] for n in names}
    fused = fuse(sub, weights, method)
    if kind == "fuse":
        return float(group.correct[idx[fused.order[0]]])
    return _zvote(group, np.asarray(fused.fused, dtype=np.float64), idx, rng, matches)


def best_of_n(
    groups: Sequence[Group],
    selectors: Sequence[str],
    ks: Sequence[int],
    *,
    matches: AnswerMatcher,
    draws: int = 32,
    seed: int = 0,
    resamples: int = 1000,
) -> dict[str, dict[int, dict[str, float]]]:
    """``{selector: {k: {"mean", "low", "high"}}}``: Best-of-N@k with 95% bootstrap CIs over problems.

    Every selector sees the same subsets (paired comparison).
    """
    if not groups:
        raise ValueError("groups=[] is empty; allowed: at least one problem")
    n_min = min(len(g.correct) for g in groups)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_min:
            raise ValueError(f"k={k!r} is out of range; allowed: 1 <= k <= {n_min} (the smallest group)")
    if draws < 1:
        raise ValueError(f"draws={draws!r} is out of range; allowed: draws >= 1")
    rng = np.random.default_rng(seed)
    per_problem: dict[str, dict[int, list[float]]] = {s: {k: [] for k in ks} for s in selectors}
    for group in groups:
        n = len(group.correct)
        for k in ks:
            subsets = [np.arange(n)] if k == n else [rng.permutation(n)[:k] for _ in range(draws)]
            for s in selectors:
                per_problem[s][k].append(
                    float(np.mean([select_accuracy(group, s, idx, rng, matches) for idx in subsets]))
                )
    out: dict[str, dict[int, dict[str, float]]] = {}
    for s in selectors:
        out[s] = {}
        for k in ks:
            mean, low, high = bootstrap_ci(per_problem[s][k], resamples=resamples, seed=seed)
            out[s][k] = {"mean": mean, "low": low, "high": high}
    return out


def unbiased_pass_at_k(groups: Sequence[Group], ks: Sequence[int]) -> dict[int, float]:
    """Mean unbiased pass@k (Chen et al.) over problems."""
    return {k: float(np.mean([pass_at_k(len(g.correct), int(sum(g.correct)), k) for g in groups])) for k in ks}


__all__ = ["ALLOWED_SELECTORS", "AnswerMatcher", "Group", "best_of_n", "select_accuracy", "unbiased_pass_at_k"]
