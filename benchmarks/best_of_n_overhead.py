"""Overhead of ``BestOfN`` orchestration over the raw N-candidate generation it wraps.

    python benchmarks/best_of_n_overhead.py --reps 5

Both sides do the same model work with the same seed: ``raw`` is one ``ChatESamp.generate``
call with ``n=N`` and the shipped hidden-state reward observing the decode (scores read from
the observer); ``bestofn`` is ``BestOfN(ChatESamp(...), n=N, reward=HiddenStateReward.shipped())``
``.invoke(question)``, which does that same call plus fusion, selection, answer extraction and
the metadata. Runs are interleaved (order alternating per repetition), medians reported, and the
generated tokens are checked to be identical, so the difference is orchestration alone.
Results go to ``benchmarks/out/best_of_n_overhead.json`` (atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage

from esamp_agents import load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.evaluation.report import machine_info
from esamp_agents.evaluation.tasks import generate_problems
from esamp_agents.hidden_reward.reward import HiddenStateReward
from esamp_agents.langchain.chat_model import ChatESamp
from esamp_agents.selection.best_of_n import BestOfN

OUT = Path(__file__).resolve().parent / "out" / "best_of_n_overhead.json"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("-n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if min(args.reps, args.n, args.max_tokens, args.questions) < 1:
        p.error("--reps, -n, --max-tokens and --questions must all be >= 1")

    loaded = load_model("embedded", device="cpu")
    reward = HiddenStateReward.shipped(loaded)
    questions = [q.prompt() for q in generate_problems("single_digit", args.questions, seed=7, split="test")]
    chat = ChatESamp(loaded_model=loaded, n=args.n, max_tokens=args.max_tokens, temperature=0.7, beta=0.25, seed=11)
    bon = BestOfN(chat, n=args.n, reward=reward, strategy="vote")

    def raw(q: str) -> tuple[float, int]:
        obs = reward.make_observer(loaded)
        t = time.perf_counter()
        result = chat.generate([[HumanMessage(q)]], observers=[obs])
        obs.rewards()
        seconds = time.perf_counter() - t
        return seconds, sum(g.generation_info["completion_tokens"] for g in result.generations[0])

    def best(q: str) -> tuple[float, int]:
        t = time.perf_counter()
        out = bon.invoke(q)
        seconds = time.perf_counter() - t
        ranked = out.response_metadata["best_of_n"]["candidates"]
        return seconds, len(ranked)

    raw(questions[0])  # warm-up
    best(questions[0])
    times: dict[str, list[float]] = {"raw": [], "bestofn": []}
    for rep in range(args.reps):
        for mode in ("raw", "bestofn") if rep % 2 == 0 else ("bestofn", "raw"):
            total = sum((raw if mode == "raw" else best)(q)[0] for q in questions)
            times[mode].append(total)
        print(f"rep {rep + 1}/{args.reps}: raw {times['raw'][-1]:.2f} s, BestOfN {times['bestofn'][-1]:.2f} s",
              flush=True)  # fmt: skip
    paired = [b / r for b, r in zip(times["bestofn"], times["raw"], strict=True)]
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "overhead_median_ratio": statistics.median(times["bestofn"]) / statistics.median(times["raw"]) - 1,
        "overhead_paired_median": statistics.median(paired) - 1,
        "raw": times,
    }
    atomic_write_json(args.out, result)
    print(f"BestOfN overhead over raw generation: {100 * result['overhead_median_ratio']:+.2f}% (medians), "
          f"{100 * result['overhead_paired_median']:+.2f}% (paired); wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
