"""Evaluation harness: task x sampler x selector -> ``results.json`` and PNG plots.

Answers two questions with error bars: do a sampler's N candidates hold more right answers
and more different ones (unbiased pass@k, diversity), and how often does a selector pick a
right one (Best-of-N@k)? Bootstrap intervals resample problems, so they say how much a
number depends on which problems were drawn.

Generations are cached with :func:`esamp_agents.hidden_reward.collect.collect`, one folder per sampler, so an
interrupted run continues where it stopped, a finished one regenerates nothing, and metrics,
selectors and plots can be recomputed for free. With a reward head the head's features are
captured during decoding into the collect shards and scored from there (no second pass).

Layout of ``out_dir``:

- ``generations/<sampler folder>/``: a collect folder (``manifest.json``, ``records.jsonl``,
  ``shards/``) plus ``timing.json`` (wall seconds of the generation runs that wrote records);
- ``results.json``: settings and every metric per sampler (written atomically);
- ``pass_at_k.png``, ``best_of_n.png``, ``diversity_quality.png``.

Samplers are strings: ``vanilla`` (plain sampling), ``esamp`` (the package's ESamp defaults),
``esamp:BETA`` (no warm start) / ``esamp:BETA:warmSTEPS`` (Exploratory Sampling) and ``minp:P``
(plain sampling with min-p), each with optional ``:key=value`` options (:data:`SAMPLER_USAGE`);
temperature, top-k, top-p and the token budget are shared unless a sampler sets ``:t=``, and
every sampler uses the same seed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import numbers
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from esamp_agents.atomic import atomic_write_bytes
from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, Problem, answers_match
from esamp_agents.hidden_reward.collect_ray import add_ray_args, ray_options_from_args
from esamp_agents.validation import check_int

if TYPE_CHECKING:  # the heavy modules (torch) load on first use, so the CLI starts fast
    import torch

    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.loading import LoadedModel
    from esamp_agents.hidden_reward.collect_ray import RayOptions
    from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead

FORMAT_NAME = "esamp-agents/eval"
FORMAT_VERSION = 1
GENERATIONS = "generations"
RESULTS = "results.json"
TIMING = "timing.json"
PLOT_FILES = ("pass_at_k.png", "best_of_n.png", "diversity_quality.png")
SCORE_NAMES = ("mean_logprob", "reward")
SAMPLER_USAGE = (
    "allowed: vanilla, esamp (the defaults), esamp:BETA, esamp:BETA:warmSTEPS (0 < BETA <= 100, 0 <= STEPS <= 10000), "
    "minp:P (0 < P < 1), each optionally followed by ':t=TEMPERATURE' (0 < T <= 10); esamp also by "
    "':warm_lr=LR' (0 < LR <= 1), ':width=W' (1 <= W <= 65536), ':shared' (one Distiller for all prompts) "
    "and ':min_p=P'"
)
SELECTOR_USAGE = f"allowed: random, majority, oracle, argmax:SCORE, vote:SCORE with SCORE in {', '.join(SCORE_NAMES)}"
MATPLOTLIB_MISSING = "plots skipped: matplotlib is not installed (pip install 'matplotlib>=3.8')"
SELECTOR_LABELS = {
    "random": "random pick",
    "majority": "majority vote",
    "oracle": "oracle (any correct)",
    "argmax:mean_logprob": "highest mean logprob",
    "argmax:reward": "highest reward",
    "vote:reward": "reward-weighted vote",
    "vote:mean_logprob": "logprob-weighted vote",
}

Interval = dict[str, float | None]


# --------------------------------------------------------------------------- samplers


def _num(x: float) -> str:
    """Shortest exact spelling of a float, without a trailing '.0' (stable folder names)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Sampler:
    """One way to sample candidates; ``name`` is its canonical spelling, ``folder`` its cache folder.

    ``None`` options take the run's shared setting (temperature) or the :class:`ESampParams` default.
    """

    kind: Literal["vanilla", "esamp", "minp"]
    beta: float = 0.0
    min_p: float = 0.0
    warm_start_steps: int = 0
    warm_start_lr: float | None = None
    distiller_width: int | None = None
    shared_distiller: bool = False
    temperature: float | None = None

    def __post_init__(self) -> None:
        plain = (
            self.beta == 0
            and self.warm_start_steps == 0
            and self.warm_start_lr is None
            and self.distiller_width is None
            and not self.shared_distiller
        )
        ok = {
            "vanilla": plain and self.min_p == 0,
            "esamp": 0 < self.beta <= 100 and 0 <= self.min_p < 1 and 0 <= self.warm_start_steps <= 10000,
            "minp": plain and 0 < self.min_p < 1,
        }
        temperature_ok = self.temperature is None or 0 < self.temperature <= 10
        if not ok.get(self.kind, False) or not temperature_ok:
            raise ValueError(f"{self!r} is not a valid sampler; {SAMPLER_USAGE}")
        if self.kind == "esamp":
            self.esamp_params()  # range-checks width and warm-start lr

    @property
    def name(self) -> str:
        if self.kind == "vanilla":
            parts = ["vanilla"]
        elif self.kind == "minp":
            parts = ["minp", _num(self.min_p)]
        else:
            parts = ["esamp", _num(self.beta)]
            if self.warm_start_steps:
                parts.append(f"warm{self.warm_start_steps}")
            if self.warm_start_lr is not None:
                parts.append(f"warm_lr={_num(self.warm_start_lr)}")
            if self.distiller_width is not None:
                parts.append(f"width={self.distiller_width}")
            if self.shared_distiller:
                parts.append("shared")
            if self.min_p:
                parts.append(f"min_p={_num(self.min_p)}")
        if self.temperature is not None:
            parts.append(f"t={_num(self.temperature)}")
        return ":".join(parts)

    @property
    def folder(self) -> str:
        return self.name.replace(":", "_")  # no ':' in paths (Windows)

    def esamp_params(self) -> ESampParams:
        extra: dict[str, Any] = {}
        if self.warm_start_lr is not None:
            extra["warm_start_lr"] = self.warm_start_lr
        if self.distiller_width is not None:
            extra["distiller_width"] = self.distiller_width
        return ESampParams(
            beta=self.beta, warm_start_steps=self.warm_start_steps, shared_distiller=self.shared_distiller, **extra
        )

    def sampling_params(
        self, *, n: int, temperature: float, top_k: int, top_p: float, max_tokens: int, seed: int
    ) -> SamplingParams:
        return SamplingParams(
            n=n,
            max_new_tokens=max_tokens,
            temperature=temperature if self.temperature is None else self.temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=self.min_p,
            seed=seed,
        )


