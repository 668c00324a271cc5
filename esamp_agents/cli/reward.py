"""Command line for the rewards: ``collect``, ``train-reward``, ``train-text-reward`` and ``score``.

    esamp-agents collect --task single_digit:240:0:train --out data/train -n 8
    esamp-agents train-reward data/train --layers every4 --out my-head.safetensors
    esamp-agents collect --task single_digit:160:0:train --out data/api -n 8 \
        --api-base-url https://api.openai.com/v1 --api-model gpt-4o-mini      # a closed API
    esamp-agents train-reward data/api --out my-logprob-head.safetensors     # a logprob head
    esamp-agents train-text-reward data/api --out my-text-reward          # a text reward model (MiniLM)
    esamp-agents score --head shipped --prompt "What is 2 + 3?" "Answer: 5" "Answer: 6"

Values are validated before the model loads; errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.hidden_reward.collect_ray import add_ray_args, ray_options_from_args

LOSSES = ("bce", "bradley_terry", "hinge")
HEAD_KINDS = ("hidden", "logprob_tokens", "logprobs")  # as esamp_agents.adapters.logprob_training (not imported: slow)
TABLES = ("free", "embedding")


def parse_layers(text: str, num_layers: int) -> list[int] | str:
    """'all', 'every4' (every 4th block + the final norm), 'final', or a comma list of indices."""
    if text == "all":
        return "all"
    if text == "every4":
        return sorted({*range(4, num_layers + 1, 4), num_layers})
    if text == "final":
        return [num_layers]
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(
            f"--layers={text!r} is not understood; allowed: all, every4, final, or comma-separated indices"
        ) from exc


def add_reward_commands(sub: Any, add_model_args: Any) -> None:
    """Register the reward subcommands on the main parser's subparsers."""
    c = sub.add_parser(
        "collect",
        help="sample and grade candidates for reward training (resumable)",
        description="Sample N candidates per problem, grade them, and store tokens, labels (and features) "
        "in a resumable folder (format: esamp_agents.hidden_reward.collect).",
    )
    c.add_argument("--task", required=True, help="TASK:COUNT[:SEED[:SPLIT]] (e.g. single_digit:240:0:train) "
                   "or gsm8k:PATH / svamp:PATH / math:PATH")  # fmt: skip
    c.add_argument("--out", type=Path, required=True, help="output folder (resumed if it exists)")
    c.add_argument("-n", type=int, default=8, help="candidates per problem (default 8)")
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--beta", type=float, default=0.0, help="ESamp strength for the candidates (default 0 = plain)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--layers", default="none",
                   help="store features of these layers while decoding: none (tokens only; features are "
                   "recomputed at training time), all, every4, final, or indices")  # fmt: skip
    c.add_argument("--prompts-per-call", type=int, default=4)
    api = c.add_argument_group("sampling from an OpenAI-compatible API instead of a local model")
    api.add_argument("--api-base-url", default=None, help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    api.add_argument("--api-model", default=None, help="the API's model name (required with --api-base-url)")
    api.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    api.add_argument("--top-logprobs", type=int, default=20, help="alternatives per token to request (1..20)")
    api.add_argument("--extra-body", default=None, help="JSON object sent with every request, e.g. '{\"top_k\": 50}'")
    api.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    add_model_args(c)
    add_ray_args(c)

    t = sub.add_parser(
        "train-reward",
        help="train a hidden-state reward head on collected data",
        description="Fit a gated linear reward head (ELHSR) on a folder written by 'collect' and save it "
        "as safetensors with its metadata.",
    )
    t.add_argument("data", type=Path, help="folder written by 'esamp-agents collect'")
    t.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    t.add_argument("--layers", default="every4", help="all, every4 (default), final, or comma-separated indices")
    t.add_argument("--kind", default=None, choices=HEAD_KINDS,
                   help="head form: hidden (local folders' default), logprob_tokens (API folders' default: "
                   "logprob statistics plus token identity) or logprobs (statistics only)")  # fmt: skip
    t.add_argument(
        "--index", default="vocab", help="token identity of a logprob_tokens head: vocab (default) or hash:B"
    )
    t.add_argument("--tables", default=None, choices=TABLES,
                   help="logprob_tokens tables: embedding (the default with --index vocab: tied to --model's token "
                   "embedding while training) or free (one learned pair per token; the default for hash)")  # fmt: skip
    t.add_argument("--loss", default="bce", choices=LOSSES)
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-gate", action="store_true", help="plain mean of token rewards instead of the gated mean")
    t.add_argument("--no-standardize", action="store_true", help="skip per-feature standardisation")
    add_model_args(t)

    tt = sub.add_parser(
        "train-text-reward",
        help="fine-tune a text reward model (sequence classifier) on collected data",
        description="Fine-tune a small cross-encoder (default: the installed all-MiniLM-L6-v2) to score "
        "(prompt, candidate) pairs on a folder written by 'collect' (local or API), and save a folder "
        "that SequenceClassifierReward loads.",
    )
    tt.add_argument("data", type=Path, help="folder written by 'esamp-agents collect' (local or --api-base-url)")
    tt.add_argument("--out", type=Path, required=True, help="model folder to write (replaced if it is one already)")
    tt.add_argument("--base", default=None, help="base model folder (default: the installed all-MiniLM-L6-v2)")
    tt.add_argument("--epochs", type=int, default=3)
    tt.add_argument("--lr", type=float, default=3e-5)
    tt.add_argument("--batch-size", type=int, default=16)
    tt.add_argument(
        "--max-length", type=int, default=256, help="tokens per (prompt, candidate) pair, cut from the left"
    )
    tt.add_argument("--val-fraction", type=float, default=0.2)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--device", default="cpu", help="torch device to train on (default cpu: reproducible)")

    s = sub.add_parser(
        "score",
        help="score responses to a prompt with a reward head",
        description="Score (prompt, response) pairs post hoc with a hidden-state reward head.",
    )
    s.add_argument("responses", nargs="*", help="responses to score (or use --pairs)")
    s.add_argument("--prompt", default=None, help="the prompt the responses answer")
    s.add_argument("--pairs", type=Path, default=None, help="JSONL with 'prompt' and 'response' fields")
    s.add_argument("--head", default="shipped", help="'shipped' (the embedded model's head) or a checkpoint path")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(s)


def _load(args: argparse.Namespace) -> Any:
    from esamp_agents.decoding.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def run_collect(args: argparse.Namespace, out: TextIO) -> int:
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.evaluation.tasks import load_problems
    from esamp_agents.hidden_reward.collect import collect
    from esamp_agents.hidden_reward.features import hidden_spec

    for name in ("n", "prompts_per_call"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range; allowed: >= 1")
    if args.api_base_url is not None:
        return _collect_from_api(args, out)
    sampling = SamplingParams(n=args.n, max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    esamp = ESampParams(beta=args.beta)
    try:
        problems = load_problems(args.task)
    except FileNotFoundError as exc:
        raise ValueError(f"--task={args.task!r}: {exc}") from exc
    ray_options = ray_options_from_args(args)  # before loading anything: a bad flag fails fast
    loaded = _load(args)
    spec = None if args.layers == "none" else hidden_spec(loaded, parse_layers(args.layers, loaded.num_layers))
    if ray_options is not None:
        from esamp_agents.hidden_reward.collect_ray import collect_ray

        summary = collect_ray(
            problems, args.out, model=args.model, dtype=args.dtype, device=args.device, sampling=sampling,
            esamp=esamp, spec=spec, prompts_per_call=args.prompts_per_call, ray_options=ray_options,
        )  # fmt: skip
    else:
        summary = collect(
            ESampEngine(loaded), problems, args.out, sampling=sampling, esamp=esamp, spec=spec,
            prompts_per_call=args.prompts_per_call,
        )  # fmt: skip
    print(summary, file=out)
    return 0


def _collect_from_api(args: argparse.Namespace, out: TextIO) -> int:
    import os

    from esamp_agents.adapters.api_collect import collect_from_api
    from esamp_agents.evaluation.tasks import load_problems

    if not args.api_model:
        raise ValueError("--api-base-url needs --api-model (the model name the API serves)")
    if args.layers != "none" or args.beta != 0.0 or ray_options_from_args(args) is not None:
        raise ValueError("--layers, --beta and Ray flags are for local models; an API collection stores logprobs only")
    extra = None
    if args.extra_body is not None:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as exc:
            raise ValueError(f"--extra-body={args.extra_body!r} is not JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise ValueError(f"--extra-body={args.extra_body!r} must be a JSON object")
    try:
        problems = load_problems(args.task)
    except FileNotFoundError as exc:
        raise ValueError(f"--task={args.task!r}: {exc}") from exc
    import openai

    client = openai.OpenAI(base_url=args.api_base_url, api_key=os.environ.get(args.api_key_env) or "unused")
    summary = collect_from_api(
        client, args.api_model, problems, args.out, n=args.n, temperature=args.temperature, max_tokens=args.max_tokens,
        top_logprobs=args.top_logprobs, seed=args.seed, extra_body=extra, concurrency=args.concurrency,
    )  # fmt: skip
    print(summary, file=out)
    if summary.failed:
        print(
            f"{len(summary.failed)} problems failed after retries; run the same command again to retry them", file=out
        )
        return 1
    return 0


def _train_logprob_head(args: argparse.Namespace, out: TextIO) -> int:
    from esamp_agents.adapters.logprob_training import parse_index, train_logprob_head
    from esamp_agents.hidden_reward.head import save_head

    kind = args.kind or "logprob_tokens"
    if kind == "hidden":
        raise ValueError(f"{args.data} holds API logprobs, not hidden states: use --kind logprob_tokens or logprobs")
    parse_index(args.index)  # a bad value fails before any work
    from esamp_agents.adapters.logprob_training import default_tables

    tables = args.tables or default_tables(args.index)
    loaded = _load(args) if kind == "logprob_tokens" and tables == "embedding" else None
    result = train_logprob_head(
        args.data, kind=kind, index=args.index, tables=tables, loaded=loaded, loss=args.loss,
        gate=not args.no_gate, standardize=not args.no_standardize, epochs=args.epochs, lr=args.lr,
        val_fraction=args.val_fraction, seed=args.seed, progress=True,
    )  # fmt: skip
    path = save_head(result.head, args.out)
    print(json.dumps(result.summary, indent=2, default=str), file=out)
    print(f"wrote {path} ({result.head.num_parameters} parameters)", file=out)
    return 0


def run_train_reward(args: argparse.Namespace, out: TextIO) -> int:
    from esamp_agents.hidden_reward.collect import load_examples
    from esamp_agents.hidden_reward.features import hidden_spec
    from esamp_agents.hidden_reward.head import save_head
    from esamp_agents.hidden_reward.training import fit

    if not (args.data / "manifest.json").is_file():
        raise ValueError(f"{args.data} is not a folder written by 'esamp-agents collect' (no manifest.json)")
    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out={str(args.out)!r} must end in .safetensors")
    if _is_api_folder(args.data):
        return _train_logprob_head(args, out)
    if args.kind not in (None, "hidden"):
        raise ValueError(
            f"--kind={args.kind} needs a folder collected from an API (esamp-agents collect --api-base-url)"
        )
    loaded = _load(args)
    spec = hidden_spec(loaded, parse_layers(args.layers, loaded.num_layers))
    examples = load_examples(args.data, loaded=loaded, spec=spec)
    result = fit(
        examples, spec, loss=args.loss, gate=not args.no_gate, standardize=not args.no_standardize,
        epochs=args.epochs, lr=args.lr, val_fraction=args.val_fraction, seed=args.seed, progress=True,
    )  # fmt: skip
    path = save_head(result.head, args.out)
    print(json.dumps(result.summary, indent=2, default=str), file=out)
    print(f"wrote {path} ({result.head.num_parameters} parameters)", file=out)
    return 0


def run_train_text_reward(args: argparse.Namespace, out: TextIO) -> int:
    from esamp_agents.selection.text_reward_training import check_out_dir, load_labelled_texts, train_text_reward

    check_out_dir(args.out)  # before reading anything
    records, suffix = load_labelled_texts(args.data)
    fit = train_text_reward(
        records, args.out, suffix=suffix, base=args.base, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, val_fraction=args.val_fraction, seed=args.seed,
        device=args.device, progress=True,
    )  # fmt: skip
    summary = {k: v for k, v in fit.summary.items() if k != "history"}
    print(json.dumps(summary, indent=2, default=str), file=out)
    print(f"wrote {fit.path} (load it with SequenceClassifierReward({str(fit.path)!r}))", file=out)
    return 0


def _is_api_folder(path: Path) -> bool:
    from esamp_agents.adapters.api_collect import FORMAT_NAME
    from esamp_agents.hidden_reward.collect import CollectFormatError, manifest_json

    try:
        manifest = manifest_json(path)
    except CollectFormatError:
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["prompt"]), str(row["response"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: need a JSON object with 'prompt' and 'response' ({exc})") from exc
    if not pairs:
        raise ValueError(f"{path} has no pairs")
    return pairs


def run_score(args: argparse.Namespace, out: TextIO) -> int:
    from esamp_agents.hidden_reward.reward import HiddenStateReward, shipped_head_path

    if args.pairs is not None:
        if args.responses or args.prompt is not None:
            raise ValueError("give either --pairs FILE or --prompt with responses, not both")
        pairs = _read_pairs(args.pairs)
    else:
        if args.prompt is None or not args.responses:
            raise ValueError("give --prompt and at least one response (or --pairs FILE)")
        pairs = [(args.prompt, r) for r in args.responses]
    head = shipped_head_path() if args.head == "shipped" else Path(args.head)
    if not head.is_file():
        raise ValueError(f"--head={args.head!r}: no such file")
    reward = HiddenStateReward(head, _load(args))
    rewards = []
    for prompt in dict.fromkeys(p for p, _ in pairs):
        responses = [r for p, r in pairs if p == prompt]
        rewards.extend(zip([prompt] * len(responses), responses, reward.score_texts(prompt, responses), strict=True))
    if args.json:
        json.dump([{"prompt": p, "response": r, "reward": s} for p, r, s in rewards], out, indent=2)
        print(file=out)
    else:
        for p, r, s in rewards:
            flat = " ".join(r.split())
            print(f"{s:+.4f}  {flat[:70]}{'...' if len(flat) > 70 else ''}   <- {' '.join(p.split())[:40]}", file=out)
    return 0


COMMANDS = {
    "collect": run_collect,
    "train-reward": run_train_reward,
    "train-text-reward": run_train_text_reward,
    "score": run_score,
}

__all__ = ["COMMANDS", "add_reward_commands", "parse_layers"]
