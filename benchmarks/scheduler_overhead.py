"""What the continuous-batching scheduler costs one call alone, and where ESamp's time goes in company.

    python benchmarks/scheduler_overhead.py                      # 1x1 and 4x16, 7 reps, 64 tokens
    OMP_WAIT_POLICY=PASSIVE flock /tmp/esamp-model.lock python benchmarks/scheduler_overhead.py

Two measurements on the embedded model, every row generating exactly ``--new-tokens`` tokens
(EOS ignored), ESamp on (beta 0.25) and off:

* **Alone**: one ``generate`` call through the scheduler thread (``ESampEngine()``, the default)
  vs the same call inline on the caller's thread (``ESampEngine(batching=False)``, the old path),
  interleaved (order alternating per repetition); ratio = scheduler / inline tokens/s, of the
  medians and of the best runs (this machine's run-to-run spread is larger than the difference).
* **In company**: ``--clients`` concurrent calls of one prompt x 1 sample each (``top_k=0``, as
  the server samples), and the same prompts as ONE call (a static batch, the ideal); tokens/s,
  and the share of wall time each call's Distiller (forward, backward, Adam) and prefill took,
  summed over calls (they run one after another on the scheduler thread).

Writes JSON (command, machine, date, numbers) to ``benchmarks/out/scheduler_overhead.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.decoding.results import GenerationResult

OUT = Path(__file__).resolve().parent / "out" / "scheduler_overhead.json"


def alone(args: argparse.Namespace, batched: ESampEngine, inline: ESampEngine) -> list[dict[str, Any]]:
    rows = []
    for shape in args.shapes:
        p, n = (int(x) for x in shape.split("x"))
        prompts = [inline.loaded.chat_token_ids([{"role": "user", "content": f"Tell me about the number {i}."}])
                   for i in range(p)]  # fmt: skip
        for beta in (0.0, 0.25):
            sampling = SamplingParams(n=n, max_new_tokens=args.new_tokens, seed=0, ignore_eos=True)
            esamp = ESampParams(beta=beta)
            speeds: dict[str, list[float]] = {"scheduler": [], "inline": []}
            for rep in range(args.reps):
                order = [("scheduler", batched), ("inline", inline)]
                for name, engine in order if rep % 2 == 0 else order[::-1]:
                    t = time.perf_counter()
                    out = engine.generate(prompts, sampling, esamp, add_special_tokens=False)
                    speeds[name].append(out.stats.generated_tokens / (time.perf_counter() - t))
            s, i = statistics.median(speeds["scheduler"]), statistics.median(speeds["inline"])
            best_s, best_i = max(speeds["scheduler"]), max(speeds["inline"])
            rows.append({"shape": shape, "beta": beta, "scheduler_tok_s": s, "inline_tok_s": i, "ratio": s / i,
                         "best_ratio": best_s / best_i, "runs": speeds})  # fmt: skip
            print(f"alone {shape} beta={beta}: scheduler {s:.1f} tok/s, inline {i:.1f} tok/s (medians), "
                  f"ratio {s / i:.3f}; best runs {best_s:.1f} / {best_i:.1f} = {best_s / best_i:.3f}")  # fmt: skip
    return rows


def company(args: argparse.Namespace, engine: ESampEngine) -> list[dict[str, Any]]:
    prompts = [engine.loaded.chat_token_ids([{"role": "user", "content": f"Write a sentence about {i}."}])
               for i in range(args.clients)]  # fmt: skip
    rows = []
    for beta in (0.0, 0.25):
        esamp = ESampParams(beta=beta)
        sampling = SamplingParams(n=1, max_new_tokens=args.new_tokens, seed=0, ignore_eos=True, top_k=0)
        results: list[GenerationResult | None] = [None] * args.clients

        def call(i: int, sampling: SamplingParams, esamp: ESampParams, results: list[Any]) -> None:
            results[i] = engine.generate([prompts[i]], sampling, esamp, add_special_tokens=False)

        threads = [threading.Thread(target=call, args=(i, sampling, esamp, results)) for i in range(args.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        done = [r for r in results if r is not None]
        tokens = sum(r.stats.generated_tokens for r in done)
        distiller = sum(r.stats.distiller_seconds for r in done)
        prefill = sum(r.stats.prefill_seconds for r in done)
        t = time.perf_counter()
        static = engine.generate(prompts, sampling, esamp, add_special_tokens=False)
        static_wall = time.perf_counter() - t
        row = {
            "beta": beta, "clients": args.clients, "concurrent_tok_s": tokens / wall,
            "static_batch_tok_s": static.stats.generated_tokens / static_wall,
            "distiller_share": distiller / wall, "prefill_share": prefill / wall, "wall_s": wall,
        }  # fmt: skip
        rows.append(row)
        print(f"company {args.clients} calls beta={beta}: {row['concurrent_tok_s']:.1f} tok/s "
              f"(one static call {row['static_batch_tok_s']:.1f}); Distillers {row['distiller_share']:.0%} "
              f"and prefills {row['prefill_share']:.0%} of the wall time")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1x1", "4x16"], help="PxN shapes for the alone runs")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--clients", type=int, default=8, help="concurrent calls for the company run")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    loaded = load_model("embedded", device="cpu")
    batched, inline = ESampEngine(loaded), ESampEngine(loaded, batching=False)
    batched.generate(["warm up"], SamplingParams(max_new_tokens=4, seed=0))
    report = {
        "command": "python benchmarks/scheduler_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__},
        "date": dt.date.today().isoformat(),
        "new_tokens": args.new_tokens,
        "alone": alone(args, batched, inline),
        "company": company(args, batched),
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
