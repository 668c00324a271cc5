"""Best-of-N with the linear hidden-state reward (ELHSR) on held-out single-digit arithmetic.

    python benchmarks/reward_bon.py                       # full protocol (about an hour on 2 cores)
    python benchmarks/reward_bon.py --train-problems 8 --test-problems 8 --test-n 4 --ks 1 2 4   # smoke run

Stages, each cached under ``--work-dir`` so an interrupted run goes on where it stopped:

1. sample (``esamp_agents.hidden_reward.collect``): training problems from the ``train`` split and held-out
   problems from the ``test`` split of the ``single_digit`` task (no arithmetic fact of the
   test split appears in training under any phrasing); tokens, top-20 logprobs and labels.
2. features: one post-hoc forward of the policy model per set gives every head's hidden-state
   features; the top-20 logprob features come from the logprobs recorded while sampling.
3. train: one gated linear head per feature set (BCE, seeded, validation split by problem).
4. evaluate: Best-of-N@k with bootstrap CIs for random pick, majority vote, mean token
   logprob, each head's argmax and reward-weighted vote, and the oracle; data efficiency
   (accuracy against the number of training problems); training time; scoring cost.

Writes ``<work-dir>/results.json`` (atomically) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.evaluation.selectors import Group, best_of_n, unbiased_pass_at_k
from esamp_agents.evaluation.tasks import answers_match, generate_problems
from esamp_agents.hidden_reward.collect import collect, load_examples, read_records
from esamp_agents.hidden_reward.features import hidden_spec
from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead, save_head
from esamp_agents.hidden_reward.logprob_features import token_features
from esamp_agents.hidden_reward.training import Example, fit

OUT = Path(__file__).resolve().parent / "out" / "reward_bon"
TOP_K = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-problems", type=int, default=240)
    p.add_argument("--test-problems", type=int, default=200)
    p.add_argument("--train-n", type=int, default=8, help="candidates per training problem")
    p.add_argument("--test-n", type=int, default=16, help="candidates per held-out problem")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.0, help="ESamp beta for the candidates (0 = plain sampling)")
    p.add_argument("--layer-sets", nargs="+", default=["all", "every4", "final"],
                   help="hidden-state layer sets to train heads on: all, every4, final, or comma lists")  # fmt: skip
    p.add_argument("--data-efficiency", type=int, nargs="*", default=[15, 30, 60, 120],
                   help="training-problem counts for the data-efficiency curve (the full set is added)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=32, help="random subsets per problem for each k < test-n")
    p.add_argument("--prompts-per-call", type=int, default=4)
    p.add_argument("--work-dir", type=Path, default=OUT)
    p.add_argument("--save-head", type=Path, default=None, help="also save the head of --ship-layers here")
    p.add_argument("--ship-layers", default="every4", help="layer set of the head written by --save-head")
    args = p.parse_args(argv)
    for name in ("train_problems", "test_problems", "train_n", "test_n", "epochs", "draws", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range; allowed: >= 1")
    if max(args.ks) > args.test_n:
        p.error(f"--ks {args.ks}: every k must be <= --test-n={args.test_n}")
    return args


def layer_set(name: str, num_layers: int) -> list[int]:
    if name == "all":
        return list(range(num_layers + 1))
    if name == "every4":
        return sorted({*range(4, num_layers + 1, 4), num_layers})
    if name == "final":
        return [num_layers]
    return sorted({int(x) % (num_layers + 1) for x in name.split(",")})


# ---------------------------------------------------------------- stage 1: sampling
def sample(engine: ESampEngine, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Candidates with every layer's token features captured during the decode (no second pass)."""
    spec = hidden_spec(engine.loaded, "all")
    sets = {
        "train": (generate_problems("single_digit", args.train_problems, seed=args.seed, split="train"), args.train_n),
        "test": (generate_problems("single_digit", args.test_problems, seed=args.seed, split="test"), args.test_n),
    }
    records: dict[str, list[dict[str, Any]]] = {}
    for name, (problems, n) in sets.items():
        sampling = SamplingParams(
            n=n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
            top_logprobs=TOP_K,
        )  # fmt: skip
        print(f"[sample] {name}: {len(problems)} problems x {n} candidates", flush=True)
        summary = collect(
            engine, problems, args.work_dir / name, sampling=sampling, esamp=ESampParams(beta=args.beta),
            spec=spec, prompts_per_call=args.prompts_per_call,
        )  # fmt: skip
        print(f"[sample] {name}: {summary}", flush=True)
        wanted = {p.id for p in problems}
        records[name] = [r for r in read_records(args.work_dir / name) if r["problem_id"] in wanted]
    return records


