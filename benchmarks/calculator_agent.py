"""Accuracy on held-out arithmetic word problems: direct answer vs a calculator-tool agent vs the
agent with Best-of-N over its tool calls, all on the embedded SmolLM2-135M-Instruct, offline.

- ``direct``: the model answers step by step, then ``Answer: <number>`` (greedy, no tool).
- ``agent``: ``create_agent`` + ``ChatESamp`` (greedy) + the calculator; the policy forces one
  call, then a reply constrained to ``The answer is <number>.``
- ``bon``: the same agent choosing each step among ``--n`` ESamp candidates (one batched decode,
  ``--temperature``/``--beta``) by tool-call validity, then by ``CallVoteReward``.

Problems: ``generate_word_problems(--problems, seed=--seed, split="test")`` (families take turns,
so 32 problems are 8 additions, subtractions, multiplications and divisions; the agent's worked
examples use train-split facts only). Accuracy comes with a 95% Wilson interval; the paired
differences with a 95% bootstrap interval over problems (seeded).

    python benchmarks/calculator_agent.py --problems 32
    python benchmarks/calculator_agent.py --problems 8 --modes direct agent

Results go to benchmarks/out/calculator_agent.json (written atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from esamp_agents.atomic import atomic_write_json
from esamp_agents.recipes.calculator_agent import (
    AgentAnswer,
    best_of_n_calculator_agent,
    calculator_agent,
    direct_answers,
    generate_word_problems,
    solve,
)

OUT = Path(__file__).resolve().parent / "out"
MODES = ("direct", "agent", "bon")
FAMILY_OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def wilson(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (sensible at 0/n and n/n, unlike the normal one)."""
    if total == 0:
        return (math.nan, math.nan)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: list[bool], b: list[bool], reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of accuracy(b) - accuracy(a), resampling problems (paired)."""
    rng = random.Random(seed)
    n = len(a)
    diffs = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(b[i] - a[i] for i in idx) / n)
    diffs.sort()
    return (diffs[int(0.025 * reps)], diffs[int(0.975 * reps) - 1])


def row(problem: Any, result: AgentAnswer, seconds: float) -> dict[str, Any]:
    family = problem.key.split(":")[0]
    ops = [c.get("op") for c in result.tool_calls]
    return {
        "id": problem.id,
        "family": family,
        "question": problem.question,
        "reference": problem.answer,
        "answer": result.answer,
        "correct": bool(result.correct),
        "tool_calls": result.tool_calls,
        "tool_results": result.tool_results,
        "tool_result_correct": result.tool_result_correct if result.tool_calls else None,
        "op_correct": (ops[:1] == [FAMILY_OPS[family]]) if ops else None,
        "final_text": result.final_text[-300:],
        "seconds": round(seconds, 3),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson(correct, n)
    out: dict[str, Any] = {
        "correct": correct,
        "total": n,
        "accuracy": correct / n,
        "wilson95": [round(low, 4), round(high, 4)],
        "seconds_per_problem": round(sum(r["seconds"] for r in rows) / n, 3),
        "by_family": {},
    }
    called = [r for r in rows if r["tool_calls"]]
    if called:
        out["tool_called"] = len(called)
        out["op_correct"] = sum(bool(r["op_correct"]) for r in called)
        out["tool_result_correct"] = sum(bool(r["tool_result_correct"]) for r in called)
    for family in FAMILY_OPS:
        fam = [r for r in rows if r["family"] == family]
        if fam:
            out["by_family"][family] = f"{sum(r['correct'] for r in fam)}/{len(fam)}"
    return out


def run_mode(mode: str, problems: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    if mode == "direct":
        start = time.perf_counter()
        results = direct_answers(problems, max_tokens=args.direct_max_tokens, batch_size=args.batch_size)
        each = (time.perf_counter() - start) / len(problems)  # batched: the mean per problem
        return [row(p, r, each) for p, r in zip(problems, results, strict=True)]
    if mode == "agent":
        agent = calculator_agent(max_tokens=args.max_tokens, seed=args.seed)
    else:
        agent = best_of_n_calculator_agent(
            args.n, temperature=args.temperature, beta=args.beta, max_tokens=args.max_tokens, seed=args.seed
        )
    rows = []
    for i, problem in enumerate(problems):
        start = time.perf_counter()
        result = solve(agent, problem)
        rows.append(row(problem, result, time.perf_counter() - start))
        print(f"  {mode} {i + 1}/{len(problems)}: {result.tool_calls} -> {result.answer} "
              f"(want {problem.answer}) {'ok' if result.correct else 'wrong'}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=32, help="held-out problems (test split)")
    parser.add_argument("--seed", type=int, default=0, help="problem draw and sampling seed")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--n", type=int, default=4, help="Best-of-N candidates per agent step")
    parser.add_argument("--temperature", type=float, default=0.7, help="Best-of-N sampling temperature")
    parser.add_argument("--beta", type=float, default=0.25, help="Best-of-N ESamp strength (0 = plain sampling)")
    parser.add_argument("--max-tokens", type=int, default=48, help="per agent step")
    parser.add_argument("--direct-max-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8, help="direct answers per batched decode")
    parser.add_argument("--out", type=Path, default=OUT / "calculator_agent.json")
    args = parser.parse_args()
    if args.problems < 1 or args.n < 1:
        parser.error(f"--problems={args.problems} and --n={args.n} must both be >= 1")

    started = time.perf_counter()
    problems = generate_word_problems(args.problems, seed=args.seed, split="test")
    modes: dict[str, Any] = {}
    per_mode: dict[str, list[dict[str, Any]]] = {}
    for mode in args.modes:
        print(f"mode {mode}", flush=True)
        per_mode[mode] = run_mode(mode, problems, args)
        modes[mode] = summary(per_mode[mode])
        print(f"  {mode}: {modes[mode]['correct']}/{modes[mode]['total']} {modes[mode]['by_family']}", flush=True)
    paired = {}
    for a, b in (("direct", "agent"), ("direct", "bon"), ("agent", "bon")):
        if a in per_mode and b in per_mode:
            ca, cb = [r["correct"] for r in per_mode[a]], [r["correct"] for r in per_mode[b]]
            low, high = paired_bootstrap(ca, cb, seed=args.seed)
            paired[f"{b}_minus_{a}"] = {
                "difference": (sum(cb) - sum(ca)) / len(ca),
                "bootstrap95": [round(low, 4), round(high, 4)],
                "only_b_right": sum(y and not x for x, y in zip(ca, cb, strict=True)),
                "only_a_right": sum(x and not y for x, y in zip(ca, cb, strict=True)),
            }
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "modes": modes,
        "paired": paired,
        "rows": per_mode,
    }
    atomic_write_json(args.out, result)
    print(f"\n{result['date']} on {result['machine']['platform']}, {result['machine']['cpus']} CPUs, "
          f"{args.problems} problems, {result['wall_seconds']} s")  # fmt: skip
    print("\n| mode | correct | accuracy | 95% Wilson | add | sub | mul | div | op right | s/problem |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, s in modes.items():
        fam = s["by_family"]
        op = f"{s['op_correct']}/{s['tool_called']}" if "op_correct" in s else "-"
        print(f"| {mode} | {s['correct']}/{s['total']} | {s['accuracy']:.3f} | "
              f"[{s['wilson95'][0]:.3f}, {s['wilson95'][1]:.3f}] | {fam.get('add', '-')} | {fam.get('sub', '-')} | "
              f"{fam.get('mul', '-')} | {fam.get('div', '-')} | {op} | {s['seconds_per_problem']:.1f} |")  # fmt: skip
    for name, p in paired.items():
        print(f"{name}: {p['difference']:+.3f} (bootstrap 95% [{p['bootstrap95'][0]:+.3f}, "
              f"{p['bootstrap95'][1]:+.3f}]; only the second right on {p['only_b_right']}, "
              f"only the first on {p['only_a_right']})")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
