"""Throughput of the decode loop: ESamp on vs off, and ours vs HF ``generate``.

Ratios are taken inside one process, with the modes interleaved (order
alternating per repetition) and medians over repetitions, because these machines
are noisy. Every row generates exactly ``--new-tokens`` tokens (EOS ignored), so
all modes do the same work and tokens/s compares like with like.

    python benchmarks/throughput.py --reps 5
    python benchmarks/throughput.py --shapes 4x16 --reps 3 --no-hf
    python benchmarks/throughput.py --shapes 1x1 4x1 4x16 16x16 --modes off on overlap default hf

Modes: ``off`` (beta 0), ``on`` (``--beta``, the Distiller's update in the loop's own order),
``overlap`` (the same with the update beside the next forward: same tokens), ``default`` (the
package's default ESampParams: beta 0.1 + 20-step warm start, the engine's default overlap
choice), ``width128`` (``on`` with a Distiller of width 128), ``shared`` (``on`` with one Distiller
for all prompts), ``every`` / ``default_every`` (``on`` / ``default`` training the Distiller once
every ``--every`` steps), ``thread`` (``off`` decoded on a second thread while the calling thread
keeps its OpenMP pool: how every call ran before section 18, when a scheduler thread always
decoded), ``torch_order`` (``off`` with every matmul in torch's own operand order: how the loop
computed before section 19), ``transposed`` (``off`` with every product of 1-7 rows transposed:
section 19's fixed rule, before the order was measured per machine), ``hf_step`` (``off`` with
every decode step through HF's own forward instead of the lean Llama step: the loop before
section 21), ``hf`` (HF ``generate`` as
it comes: torch's own order) and ``hf_fast`` (HF ``generate`` with the package's few-row matmuls
in the order ``load_model`` measured). Each run also records the minor page faults it caused.

Peak memory: ``--memory`` runs each mode of the largest shape in a fresh
subprocess and reports the peak resident set size (ESamp's extra memory is the
difference). Results go to benchmarks/out/throughput.json (written atomically).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.decoding import cpu_matmul, fast_decode
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.evaluation.report import machine_info

QUESTIONS = [
    "Explain step by step how to compute 17 * 23.",
    "Write a short story about a lighthouse keeper.",
    "What are three ways to improve sleep? Explain each.",
    "Describe how a bicycle works to a child.",
    "List the planets of the solar system and one fact about each.",
    "Explain why the sky is blue.",
    "Give a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?",
    "Summarise the plot of a detective story you invent.",
    "How does a refrigerator keep food cold?",
    "Explain what a prime number is, with examples.",
    "Describe a day in the life of a honeybee.",
    "Why do we have seasons on Earth?",
    "Explain how to plant a tree, step by step.",
    "What makes a good password? Explain.",
    "Describe how rain forms.",
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
    engine: ESampEngine,
    prompts: list[list[int]],
    sampling: SamplingParams,
    esamp: ESampParams,
    overlap: bool | None = None,
) -> dict[str, float]:
    """One timed generation; ``overlap`` None keeps the engine's default choice."""
    default_overlap = engine.overlap_distiller
    if overlap is not None:
        engine.overlap_distiller = overlap
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    try:
        out = engine.generate(prompts, sampling, esamp)
    finally:
        engine.overlap_distiller = default_overlap
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": out.stats.generated_tokens,
        "distiller_seconds": out.stats.distiller_seconds,
        "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
    }


def run_on_second_thread(
    engine: ESampEngine, prompts: list[list[int]], sampling: SamplingParams, esamp: ESampParams
) -> dict[str, float]:
    """One timed generation decoded on a fresh thread while this thread keeps an OpenMP pool."""
    torch.ones(1 << 20).add_(1.0)  # a parallel region: this thread holds a worker pool now
    box: dict[str, float] = {}
    worker = threading.Thread(target=lambda: box.update(run_ours(engine, prompts, sampling, esamp)))
    worker.start()
    worker.join()
    return box


def in_torch_order(fn: Any, *args: Any) -> dict[str, float]:
    """``fn(*args)`` with every matmul in torch's own operand order (``cpu_matmul.torch_order``)."""
    with cpu_matmul.torch_order():
        return fn(*args)


