"""The ``esamp-agents agent-demo`` command: the offline calculator agent on word problems.

It runs :mod:`esamp_agents.recipes.calculator_agent` (``create_agent`` + ``ChatESamp`` on the
embedded model + a calculator tool; ``--n`` above 1 chooses each step among N ESamp candidates)
on seeded held-out word problems, or on ``--question`` text, and prints each tool call, its
result and the final answer. Every argument is checked before the model loads.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO

from esamp_agents.validation import check_int, check_range

MAX_PROBLEMS = 50
DEFAULT_PROBLEMS = 3


def add_agent_demo_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``agent-demo`` on the main parser's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "agent-demo",
        help="offline tool agent: word problems solved with a calculator tool (create_agent + ChatESamp)",
        description="Solve arithmetic word problems with a langchain create_agent agent on the embedded "
        "model: a forced calculator call, then a reply stating the result. No API key, no network.",
        epilog="example: esamp-agents agent-demo --problems 4 --n 4",
    )
    p.add_argument(
        "--problems",
        type=int,
        default=DEFAULT_PROBLEMS,
        help=f"held-out generated problems (default {DEFAULT_PROBLEMS}; 1..{MAX_PROBLEMS})",
    )
    p.add_argument("--question", action="append", default=None, help="your own word problem instead (may repeat)")
    p.add_argument("--seed", type=int, default=0, help="seeds the problems and the sampling (default 0)")
    p.add_argument("--n", type=int, default=1, help="candidates per agent step: 1 = greedy (default), >1 = Best-of-N")
    p.add_argument("--temperature", type=float, default=0.7, help="Best-of-N sampling temperature (default 0.7)")
    p.add_argument("--beta", type=float, default=0.25, help="Best-of-N ESamp strength, 0 = plain (default 0.25)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per agent step (default 48)")
    return p


def _check(args: argparse.Namespace) -> None:
    check_int("problems", args.problems, 1, MAX_PROBLEMS)
    check_int("n", args.n, 1, 64)
    check_int("max_tokens", args.max_tokens, 8, 4096)
    check_range("temperature", args.temperature, 0.0, 5.0, allowed="0 <= temperature <= 5")
    check_range("beta", args.beta, 0.0, 10.0, allowed="0 <= beta <= 10")
    for q in args.question or []:
        if not q.strip():
            raise ValueError("question='' is empty; allowed: a non-empty word problem")


def run_agent_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the agent on each problem and print what it did; exit status 0."""
    _check(args)
    from esamp_agents.recipes.calculator_agent import (
        best_of_n_calculator_agent,
        calculator_agent,
        generate_word_problems,
        solve,
    )

    problems: list[Any] = (
        list(args.question) if args.question else generate_word_problems(args.problems, seed=args.seed)
    )
    if args.n == 1:
        agent = calculator_agent(max_tokens=args.max_tokens, seed=args.seed)
    else:
        agent = best_of_n_calculator_agent(
            args.n, temperature=args.temperature, beta=args.beta, max_tokens=args.max_tokens, seed=args.seed
        )
    right = 0
    for i, problem in enumerate(problems, 1):
        start = time.perf_counter()
        result = solve(agent, problem)
        seconds = time.perf_counter() - start
        print(f"[{i}] {result.question}", file=out)
        for call, value in zip(result.tool_calls, result.tool_results, strict=False):
            print(f"    calculator({call.get('a')} {call.get('op')} {call.get('b')}) -> {value}", file=out)
        verdict = "" if result.correct is None else f" ({'right' if result.correct else 'wrong'}: {result.reference})"
        print(f"    {result.final_text}{verdict} [{seconds:.1f} s]", file=out)
        right += bool(result.correct)
    if not args.question:
        print(f"{right}/{len(problems)} right", file=out)
    return 0


__all__ = ["add_agent_demo_command", "run_agent_demo"]
