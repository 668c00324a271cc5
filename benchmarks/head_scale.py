"""More data of the shipped head's own task: more phrasings and more samples per fact (#20).

    python benchmarks/head_scale.py collect     # resumable; ~25 min on 2 cores for the first three sets
    python benchmarks/head_scale.py analyse     # heads per data recipe, paired against the shipped head
    python benchmarks/head_scale.py collect --scale 0.02 --work-dir /tmp/hsc   # smoke run

Sections 15 and 17 found that only data of the task and condition the section-1 test uses moved
the head (160 -> 235 single-digit problems: about +2 points), and that the single-digit train
split has only 285 problems (57 facts x 5 phrasings). This study grows that data two ways that
never touch a held-out fact, and measures each:

- ``train/rephrased``: the same 57 train facts in other phrasings (``single_digit_rephrased``,
  the first 285 of its 570 train problems in a seeded order: twice the problems per fact);
- ``train/single_digit_seed1``: the 285 train problems sampled again with another seed
  (16 candidates per problem instead of 8).

Every set is plain sampling at T=0.7, 8 candidates per problem, 64 new tokens, float32, with
the shipped head's layers (every 4th + final norm) captured during the decode; the test set is
section 1's held-out set regenerated (200 single-digit test problems x 8: the bar is at N=8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.evaluation.tasks import Problem, generate_problems
from esamp_agents.hidden_reward.collect import collect
from esamp_agents.hidden_reward.features import hidden_spec

OUT = Path(__file__).resolve().parent / "out" / "head_scale"
LAYERS = [4, 8, 12, 16, 20, 24, 28, 30]  # the shipped head's hidden states
MAX_NEW_TOKENS = 64
TEMPERATURE = 0.7
TOP_K = 20


def sets(scale: float) -> list[tuple[str, list[Problem], int, int]]:
    """(folder, problems, candidates per problem, seed), in collection order: what the bar needs first."""

    def draw(task: str, count: int, split: str) -> list[Problem]:
        return generate_problems(task, max(2, round(count * scale)), seed=0, split=split)  # type: ignore[arg-type]

    train = draw("single_digit", 285, "train")
    return [
        ("test/section1", draw("single_digit", 200, "test"), 8 if scale >= 0.5 else 4, 0),
        ("train/single_digit", train, 8, 0),
        ("train/rephrased", draw("single_digit_rephrased", 285, "train"), 8, 0),
        ("train/single_digit_seed1", train, 8, 1),
    ]


def collect_all(args: argparse.Namespace) -> None:
    loaded = load_model("embedded", device="cpu", dtype="float32")
    engine = ESampEngine(loaded)
    spec = hidden_spec(loaded, LAYERS)
    jobs = sets(args.scale)
    total = sum(len(p) * n for _, p, n, _ in jobs)
    print(f"[collect] {len(jobs)} sets, {sum(len(p) for _, p, _, _ in jobs)} problems, {total} candidates", flush=True)
    for folder, problems, n, seed in jobs:
        sampling = SamplingParams(n=n, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, seed=seed,
                                  top_logprobs=TOP_K)  # fmt: skip
        t = time.perf_counter()
        summary = collect(engine, problems, args.work_dir / folder, sampling=sampling, esamp=ESampParams(beta=0.0),
                          spec=spec, prompts_per_call=max(1, 128 // n), progress=False)  # fmt: skip
        print(f"[collect] {folder}: {len(problems)} x {n} (seed {seed}) {summary} in {time.perf_counter() - t:.0f} s",
              flush=True)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["collect", "analyse"])
    p.add_argument("--work-dir", type=Path, default=OUT)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of every set's problems (smoke runs)")
    p.add_argument("--save-head", type=Path, default=None, help="analyse: also save the head chosen on validation")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error(f"--scale={args.scale} is out of range; allowed: 0 < scale <= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stage == "collect":
        collect_all(args)
    else:
        root = str(Path(__file__).resolve().parent.parent)
        if root not in sys.path:  # run as a script: make the benchmarks package importable
            sys.path.insert(0, root)
        from benchmarks.head_scale_analysis import analyse

        analyse(args)


if __name__ == "__main__":
    main()
