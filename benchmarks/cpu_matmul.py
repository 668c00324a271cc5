"""The operand order of few-row float32 products on the CPU (BENCHMARKS.md section 19).

    python benchmarks/cpu_matmul.py                     # rows 1 2 3 4 8 16 32 64 128 256
    python benchmarks/cpu_matmul.py --rows 1 4 --reps 9

One "pass" multiplies ``rows`` input rows by every weight matrix of the embedded model's
shape (30 layers of q, k, v, o, gate, up, down, then the 49,152 x 576 LM head; random weights,
distinct per layer, so they stream from memory as a decode step's do), once as torch computes
``F.linear`` (``x @ W^T``) and once as :mod:`esamp_agents.decoding.cpu_matmul` does
(``(W @ x^T)^T``, one row given as two columns). The orders alternate within each repetition;
medians. Results go to benchmarks/out/cpu_matmul.json (written atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from esamp_agents.atomic import atomic_write_json
from esamp_agents.decoding import cpu_matmul
from esamp_agents.evaluation.report import machine_info

OUT = Path(__file__).resolve().parent / "out"
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def one_pass(weights: list[torch.Tensor], inputs: dict[int, torch.Tensor], fast: bool) -> float:
    start = time.perf_counter()
    for w in weights:
        x = inputs[w.shape[1]]
        if fast:
            cpu_matmul.few_row_mm(x, w)
        else:
            F.linear(x, w)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT / "cpu_matmul.json")
    args = parser.parse_args()
    if args.reps < 1 or any(r < 1 for r in args.rows):
        parser.error(f"--reps={args.reps} and every --rows value ({args.rows}) must be >= 1")
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g) for _ in range(LAYERS) for o, i in LAYER_SHAPES]
    weights.append(torch.randn(VOCAB, HIDDEN, generator=g))
    megabytes = sum(w.numel() for w in weights) * 4 / 1e6
    rows_out = []
    for rows in args.rows:
        inputs = {d: torch.randn(rows, d, generator=g) for d in (576, 1536)}
        one_pass(weights, inputs, True), one_pass(weights, inputs, False)  # warm-up
        times: dict[str, list[float]] = {"torch": [], "transposed": []}
        for rep in range(args.reps):
            for fast in (rep % 2 == 0, rep % 2 == 1):
                times["transposed" if fast else "torch"].append(one_pass(weights, inputs, fast))
        t_torch, t_fast = statistics.median(times["torch"]), statistics.median(times["transposed"])
        row = {
            "rows": rows, "torch_ms": t_torch * 1e3, "transposed_ms": t_fast * 1e3, "speedup": t_torch / t_fast,
            "torch_gb_per_s": megabytes / t_torch / 1e3, "transposed_gb_per_s": megabytes / t_fast / 1e3,
        }  # fmt: skip
        rows_out.append(row)
        print(f"rows {rows:4d}: torch {row['torch_ms']:7.1f} ms ({row['torch_gb_per_s']:4.1f} GB/s)  "
              f"transposed {row['transposed_ms']:7.1f} ms ({row['transposed_gb_per_s']:4.1f} GB/s)  "
              f"speed-up {row['speedup']:.2f}x", flush=True)  # fmt: skip
    atomic_write_json(args.out, {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(), "weights_mb": megabytes, "threads": torch.get_num_threads(), "rows": rows_out,
    })  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