def _parse_float(text: str, spec: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"sampler {spec!r}: {what}={text!r} is not a number; {SAMPLER_USAGE}") from None
    if not math.isfinite(value):
        raise ValueError(f"sampler {spec!r}: {what}={text!r} is not finite; {SAMPLER_USAGE}")
    return value


def _parse_options(spec: str, kind: str, tokens: list[str]) -> dict[str, Any]:
    """The ``:key=value`` / ``:shared`` options after a sampler's positional parts."""
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for token in tokens:
        key, eq, value = token.partition("=")
        esamp_only = key in ("warm_lr", "width", "shared", "min_p")
        if key in seen or (esamp_only and kind != "esamp") or (bool(eq) == (key == "shared")):
            raise ValueError(f"sampler {spec!r}: option {token!r} is not understood here; {SAMPLER_USAGE}")
        seen.add(key)
        if key == "t":
            t = _parse_float(value, spec, "t")
            if not 0.0 < t <= 10.0:
                raise ValueError(f"sampler {spec!r}: t={t!r} is out of range; allowed: 0 < t <= 10")
            out["temperature"] = t
        elif key == "warm_lr":
            lr = _parse_float(value, spec, "warm_lr")
            if not 0.0 < lr <= 1.0:
                raise ValueError(f"sampler {spec!r}: warm_lr={lr!r} is out of range; allowed: 0 < warm_lr <= 1")
            out["warm_start_lr"] = lr
        elif key == "width":
            if not value.isdigit() or not 1 <= int(value) <= 65536:
                raise ValueError(f"sampler {spec!r}: width={value!r} is out of range; allowed: 1 <= width <= 65536")
            out["distiller_width"] = int(value)
        elif key == "min_p":
            p = _parse_float(value, spec, "min_p")
            if not 0.0 < p < 1.0:
                raise ValueError(f"sampler {spec!r}: min_p={p!r} is out of range; allowed: 0 < min_p < 1")
            out["min_p"] = p
        elif key == "shared":
            out["shared_distiller"] = True
        else:
            raise ValueError(f"sampler {spec!r}: option {token!r} is not understood; {SAMPLER_USAGE}")
    return out


def parse_sampler(spec: str | Sampler) -> Sampler:
    """``vanilla``, ``esamp[:BETA[:warmSTEPS]]`` or ``minp:P``, then options -> :class:`Sampler` (range-checked)."""
    if isinstance(spec, Sampler):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"sampler {spec!r} must be a string; {SAMPLER_USAGE}")
    kind, *rest = spec.strip().split(":")
    positional = [t for t in rest if "=" not in t and t != "shared"]
    options = rest[len(positional) :]
    if positional != rest[: len(positional)]:
        raise ValueError(f"sampler {spec!r}: options must come after BETA/STEPS/P; {SAMPLER_USAGE}")
    if kind == "vanilla" and not positional:
        return Sampler("vanilla", **_parse_options(spec, kind, options))
    if kind == "esamp" and len(positional) <= 2:
        beta = _parse_float(positional[0], spec, "BETA") if positional else ESampParams.beta
        if not 0.0 < beta <= 100.0:
            raise ValueError(
                f"sampler {spec!r}: BETA={beta!r} is out of range; allowed: 0 < BETA <= 100 (for beta 0 use 'vanilla')"
            )
        warm = 0 if positional else ESampParams.warm_start_steps  # bare 'esamp': the package defaults
        if len(positional) == 2:
            match = re.fullmatch(r"warm(\d+)", positional[1])
            if match is None or int(match.group(1)) > 10000:
                raise ValueError(
                    f"sampler {spec!r}: {positional[1]!r} is not warmSTEPS with 0 <= STEPS <= 10000; {SAMPLER_USAGE}"
                )
            warm = int(match.group(1))
        return Sampler("esamp", beta=beta, warm_start_steps=warm, **_parse_options(spec, kind, options))
    if kind == "minp" and len(positional) == 1:
        p = _parse_float(positional[0], spec, "P")
        if not 0.0 < p < 1.0:
            raise ValueError(f"sampler {spec!r}: P={p!r} is out of range; allowed: 0 < P < 1")
        return Sampler("minp", min_p=p, **_parse_options(spec, kind, options))
    raise ValueError(f"sampler {spec!r} is not understood; {SAMPLER_USAGE}")


def parse_samplers(specs: Sequence[str | Sampler]) -> list[Sampler]:
    """Parse every sampler; two spellings of the same sampler (``esamp`` and ``esamp:0.1:warm20``) are rejected."""
    if isinstance(specs, (str, Sampler)) or not isinstance(specs, Sequence) or not specs:
        raise ValueError(f"samplers={specs!r} must be a non-empty list; {SAMPLER_USAGE}")
    out: list[Sampler] = []
    seen: dict[str, str | Sampler] = {}
    for spec in specs:
        sampler = parse_sampler(spec)
        if sampler.name in seen:
            raise ValueError(f"samplers {seen[sampler.name]!r} and {spec!r} are the same sampler ({sampler.name})")
        seen[sampler.name] = spec
        out.append(sampler)
    return out


