"""The logit-only reward on the closed-API path: logprob heads, trained and scored from what an API returns.

    python benchmarks/logprob_reward.py                  # collect (about 40 min on 2 cores), then analyse
    python benchmarks/logprob_reward.py --stage analyse  # re-analyse the collected folders

Protocol of BENCHMARKS section 1 (task ``single_digit``, split by arithmetic fact; 160 training
problems x 8 candidates, 200 held-out problems x 16; T = 0.7, top-k 50, 64 new tokens, plain
sampling), but every candidate is served by ``esamp-agents serve`` and read through the real
``openai`` client with ``logprobs=True, top_logprobs=20``, collected with
:func:`esamp_agents.adapters.api_collect.collect_from_api`, exactly as a closed-API user would.

Stages (each cached under ``--work-dir``): 1. collect (starts its own server unless
``--base-url`` is given); 2. analyse: features of every design, heads trained with the
package's trainer, Best-of-N@k with bootstrap intervals against random pick, majority vote,
mean logprob and the oracle, paired differences, data efficiency and scoring cost.
Writes ``<work-dir>/results.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "out" / "logprob_reward"
SUFFIX = "Think step by step, then write the final answer as 'Answer: <number>'."  # the tasks' DEFAULT_SUFFIX


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "collect", "hidden", "analyse"], default="all",
                   help="collect: sample from the server; hidden: the shipped hidden-state head's scores of the "
                   "held-out candidates (post hoc, for comparison); analyse: the logprob heads")  # fmt: skip
    p.add_argument("--train-problems", type=int, default=160)
    p.add_argument("--test-problems", type=int, default=200)
    p.add_argument("--train-n", type=int, default=8)
    p.add_argument("--test-n", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server to use instead of starting one")
    p.add_argument("--model", default="embedded", help="model name sent to the server")
    p.add_argument("--work-dir", type=Path, default=OUT)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--draws", type=int, default=32)
    p.add_argument("--data-efficiency", type=int, nargs="*", default=[15, 30, 60, 120])
    p.add_argument("--ship", type=Path, default=None, help="write the best design's head here")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(args: argparse.Namespace) -> Iterator[str]:
    """The base URL of a running server: ``--base-url``, or ``esamp-agents serve`` started here (plain sampling)."""
    if args.base_url:
        yield args.base_url
        return
    import urllib.request

    port = _free_port()
    cmd = [
        sys.executable, "-m", "esamp_agents", "serve", "--port", str(port), "--beta", "0",
        "--top-k", str(args.top_k), "--temperature", str(args.temperature), "--max-batch-rows", "64",
    ]  # fmt: skip
    log = open(args.work_dir / "serve.log", "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {args.work_dir / 'serve.log'}") from None
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def collect_stage(args: argparse.Namespace) -> None:
    import openai

    from esamp_agents.adapters.api_collect import collect_from_api
    from esamp_agents.evaluation.tasks import generate_problems

    sets = {
        "train": (generate_problems("single_digit", args.train_problems, seed=args.seed, split="train"), args.train_n),
        "test": (generate_problems("single_digit", args.test_problems, seed=args.seed, split="test"), args.test_n),
    }
    with served(args) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"))
        for name, (problems, n) in sets.items():
            print(f"[collect] {name}: {len(problems)} problems x {n} from {base_url}", flush=True)
            summary = collect_from_api(
                client, args.model, problems, args.work_dir / name, n=n, temperature=args.temperature,
                max_tokens=args.max_tokens, top_logprobs=20, seed=args.seed,
                extra_body={"top_k": args.top_k, "beta": 0}, concurrency=max(1, 64 // n),
            )  # fmt: skip
            print(f"[collect] {name}: {summary}", flush=True)
            if summary.failed:
                raise SystemExit(f"{len(summary.failed)} problems failed; rerun to retry them")


# ---------------------------------------------------------------- stage 2: analyse
TOP_K = 20


def answer_span(record: dict[str, Any]) -> list[int]:
    """Indices of the content tokens that spell the final answer (its last occurrence in the text);
    the last token when no answer is found."""
    tokens = record["tokens"]
    if not tokens:
        return []
    ends, pos = [], 0
    for token, _lp, _raw, _alts in tokens:
        pos += len(token)
        ends.append(pos)
    text = "".join(t[0] for t in tokens)
    answer = record.get("extracted")
    at = text.rfind(answer) if answer else -1
    if at < 0:
        return [len(tokens) - 1]
    lo, hi = at, at + len(answer)
    return [i for i, end in enumerate(ends) if end > lo and end - len(tokens[i][0]) < hi] or [len(tokens) - 1]


def served_token_ids(records: list[dict[str, Any]], loaded: Any) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) of served candidates in the local model's vocabulary: the chat
    template of the question, and each token by its exact bytes (plus the end-of-turn token when
    the reply ended with it), i.e. the very tokens the server sampled."""
    from esamp_agents.openai_format import renderer_for

    by_bytes = renderer_for(loaded.tokenizer).ids_by_bytes()
    eot = loaded.eos_token_ids[:1]
    prompts, responses = [], []
    for r in records:
        prompts.append(loaded.chat_token_ids([{"role": "user", "content": f"{r['question']} {SUFFIX}"}]))
        ids = []
        for token, _lp, raw, _alts in r["tokens"]:
            b = token.encode("utf-8") if raw is None else bytes(raw)
            ids.append(
                by_bytes[b] if b in by_bytes else loaded.tokenizer(token, add_special_tokens=False)["input_ids"][0]
            )
        responses.append(ids + (eot if r["finish_reason"] == "stop" else []))
    return prompts, responses


