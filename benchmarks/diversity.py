"""Diversity of N samples per prompt, ESamp off vs on, on NoveltyBench's creative prompts.

For each prompt the same seed is used in every mode and the modes run one after
the other (their order rotating per prompt), so a per-prompt paired difference
(on - off) isolates ESamp's effect. Per mode and prompt: mean pairwise embedding
similarity and Vendi score (all-MiniLM-L6-v2), distinct-1/2/3, the mean perplexity
of the samples under the model itself (from ``Candidate.logprobs``) and the mean
length. Bootstrap CIs resample prompts.

    python benchmarks/diversity.py                      # 20 prompts x 16 samples, beta 0.25
    python benchmarks/diversity.py --limit 2 --samples 4 --max-new-tokens 16   # smoke run
    python benchmarks/diversity.py --resume             # go on after an interruption

Results are written after every prompt (atomically) to benchmarks/out/diversity.json;
``--resume`` skips the prompts already there (the settings must match) and the
summary covers every prompt the file holds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm import tqdm

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.atomic import atomic_write_bytes
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.evaluation.metrics import (
    bootstrap_ci,
    distinct_n,
    load_embedder,
    mean_pairwise_similarity,
    perplexity,
    vendi_score,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "noveltybench_curated.jsonl"
OUT = Path(__file__).resolve().parent / "out"
OFF = "off"
# Per-prompt metrics that get a bootstrap CI (and a paired on - off difference).
METRICS = ("similarity", "vendi", "distinct_1", "distinct_2", "distinct_3", "perplexity", "length_tokens", "stop_rate")
# Settings that change the samples: a resumed file must have been made with the same ones.
RESULT_SETTINGS = (
    "model", "category", "samples", "temperature", "top_k", "top_p", "min_p",
    "max_new_tokens", "betas", "seed", "warm_start_steps",
)  # fmt: skip


# ---------------------------------------------------------------- inputs
def load_prompts(path: Path, category: str) -> list[dict[str, str]]:
    """The prompts of one NoveltyBench category, in file order, as {"id", "prompt"}."""
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist; pass --data PATH to NoveltyBench's curated.jsonl "
            f"(the repo's CI has it at ../shared/data/noveltybench_curated.jsonl)"
        )
    prompts, categories = [], set()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                categories.add(row["category"])
                if row["category"] == category:
                    prompts.append({"id": str(row["id"]), "prompt": str(row["prompt"])})
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no} is not a NoveltyBench row with id/category/prompt: {exc}") from exc
    if not prompts:
        raise ValueError(f"{path} has no prompts of category {category!r}; it has: {sorted(categories)}")
    return prompts


def mode_names(betas: list[float]) -> list[str]:
    return [OFF, *(f"beta={b:g}" for b in betas)]


# ---------------------------------------------------------------- per prompt
def group_metrics(texts: list[str], logprobs: list[list[float]], lengths: list[int], stops: list[bool],
                  embeddings: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """Diversity and fluency of one prompt's samples (perplexity: mean over non-empty samples)."""
    ppl = [perplexity(lp) for lp in logprobs if lp]
    return {
        "similarity": mean_pairwise_similarity(embeddings),
        "vendi": vendi_score(embeddings),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "perplexity": float(np.mean(ppl)) if ppl else float("nan"),
        "length_tokens": float(np.mean(lengths)),
        "stop_rate": float(np.mean(stops)),
    }