# --------------------------------------------------------------------------- checks


def default_ks(n: int) -> list[int]:
    """Powers of two below ``n``, and ``n``."""
    n = check_int("n", n, 1)
    return sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})


def check_ks(ks: Sequence[int], n: int) -> list[int]:
    """Sorted ks, each ``1 <= k <= n`` and none twice."""
    n = check_int("n", n, 1)
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
        raise ValueError(f"ks={ks!r} must be a non-empty list of integers; allowed: 1 <= k <= n = {n}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
            raise ValueError(f"k={k!r} in ks={list(ks)!r} is out of range; allowed: 1 <= k <= n = {n}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks={list(ks)!r} names a k twice; allowed: distinct values")
    return sorted(int(k) for k in ks)


def default_selectors(has_reward: bool) -> list[str]:
    """random, majority, highest mean logprob, (the reward's argmax and vote,) oracle."""
    selectors = ["random", "majority", "argmax:mean_logprob"]
    if has_reward:
        selectors += ["argmax:reward", "vote:reward"]
    return [*selectors, "oracle"]


def check_selectors(selectors: Sequence[str], has_reward: bool) -> list[str]:
    """Validated selector names; ``*:reward`` needs a reward head."""
    if isinstance(selectors, str) or not isinstance(selectors, Sequence) or not selectors:
        raise ValueError(f"selectors={selectors!r} must be a non-empty list; {SELECTOR_USAGE}")
    out: list[str] = []
    for s in selectors:
        if not isinstance(s, str):
            raise ValueError(f"selector {s!r} must be a string; {SELECTOR_USAGE}")
        kind, sep, score = s.partition(":")
        plain = not sep and kind in ("random", "majority", "oracle")
        if not plain and not (sep and kind in ("argmax", "vote") and score in SCORE_NAMES):
            raise ValueError(f"selector {s!r} is not understood; {SELECTOR_USAGE}")
        if score == "reward" and not has_reward:
            raise ValueError(f"selector {s!r} needs a reward head; pass reward_head= (CLI: --reward shipped|PATH)")
        if s in out:
            raise ValueError(f"selector {s!r} is given twice")
        out.append(s)
    return out


def _check_problems(problems: Sequence[Problem]) -> list[Problem]:
    if isinstance(problems, (str, bytes)) or not isinstance(problems, Sequence) or not problems:
        raise ValueError("problems must be a non-empty list of Problem (e.g. tasks.load_problems('single_digit:50'))")
    ids: set[str] = set()
    for i, p in enumerate(problems):
        if not isinstance(p, Problem):
            raise ValueError(f"problems[{i}] is a {type(p).__name__}, not a Problem")
        if p.id in ids:
            raise ValueError(f"problem id {p.id!r} appears twice; ids must be unique (the cache is keyed by id)")
        ids.add(p.id)
    return list(problems)


def resolve_reward_head(value: GatedLinearHead | str | Path | None) -> tuple[GatedLinearHead | None, str | None]:
    """(head, path): ``None``/``"none"`` -> no head, ``"shipped"`` -> the packaged head, else a checkpoint path."""
    from esamp_agents.hidden_reward.head import GatedLinearHead, load_head

    if value is None or (isinstance(value, str) and value == "none"):
        return None, None
    if isinstance(value, GatedLinearHead):
        head, path = value, None
    else:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"reward_head={value!r} must be a GatedLinearHead, 'shipped', 'none' or a checkpoint path")
        if isinstance(value, str) and value == "shipped":
            from esamp_agents.hidden_reward.reward import shipped_head_path

            value = shipped_head_path()
        path = str(value)
        head = load_head(value)
    if head.spec.kind != "hidden":
        raise ValueError(f"reward head reads features of kind {head.spec.kind!r}; the harness needs kind 'hidden'")
    return head, path


# --------------------------------------------------------------------------- files


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats become null; tuples become lists, keys strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if math.isfinite(value) else None


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8"))


