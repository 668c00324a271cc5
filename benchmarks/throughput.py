"""Throughput of the decode loop: ESamp on vs off, and ours vs HF ``generate``.

Ratios are taken inside one process, with the modes interleaved (order
alternating per repetition) and medians over repetitions, because these machines
are noisy. Every row generates exactly ``--new-tokens`` tokens (EOS ignored), so
all modes do the same work and tokens/s compares like with like.

    python benchmarks/throughput.py --reps 5
    python benchmarks/throughput.py --shapes 4x16 --reps 3 --no-hf

Peak memory: ``--memory`` runs each mode of the largest shape in a fresh
subprocess and reports the peak resident set size (ESamp's extra memory is the
difference). Results go to benchmarks/out/throughput.json (written atomically).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.decoding.engine import ESampEngine

QUESTIONS = [
    "Explain step by step how to compute 17 * 23.",
    "Write a short story about a lighthouse keeper.",
    "What are three ways to improve sleep? Explain each.",
    "Describe how a bicycle works to a child.",
]
OUT = Path(__file__).resolve().parent / "out"


def parse_shape(text: str) -> tuple[int, int]:
    try:
        p, n = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape {text!r} must look like PxN, e.g. 4x16") from exc
    if p < 1 or n < 1 or p > len(QUESTIONS):
        raise argparse.ArgumentTypeError(f"shape {text!r}: need 1 <= P <= {len(QUESTIONS)} and N >= 1")
    return p, n


def prompts_for(engine: ESampEngine, p: int) -> list[list[int]]:
    return [engine.loaded.chat_token_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:p]]


def run_ours(
    engine: ESampEngine, prompts: list[list[int]], sampling: SamplingParams, beta: float, warm: int = 0
) -> dict[str, float]:
    start = time.perf_counter()
    out = engine.generate(prompts, sampling, ESampParams(beta=beta, warm_start_steps=warm if beta else 0))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": out.stats.generated_tokens, "distiller_seconds": out.stats.distiller_seconds}


def run_hf(engine: ESampEngine, prompts: list[list[int]], sampling: SamplingParams) -> dict[str, float]:
    loaded = engine.loaded
    width = max(len(p) for p in prompts)
    pad = loaded.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = copy.deepcopy(loaded.model.generation_config)
    config.eos_token_id = None  # same work as ours with ignore_eos
    config.pad_token_id = pad
    torch.manual_seed(sampling.seed or 0)
    start = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(
            ids,
            attention_mask=mask,
            generation_config=config,
            do_sample=True,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=None,
            num_return_sequences=sampling.n,
        )
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * out.shape[0]
    return {"seconds": seconds, "tokens": tokens, "distiller_seconds": 0.0}


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    return {
        "median_tokens_per_s": statistics.median(rates),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "median_distiller_share": statistics.median(r["distiller_seconds"] / r["seconds"] for r in runs),
        "runs": len(runs),
    }


def bench_shape(engine: ESampEngine, p: int, n: int, args: argparse.Namespace) -> dict[str, Any]:
    prompts = prompts_for(engine, p)
    sampling = SamplingParams(
        n=n, max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=1234, ignore_eos=True,
    )  # fmt: skip
    modes = ["off", "on"] + ([] if args.no_hf else ["hf"])
    run = {
        "off": lambda: run_ours(engine, prompts, sampling, 0.0),
        "on": lambda: run_ours(engine, prompts, sampling, args.beta, args.warm_start_steps),
        "hf": lambda: run_hf(engine, prompts, sampling),
    }
    for mode in modes:  # warm-up, not recorded
        run[mode]()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for rep in range(args.reps):
        order = modes if rep % 2 == 0 else list(reversed(modes))
        for mode in order:
            results[mode].append(run[mode]())
        print(f"  {p}x{n} rep {rep + 1}/{args.reps}: "
              + ", ".join(f"{m} {results[m][-1]['tokens'] / results[m][-1]['seconds']:.1f} tok/s" for m in modes),
              flush=True)  # fmt: skip
    summary = {m: summarise(results[m]) for m in modes}
    paired_on_off = [
        (on["tokens"] / on["seconds"]) / (off["tokens"] / off["seconds"])
        for on, off in zip(results["on"], results["off"], strict=True)
    ]
    row: dict[str, Any] = {
        "shape": f"{p}x{n}",
        "modes": summary,
        "ratio_on_off": summary["on"]["median_tokens_per_s"] / summary["off"]["median_tokens_per_s"],
        "paired_ratio_on_off_median": statistics.median(paired_on_off),
        "raw": results,
    }
    if "hf" in summary:
        row["ratio_off_hf"] = summary["off"]["median_tokens_per_s"] / summary["hf"]["median_tokens_per_s"]
    return row


def peak_rss_mb(mode: str, shape: str, args: argparse.Namespace) -> dict[str, float]:
    """One generation in a fresh process: resident memory before it and its peak during it, in MB.

    The process-wide ``ru_maxrss`` is useless here (de-quantising the GGUF at load time
    peaks far above decoding), so a thread samples the current RSS every 5 ms instead.
    """
    code = (
        "import sys,threading,time; sys.argv=['x'];"
        "from benchmarks.throughput import *;"
        "rss=lambda: int(open('/proc/self/statm').read().split()[1])*os.sysconf('SC_PAGE_SIZE')/2**20;"
        f"e=ESampEngine(load_model('embedded', device='cpu'));p,n=parse_shape({shape!r});"
        f"s=SamplingParams(n=n,max_new_tokens={args.new_tokens},temperature={args.temperature},top_k={args.top_k},"
        "seed=1,ignore_eos=True);pr=prompts_for(e,p);"
        "e.generate(pr,SamplingParams(n=1,max_new_tokens=2),ESampParams(beta=0.0));"
        "base=rss();peak=[base];done=threading.Event();"
        "t=threading.Thread(target=lambda: [peak.append(max(peak[-1],rss())) or time.sleep(0.005) "
        "for _ in iter(lambda: done.is_set(), True)]);t.start();"
        f"e.generate(pr,s,ESampParams(beta={args.beta if mode == 'on' else 0.0},"
        f"warm_start_steps={args.warm_start_steps if mode == 'on' else 0}));"
        "done.set();t.join();print(base, peak[-1])"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    base, peak = (float(x) for x in out.stdout.strip().splitlines()[-1].split())
    return {"before_mb": base, "peak_mb": peak, "growth_mb": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 1), (4, 1), (4, 16)])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--beta", type=float, default=0.25)
    parser.add_argument("--warm-start-steps", type=int, default=0, help="ESamp warm start (0 = the paper's recipe)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate comparison")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS per mode (subprocesses)")
    parser.add_argument("--out", type=Path, default=OUT / "throughput.json")
    args = parser.parse_args()
    if args.reps < 1 or args.new_tokens < 1:
        parser.error(f"--reps={args.reps} and --new-tokens={args.new_tokens} must both be >= 1")

    engine = ESampEngine(load_model("embedded", device="cpu"))
    rows = []
    for p, n in args.shapes:
        print(f"shape {p}x{n}", flush=True)
        rows.append(bench_shape(engine, p, n, args))
    memory = {}
    if args.memory:
        shape = "x".join(map(str, args.shapes[-1]))
        memory = {mode: peak_rss_mb(mode, shape, args) for mode in ("off", "on")}
        memory["esamp_extra_mb"] = memory["on"]["peak_mb"] - memory["off"]["peak_mb"]
        memory["esamp_extra_growth_mb"] = memory["on"]["growth_mb"] - memory["off"]["growth_mb"]
        memory["shape"] = shape
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "shapes")},
        "rows": rows,
        "peak_rss_mb": memory,
    }
    atomic_write_json(args.out, result)
    print("\n| shape | off tok/s | ESamp tok/s | on/off (median) | paired on/off | Distiller share | off/HF |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["modes"]
        hf = f"{r['ratio_off_hf']:.3f}" if "ratio_off_hf" in r else "-"
        print(f"| {r['shape']} | {m['off']['median_tokens_per_s']:.1f} | {m['on']['median_tokens_per_s']:.1f} | "
              f"{r['ratio_on_off']:.3f} | {r['paired_ratio_on_off_median']:.3f} | "
              f"{m['on']['median_distiller_share']:.3f} | {hf} |")  # fmt: skip
    if memory:
        off, on = memory["off"], memory["on"]
        print(f"\nRSS during generation at {memory['shape']}: "
              f"off {off['before_mb']:.0f} -> peak {off['peak_mb']:.0f} MB, "
              f"on {on['before_mb']:.0f} -> peak {on['peak_mb']:.0f} MB; ESamp extra growth "
              f"{memory['esamp_extra_growth_mb']:.0f} MB")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
