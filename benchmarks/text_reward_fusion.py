"""A real text reward model (MiniLM fine-tuned here) against and together with the hidden-state reward.

    python benchmarks/logprob_reward.py --stage collect   # the candidates (once; shared with that benchmark)
    python benchmarks/text_reward_fusion.py               # train the text RM, score, fuse, report

Protocol of BENCHMARKS section 1 on the candidates served by ``esamp-agents serve``
(``benchmarks/out/logprob_reward/{train,test}``: 160 training problems x 8, 200 held-out x 16,
plain sampling, T = 0.7, top-k 50, 64 tokens). Rewards, each trained on the SAME 160 training
problems' candidates, validation split by problem, seed 0:

- ``text``: all-MiniLM-L6-v2 fine-tuned as a one-logit sequence classifier on (prompt,
  candidate) -> correct (``esamp_agents.selection.text_reward_training``), scored by
  ``SequenceClassifierReward`` exactly as ``BestOfN`` would;
- ``hidden``: the package's shipped ELHSR head (every 4th layer + final norm, 9,218
  parameters), trained on section 1's candidates of the SAME 160 training problems (other
  samples of the same model and settings), scored post hoc on the served candidates
  (``benchmarks/logprob_reward.py --stage hidden``).

Fusions (within each subset of N, as BestOfN fuses): z-score, min-max, worst rank, equal
weights; plus the reward-weighted vote of each. Best-of-N@k with bootstrap intervals and
paired differences; the cost table (parameters, FLOPs and measured seconds per candidate).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT / "benchmarks" / "out" / "logprob_reward"
OUT = ROOT / "benchmarks" / "out" / "text_reward"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="folder holding the train/ and test/ API collections")
    p.add_argument("--work-dir", type=Path, default=OUT)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--draws", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train the text RM again even if --work-dir has one")
    p.add_argument("--limit", type=int, default=None, help="use only the first LIMIT problems of each split (smoke)")
    return p.parse_args(argv)


def _limited(records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is None:
        return records
    keep = set(list(dict.fromkeys(r["problem_id"] for r in records))[:limit])
    return [r for r in records if r["problem_id"] in keep]


def _limited_scores(scores: list[float], all_test: list[dict[str, Any]], test: list[dict[str, Any]]) -> list[float]:
    """The stored per-candidate scores of the (possibly --limit'ed) test records."""
    if len(scores) != len(all_test):
        raise SystemExit(f"hidden_scores.json has {len(scores)} scores for {len(all_test)} held-out candidates")
    at = {(r["problem_id"], r["sample"]): i for i, r in enumerate(all_test)}
    return [scores[at[(r["problem_id"], r["sample"])]] for r in test]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.logprob_reward import SUFFIX, paired
    from esamp_agents.adapters.api_collect import read_api_records
    from esamp_agents.atomic import atomic_write_json
    from esamp_agents.evaluation.selectors import Group, best_of_n, unbiased_pass_at_k
    from esamp_agents.evaluation.tasks import answers_match
    from esamp_agents.hidden_reward.reward import HiddenStateReward
    from esamp_agents.selection.rewards import SequenceClassifierReward
    from esamp_agents.selection.text_reward_training import train_text_reward

    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    train = _limited(read_api_records(args.data / "train"), args.limit)
    test = _limited(read_api_records(args.data / "test"), args.limit)
    print(f"[data] {len(train)} training, {len(test)} held-out candidates", flush=True)
    timings: dict[str, float] = {}

    # ---- the text reward model (trained once; --retrain trains it again)
    model_dir = args.work_dir / "text-rm"
    if args.retrain or not (model_dir / "esamp_reward.json").is_file():
        fit_text = train_text_reward(train, model_dir, suffix=SUFFIX, epochs=args.epochs, lr=args.lr,
                                     seed=args.seed, progress=True)  # fmt: skip
        text_summary = fit_text.summary
    else:
        text_summary = json.loads((model_dir / "esamp_reward.json").read_text())
    timings["text_train_seconds"] = float(text_summary["seconds"])
    print(f"[text] trained in {timings['text_train_seconds']:.0f} s, val BoN {text_summary['val_bon_accuracy']}")
    text_rm = SequenceClassifierReward(model_dir, batch_size=32)
    prompts_text = [f"{r['question']} {SUFFIX}" for r in test]
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts_text):
        by_prompt.setdefault(p, []).append(i)
    text_scores = [0.0] * len(test)
    t = time.perf_counter()
    for p, idx in by_prompt.items():
        for i, v in zip(idx, text_rm.score_texts(p, [test[i]["text"] for i in idx]), strict=True):
            text_scores[i] = v
    timings["text_score_seconds_per_candidate"] = (time.perf_counter() - t) / len(test)
    pair_tokens = [len(text_rm.encode(p, r["text"])) for p, r in zip(prompts_text, test, strict=True)]
    text_params = sum(p.numel() for p in text_rm.model.parameters())
    embed_params = sum(p.numel() for n, p in text_rm.model.named_parameters() if "embeddings" in n)
    del text_rm

    # ---- the shipped hidden-state head on the same candidates (benchmarks/logprob_reward.py --stage hidden)
    hidden_file = args.data / "hidden_scores.json"
    if not hidden_file.is_file():
        raise SystemExit(f"{hidden_file} is missing: run python benchmarks/logprob_reward.py --stage hidden")
    stored = json.loads(hidden_file.read_text())
    hidden = _limited_scores(stored["scores"], read_api_records(args.data / "test"), test)
    timings["hidden_posthoc_seconds_per_candidate"] = stored["ms_per_candidate"] / 1000
    head = HiddenStateReward.shipped("embedded").head
    spec = head.spec
    response_tokens = [len(r["tokens"]) + (r["finish_reason"] == "stop") for r in test]
    x = torch.randn(64, 52, spec.dim)
    mask = torch.ones(64, 52, dtype=torch.bool)
    t = time.perf_counter()
    for _ in range(10):
        with torch.no_grad():
            head(x, mask)
    timings["hidden_head_seconds_per_candidate"] = (time.perf_counter() - t) / 640

    scores = {"text": text_scores, "hidden": hidden}
    by: dict[str, list[int]] = {}
    for i, r in enumerate(test):
        by.setdefault(r["problem_id"], []).append(i)
    groups = [Group(pid, [bool(test[i]["correct"]) for i in idx], [test[i]["extracted"] for i in idx],
                    test[idx[0]]["answer"], {n: [v[i] for i in idx] for n, v in scores.items()})
              for pid, idx in by.items()]  # fmt: skip
    ks = [k for k in args.ks if k <= min(len(g.correct) for g in groups)]
    singles = ["text", "hidden"]
    fusions = [f"fuse:{m}:text+hidden" for m in ("zscore", "minmax", "worst_rank")]
    fusions += ["fuse:zscore:text+hidden@1,2", "fuse:zscore:text+hidden@2,1"]  # exploratory, not used to choose
    votes = [f"zvote:{n}" for n in singles] + ["fusevote:zscore:text+hidden", "fusevote:worst_rank:text+hidden"]
    selectors = ["random", "majority", *[f"argmax:{n}" for n in singles], *fusions, *votes, "oracle"]
    bon = best_of_n(groups, selectors, ks, matches=answers_match, draws=args.draws, seed=args.seed)
    k = 8 if 8 in ks else max(ks)
    better = max(("text", "hidden"), key=lambda n: bon[f"argmax:{n}"][k]["mean"])
    comparisons = {
        "argmax:hidden - argmax:text": paired(groups, "argmax:hidden", "argmax:text", k, args.draws, args.seed),
        "argmax:text - majority": paired(groups, "argmax:text", "majority", k, args.draws, args.seed),
    }
    for f in fusions[:3]:
        comparisons[f"{f} - argmax:{better}"] = paired(groups, f, f"argmax:{better}", k, args.draws, args.seed)
    comparisons[f"fusevote:zscore:text+hidden - zvote:{better}"] = paired(
        groups, "fusevote:zscore:text+hidden", f"zvote:{better}", k, args.draws, args.seed
    )
    comparisons["fusevote:zscore:text+hidden - majority"] = paired(
        groups, "fusevote:zscore:text+hidden", "majority", k, args.draws, args.seed
    )
    mean_pair = sum(pair_tokens) / len(pair_tokens)
    mean_resp = sum(response_tokens) / len(response_tokens)
    cost = {
        "text": {
            "parameters": text_params,
            "flops_per_candidate": 2 * (text_params - embed_params) * mean_pair,
            "tokens_read_per_candidate": mean_pair,
            "seconds_per_candidate": timings["text_score_seconds_per_candidate"],
        },
        "hidden": {
            "parameters": head.num_parameters,
            "flops_per_candidate": 2 * 2 * spec.dim * mean_resp,
            "tokens_read_per_candidate": mean_resp,
            "seconds_per_candidate_head_only": timings["hidden_head_seconds_per_candidate"],
            "seconds_per_candidate_posthoc_forward": timings["hidden_posthoc_seconds_per_candidate"],
        },
    }
    result = {
        "command": shlex.join(
            ["python", "benchmarks/text_reward_fusion.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "train": {"candidates": len(train), "problems": len({r["problem_id"] for r in train})},
        "test": {
            "candidates": len(test),
            "problems": len(groups),
            "unbiased_pass_at_k": unbiased_pass_at_k(groups, ks),
        },
        "text_fit": {k: v for k, v in text_summary.items() if k != "history"},
        "timings": timings,
        "best_of_n": bon,
        f"paired_at_{k}": comparisons,
        "cost": cost,
    }
    atomic_write_json(args.work_dir / "results.json", result)
    atomic_write_json(args.work_dir / "scores.json", [
        {"problem_id": r["problem_id"], "correct": r["correct"], "text": text_scores[i], "hidden": hidden[i]}
        for i, r in enumerate(test)])  # fmt: skip
    print("\n| selector | " + " | ".join(f"N={k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for sel, row in bon.items():
        print(f"| {sel} | " + " | ".join(f"{100 * row[q]['mean']:.1f} [{100 * row[q]['low']:.1f}, "
                                         f"{100 * row[q]['high']:.1f}]" for q in ks) + " |")  # fmt: skip
    print(f"\npaired differences at N = {k} (points):")
    for name, d in comparisons.items():
        print(f"  {name}: {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
    print(f"\ncost: {cost}\ntimings: {timings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
