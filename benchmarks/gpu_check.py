"""A short check of the CUDA paths, for a machine that has a GPU (the CI machines have none).

    python benchmarks/gpu_check.py --out "$OUT/gpu_check.json"      # ~3-5 minutes on one GPU

1. Correctness: the embedded model on CUDA in float32 and bfloat16; ESamp with the Distiller's
   update on the side stream (the CUDA default) samples the same tokens as the synchronous order,
   and the Distiller's losses stay finite under a bfloat16 model (it trains in float32).
   The same for ``distiller_update_every=4`` (training once per 4 steps on the side stream).
2. Speed: ESamp on / off throughput (paired, interleaved, medians) at 1x1, 4x1, 4x16 and 16x16,
   with and without the side stream, and training every 4th step, in bfloat16; generated tokens
   counted (EOS ignored).

Exits non-zero when a correctness check fails. Refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.throughput import prompts_for
from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.decoding.engine import ESampEngine


def timed(
    engine: ESampEngine, prompts: list[list[int]], sampling: SamplingParams, beta: float, overlap: bool, every: int = 1
) -> float:
    engine.overlap_distiller = overlap
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate(prompts, sampling, ESampParams(beta=beta, warm_start_steps=0, distiller_update_every=every))
    torch.cuda.synchronize()
    return out.stats.generated_tokens / (time.perf_counter() - start)


def correctness(engine: ESampEngine) -> dict[str, Any]:
    """Same tokens with the update on the side stream as in order; the Distiller's losses finite
    (it trains in float32 whatever the model's dtype)."""
    prompts = prompts_for(engine, 2)
    sampling = SamplingParams(n=4, max_new_tokens=24, seed=7)
    tokens, losses = {}, []
    for every in (1, 4):
        for overlap in (False, True):
            engine.overlap_distiller = overlap
            out = engine.generate(prompts, sampling, ESampParams(beta=0.25, distiller_update_every=every))
            tokens[every, overlap] = [c.token_ids for pr in out for c in pr.candidates]
            losses += [x for pr in out for x in pr.distiller_loss]
    return {
        "same_tokens_with_side_stream": tokens[1, True] == tokens[1, False],
        "same_tokens_with_side_stream_every_4": tokens[4, True] == tokens[4, False],
        "distiller_losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device; torch.cuda.is_available() is False here")
    result: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "checks": {},
        "speed": [],
    }
    ok = True
    for dtype in ("float32", "bfloat16"):
        engine = ESampEngine(load_model("embedded", device="cuda", dtype=dtype), batching=False)
        check = correctness(engine)
        result["checks"][dtype] = check
        ok &= all(check.values())
        print(dtype, check, flush=True)
        if dtype != "bfloat16":
            continue
        for p, n in ((1, 1), (4, 1), (4, 16), (16, 16)):
            prompts = prompts_for(engine, p)
            sampling = SamplingParams(n=n, max_new_tokens=args.new_tokens, seed=1, ignore_eos=True)
            timed(engine, prompts, sampling, 0.25, True)  # warm-up
            ratios: dict[str, list[float]] = {"sync": [], "side_stream": [], "side_stream_every_4": []}
            for _ in range(args.reps):
                off = timed(engine, prompts, sampling, 0.0, False)
                ratios["sync"].append(timed(engine, prompts, sampling, 0.25, False) / off)
                ratios["side_stream"].append(timed(engine, prompts, sampling, 0.25, True) / off)
                ratios["side_stream_every_4"].append(timed(engine, prompts, sampling, 0.25, True, every=4) / off)
            row = {"shape": f"{p}x{n}", "off_tokens_per_s": off, **{k: statistics.median(v) for k, v in ratios.items()}}
            result["speed"].append(row)
            print(row, flush=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    if not ok:
        sys.exit("a correctness check failed: see the checks above")


if __name__ == "__main__":
    main()
