"""The ``esamp-agents eval`` command: every argument checked before the model loads, then
:func:`esamp_agents.evaluation.harness.run_eval` and the report's tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from esamp_agents.decoding.params import SamplingParams
from esamp_agents.evaluation.harness import (
    check_ks,
    check_selectors,
    default_ks,
    default_selectors,
    resolve_reward_head,
    run_eval,
)
from esamp_agents.evaluation.report import RESULTS, format_summary
from esamp_agents.evaluation.samplers import parse_samplers
from esamp_agents.hidden_reward.collect_ray import add_ray_args, ray_options_from_args
from esamp_agents.validation import check_int

if TYPE_CHECKING:
    from esamp_agents.hidden_reward.head import GatedLinearHead


def add_eval_command(subparsers: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> Any:
    """Register ``eval`` on the main parser's subparsers; returns its parser."""
    e = subparsers.add_parser(
        "eval",
        help="evaluate samplers x selectors on a task: results.json and plots (resumable)",
        description="Sample N candidates per problem with each sampler (cached and resumable under "
        "OUT/generations/), then report per-sample accuracy, unbiased pass@k, Best-of-N@k per selector "
        "and majority@k with 95% bootstrap CIs, diversity (distinct answers, distinct-n, MiniLM embedding "
        "similarity and Vendi), perplexity, tokens and time, in OUT/results.json and PNG plots.",
        epilog="example: esamp-agents eval --task single_digit:50:0:test --samplers vanilla esamp:0.25 minp:0.05 "
        "-n 8 --ks 1 2 4 8 --out runs/eval",
    )
    e.add_argument(
        "--task",
        required=True,
        help="TASK:COUNT[:SEED[:SPLIT]] (e.g. single_digit:50:0:test) or gsm8k:PATH / svamp:PATH / math:PATH",
    )
    e.add_argument(
        "--samplers",
        nargs="+",
        default=["vanilla", "esamp"],
        metavar="SAMPLER",
        help="vanilla, esamp[:BETA[:warmSTEPS]], minp:P, each with :key=value options "
        "(default: vanilla esamp = the package's ESamp defaults)",
    )
    e.add_argument("-n", type=int, default=8, help="candidates per problem (default 8)")
    e.add_argument("--ks", type=int, nargs="+", default=None, help="k values (default: powers of 2 up to n, and n)")
    e.add_argument(
        "--selectors",
        nargs="+",
        default=None,
        metavar="SELECTOR",
        help="random, majority, oracle, argmax:SCORE, vote:SCORE with SCORE mean_logprob or reward "
        "(default: all that apply)",
    )
    e.add_argument("--out", type=Path, required=True, help="output folder (resumed if it exists)")
    e.add_argument(
        "--reward",
        default="auto",
        metavar="auto|shipped|PATH|none",
        help="reward head for argmax:reward and vote:reward (default auto: the shipped head "
        "with the embedded model when it is installed, else none)",
    )
    e.add_argument("--no-diversity", action="store_true", help="skip the embedding metrics (no MiniLM load)")
    e.add_argument("--no-plots", action="store_true", help="write results.json only")
    e.add_argument("--temperature", type=float, default=0.7, help="default 0.7")
    e.add_argument("--top-k", type=int, default=SamplingParams.top_k, help="default 50; 0 = off")
    e.add_argument("--top-p", type=float, default=1.0, help="default 1.0 = off")
    e.add_argument("--max-tokens", type=int, default=64, help="new tokens per candidate (default 64)")
    e.add_argument("--seed", type=int, default=0, help="sampling, subset and bootstrap seed (default 0)")
    e.add_argument("--prompts-per-call", type=int, default=4, help="problems per engine call (default 4)")
    e.add_argument("--draws", type=int, default=32, help="random subsets per problem for each k < n (default 32)")
    add_model_args(e)
    add_ray_args(e)
    return e


def _cli_reward(value: str, model: str) -> tuple[GatedLinearHead | None, str | None]:
    from esamp_agents.decoding.loading import EMBEDDED
    from esamp_agents.hidden_reward.reward import shipped_head_path

    if value == "auto":
        if model != EMBEDDED:
            return None, None
        try:
            shipped_head_path()
        except FileNotFoundError:
            print("eval: no reward head (the shipped head is not installed); reward selectors are off", file=sys.stderr)
            return None, None
        value = "shipped"
    if value not in ("shipped", "none") and not Path(value).is_file():
        raise ValueError(f"--reward={value!r} is not a file; allowed: auto, shipped, none, or a head checkpoint path")
    try:
        return resolve_reward_head(value)
    except FileNotFoundError as exc:
        raise ValueError(f"--reward={value!r}: {exc}") from exc


def run_eval_command(args: argparse.Namespace, out: TextIO) -> int:
    """``esamp-agents eval``: validate every argument, load the model, run, print the tables."""
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.loading import load_model
    from esamp_agents.evaluation.tasks import load_problems

    try:
        problems = load_problems(args.task)
    except FileNotFoundError as exc:
        raise ValueError(f"--task={args.task!r}: {exc}") from exc
    samplers = parse_samplers(args.samplers)
    ks = check_ks(args.ks if args.ks is not None else default_ks(check_int("-n", args.n, 1)), args.n)
    head, _ = _cli_reward(args.reward, args.model)
    selectors = check_selectors(args.selectors or default_selectors(head is not None), head is not None)
    for s in samplers:
        s.sampling_params(
            n=args.n,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
    for name in ("prompts_per_call", "draws"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out={str(args.out)!r} exists and is not a folder")

    ray_options = ray_options_from_args(args)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
    results = run_eval(
        problems,
        samplers,
        n=args.n,
        ks=ks,
        selectors=selectors,
        out_dir=args.out,
        engine=ESampEngine(loaded),
        reward_head=head,
        diversity=not args.no_diversity,
        plots=not args.no_plots,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        prompts_per_call=args.prompts_per_call,
        draws=args.draws,
        meta={"command": "eval", "arguments": arguments},
        ray_options=ray_options,
        model_load={"model": args.model, "dtype": args.dtype, "device": args.device} if ray_options else None,
    )
    print(format_summary(results), file=out)
    if results["plots_skipped"] and not args.no_plots:
        print(results["plots_skipped"], file=out)
    files = [RESULTS, *results["plots"]]
    print(f"\nwrote {', '.join(str(args.out / f) for f in files)}", file=out)
    return 0


__all__ = ["add_eval_command", "run_eval_command"]
