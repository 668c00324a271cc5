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

Samplers are spelled as in :mod:`esamp_agents.evaluation.samplers`; temperature, top-k, top-p
and the token budget are shared unless a sampler sets ``:t=``, and every sampler uses the same
seed. The report and its tables are in :mod:`~esamp_agents.evaluation.report`, the plots in
:mod:`~esamp_agents.evaluation.plots`, the ``esamp-agents eval`` command in :mod:`esamp_agents.cli.eval`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import numbers
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.evaluation.plots import MATPLOTLIB_MISSING, write_plots
from esamp_agents.evaluation.report import FORMAT_NAME, FORMAT_VERSION, RESULTS, Interval, json_safe, write_json
from esamp_agents.evaluation.samplers import Sampler, parse_samplers
from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, Problem, answers_match
from esamp_agents.validation import check_int

if TYPE_CHECKING:  # the heavy modules (torch) load on first use, so the CLI starts fast
    import torch

    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.loading import LoadedModel
    from esamp_agents.hidden_reward.collect_ray import RayOptions
    from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead

GENERATIONS = "generations"
TIMING = "timing.json"
SCORE_NAMES = ("mean_logprob", "reward")
SELECTOR_USAGE = f"allowed: random, majority, oracle, argmax:SCORE, vote:SCORE with SCORE in {', '.join(SCORE_NAMES)}"


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


def _read_timing(folder: Path) -> dict[str, Any] | None:
    try:
        timing = json.loads((folder / TIMING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return timing if isinstance(timing, dict) and isinstance(timing.get("seconds"), (int, float)) else None


def _add_timing(folder: Path, seconds: float) -> None:
    old = _read_timing(folder) or {"seconds": 0.0, "runs": 0}
    write_json(folder / TIMING, {"seconds": float(old["seconds"]) + seconds, "runs": int(old.get("runs", 0)) + 1})


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
    results = json_safe(results)
    write_json(out / RESULTS, results)  # before plotting: a plotting failure loses no numbers
    if plots:
        try:
            results["plots"] = write_plots(results, out)
        except ImportError:
            warnings.warn(MATPLOTLIB_MISSING, stacklevel=2)
            results["plots_skipped"] = MATPLOTLIB_MISSING
        results["seconds"] = time.perf_counter() - start
        write_json(out / RESULTS, results)
    return results


__all__ = [
    "GENERATIONS",
    "SCORE_NAMES",
    "SELECTOR_USAGE",
    "check_ks",
    "check_selectors",
    "default_ks",
    "default_selectors",
    "resolve_reward_head",
    "reward_scores",
    "run_eval",
]