def cpu_matmul_rule() -> dict[str, Any]:
    """The few-row order rule this run decoded with, and the measurement behind it."""
    measured = cpu_matmul.last_calibration()
    return {
        "fast_rows": sorted(cpu_matmul.fast_rows()),
        "speedups": None if measured is None else [round(s, 3) for s in measured.speedups],
    }


def in_hf_forward(fn: Any, *args: Any) -> dict[str, float]:
    """``fn(*args)`` with every decode step through HF's forward (``fast_decode.hf_forward``)."""
    with fast_decode.hf_forward():
        return fn(*args)


def in_transposed_order(fn: Any, *args: Any) -> dict[str, float]:
    """``fn(*args)`` with every product of 1-7 rows in the transposed order (section 19's fixed rule)."""
    with cpu_matmul.fast_rows_set_to(range(1, 8)):
        return fn(*args)


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
    return {"seconds": seconds, "tokens": tokens, "distiller_seconds": 0.0, "minor_faults": 0}


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    return {
        "median_tokens_per_s": statistics.median(rates),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "median_distiller_share": statistics.median(r["distiller_seconds"] / r["seconds"] for r in runs),
        "median_minor_faults": statistics.median(r["minor_faults"] for r in runs),
        "runs": len(runs),
    }


MODES = (
    "off", "on", "overlap", "default", "width128", "shared", "every", "default_every", "thread", "torch_order",
    "transposed", "hf_step", "hf", "hf_fast",
)  # fmt: skip


HF_MODES = ("hf", "hf_fast")  # HF generate's own loop (--no-hf skips them)


def bench_shape(engine: ESampEngine, p: int, n: int, args: argparse.Namespace) -> dict[str, Any]:
    prompts = prompts_for(engine, p)
    sampling = SamplingParams(
        n=n, max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=1234, ignore_eos=True,
    )  # fmt: skip
    modes = [m for m in args.modes if not (m in HF_MODES and args.no_hf)]
    on = ESampParams(beta=args.beta, warm_start_steps=args.warm_start_steps)
    every = replace(on, distiller_update_every=args.every)
    run = {
        "off": lambda: run_ours(engine, prompts, sampling, ESampParams(beta=0.0)),
        "on": lambda: run_ours(engine, prompts, sampling, on, overlap=False),
        "overlap": lambda: run_ours(engine, prompts, sampling, on, overlap=True),
        "default": lambda: run_ours(engine, prompts, sampling, ESampParams()),
        "width128": lambda: run_ours(engine, prompts, sampling, replace(on, distiller_width=128), overlap=False),
        "shared": lambda: run_ours(engine, prompts, sampling, replace(on, shared_distiller=True), overlap=False),
        "every": lambda: run_ours(engine, prompts, sampling, every, overlap=False),
        "default_every": lambda: run_ours(engine, prompts, sampling, ESampParams(distiller_update_every=args.every)),
        "thread": lambda: run_on_second_thread(engine, prompts, sampling, ESampParams(beta=0.0)),
        "torch_order": lambda: in_torch_order(run_ours, engine, prompts, sampling, ESampParams(beta=0.0)),
        "transposed": lambda: in_transposed_order(run_ours, engine, prompts, sampling, ESampParams(beta=0.0)),
        "hf_step": lambda: in_hf_forward(run_ours, engine, prompts, sampling, ESampParams(beta=0.0)),
        "hf": lambda: in_torch_order(run_hf, engine, prompts, sampling),
        "hf_fast": lambda: run_hf(engine, prompts, sampling),
    }
    for mode in modes:  # warm-up, not recorded
        run[mode]()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for rep in range(args.reps):
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]  # each mode leads in turn
        for mode in order:
            results[mode].append(run[mode]())
        print(f"  {p}x{n} rep {rep + 1}/{args.reps}: "
              + ", ".join(f"{m} {results[m][-1]['tokens'] / results[m][-1]['seconds']:.1f} tok/s" for m in modes),
              flush=True)  # fmt: skip
    summary = {m: summarise(results[m]) for m in modes}
    rate = lambda r: r["tokens"] / r["seconds"]  # noqa: E731
    row: dict[str, Any] = {"shape": f"{p}x{n}", "modes": summary, "raw": results}
    for mode in modes:
        if mode == "off" or "off" not in summary:
            continue
        paired = [rate(a) / rate(b) for a, b in zip(results[mode], results["off"], strict=True)]
        row[f"ratio_{mode}_off"] = summary[mode]["median_tokens_per_s"] / summary["off"]["median_tokens_per_s"]
        row[f"paired_{mode}_off"] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}
    if "hf" in summary and "off" in summary:
        row["ratio_off_hf"] = summary["off"]["median_tokens_per_s"] / summary["hf"]["median_tokens_per_s"]
    for base in ("hf", "hf_fast"):
        if base in summary and "off" in summary:
            paired = [rate(a) / rate(b) for a, b in zip(results["off"], results[base], strict=True)]
            row[f"paired_off_{base}"] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}
    return row