def run_prompt(engine: ESampEngine, embedder: Any, item: dict[str, str], seed: int, order: list[str],
               betas: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    templated = engine.loaded.apply_chat_template([{"role": "user", "content": item["prompt"]}])
    sampling = SamplingParams(
        n=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, seed=seed,
    )  # fmt: skip
    modes: dict[str, Any] = {}
    for mode in order:
        esamp = ESampParams(beta=betas[mode], warm_start_steps=args.warm_start_steps)
        start = time.perf_counter()
        out = engine.generate([templated], sampling, esamp, add_special_tokens=False)
        seconds = time.perf_counter() - start
        cands = out[0].candidates
        texts = [c.text for c in cands]
        lengths = [c.completion_tokens for c in cands]
        embeddings = embedder.embed(texts)
        loss = out[0].distiller_loss
        modes[mode] = {
            "metrics": group_metrics(
                texts, [c.logprobs for c in cands], lengths, [c.finish_reason == "stop" for c in cands], embeddings
            ),
            "seconds": seconds,
            "tokens_per_s": sum(lengths) / seconds if seconds > 0 else float("nan"),
            "distiller_loss_first_last": [loss[0], loss[-1]] if loss else None,
            "texts": texts,
            "completion_tokens": lengths,
            "finish_reasons": [c.finish_reason for c in cands],
        }
    ordered = {m: modes[m] for m in sorted(modes, key=lambda m: (m != OFF, m))}  # off first
    return {"id": item["id"], "prompt": item["prompt"], "seed": seed, "modes": ordered}


# ---------------------------------------------------------------- summary
def _ci(values: list[float], args: argparse.Namespace) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "low": None, "high": None, "prompts": 0}
    est, low, high = bootstrap_ci(finite, resamples=args.bootstrap_resamples, seed=args.bootstrap_seed)
    return {"mean": est, "low": low, "high": high, "prompts": len(finite)}


def _value(record: dict[str, Any], mode: str, metric: str) -> float:
    v = record["modes"][mode]["metrics"].get(metric)
    return float("nan") if v is None else float(v)