# ---------------------------------------------------------------- stage 2: features
def logprob_features(record: dict[str, Any]) -> torch.Tensor:
    """Top-20 logprob features of the content tokens (the closing end-of-turn token is not shown by APIs)."""
    length = record["content_tokens"]
    chosen = torch.tensor(record["logprobs"][:length], dtype=torch.float32)
    top = torch.tensor(record["top_logprobs"][:length], dtype=torch.float32).reshape(length, -1)
    return token_features(chosen, top, TOP_K)


def columns(layers: list[int], hidden_size: int) -> torch.Tensor:
    """Columns of the all-layer features (layer l at [l * d, (l + 1) * d)) that hold ``layers``."""
    return torch.cat([torch.arange(layer * hidden_size, (layer + 1) * hidden_size) for layer in layers])


def iter_shard_features(work: Path, records: list[dict[str, Any]]) -> Any:
    """Yield (record index, all-layer features [T, dim]) one shard at a time, so memory stays small."""
    from safetensors import safe_open

    by_shard: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_shard.setdefault(r["shard"], []).append(i)
    for shard, idx in by_shard.items():
        with safe_open(str(work / shard), framework="pt", device="cpu") as f:
            feats = f.get_tensor("features")
        for i in idx:
            r = records[i]
            yield i, feats[r["offset"] : r["offset"] + r["length"]]


# ---------------------------------------------------------------- stage 3+4
def score_one(head: GatedLinearHead, feats: torch.Tensor) -> float:
    if feats.shape[0] == 0:
        return 0.0
    with torch.no_grad():
        return float(head(feats.float().unsqueeze(0), torch.ones(1, feats.shape[0], dtype=torch.bool))[0])


def groups_from(records: list[dict[str, Any]], scores: dict[str, list[float]]) -> list[Group]:
    by_problem: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_problem.setdefault(r["problem_id"], []).append(i)
    groups = []
    for pid, idx in by_problem.items():
        first = records[idx[0]]
        groups.append(
            Group(
                problem_id=pid,
                correct=[bool(records[i]["correct"]) for i in idx],
                answers=[records[i]["extracted"] for i in idx],
                reference=first["answer"],
                scores={name: [values[i] for i in idx] for name, values in scores.items()},
            )
        )
    return groups


def train_head(feats: list[torch.Tensor], records: list[dict[str, Any]], spec: FeatureSpec, args: argparse.Namespace,
               problems: set[str] | None = None) -> tuple[GatedLinearHead, dict[str, Any]]:  # fmt: skip
    examples = [
        Example(features=f, label=bool(r["correct"]), group=r["problem_id"])
        for f, r in zip(feats, records, strict=True)
        if (problems is None or r["problem_id"] in problems) and f.shape[0] > 0
    ]
    result = fit(examples, spec, loss="bce", epochs=args.epochs, lr=args.lr, seed=args.seed)
    return result.head, result.summary


def observer_overhead(engine: ESampEngine, head: GatedLinearHead, args: argparse.Namespace, reps: int = 3) -> dict:
    """Decode throughput with the streamed reward (RewardObserver) on vs off, interleaved, medians."""
    import statistics

    from esamp_agents.hidden_reward.features import RewardObserver

    problems = generate_problems("single_digit", 4, seed=args.seed + 1, split="test")
    prompts = [engine.loaded.chat_token_ids([{"role": "user", "content": p.prompt()}]) for p in problems]
    sampling = SamplingParams(n=min(16, args.test_n), max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, seed=args.seed, ignore_eos=True)  # fmt: skip
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for rep in range(reps + 1):
        for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
            obs = [RewardObserver(head)] if mode == "on" else []
            t = time.perf_counter()
            out = engine.generate(prompts, sampling, ESampParams(beta=args.beta), observers=obs)
            if rep > 0:  # the first round warms up
                rates[mode].append(out.stats.generated_tokens / (time.perf_counter() - t))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"tokens_per_s_off": off, "tokens_per_s_on": on, "ratio_on_off": on / off, "reps": reps,
            "shape": f"4x{sampling.n}"}  # fmt: skip