def peak_rss_mb(mode: str, shape: str, args: argparse.Namespace) -> dict[str, float]:
    """One generation in a fresh process: resident memory before it and its peak during it, in MB.

    The process-wide ``ru_maxrss`` is useless here (de-quantising the GGUF at load time
    peaks far above decoding), so a thread samples the current RSS every 5 ms instead.
    """
    code = (
        "import os,sys,threading,time; sys.argv=['x'];"
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
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {mode} memory run at {shape} failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
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
    parser.add_argument("--modes", nargs="+", choices=list(MODES),
                        default=["off", "on", "hf"])  # fmt: skip
    parser.add_argument("--every", type=int, default=4, help="the Distiller's update interval of the *every modes")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate comparison")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS per mode (subprocesses)")
    parser.add_argument("--out", type=Path, default=OUT / "throughput.json")
    args = parser.parse_args()
    if args.reps < 1 or args.new_tokens < 1 or args.every < 1:
        parser.error(f"--reps={args.reps}, --new-tokens={args.new_tokens} and --every={args.every} must all be >= 1")

    engine = ESampEngine(load_model("embedded", device="cpu"))
    rows = []
    for p, n in args.shapes:
        print(f"shape {p}x{n}", flush=True)
        rows.append(bench_shape(engine, p, n, args))
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "cpu_matmul": cpu_matmul_rule(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "shapes")},
        "rows": rows,
        "peak_rss_mb": {},
    }
    atomic_write_json(args.out, result)  # the timed rows first: a failed memory run must not lose them
    if args.memory:
        shape = "x".join(map(str, args.shapes[-1]))
        memory: dict[str, Any] = {mode: peak_rss_mb(mode, shape, args) for mode in ("off", "on")}
        memory["esamp_extra_mb"] = memory["on"]["peak_mb"] - memory["off"]["peak_mb"]
        memory["esamp_extra_growth_mb"] = memory["on"]["growth_mb"] - memory["off"]["growth_mb"]
        memory["shape"] = shape
        result["peak_rss_mb"] = memory
        atomic_write_json(args.out, result)
    others = [m for m in args.modes if m != "off" and m not in HF_MODES]
    print("\n| shape | off tok/s | " + " | ".join(f"{m} tok/s | {m}/off (paired median [min-max]) | {m} Distiller share"
                                         for m in others) + " | off/HF |")  # fmt: skip
    print("|---|---|" + "---|---|---|" * len(others) + "---|")
    for r in rows:
        m = r["modes"]
        cells = [r["shape"], f"{m['off']['median_tokens_per_s']:.1f}"]
        for mode in others:
            pr = r[f"paired_{mode}_off"]
            cells += [f"{m[mode]['median_tokens_per_s']:.1f}", f"{pr['median']:.3f} [{pr['min']:.3f}-{pr['max']:.3f}]",
                      f"{m[mode]['median_distiller_share']:.3f}"]  # fmt: skip
        cells.append(f"{r['ratio_off_hf']:.3f}" if "ratio_off_hf" in r else "-")
        print("| " + " | ".join(cells) + " |")
    if memory := result["peak_rss_mb"]:
        off, on = memory["off"], memory["on"]
        print(f"\nRSS during generation at {memory['shape']}: "
              f"off {off['before_mb']:.0f} -> peak {off['peak_mb']:.0f} MB, "
              f"on {on['before_mb']:.0f} -> peak {on['peak_mb']:.0f} MB; ESamp extra growth "
              f"{memory['esamp_extra_growth_mb']:.0f} MB")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