def _read_timing(folder: Path) -> dict[str, Any] | None:
    try:
        timing = json.loads((folder / TIMING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return timing if isinstance(timing, dict) and isinstance(timing.get("seconds"), (int, float)) else None


def _add_timing(folder: Path, seconds: float) -> None:
    old = _read_timing(folder) or {"seconds": 0.0, "runs": 0}
    _write_json(folder / TIMING, {"seconds": float(old["seconds"]) + seconds, "runs": int(old.get("runs", 0)) + 1})


def _folder_spec(
    folder: Path, head: GatedLinearHead | None, loaded: LoadedModel, sampling: SamplingParams, esamp: ESampParams
) -> FeatureSpec | None:
    """The feature spec to collect with: the folder's own when it exists (so it resumes), else the head's.

    Also checks an existing folder's settings now, so a mismatch fails before any sampler generates.
    """
    from esamp_agents.hidden_reward.collect import check_manifest, make_manifest, read_manifest
    from esamp_agents.hidden_reward.head import FeatureSpec

    if (folder / "manifest.json").exists():
        stored = read_manifest(folder)
        spec = FeatureSpec.from_dict(stored["spec"]) if stored.get("spec") is not None else None
        check_manifest(stored, make_manifest(loaded, spec, sampling, esamp, DEFAULT_SUFFIX), folder)
        return spec
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    return head.spec if head is not None else None


# --------------------------------------------------------------------------- scoring


def _columns(stored: FeatureSpec, wanted: FeatureSpec) -> torch.Tensor | None:
    """Columns of ``stored`` features holding ``wanted``'s layers (None: they are the same features)."""
    import torch

    if stored.layers == wanted.layers:
        return None
    d = stored.hidden_size
    return torch.cat(
        [torch.arange(stored.layers.index(layer) * d, (stored.layers.index(layer) + 1) * d) for layer in wanted.layers]
    )


def reward_scores(
    folder: str | Path, records: Sequence[Mapping[str, Any]], head: GatedLinearHead, loaded: LoadedModel
) -> tuple[list[float], str]:
    """The head's reward of each record and where the features came from (``"shards"`` or ``"posthoc"``).

    Features recorded during decoding are read from the shards when they hold the head's layers;
    a folder collected without them (or with other layers) is scored by one post-hoc forward pass.
    """
    import torch
    from safetensors import safe_open

    from esamp_agents.hidden_reward.collect import CollectFormatError, read_manifest
    from esamp_agents.hidden_reward.features import posthoc_rewards
    from esamp_agents.hidden_reward.head import FeatureSpec

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["model"] != loaded.name:
        raise ValueError(f"{folder} was generated by model {manifest['model']!r}, not {loaded.name!r}")
    stored = FeatureSpec.from_dict(manifest["spec"]) if manifest.get("spec") is not None else None
    if stored is None or not set(head.spec.layers) <= set(stored.layers) or stored.hidden_size != head.spec.hidden_size:
        prompts = [r["prompt_token_ids"] for r in records]
        return posthoc_rewards(head, loaded, prompts, [r["token_ids"] for r in records]), "posthoc"
    cols = _columns(stored, head.spec)
    scores = [0.0] * len(records)
    by_shard: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.get("shard") is None:
            raise CollectFormatError(
                f"{folder}: record of problem {r['problem_id']!r} sample {r['sample']} has no shard"
            )
        by_shard.setdefault(r["shard"], []).append(i)
    for name, idx in by_shard.items():
        path = folder / name
        if not path.is_file():
            raise CollectFormatError(f"shard {path} referenced by the records is missing")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            part = f.get_slice("features")
            for i in idx:
                r = records[i]
                if r["length"] == 0:
                    continue  # no tokens: reward 0, as the decode-time observer gives
                x = part[r["offset"] : r["offset"] + r["length"]]
                if cols is not None:
                    x = x.index_select(1, cols)
                with torch.no_grad():
                    scores[i] = float(head(x.float().unsqueeze(0), torch.ones(1, x.shape[0], dtype=torch.bool))[0])
    return scores, "shards"


# --------------------------------------------------------------------------- metrics


def _interval(values: Sequence[float | None], seed: int, resamples: int) -> Interval:
    """Mean and 95% bootstrap CI over problems; problems without a value (NaN/None) are left out."""
    from esamp_agents.evaluation.metrics import bootstrap_ci

    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return {"mean": None, "low": None, "high": None}
    mean, low, high = bootstrap_ci(kept, resamples=resamples, seed=seed)
    return {"mean": mean, "low": low, "high": high}


def _distinct_answers(answers: Sequence[str | None]) -> int:
    """Distinct extracted answers, counting values that match ('12' and '12.0') once."""
    kinds: list[str] = []
    for a in answers:
        if a is not None and not any(answers_match(a, k) for k in kinds):
            kinds.append(a)
    return len(kinds)


def _grouped(records: list[dict[str, Any]], problems: Sequence[Problem], n: int, folder: Path) -> list[list[dict]]:
    from esamp_agents.hidden_reward.collect import CollectFormatError

    by_problem: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r)
    groups = []
    for p in problems:
        group = sorted(by_problem.get(p.id, []), key=lambda r: r["sample"])
        if len(group) != n:
            raise CollectFormatError(f"{folder} holds {len(group)} candidates of problem {p.id!r}, expected n={n}")
        groups.append(group)
    return groups


def _sampler_metrics(
    groups: list[list[dict[str, Any]]],
    *,
    ks: list[int],
    selectors: list[str],
    rewards: list[float] | None,
    embedder: Any,
    seed: int,
    draws: int,
    resamples: int,
) -> dict[str, Any]:
    """Every metric of one sampler's candidates (``groups``: per problem, its n records)."""
    import numpy as np

    from esamp_agents.evaluation.metrics import distinct_n, mean_pairwise_similarity, pass_at_k, perplexity, vendi_score
    from esamp_agents.evaluation.selectors import Group, best_of_n

    def ci(values: Sequence[float | None]) -> Interval:
        return _interval(values, seed, resamples)

    n = len(groups[0])
    flat = [r for g in groups for r in g]
    correct = [[bool(r["correct"]) for r in g] for g in groups]
    eval_groups = []
    for j, g in enumerate(groups):
        scores = {"mean_logprob": [r["mean_logprob"] if r["mean_logprob"] is not None else -math.inf for r in g]}
        if rewards is not None:
            scores["reward"] = rewards[j * n : (j + 1) * n]
        eval_groups.append(
            Group(
                problem_id=g[0]["problem_id"],
                correct=correct[j],
                answers=[r["extracted"] for r in g],
                reference=g[0]["answer"],
                scores=scores,
            )
        )
    wanted = selectors if "majority" in selectors else [*selectors, "majority"]
    bon = best_of_n(eval_groups, wanted, ks, matches=answers_match, draws=draws, seed=seed, resamples=resamples)
    texts = [[r["text"] for r in g] for g in groups]
    ppl = [[perplexity(r["logprobs"]) for r in g if r["logprobs"]] for g in groups]
    diversity: dict[str, Any] = {
        "distinct_answers": ci([_distinct_answers([r["extracted"] for r in g]) for g in groups]),
        "distinct_1": ci([distinct_n(t, 1) for t in texts]),
        "distinct_2": ci([distinct_n(t, 2) for t in texts]),
        "embedding_similarity": None,
        "vendi": None,
    }
    if embedder is not None:
        emb = embedder.embed([t for ts in texts for t in ts])
        parts = [emb[j * n : (j + 1) * n] for j in range(len(groups))]
        diversity["embedding_similarity"] = ci([mean_pairwise_similarity(e) for e in parts])
        diversity["vendi"] = ci([vendi_score(e) for e in parts])
    return {
        "problems": len(groups),
        "candidates": len(flat),
        "accuracy": ci([float(np.mean(c)) for c in correct]),
        "pass_at_k": {k: ci([pass_at_k(n, sum(c), k) for c in correct]) for k in ks},
        "best_of_n": {s: bon[s] for s in selectors},
        "majority_at_k": bon["majority"],
        "diversity": diversity,
        "perplexity": ci([float(np.mean(v)) if v else None for v in ppl]),
        "mean_tokens": float(np.mean([len(r["token_ids"]) for r in flat])),
        "stop_rate": float(np.mean([r["finish_reason"] == "stop" for r in flat])),
        "reward": None if rewards is None else {"mean": float(np.mean(rewards))},
    }


# --------------------------------------------------------------------------- the run


def _generate(
    engine: ESampEngine,
    problems: list[Problem],
    folder: Path,
    *,
    sampling: SamplingParams,
    esamp: ESampParams,
    spec: FeatureSpec | None,
    prompts_per_call: int,
    progress: bool,
    ray: tuple[RayOptions, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Collect the missing candidates; time the runs that wrote records (kept in ``timing.json``)."""
    from esamp_agents.hidden_reward.collect import RECORDS, collect
    from esamp_agents.hidden_reward.collect_ray import collect_ray

    records = folder / RECORDS
    before = records.stat().st_size if records.exists() else 0
    start = time.perf_counter()
    finished = False
    try:
        if ray is not None:
            summary = collect_ray(
                problems, folder, **ray[1], sampling=sampling, esamp=esamp, spec=spec,
                prompts_per_call=prompts_per_call, ray_options=ray[0], progress=progress,
            )  # fmt: skip
        else:
            summary = collect(
                engine, problems, folder, sampling=sampling, esamp=esamp, spec=spec,
                prompts_per_call=prompts_per_call, progress=progress,
            )  # fmt: skip
        finished = True
    finally:
        seconds = time.perf_counter() - start
        if (records.stat().st_size if records.exists() else 0) != before:
            if finished:
                _add_timing(folder, seconds)
            else:  # interrupted: keep the partial time if we can, never hide the real error
                with contextlib.suppress(OSError):
                    _add_timing(folder, seconds)
    return {
        "problems_generated": summary.problems_done,
        "problems_cached": summary.problems_skipped,
        "seconds_this_run": summary.seconds,
    }


def _check_ray(
    options: RayOptions | None, model_load: Mapping[str, Any] | None, loaded: LoadedModel
) -> tuple[RayOptions, dict[str, Any]] | None:
    """``(options, load_model kwargs)`` for the Ray path after checking they name the engine's model."""
    from esamp_agents.decoding.loading import load_model
    from esamp_agents.hidden_reward.collect_ray import RayOptions, require_ray

    if options is None:
        if model_load is not None:
            raise ValueError("model_load only applies with ray_options")
        return None
    if not isinstance(options, RayOptions):
        raise ValueError(f"ray_options must be RayOptions, got {type(options).__name__}")
    require_ray()
    kwargs = dict(model_load or {"model": "embedded"})
    unknown = set(kwargs) - {"model", "dtype", "device"}
    if unknown or "model" not in kwargs:
        raise ValueError(f"model_load={model_load!r}: allowed keys are model (required), dtype, device")
    if load_model(**kwargs) is not loaded:
        raise ValueError(f"model_load={model_load!r} does not load the engine's model ({loaded.name})")
    return options, kwargs


def run_eval(
    problems: Sequence[Problem],
    samplers: Sequence[str | Sampler],
    *,
    n: int,
    ks: Sequence[int],
    selectors: Sequence[str] | None = None,
    out_dir: str | Path,
    engine: ESampEngine,
    reward_head: GatedLinearHead | str | Path | None = None,
    diversity: bool = True,
    plots: bool = True,
    seed: int = 0,
    progress: bool = True,
    temperature: float = 0.7,
    top_k: int = SamplingParams.top_k,
    top_p: float = 1.0,
    max_tokens: int = 64,
    prompts_per_call: int = 4,
    draws: int = 32,
    resamples: int = 1000,
    meta: Mapping[str, Any] | None = None,
    ray_options: RayOptions | None = None,
    model_load: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate (cached, resumable) and evaluate ``n`` candidates per problem for each sampler.

    ``selectors=None`` uses :func:`default_selectors`. ``reward_head``: a head, a checkpoint path,
    ``"shipped"`` or None. With ``ray_options`` the candidates are generated on Ray actors
    (:func:`esamp_agents.hidden_reward.collect_ray.collect_ray`), each loading ``model_load`` (the
    :func:`~esamp_agents.decoding.loading.load_model` arguments ``model``, ``dtype``, ``device`` of
    ``engine``'s model). Every argument is checked before anything is generated or written.
    Returns the dict written to ``out_dir/results.json`` (JSON types: k keys are strings,
    missing values null).
    """
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.evaluation.metrics import embedder_model_dir, load_embedder
    from esamp_agents.hidden_reward.collect import read_records
    from esamp_agents.hidden_reward.head import check_compatible

    start = time.perf_counter()
    problems = _check_problems(problems)
    parsed = parse_samplers(samplers)
    ks = check_ks(ks, n)
    head, head_path = resolve_reward_head(reward_head)
    selectors = check_selectors(
        default_selectors(head is not None) if selectors is None else selectors, head is not None
    )
    shared = {
        "n": n,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "seed": seed,
    }
    plan = {s.name: (s, s.sampling_params(**shared), s.esamp_params()) for s in parsed}
    prompts_per_call = check_int("prompts_per_call", prompts_per_call, 1)
    draws = check_int("draws", draws, 1)
    resamples = check_int("resamples", resamples, 1)
    if not isinstance(engine, ESampEngine):
        raise ValueError(f"engine must be an ESampEngine, got {type(engine).__name__}")
    loaded = engine.loaded
    ray = _check_ray(ray_options, model_load, loaded)
    if head is not None:
        check_compatible(
            head.spec, base_model=loaded.name, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r} exists and is not a folder")
    if diversity:
        embedder_model_dir()  # fail now, not after the generation, when MiniLM is not installed
    if plots and importlib.util.find_spec("matplotlib") is None:
        warnings.warn(MATPLOTLIB_MISSING, stacklevel=2)
        plots = False
        plots_skipped = MATPLOTLIB_MISSING
    else:
        plots_skipped = None if plots else "disabled (plots=False)"
    specs = {
        name: _folder_spec(out / GENERATIONS / s.folder, head, loaded, sp, es) for name, (s, sp, es) in plan.items()
    }

    generation: dict[str, dict[str, Any]] = {}
    for i, (name, (s, sp, es)) in enumerate(plan.items()):
        if progress:
            print(f"[eval] sampler {name} ({i + 1}/{len(plan)}): {len(problems)} problems x {n}", file=sys.stderr)
        generation[name] = _generate(
            engine,
            problems,
            out / GENERATIONS / s.folder,
            sampling=sp,
            esamp=es,
            spec=specs[name],
            prompts_per_call=prompts_per_call,
            progress=progress,
            ray=ray,
        )

    embedder = None
    if diversity:
        embedder = load_embedder("cuda" if str(loaded.device).startswith("cuda") else "cpu")
    wanted = {p.id for p in problems}
    per_sampler: dict[str, Any] = {}
    for name, (s, sp, es) in plan.items():
        folder = out / GENERATIONS / s.folder
        groups = _grouped([r for r in read_records(folder) if r["problem_id"] in wanted], problems, n, folder)
        rewards, source = None, None
        if head is not None:
            rewards, source = reward_scores(folder, [r for g in groups for r in g], head, loaded)
        metrics = _sampler_metrics(
            groups,
            ks=ks,
            selectors=selectors,
            rewards=rewards,
            embedder=embedder,
            seed=seed,
            draws=draws,
            resamples=resamples,
        )
        if metrics["reward"] is not None:
            metrics["reward"]["source"] = source
        tokens = sum(len(r["token_ids"]) for g in groups for r in g)
        timing = _read_timing(folder)
        seconds = timing["seconds"] if timing else None
        per_sampler[name] = {
            "sampler": name,
            "folder": f"{GENERATIONS}/{s.folder}",
            "sampling": asdict(sp),
            "esamp": asdict(es),
            **metrics,
            "generation": {
                **generation[name],
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_second": tokens / seconds if seconds else None,
            },
        }
    ids = "\x1f".join(p.id for p in problems).encode("utf-8")
    results: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": loaded.name,
        "problems": {
            "count": len(problems),
            "tasks": sorted({p.task for p in problems}),
            "ids_sha256": hashlib.sha256(ids).hexdigest(),
        },
        "settings": {
            **shared,
            "ks": ks,
            "selectors": selectors,
            "prompts_per_call": prompts_per_call,
            "draws": draws,
            "resamples": resamples,
            "diversity": bool(diversity),
            "suffix": DEFAULT_SUFFIX,
        },
        "reward_head": None if head is None else {"path": head_path, "spec": head.spec.to_dict(), "gate": head.gate},
        "samplers": per_sampler,
        "plots": [],
        "plots_skipped": plots_skipped,
        "run": dict(meta or {}),
        "seconds": None,
    }
    results["seconds"] = time.perf_counter() - start
    results = _json_safe(results)
    _write_json(out / RESULTS, results)  # before plotting: a plotting failure loses no numbers
    if plots:
        try:
            results["plots"] = write_plots(results, out)
        except ImportError:
            warnings.warn(MATPLOTLIB_MISSING, stacklevel=2)
            results["plots_skipped"] = MATPLOTLIB_MISSING
        results["seconds"] = time.perf_counter() - start
        _write_json(out / RESULTS, results)
    return results


# --------------------------------------------------------------------------- plots


def _series(by_k: Mapping[str, Interval], ks: Sequence[int]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(ks, mean, low, high) of the ks that have a value."""
    rows = [(k, by_k[str(k)]) for k in ks if by_k.get(str(k)) and by_k[str(k)]["mean"] is not None]
    return [k for k, _ in rows], [v["mean"] for _, v in rows], [v["low"] for _, v in rows], [v["high"] for _, v in rows]


def _style(i: int, count: int) -> tuple[Any, str]:
    """A distinct (color, marker) per sampler: matplotlib's 10 colors, then tab20 and other markers."""
    if count <= 10:
        return f"C{i}", "o"
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20), "osD^v<>p"[(i // 20) % 8]


def _curves(ax: Any, results: Mapping[str, Any], pick: Callable[[Mapping[str, Any]], Mapping[str, Interval]]) -> None:
    ks = results["settings"]["ks"]
    for i, (name, res) in enumerate(results["samplers"].items()):
        xs, mean, low, high = _series(pick(res), ks)
        color, marker = _style(i, len(results["samplers"]))
        ax.plot(xs, mean, marker=marker, color=color, label=name)
        ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (candidates)")
    ax.grid(True, alpha=0.3)


def _headline_selector(selectors: Sequence[str]) -> str:
    for s in ("vote:reward", "argmax:reward", "majority", "argmax:mean_logprob"):
        if s in selectors:
            return s
    return selectors[0]


def _save(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _legend(fig: Any, ax: Any) -> None:
    """One legend for the figure, below the panels, so it never hides a curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9, frameon=False)


def write_plots(results: Mapping[str, Any], out_dir: str | Path) -> list[str]:
    """Pass@k and Best-of-N@k curves (95% CI bands) and diversity vs quality; returns the file names.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change);
    raises ImportError when matplotlib is missing.
    """
    from matplotlib.figure import Figure

    out = Path(out_dir)
    ks, selectors = results["settings"]["ks"], results["settings"]["selectors"]
    samplers = results["samplers"]
    k_max = max(ks)
    problems = results["problems"]
    where = f"{problems['count']} problems ({', '.join(problems['tasks'])}), n={results['settings']['n']}"
    written = []

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    _curves(ax, results, lambda r: r["pass_at_k"])
    ax.set_ylabel("pass@k (unbiased)")
    ax.set_title(f"Pass@k (95% CI), {where}", fontsize=10)
    _legend(fig, ax)
    _save(fig, out / PLOT_FILES[0])
    written.append(PLOT_FILES[0])

    cols = min(3, len(selectors))
    rows = math.ceil(len(selectors) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for j, sel in enumerate(selectors):
        ax = axes[j // cols][j % cols]
        _curves(ax, results, lambda r, sel=sel: r["best_of_n"][sel])
        ax.set_title(SELECTOR_LABELS.get(sel, sel), fontsize=10)
        if j % cols == 0:
            ax.set_ylabel("Best-of-N@k accuracy")
    for j in range(len(selectors), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    _legend(fig, axes[0][0])
    fig.suptitle(f"Best-of-N@k by selector (95% CI), {where}", fontsize=11)
    _save(fig, out / PLOT_FILES[1])
    written.append(PLOT_FILES[1])

    headline = _headline_selector(selectors)
    use_embed = any(r["diversity"].get("embedding_similarity") for r in samplers.values())
    x_key = "embedding_similarity" if use_embed else "distinct_2"
    x_label = (
        "mean pairwise embedding similarity (lower = more diverse)"
        if use_embed
        else "distinct-2 (higher = more diverse)"
    )
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    panels = (
        (axes[0], lambda r: r["pass_at_k"][str(k_max)], f"pass@{k_max}"),
        (
            axes[1],
            lambda r: r["best_of_n"][headline][str(k_max)],
            f"Best-of-N@{k_max}: {SELECTOR_LABELS.get(headline, headline)}",
        ),
    )
    for ax, pick, label in panels:
        for i, (name, res) in enumerate(samplers.items()):
            x, y = res["diversity"][x_key], pick(res)
            if not x or x["mean"] is None or y["mean"] is None:
                continue
            color, marker = _style(i, len(samplers))
            ax.errorbar(
                x["mean"],
                y["mean"],
                color=color,
                marker=marker,
                markersize=7,
                capsize=3,
                label=name,
                xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]],
            )
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    _legend(fig, axes[0])
    fig.suptitle(f"Diversity vs quality (95% CI), {where}", fontsize=11)
    _save(fig, out / PLOT_FILES[2])
    written.append(PLOT_FILES[2])
    return written


# --------------------------------------------------------------------------- report


def _pct(v: Interval | None) -> str:
    return "-" if not v or v["mean"] is None else f"{100 * v['mean']:.1f} [{100 * v['low']:.1f}, {100 * v['high']:.1f}]"


def _val(v: Interval | None, fmt: str = ".3f") -> str:
    return "-" if not v or v["mean"] is None else format(v["mean"], fmt)


def format_summary(results: Mapping[str, Any]) -> str:
    """Two markdown tables: quality at the largest k (with 95% CIs), then diversity and cost."""
    k = max(results["settings"]["ks"])
    selectors = results["settings"]["selectors"]
    head = ["sampler", "accuracy", f"pass@{k}", *(f"{SELECTOR_LABELS.get(s, s)} @{k}" for s in selectors)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results["samplers"].items():
        cells = [name, _pct(r["accuracy"]), _pct(r["pass_at_k"][str(k)])]
        cells += [_pct(r["best_of_n"][s][str(k)]) for s in selectors]
        lines.append("| " + " | ".join(cells) + " |")
    head2 = [
        "sampler",
        "distinct answers",
        "distinct-1",
        "distinct-2",
        "emb. similarity",
        "Vendi",
        "perplexity",
        "mean tokens",
        "tokens",
        "seconds",
    ]
    lines += ["", "| " + " | ".join(head2) + " |", "|---" * len(head2) + "|"]
    for name, r in results["samplers"].items():
        d, g = r["diversity"], r["generation"]
        cells = [
            name,
            _val(d["distinct_answers"], ".2f"),
            _val(d["distinct_1"]),
            _val(d["distinct_2"]),
            _val(d["embedding_similarity"]),
            _val(d["vendi"], ".2f"),
            _val(r["perplexity"], ".2f"),
            f"{r['mean_tokens']:.1f}",
            str(g["tokens"]),
            "-" if g["seconds"] is None else f"{g['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_eval_command(subparsers: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> Any:
    """Register ``eval`` on the main parser's subparsers; returns its parser."""
    e = subparsers.add_parser(
        "eval",
        help="evaluate samplers x selectors on a task: results.json and plots (resumable)",
        description="Sample N candidates per problem with each sampler (cached and resumable under "
        "OUT/generations/), then report per-sample accuracy, unbiased pass@k, Best-of-N@k per selector "
        "and majority@k with 95% bootstrap CIs, diversity (distinct answers, distinct-n, MiniLM embedding "
        "similarity and Vendi), perplexity, tokens and time, in OUT/results.json and PNG plots.",
        epilog="example: esamp-agents eval --task single_digit:50:0:test --samplers vanilla esamp:0.25 minp:0.05 "
        "-n 8 --ks 1 2 4 8 --out runs/eval",
    )
    e.add_argument(
        "--task",
        required=True,
        help="TASK:COUNT[:SEED[:SPLIT]] (e.g. single_digit:50:0:test) or gsm8k:PATH / svamp:PATH / math:PATH",
    )
    e.add_argument(
        "--samplers",
        nargs="+",
        default=["vanilla", "esamp"],
        metavar="SAMPLER",
        help="vanilla, esamp[:BETA[:warmSTEPS]], minp:P, each with :key=value options "
        "(default: vanilla esamp = the package's ESamp defaults)",
    )
    e.add_argument("-n", type=int, default=8, help="candidates per problem (default 8)")
    e.add_argument("--ks", type=int, nargs="+", default=None, help="k values (default: powers of 2 up to n, and n)")
    e.add_argument(
        "--selectors",
        nargs="+",
        default=None,
        metavar="SELECTOR",
        help="random, majority, oracle, argmax:SCORE, vote:SCORE with SCORE mean_logprob or reward "
        "(default: all that apply)",
    )
    e.add_argument("--out", type=Path, required=True, help="output folder (resumed if it exists)")
    e.add_argument(
        "--reward",
        default="auto",
        metavar="auto|shipped|PATH|none",
        help="reward head for argmax:reward and vote:reward (default auto: the shipped head "
        "with the embedded model when it is installed, else none)",
    )
    e.add_argument("--no-diversity", action="store_true", help="skip the embedding metrics (no MiniLM load)")
    e.add_argument("--no-plots", action="store_true", help="write results.json only")
    e.add_argument("--temperature", type=float, default=0.7, help="default 0.7")
    e.add_argument("--top-k", type=int, default=SamplingParams.top_k, help="default 50; 0 = off")
    e.add_argument("--top-p", type=float, default=1.0, help="default 1.0 = off")
    e.add_argument("--max-tokens", type=int, default=64, help="new tokens per candidate (default 64)")
    e.add_argument("--seed", type=int, default=0, help="sampling, subset and bootstrap seed (default 0)")
    e.add_argument("--prompts-per-call", type=int, default=4, help="problems per engine call (default 4)")
    e.add_argument("--draws", type=int, default=32, help="random subsets per problem for each k < n (default 32)")
    add_model_args(e)
    add_ray_args(e)
    return e


def _cli_reward(value: str, model: str) -> tuple[GatedLinearHead | None, str | None]:
    from esamp_agents.decoding.loading import EMBEDDED
    from esamp_agents.hidden_reward.reward import shipped_head_path

    if value == "auto":
        if model != EMBEDDED:
            return None, None
        try:
            shipped_head_path()
        except FileNotFoundError:
            print("eval: no reward head (the shipped head is not installed); reward selectors are off", file=sys.stderr)
            return None, None
        value = "shipped"
    if value not in ("shipped", "none") and not Path(value).is_file():
        raise ValueError(f"--reward={value!r} is not a file; allowed: auto, shipped, none, or a head checkpoint path")
    try:
        return resolve_reward_head(value)
    except FileNotFoundError as exc:
        raise ValueError(f"--reward={value!r}: {exc}") from exc


def run_eval_command(args: argparse.Namespace, out: TextIO) -> int:
    """``esamp-agents eval``: validate every argument, load the model, run, print the tables."""
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.loading import load_model
    from esamp_agents.evaluation.tasks import load_problems

    try:
        problems = load_problems(args.task)
    except FileNotFoundError as exc:
        raise ValueError(f"--task={args.task!r}: {exc}") from exc
    samplers = parse_samplers(args.samplers)
    ks = check_ks(args.ks if args.ks is not None else default_ks(check_int("-n", args.n, 1)), args.n)
    head, _ = _cli_reward(args.reward, args.model)
    selectors = check_selectors(args.selectors or default_selectors(head is not None), head is not None)
    for s in samplers:
        s.sampling_params(
            n=args.n,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
    for name in ("prompts_per_call", "draws"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out={str(args.out)!r} exists and is not a folder")

    ray_options = ray_options_from_args(args)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
    results = run_eval(
        problems,
        samplers,
        n=args.n,
        ks=ks,
        selectors=selectors,
        out_dir=args.out,
        engine=ESampEngine(loaded),
        reward_head=head,
        diversity=not args.no_diversity,
        plots=not args.no_plots,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        prompts_per_call=args.prompts_per_call,
        draws=args.draws,
        meta={"command": "eval", "arguments": arguments},
        ray_options=ray_options,
        model_load={"model": args.model, "dtype": args.dtype, "device": args.device} if ray_options else None,
    )
    print(format_summary(results), file=out)
    if results["plots_skipped"] and not args.no_plots:
        print(results["plots_skipped"], file=out)
    files = [RESULTS, *results["plots"]]
    print(f"\nwrote {', '.join(str(args.out / f) for f in files)}", file=out)
    return 0


__all__ = [
    "SAMPLER_USAGE",
    "Sampler",
    "add_eval_command",
    "check_ks",
    "check_selectors",
    "default_ks",
    "default_selectors",
    "format_summary",
    "parse_sampler",
    "parse_samplers",
    "resolve_reward_head",
    "reward_scores",
    "run_eval",
    "run_eval_command",
    "write_plots",
]