def table(results: dict[str, dict[int, dict[str, float]]], ks: list[int], names: dict[str, str]) -> str:
    lines = ["| selector | " + " | ".join(f"N={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for sel, label in names.items():
        cells = [f"{100 * results[sel][k]['mean']:.1f} [{100 * results[sel][k]['low']:.1f}, "
                 f"{100 * results[sel][k]['high']:.1f}]" for k in ks]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    loaded = load_model("embedded", device="cpu")
    engine = ESampEngine(loaded)
    t0 = time.perf_counter()
    records = sample(engine, args)
    sample_seconds = time.perf_counter() - t0
    eos = set(loaded.eos_token_ids)
    for rs in records.values():
        for r in rs:
            ends_with_eos = r["token_ids"] and r["token_ids"][-1] in eos and r.get("finish_reason") == "stop"
            r["content_tokens"] = len(r["token_ids"]) - (1 if ends_with_eos else 0)
    gen_tokens = sum(len(r["token_ids"]) for r in records["test"])

    num_layers, d = loaded.num_layers, loaded.hidden_size
    sets = {name: layer_set(name, num_layers) for name in args.layer_sets}
    eff_name = args.ship_layers if args.ship_layers in sets else next(iter(sets))
    train_ids = list(dict.fromkeys(r["problem_id"] for r in records["train"]))
    counts = sorted({c for c in args.data_efficiency if c < len(train_ids)} | {len(train_ids)})
    k_eff = 8 if 8 in args.ks else max(args.ks)

    # train every head on the training features (all layers, float16, read from the shards)
    t = time.perf_counter()
    train_all = [ex.features for ex in load_examples(args.work_dir / "train")]
    print(f"[train] loaded {sum(f.shape[0] for f in train_all)} training token features "
          f"in {time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
    heads: dict[str, GatedLinearHead] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, layers in sets.items():
        spec = hidden_spec(loaded, layers)
        cols = columns(layers, d)
        feats = train_all if len(layers) == num_layers + 1 else [f.index_select(1, cols) for f in train_all]
        for c in counts if name == eff_name else [len(train_ids)]:
            key = f"hidden_{name}" if c == len(train_ids) else f"eff_{c}"
            t = time.perf_counter()
            head, summary = train_head(feats, records["train"], spec, args, problems=set(train_ids[:c]))
            heads[key] = head
            info[key] = {"layers": layers, "dim": spec.dim, "parameters": head.num_parameters,
                         "train_problems": c, "train_seconds": time.perf_counter() - t, "summary": summary}  # fmt: skip
            print(f"[train] {key}: {info[key]['train_seconds']:.0f} s, best val {summary}", flush=True)
        if args.save_head is not None and name == args.ship_layers:
            save_head(heads[f"hidden_{name}"], args.save_head)
            print(f"[train] saved {args.save_head}", flush=True)
        del feats
    del train_all
    lp_spec = FeatureSpec(kind="logprobs", dim=TOP_K + 8, base_model=loaded.name, hidden_size=d,
                          num_layers=num_layers, top_k=TOP_K)  # fmt: skip
    t = time.perf_counter()
    lp_head, lp_summary = train_head([logprob_features(r) for r in records["train"]], records["train"], lp_spec, args)
    info["logprobs_top20"] = {"dim": lp_spec.dim, "parameters": lp_head.num_parameters,
                              "train_seconds": time.perf_counter() - t, "summary": lp_summary}  # fmt: skip

    # score the held-out candidates with every head, one shard at a time
    tests = records["test"]
    scores: dict[str, list[float]] = {
        "mean_logprob": [sum(r["logprobs"]) / len(r["logprobs"]) if r["logprobs"] else float("-inf") for r in tests],
        "logprobs_top20": [score_one(lp_head, logprob_features(r)) for r in tests],
    }
    for key in heads:
        scores[key] = [0.0] * len(tests)
    cols_of = {key: columns(info[key]["layers"], d) for key in heads}
    score_seconds = 0.0
    for i, feats in iter_shard_features(args.work_dir / "test", tests):
        for key, head in heads.items():
            x = feats if len(info[key]["layers"]) == num_layers + 1 else feats.index_select(1, cols_of[key])
            t = time.perf_counter()
            scores[key][i] = score_one(head, x)
            score_seconds += time.perf_counter() - t
    eff_scores = {key: scores.pop(key) for key in list(scores) if key.startswith("eff_")}
    for key in list(heads):
        if key.startswith("eff_"):
            info.pop(key, None)

    groups = groups_from(tests, scores)
    head_names = [n for n in scores if n != "mean_logprob"]
    selectors = ["random", "majority", "argmax:mean_logprob"]
    selectors += [f"argmax:{n}" for n in head_names] + [f"vote:{n}" for n in head_names]
    selectors += [f"zvote:{n}" for n in head_names] + ["oracle"]
    bon = best_of_n(groups, selectors, args.ks, matches=answers_match, draws=args.draws, seed=args.seed)

    eff: dict[str, Any] = {}
    eff_scores[f"eff_{len(train_ids)}"] = scores[f"hidden_{eff_name}"]
    for c in counts:
        res = best_of_n(groups_from(tests, {"eff": eff_scores[f"eff_{c}"]}), ["argmax:eff", "vote:eff"], [k_eff],
                        matches=answers_match, draws=args.draws, seed=args.seed)  # fmt: skip
        eff[str(c)] = {"argmax": res["argmax:eff"][k_eff], "vote": res["vote:eff"][k_eff]}
        print(f"[efficiency] {c} training problems: BoN@{k_eff} {100 * eff[str(c)]['argmax']['mean']:.1f}", flush=True)
    heads_info = info
    overhead = observer_overhead(engine, heads[f"hidden_{eff_name}"], args)
    print(f"[cost] streamed reward on/off decode throughput: {overhead['ratio_on_off']:.3f}", flush=True)
    head_tokens = sum(len(r["token_ids"]) for r in tests) * len(heads)
    gen_seconds_per_token = sample_seconds / max(1, sum(len(r["token_ids"]) for rs in records.values() for r in rs))
    result = {
        "command": shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "test": {
            "problems": len(groups),
            "candidates": len(records["test"]),
            "generated_tokens": gen_tokens,
            "per_sample_accuracy": sum(r["correct"] for r in records["test"]) / len(records["test"]),
            "unbiased_pass_at_k": unbiased_pass_at_k(groups, args.ks),
        },
        "train": {
            "problems": len(train_ids),
            "candidates": len(records["train"]),
            "per_sample_accuracy": sum(r["correct"] for r in records["train"]) / len(records["train"]),
        },
        "heads": heads_info,
        "head_scoring_seconds_per_token": score_seconds / max(1, head_tokens),
        "best_of_n": bon,
        "data_efficiency": {"layers": eff_name, "k": k_eff, "by_train_problems": eff},
        "sample_seconds": sample_seconds,
        "streamed_reward_overhead": overhead,
        "generation_seconds_per_token": gen_seconds_per_token,
    }
    atomic_write_json(args.work_dir / "results.json", result)
    # per-candidate scores, so other selectors can be evaluated later without re-running anything
    atomic_write_json(
        args.work_dir / "scores.json",
        [{"problem_id": r["problem_id"], "correct": r["correct"], "extracted": r["extracted"], "answer": r["answer"],
          **{k: v[i] for k, v in scores.items()}} for i, r in enumerate(tests)],
    )  # fmt: skip

    names = {"random": "random pick", "majority": "majority vote", "argmax:mean_logprob": "mean token logprob"}
    for n in head_names:
        names[f"argmax:{n}"] = f"ELHSR {n}"
    for n in head_names:
        names[f"vote:{n}"] = f"ELHSR-weighted vote {n}"
    for n in head_names:
        names[f"zvote:{n}"] = f"BestOfN vote (softmax-z) {n}"
    names["oracle"] = "oracle (any correct)"
    print("\n" + table(bon, args.ks, names))
    print(f"\nper-sample accuracy {100 * result['test']['per_sample_accuracy']:.1f}%, "
          f"pass@k {result['test']['unbiased_pass_at_k']}")  # fmt: skip
    print(f"wrote {args.work_dir / 'results.json'}")


if __name__ == "__main__":
    main()