def hidden_stage(args: argparse.Namespace) -> None:
    """The shipped hidden-state head's score of every held-out candidate -> ``hidden_scores.json``."""
    from esamp_agents.adapters.api_collect import read_api_records
    from esamp_agents.atomic import atomic_write_json

    test = read_api_records(args.work_dir / "test")
    t = time.perf_counter()
    scores = hidden_scores(test)
    seconds = time.perf_counter() - t
    atomic_write_json(args.work_dir / "hidden_scores.json",
                      {"scores": scores, "ms_per_candidate": 1000 * seconds / len(test)})  # fmt: skip
    print(f"[hidden] {len(test)} candidates in {seconds:.0f} s", flush=True)


def hidden_scores(records: list[dict[str, Any]]) -> list[float]:
    """The shipped hidden-state head on the same served candidates (post hoc: one forward per batch)."""
    from esamp_agents import load_model
    from esamp_agents.hidden_reward.reward import HiddenStateReward

    loaded = load_model("embedded", device="cpu")
    reward = HiddenStateReward.shipped(loaded)
    prompts, responses = served_token_ids(records, loaded)
    out: list[float] = []
    for start in range(0, len(records), 64):
        out.extend(reward.score_tokens(prompts[start : start + 64], responses[start : start + 64]))
    return out