def summarise(records: list[dict[str, Any]], modes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Per mode: mean and bootstrap CI over prompts; per ESamp mode: the paired difference to off."""
    per_mode = {
        mode: {
            **{metric: _ci([_value(r, mode, metric) for r in records], args) for metric in METRICS},
            "median_tokens_per_s": statistics.median(
                [r["modes"][mode]["tokens_per_s"] or float("nan") for r in records]
            ),
        }
        for mode in modes
    }
    paired = {
        mode: {
            metric: _ci([_value(r, mode, metric) - _value(r, OFF, metric) for r in records], args) for metric in METRICS
        }
        for mode in modes
        if mode != OFF
    }
    return {"prompts": len(records), "modes": per_mode, "paired_minus_off": paired}


def _fmt(ci: dict[str, Any], digits: int = 3) -> str:
    if ci["mean"] is None:
        return "-"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def markdown_table(summary: dict[str, Any], modes: list[str]) -> str:
    on_modes = [m for m in modes if m != OFF]
    head = ["metric", *modes, *(f"{m} - off" for m in on_modes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in METRICS:
        cells = [_fmt(summary["modes"][m][metric]) for m in modes]
        cells += [_fmt(summary["paired_minus_off"][m][metric]) for m in on_modes]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    speed = [f"{summary['modes'][m]['median_tokens_per_s']:.1f}" for m in modes]
    lines.append("| tokens/s (median) | " + " | ".join(speed + ["-"] * len(on_modes)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- output
def _json_safe(value: Any) -> Any:
    """NaN/inf -> null, so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: Path, data: Any) -> None:
    """NaN-free JSON (non-finite values become null), written atomically."""
    atomic_write_bytes(path, (json.dumps(_json_safe(data), indent=1, allow_nan=False) + "\n").encode("utf-8"))


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="NoveltyBench curated.jsonl (default: %(default)s)"
    )
    parser.add_argument("--category", default="Creativity", help="prompt category to use (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT prompts")
    parser.add_argument("--samples", type=int, default=16, help="samples per prompt and mode (default: %(default)s)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.25], help="ESamp betas to compare with off")
    parser.add_argument("--warm-start-steps", type=int, default=0, help="Distiller warm start (0 = paper recipe)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1234, help="prompt i (in file order) uses seed + i in every mode")
    parser.add_argument("--model", default="embedded", help="model to sample from (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--bootstrap-resamples", type=int, default=1000)
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT / "diversity.json")
    parser.add_argument("--resume", action="store_true", help="skip prompts already in --out (same settings needed)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit} is out of range; allowed: --limit >= 1")
    if args.samples < 2:
        parser.error(f"--samples={args.samples} is out of range; allowed: --samples >= 2 (similarity needs pairs)")
    if any(not b > 0 for b in args.betas) or len(set(args.betas)) != len(args.betas):
        parser.error(f"--betas={args.betas}: allowed: distinct values > 0 (beta 0, ESamp off, always runs)")
    if args.bootstrap_resamples < 1:
        parser.error(f"--bootstrap-resamples={args.bootstrap_resamples} is out of range; allowed: >= 1")
    try:  # every sampling setting is checked here, before the model loads
        SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)  # fmt: skip
        for b in args.betas:
            ESampParams(beta=b, warm_start_steps=args.warm_start_steps)
    except ValueError as exc:
        parser.error(str(exc))
    if args.temperature == 0:
        parser.error("--temperature=0 is greedy: all samples would be equal; allowed: --temperature > 0")
    return parser, args


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    try:
        prompts = load_prompts(args.data, args.category)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    seeds = {item["id"]: args.seed + i for i, item in enumerate(prompts)}
    prompts = prompts[: args.limit]
    modes = mode_names(args.betas)
    betas = dict(zip(modes, [0.0, *args.betas], strict=True))
    settings = {k: getattr(args, k) for k in RESULT_SETTINGS}
    other_settings = {
        "data": str(args.data),
        "device": args.device,
        "limit": args.limit,
        "bootstrap_resamples": args.bootstrap_resamples,
        "bootstrap_seed": args.bootstrap_seed,
    }

    records: dict[str, dict[str, Any]] = {}
    history: list[dict[str, str]] = []
    if args.resume and args.out.is_file():
        old = json.loads(args.out.read_text(encoding="utf-8"))
        old_settings = old.get("settings", {})
        differ = {k: (old_settings.get(k), v) for k, v in settings.items() if old_settings.get(k) != v}
        if differ:
            parser.error(f"--resume: {args.out} was made with other settings (file, now): {differ}")
        records = {r["id"]: r for r in old["records"]}
        history = old.get("history", [])
    todo = [item for item in prompts if item["id"] not in records]
    print(f"{len(prompts)} {args.category} prompts, {len(prompts) - len(todo)} already done, modes {modes}", flush=True)

    command = shlex.join([f"benchmarks/{Path(sys.argv[0]).name}", *(sys.argv[1:] if argv is None else argv)])
    history.append({"command": command, "date": dt.datetime.now().isoformat(timespec="seconds")})
    machine = {
        "platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    order_of = {item["id"]: i for i, item in enumerate(prompts)}

    def write() -> dict[str, Any]:
        ordered = sorted(records.values(), key=lambda r: (order_of.get(r["id"], len(order_of)), r["id"]))
        summary = summarise(ordered, modes, args) if ordered else None
        atomic_write_json(args.out, {
            "command": command, "date": history[-1]["date"], "history": history, "machine": machine,
            "settings": settings, "other_settings": other_settings, "summary": summary, "records": ordered,
        })  # fmt: skip
        return summary or {}

    summary: dict[str, Any] = {}
    if todo:
        engine = ESampEngine(load_model(args.model, device=args.device))
        embedder = load_embedder(args.device or str(engine.loaded.device))
        # Warm-up (one-off allocations), so the first prompt's first mode is not slower.
        engine.generate(["Hello"], SamplingParams(n=2, max_new_tokens=2, seed=0), ESampParams(beta=args.betas[0]))
        bar = tqdm(todo, desc="prompts", unit="prompt")
        for item in bar:
            k = order_of[item["id"]] % len(modes)
            order = modes[k:] + modes[:k]  # rotate which mode runs first
            record = run_prompt(engine, embedder, item, seeds[item["id"]], order, betas, args)
            records[item["id"]] = record
            summary = write()
            bar.set_postfix({m: f"vendi {record['modes'][m]['metrics']['vendi']:.2f}" for m in modes})
    else:
        summary = write()
    if not summary:
        print("no prompts were run")
        return
    print(f"\n{summary['prompts']} prompts x {args.samples} samples, T={args.temperature} top_k={args.top_k} "
          f"top_p={args.top_p} min_p={args.min_p}, {args.max_new_tokens} new tokens; "
          f"mean [95% bootstrap CI over prompts]\n")  # fmt: skip
    print(markdown_table(summary, modes))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
