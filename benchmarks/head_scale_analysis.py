"""The ``analyse`` stage of ``benchmarks/head_scale.py``: one head per data recipe, paired against
the shipped head on the section-1 held-out set (#20).

No model runs. Recipes are ranked on a fixed validation set: the single-digit train problems
whose fact falls in the same 20% hash bucket as section 15's (``val:single_digit:<fact>``), in
their original phrasings; no head trains on any phrasing of those facts. ``fit`` early-stops on
its own seeded split of the rest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.head_study_analysis import Candidates, fmt, fmt_diff, groups_of, mean_logprob, read_features
from benchmarks.logprob_reward import paired
from esamp_agents.atomic import atomic_write_json
from esamp_agents.evaluation.report import machine_info
from esamp_agents.evaluation.selectors import best_of_n, unbiased_pass_at_k
from esamp_agents.evaluation.tasks import answers_match
from esamp_agents.hidden_reward.collect import read_manifest, read_records
from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead, load_head, save_head
from esamp_agents.hidden_reward.reward import shipped_head_path
from esamp_agents.hidden_reward.training import Example, fit, score_examples

KS = [1, 2, 4, 8]
DRAWS = 32
VAL_FRACTION = 0.2
TRAIN_SETS = ("single_digit", "rephrased", "single_digit_seed1")
RECIPES: dict[str, tuple[str, ...]] = {
    "original (285 problems x 8, as section 15)": ("single_digit",),
    "+ rephrased (2x problems per fact)": ("single_digit", "rephrased"),
    "+ second seed (16 candidates per problem)": ("single_digit", "single_digit_seed1"),
    "all three": TRAIN_SETS,
}


def in_validation(record: dict[str, Any]) -> bool:
    """Section 15's validation facts, by fact alone (so every phrasing of a fact is on one side)."""
    digest = hashlib.sha256(f"val:single_digit:{record['key']}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VAL_FRACTION


def read_all(folder: Path) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Records and token features (float16, every stored column) of one collect folder."""
    records = read_records(folder)
    return records, read_features(folder, records)


def scores_of(head: GatedLinearHead, feats: list[torch.Tensor]) -> list[float]:
    return [float(v) for start in range(0, len(feats), 64) for v in score_examples(head, feats[start : start + 64])]


def val_bon(head: GatedLinearHead, records: list[dict[str, Any]], feats: list[torch.Tensor]) -> float:
    """Argmax accuracy on the validation problems that have a correct candidate."""
    groups = [g for g in groups_of_records(records, {"h": scores_of(head, feats)}) if any(g.correct)]
    return float(np.mean([g.correct[int(np.argmax(g.scores["h"]))] for g in groups]))


def groups_of_records(records: list[dict[str, Any]], scores: dict[str, list[float]]) -> list[Any]:
    return groups_of(Candidates(records, []), scores)  # grouping reads the records only


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    work: Path = args.work_dir
    spec = FeatureSpec.from_dict(read_manifest(work / "test" / "section1")["spec"])
    current = load_head(shipped_head_path())
    assert isinstance(current, GatedLinearHead) and current.spec.layers == spec.layers, "layers differ"
    train: dict[str, tuple[list[dict[str, Any]], list[torch.Tensor]]] = {}
    for name in TRAIN_SETS:
        if (work / "train" / name / "manifest.json").exists():
            train[name] = read_all(work / "train" / name)
    test_records, test_feats = read_all(work / "test" / "section1")
    val_records = [r for r in train["single_digit"][0] if in_validation(r)]
    val_feats = [f for r, f in zip(*train["single_digit"], strict=True) if in_validation(r)]
    print(f"[analyse] read {sum(len(r) for r, _ in train.values())} training and {len(test_records)} test "
          f"candidates in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip

    def examples(names: tuple[str, ...]) -> list[Example]:
        return [Example(features=f, label=bool(r["correct"]), group=r["problem_id"])
                for n in names for r, f in zip(*train[n], strict=True)
                if not in_validation(r) and f.shape[0] > 0]  # fmt: skip

    heads: dict[str, GatedLinearHead] = {}
    info: dict[str, Any] = {}

    def train_head(name: str, sets: tuple[str, ...], loss: str, seed: int) -> None:
        data = examples(sets)
        t = time.perf_counter()
        head = fit(data, spec, loss=loss, epochs=40, lr=1e-3, seed=seed).head  # type: ignore[arg-type]
        heads[name] = head
        info[name] = {"sets": list(sets), "loss": loss, "seed": seed, "train_candidates": len(data),
                      "train_problems": len({e.group for e in data}), "seconds": time.perf_counter() - t,
                      "val_bon": val_bon(head, val_records, val_feats)}  # fmt: skip
        print(f"[train] {name}: {info[name]['train_problems']} problems, {len(data)} candidates, val BoN "
              f"{100 * info[name]['val_bon']:.1f}, {info[name]['seconds']:.0f} s", flush=True)  # fmt: skip

    for recipe, sets in RECIPES.items():
        if all(s in train for s in sets):
            for loss in ("bce", "bradley_terry"):
                train_head(f"{recipe}, {loss}", sets, loss, 0)
    chosen = max(heads, key=lambda n: info[n]["val_bon"])
    train_head(f"{chosen}, seed 1", tuple(info[chosen]["sets"]), info[chosen]["loss"], 1)
    print(f"[select] chosen on validation: {chosen}", flush=True)

    named = {"current": current, **heads}
    scores = {n: scores_of(h, test_feats) for n, h in named.items()}
    scores["mean_logprob"] = mean_logprob(Candidates(test_records, []))
    groups = groups_of_records(test_records, scores)
    ks = [k for k in KS if k <= min(len(g.correct) for g in groups)]  # smoke runs sample fewer than 8
    top = ks[-1]
    selectors = ["random", "majority", "argmax:mean_logprob", *[f"argmax:{n}" for n in named],
                 "zvote:current", f"zvote:{chosen}", "oracle"]  # fmt: skip
    res: dict[str, Any] = {
        "heads": info, "chosen": chosen, "problems": len(groups), "candidates": len(test_records),
        "per_sample_accuracy": float(np.mean([r["correct"] for r in test_records])),
        "pass_at_k": unbiased_pass_at_k(groups, ks),
        "best_of_n": best_of_n(groups, selectors, ks, matches=answers_match, draws=DRAWS, seed=0),
        f"paired_{top}": {f"{n} - current": paired(groups, f"argmax:{n}", "argmax:current", top, DRAWS, 0)
                          for n in heads}
                    | {"current - majority": paired(groups, "argmax:current", "majority", top, DRAWS, 0),
                       f"zvote {chosen} - zvote current": paired(groups, f"zvote:{chosen}", "zvote:current", top,
                                                                 DRAWS, 0)},
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    atomic_write_json(work / "results.json", res)
    print(f"\nsection 1 held-out: {len(groups)} problems, per-sample {100 * res['per_sample_accuracy']:.1f}%")
    print("| selector | val | " + " | ".join(f"N={k}" for k in ks) + " |")
    for sel in selectors:
        name = sel.split(":", 1)[-1]
        val = f"{100 * info[name]['val_bon']:.1f}" if sel.startswith("argmax:") and name in info else ""
        print(f"| {sel} | {val} | " + " | ".join(fmt(res["best_of_n"][sel][k]) for k in ks) + " |")
    for n, r in res[f"paired_{top}"].items():
        print(f"paired N={top} {n}: {fmt_diff(r)}")
    if args.save_head is not None:
        save_head(heads[chosen], args.save_head)
        print(f"[analyse] saved {chosen} to {args.save_head}", flush=True)
    return res
