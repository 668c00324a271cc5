"""Does decoding on a second thread cost speed? The side-by-side check behind BENCHMARKS.md section 18.

    python benchmarks/decode_thread.py --shape 1x1 --new-tokens 8 --reps 40
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_thread.py --reps 30   # no spin-waits anywhere

Modes, alternating with the leading one rotating: ``main`` (one call decoded on this thread,
``batching=False``), ``thread`` (the same call on a fresh thread while this thread keeps the
OpenMP pool its earlier calls built), ``batched`` (the default engine: a lone call now decodes on
its caller's thread) and ``hf`` (HF ``generate`` on this thread). Prints tokens/s and each mode's
time per token relative to ``main``'s in the same repetition (median and interquartile range).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.decoding.engine import ESampEngine

try:
    from benchmarks.throughput import parse_shape, prompts_for, run_hf, run_on_second_thread, run_ours
except ImportError:  # run as a script from the benchmarks folder
    from throughput import parse_shape, prompts_for, run_hf, run_on_second_thread, run_ours  # type: ignore[no-redef]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, default=(1, 1))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    if args.reps < 2 or args.new_tokens < 1:
        parser.error(f"--reps={args.reps} must be >= 2 and --new-tokens={args.new_tokens} >= 1")
    loaded = load_model("embedded", device="cpu")
    batched, alone = ESampEngine(loaded), ESampEngine(loaded, batching=False)
    p, n = args.shape
    prompts = prompts_for(alone, p)
    sampling = SamplingParams(n=n, max_new_tokens=args.new_tokens, temperature=0.7, top_k=50, ignore_eos=True, seed=0)
    plain = ESampParams(beta=0.0)

    modes: dict[str, Callable[[], dict[str, float]]] = {
        "main": lambda: run_ours(alone, prompts, sampling, plain),
        "thread": lambda: run_on_second_thread(alone, prompts, sampling, plain),
        "batched": lambda: run_ours(batched, prompts, sampling, plain),
        "hf": lambda: run_hf(batched, prompts, sampling),
    }
    names = list(modes)
    for name in names:  # warm-up
        modes[name]()
    per_token: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            run = modes[name]()
            per_token[name].append(run["seconds"] / run["tokens"])
    for name in names:
        ratios = [a / b for a, b in zip(per_token["main"], per_token[name], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"{name:8s} {1 / statistics.median(per_token[name]):6.1f} tok/s   main time / {name} time: "
              f"median {statistics.median(ratios):.3f} [IQR {q1:.3f}-{q3:.3f}]")  # fmt: skip


if __name__ == "__main__":
    main()