def paired(groups: list[Any], a: str, b: str, k: int, draws: int, seed: int) -> dict[str, float]:
    """Best-of-N@k of selector a minus b on the same subsets, with a 95% bootstrap interval over problems."""
    import numpy as np

    from esamp_agents.evaluation.metrics import bootstrap_ci
    from esamp_agents.evaluation.selectors import select_accuracy
    from esamp_agents.evaluation.tasks import answers_match

    rng = np.random.default_rng(seed)
    diffs = []
    for g in groups:
        n = len(g.correct)
        subsets = [np.arange(n)] if k == n else [rng.permutation(n)[:k] for _ in range(draws)]
        da = [select_accuracy(g, a, idx, rng, answers_match) for idx in subsets]
        db = [select_accuracy(g, b, idx, rng, answers_match) for idx in subsets]
        diffs.append(float(np.mean(da) - np.mean(db)))
    mean, low, high = bootstrap_ci(diffs, seed=seed)
    return {"mean": mean, "low": low, "high": high}


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    from esamp_agents import load_model
    from esamp_agents.adapters.api_collect import read_api_records
    from esamp_agents.adapters.logprob_training import candidate_features, new_head, stats_spec
    from esamp_agents.atomic import atomic_write_json
    from esamp_agents.evaluation.selectors import Group, best_of_n, unbiased_pass_at_k
    from esamp_agents.evaluation.tasks import answers_match
    from esamp_agents.hidden_reward.head import save_head
    from esamp_agents.hidden_reward.token_head import TokenTableHead
    from esamp_agents.hidden_reward.training import Example, fit, score_examples

    train = read_api_records(args.work_dir / "train")
    test = read_api_records(args.work_dir / "test")
    train_ids = list(dict.fromkeys(r["problem_id"] for r in train))
    print(f"[analyse] {len(train)} training and {len(test)} held-out candidates", flush=True)
    spans_test = [answer_span(r) for r in test]

    designs: dict[str, dict[str, Any]] = {
        "stats": {"kind": "logprobs"},
        "stats_answer_span": {"kind": "logprobs", "span": True},
        "vocab": {"kind": "logprob_tokens", "index": "vocab"},
        "hash": {"kind": "logprob_tokens", "index": "hash:4096"},
        "embed": {"kind": "logprob_tokens", "index": "vocab", "tables": "embedding"},
    }
    loaded = load_model("embedded", device="cpu")

    cache: dict[str, tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]] = {}

    def prepared(name: str) -> tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]:
        """(untrained head or None, spec, training features, held-out features) of a design, computed
        once. A vocab index holds the tokens of ALL training candidates (no labels involved), also
        for the data-efficiency heads trained on fewer problems."""
        if name not in cache:
            design = designs[name]
            head = new_head(train, args.model, kind=design["kind"], index=design.get("index", "vocab"),
                            tables=design.get("tables", "free"), loaded=loaded)  # fmt: skip
            spec = head.spec if head is not None else stats_spec(args.model)
            reader = head if head is not None else spec
            f_train, f_test = candidate_features(train, reader), candidate_features(test, reader)
            if design.get("span"):
                f_train = [f[answer_span(r)] for f, r in zip(f_train, train, strict=True)]
                f_test = [f[s] for f, s in zip(f_test, spans_test, strict=True)]
            cache[name] = (head, spec, f_train, f_test)
        return cache[name]

    def train_design(name: str, problems: set[str], lr: float) -> tuple[Any, list[float], float]:
        """(fit result, held-out scores, training seconds) of a design trained on ``problems``."""
        template, spec, f_train, f_test = prepared(name)
        head = copy.deepcopy(template)
        examples = [Example(f, bool(r["correct"]), r["problem_id"]) for f, r in zip(f_train, train, strict=True)
                    if f.shape[0] > 0 and r["problem_id"] in problems]  # fmt: skip
        t = time.perf_counter()
        result = fit(examples, spec, lr=lr, epochs=40, seed=args.seed, head=head)
        seconds = time.perf_counter() - t
        if isinstance(result.head, TokenTableHead):
            result.head.materialise()
        padded = [f if f.shape[0] else torch.zeros(1, f.shape[1]) for f in f_test]
        return result, [float(v) for v in score_examples(result.head, padded)], seconds

    scores: dict[str, list[float]] = {
        "mean_logprob": [sum(t[1] for t in r["tokens"]) / max(1, len(r["tokens"])) for r in test],
        "answer_mean_logprob": [
            sum(r["tokens"][i][1] for i in s) / max(1, len(s)) for r, s in zip(test, spans_test, strict=True)
        ],
        "answer_min_logprob": [
            min((r["tokens"][i][1] for i in s), default=0.0) for r, s in zip(test, spans_test, strict=True)
        ],
    }
    info: dict[str, Any] = {}
    heads: dict[str, Any] = {}
    all_problems = set(train_ids)
    for name in designs:
        best = None
        for lr in (1e-3, 1e-2):  # chosen on the validation split, never on the test set
            result, sc, seconds = train_design(name, all_problems, lr)
            acc = result.summary["best_val_bon_accuracy"] or 0.0
            loss = result.summary["best_val_loss"] or 0.0
            print(f"[train] {name} lr={lr}: val BoN {acc:.3f}, val loss {loss:.4f}, {seconds:.1f} s", flush=True)
            if best is None or (acc, -loss) > (best[0], -best[5]):
                best = (acc, lr, result, sc, seconds, loss)
        acc, lr, result, sc, seconds, _loss = best
        heads[name], scores[name] = result.head, sc
        t = time.perf_counter()
        reader = result.head
        feats = candidate_features(test[:320], reader)
        feature_ms = 1000 * (time.perf_counter() - t) / 320
        t = time.perf_counter()
        score_examples(reader, [f if f.shape[0] else torch.zeros(1, f.shape[1]) for f in feats])
        head_ms = 1000 * (time.perf_counter() - t) / 320
        info[name] = {"lr": lr, "val_bon_accuracy": acc, "parameters": result.head.num_parameters,
                      "train_seconds": seconds, "summary": result.summary,
                      "feature_ms_per_candidate": feature_ms, "head_ms_per_candidate": head_ms}  # fmt: skip
    hidden_file = args.work_dir / "hidden_scores.json"
    if hidden_file.is_file():  # written by --stage hidden
        stored = json.loads(hidden_file.read_text())
        if len(stored["scores"]) != len(test):
            raise SystemExit(f"{hidden_file} has {len(stored['scores'])} scores for {len(test)} candidates")
        scores["hidden_shipped"] = stored["scores"]
        info["hidden_shipped"] = {"ms_per_candidate_posthoc": stored["ms_per_candidate"]}
    learned_names = [*designs, "hidden_shipped"] if "hidden_shipped" in scores else list(designs)

    def groups_of(score_map: dict[str, list[float]]) -> list[Group]:
        by: dict[str, list[int]] = {}
        for i, r in enumerate(test):
            by.setdefault(r["problem_id"], []).append(i)
        return [Group(pid, [bool(test[i]["correct"]) for i in idx], [test[i]["extracted"] for i in idx],
                      test[idx[0]]["answer"], {n: [v[i] for i in idx] for n, v in score_map.items()})
                for pid, idx in by.items()]  # fmt: skip

    groups = groups_of(scores)
    learned = learned_names
    selectors = ["random", "majority", "argmax:mean_logprob", "argmax:answer_mean_logprob", "argmax:answer_min_logprob"]
    selectors += [f"argmax:{n}" for n in learned] + [f"zvote:{n}" for n in learned] + ["oracle"]
    bon = best_of_n(groups, selectors, args.ks, matches=answers_match, draws=args.draws, seed=args.seed)
    k = 8
    comparisons = {}
    for n in learned:
        for kind in ("argmax", "zvote"):
            comparisons[f"{kind}:{n} - majority"] = paired(groups, f"{kind}:{n}", "majority", k, args.draws, args.seed)

    # the validation rule fit() uses: best validation Best-of-N, ties to the lower validation loss
    def val_key(n: str) -> tuple[float, float]:
        return info[n]["val_bon_accuracy"], -(info[n]["summary"]["best_val_loss"] or 0.0)

    best_design = max(designs, key=val_key)
    best_token = max(("vocab", "hash", "embed"), key=val_key)
    for kind in ("argmax", "zvote"):
        comparisons[f"{kind}:{best_token} - {kind}:stats"] = paired(
            groups, f"{kind}:{best_token}", f"{kind}:stats", k, args.draws, args.seed
        )
    majority = bon["majority"][k]["mean"]
    hidden_gain = bon["argmax:hidden_shipped"][k]["mean"] - majority if "hidden_shipped" in scores else None
    fraction = {n: (bon[f"argmax:{n}"][k]["mean"] - majority) / hidden_gain if hidden_gain else None for n in designs}

    # data efficiency of every token design (argmax and vote at N = 8)
    efficiency: dict[str, dict[str, Any]] = {}
    sizes = sorted({c for c in args.data_efficiency if c < len(train_ids)} | {len(train_ids)})
    for name in ("stats", "vocab", "hash", "embed"):
        efficiency[name] = {}
        for c in sizes:
            _result, sc, _ = train_design(name, set(train_ids[:c]), info[name]["lr"])
            res = best_of_n(groups_of({"x": sc}), ["argmax:x", "zvote:x"], [k], matches=answers_match,
                            draws=args.draws, seed=args.seed)  # fmt: skip
            efficiency[name][str(c)] = {"argmax": res["argmax:x"][k], "zvote": res["zvote:x"][k]}
            print(f"[efficiency] {name} {c} problems: {100 * res['argmax:x'][k]['mean']:.1f} / "
                  f"{100 * res['zvote:x'][k]['mean']:.1f}", flush=True)  # fmt: skip

    if args.ship is not None:
        design = designs[best_design]
        heads[best_design].training_summary.update({
            "api_model": args.model, "head_kind": design["kind"], "index": design.get("index"),
            "tables": design.get("tables", "free"), "trained_by": "benchmarks/logprob_reward.py",
        })  # fmt: skip
        save_head(heads[best_design], args.ship)
        print(f"[ship] {best_design} -> {args.ship}", flush=True)
    result = {
        "command": shlex.join(["python", "benchmarks/logprob_reward.py", *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "train": {
            "problems": len(train_ids),
            "candidates": len(train),
            "per_sample_accuracy": sum(r["correct"] for r in train) / len(train),
        },
        "test": {
            "problems": len(groups),
            "candidates": len(test),
            "per_sample_accuracy": sum(r["correct"] for r in test) / len(test),
            "unbiased_pass_at_k": unbiased_pass_at_k(groups, args.ks),
        },
        "designs": info,
        "best_design_by_validation": best_design,
        "best_of_n": bon,
        "paired_at_8": comparisons,
        "gain_over_majority_as_fraction_of_hidden": fraction,
        "data_efficiency": efficiency,
    }
    atomic_write_json(args.work_dir / "results.json", result)
    atomic_write_json(args.work_dir / "scores.json", [
        {"problem_id": r["problem_id"], "correct": r["correct"], "extracted": r["extracted"], "answer": r["answer"],
         **{n: v[i] for n, v in scores.items()}} for i, r in enumerate(test)])  # fmt: skip
    print_tables(result, args.ks)
    return result


def print_tables(result: dict[str, Any], ks: list[int]) -> None:
    bon = result["best_of_n"]
    print("\n| selector | " + " | ".join(f"N={k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for sel, row in bon.items():
        print(f"| {sel} | " + " | ".join(f"{100 * row[k]['mean']:.1f} [{100 * row[k]['low']:.1f}, "
                                         f"{100 * row[k]['high']:.1f}]" for k in ks) + " |")  # fmt: skip
    print("\npaired differences at N = 8 (points):")
    for name, d in result["paired_at_8"].items():
        print(f"  {name}: {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
    print(f"\nvalidation-chosen design: {result['best_design_by_validation']}; "
          f"gain over majority / hidden head's gain: {result['gain_over_majority_as_fraction_of_hidden']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "collect"):
        collect_stage(args)
    if args.stage in ("all", "hidden"):
        hidden_stage(args)
    if args.stage in ("all", "analyse"):
        analyse(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
