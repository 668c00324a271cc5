"""The ``analyse`` stage of ``benchmarks/head_study.py``: heads, ablations, transfer (#20).

Everything is read from the features stored by ``collect``; no model runs. Every-2nd-layer
columns (a superset of every layer set tried) are read once into memory; each head selects
its columns from them.

Model selection never looks at a test set: 20% of the training problems (by a stable hash of
the fact, so no fact straddles) form a fixed validation set that no head trains on; configs
are ranked by Best-of-N on it (argmax of 8 candidates). ``fit`` early-stops on its own
seeded split of the rest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.head_study import CONDITIONS, SECTION1_FAMILY, TRAIN_FAMILIES
from benchmarks.logprob_reward import paired
from esamp_agents.atomic import atomic_write_json
from esamp_agents.evaluation.report import machine_info
from esamp_agents.evaluation.selectors import Group, best_of_n, unbiased_pass_at_k
from esamp_agents.evaluation.tasks import answers_match
from esamp_agents.hidden_reward.collect import read_manifest, read_records
from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead, load_head, save_head
from esamp_agents.hidden_reward.reward import shipped_head_path
from esamp_agents.hidden_reward.training import Example, fit, score_examples

KS = [1, 2, 4, 8, 16]
DRAWS = 32
VAL_FRACTION = 0.2
CACHED_LAYERS = list(range(0, 31, 2))  # every 2nd hidden state, 0 = embeddings .. 30 = final norm
LAYER_SETS: dict[str, list[int]] = {
    "every4": [4, 8, 12, 16, 20, 24, 28, 30],  # the shipped head's set
    "every2": CACHED_LAYERS,
    "final": [30],
}


@dataclass
class Candidates:
    """One collected set: its records and every-2nd-layer token features (float16 views)."""

    records: list[dict[str, Any]]
    features: list[torch.Tensor]
    family: list[str] = field(default_factory=list)
    condition: list[str] = field(default_factory=list)


def read_set(folder: Path, family: str, condition: str) -> Candidates:
    """Records and the cached columns of ``folder``, one shard at a time."""
    spec = FeatureSpec.from_dict(read_manifest(folder)["spec"])
    d = spec.hidden_size
    positions = {layer: i for i, layer in enumerate(spec.layers)}
    cols = torch.cat([torch.arange(positions[layer] * d, (positions[layer] + 1) * d) for layer in CACHED_LAYERS])
    records = read_records(folder)
    feats = read_features(folder, records, cols)
    return Candidates(records, feats, [family] * len(records), [condition] * len(records))


def read_features(folder: Path, records: list[dict[str, Any]], cols: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each record's token features (float16 views; ``cols``: only those columns), one shard at a time."""
    from safetensors import safe_open

    feats: list[torch.Tensor | None] = [None] * len(records)
    by_shard: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_shard.setdefault(r["shard"], []).append(i)
    for shard, idx in by_shard.items():
        with safe_open(str(folder / shard), framework="pt", device="cpu") as f:
            part = f.get_tensor("features")
        if cols is not None:
            part = part.index_select(1, cols)
        for i in idx:
            feats[i] = part[records[i]["offset"] : records[i]["offset"] + records[i]["length"]]
    return [f for f in feats if f is not None]


def in_validation(record: dict[str, Any]) -> bool:
    digest = hashlib.sha256(f"val:{record['task']}:{record['key']}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VAL_FRACTION


def column_index(layers: list[int], d: int) -> torch.Tensor:
    pos = {layer: i for i, layer in enumerate(CACHED_LAYERS)}
    return torch.cat([torch.arange(pos[layer] * d, (pos[layer] + 1) * d) for layer in layers])


def head_spec(manifest: dict[str, Any], layers: list[int]) -> FeatureSpec:
    stored = FeatureSpec.from_dict(manifest["spec"])
    return FeatureSpec(kind="hidden", dim=len(layers) * stored.hidden_size, base_model=stored.base_model,
                       hidden_size=stored.hidden_size, num_layers=stored.num_layers, layers=tuple(layers))  # fmt: skip


def scores_of(head: GatedLinearHead, feats: list[torch.Tensor], d: int) -> list[float]:
    idx = column_index(list(head.spec.layers), d)
    out: list[float] = []
    for start in range(0, len(feats), 64):
        chunk = [f.index_select(1, idx) for f in feats[start : start + 64]]
        out.extend(score_examples(head, chunk).tolist())
    return out


def groups_of(c: Candidates, scores: dict[str, list[float]]) -> list[Group]:
    by_problem: dict[str, list[int]] = {}
    for i, r in enumerate(c.records):
        by_problem.setdefault(r["problem_id"], []).append(i)
    return [
        Group(
            problem_id=pid,
            correct=[bool(c.records[i]["correct"]) for i in idx],
            answers=[c.records[i]["extracted"] for i in idx],
            reference=c.records[idx[0]]["answer"],
            scores={name: [v[i] for i in idx] for name, v in scores.items()},
        )
        for pid, idx in by_problem.items()
    ]


def mean_logprob(c: Candidates) -> list[float]:
    return [sum(r["logprobs"]) / len(r["logprobs"]) if r["logprobs"] else float("-inf") for r in c.records]


def val_bon(head: GatedLinearHead, val: Candidates, d: int) -> float:
    """Argmax accuracy over each validation problem's candidates (all of them), mean over the
    problems that have a correct candidate (the others cannot tell heads apart)."""
    groups = [g for g in groups_of(val, {"h": scores_of(head, val.features, d)}) if any(g.correct)]
    return float(np.mean([g.correct[int(np.argmax(g.scores["h"]))] for g in groups]))


def fmt(r: dict[str, float]) -> str:
    return f"{100 * r['mean']:.1f} [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def fmt_diff(r: dict[str, float]) -> str:
    return f"{100 * r['mean']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    work: Path = args.work_dir
    t0 = time.perf_counter()
    manifest = read_manifest(work / "test" / "section1")
    d = FeatureSpec.from_dict(manifest["spec"]).hidden_size

    # ------------------------------------------------------------------ data
    train_parts: list[Candidates] = []
    for family in TRAIN_FAMILIES:
        for cond in CONDITIONS:
            folder = work / "train" / family / cond.name
            if (folder / "manifest.json").exists():
                train_parts.append(read_set(folder, family, cond.name))
    pool = Candidates([], [], [], [])
    for part in train_parts:
        pool.records += part.records
        pool.features += part.features
        pool.family += part.family
        pool.condition += part.condition
    del train_parts
    val_mask = [in_validation(r) for r in pool.records]
    tests: dict[str, Candidates] = {}
    for name in ["section1", "section1_esamp", *[f for f in TRAIN_FAMILIES if f != SECTION1_FAMILY]]:
        folder = work / "test" / name
        if (folder / "manifest.json").exists():
            tests[name] = read_set(folder, name, "")
    print(f"[analyse] read {len(pool.records)} training and {sum(len(c.records) for c in tests.values())} test "
          f"candidates in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip

    def subset(keep: list[bool]) -> Candidates:
        idx = [i for i, k in enumerate(keep) if k]
        return Candidates([pool.records[i] for i in idx], [pool.features[i] for i in idx],
                          [pool.family[i] for i in idx], [pool.condition[i] for i in idx])  # fmt: skip

    val = subset(val_mask)
    fit_rows = [not v for v in val_mask]

    def train(name: str, rows: list[bool], layers: list[int], **hyper: Any) -> GatedLinearHead | None:
        data = subset([r and k for r, k in zip(rows, fit_rows, strict=True)])
        if not data.records:
            print(f"[train] {name}: no training data collected, skipped", flush=True)
            return None
        idx = column_index(layers, d)
        examples = [Example(features=f.index_select(1, idx), label=bool(r["correct"]), group=r["problem_id"])
                    for f, r in zip(data.features, data.records, strict=True) if f.shape[0] > 0]  # fmt: skip
        t = time.perf_counter()
        result = fit(examples, head_spec(manifest, layers), epochs=40, lr=1e-3, seed=0, **hyper)
        head = result.head
        del examples
        head.training_summary["val_bon_external"] = val_bon(head, val, d)
        info[name] = {"layers": layers, "hyper": hyper, "train_problems": len({r["problem_id"] for r in data.records}),
                      "train_candidates": len(data.records), "seconds": time.perf_counter() - t,
                      "best_epoch": result.summary["best_epoch"],
                      "val_bon": head.training_summary["val_bon_external"]}  # fmt: skip
        print(f"[train] {name}: {info[name]['train_problems']} problems, val BoN {100 * info[name]['val_bon']:.1f}, "
              f"{info[name]['seconds']:.0f} s", flush=True)  # fmt: skip
        return head

    info: dict[str, Any] = {}
    everything = [True] * len(pool.records)
    heads: dict[str, GatedLinearHead] = {}

    def add(name: str, head: GatedLinearHead | None, into: dict[str, GatedLinearHead] = heads) -> None:
        if head is not None:
            into[name] = head

    # configurations, all on every family and condition; ranked on the validation set
    add("every4", train("every4", everything, LAYER_SETS["every4"]))
    add("every2", train("every2", everything, LAYER_SETS["every2"]))
    w = heads["every2"].linear.weight.detach().reshape(2, len(CACHED_LAYERS), d).pow(2).sum((0, 2))
    learned = sorted(CACHED_LAYERS[i] for i in w.topk(8).indices.tolist())
    add("learned8", train("learned8", everything, learned))
    add("final", train("final", everything, LAYER_SETS["final"]))
    add("every4_nostd", train("every4_nostd", everything, LAYER_SETS["every4"], standardize=False))
    add("every4_bt", train("every4_bt", everything, LAYER_SETS["every4"], loss="bradley_terry"))
    add("every4_wd1e-1", train("every4_wd1e-1", everything, LAYER_SETS["every4"], weight_decay=1e-1))
    configs = list(heads)
    chosen = max(configs, key=lambda n: (info[n]["val_bon"], -len(info[n]["layers"])))
    c_layers, c_hyper = info[chosen]["layers"], info[chosen]["hyper"]
    print(f"[select] chosen on validation: {chosen}", flush=True)
    # data ablations and transfer, with the chosen configuration
    only_s1 = [f == SECTION1_FAMILY for f in pool.family]
    add("single_digit_only", train("single_digit_only", only_s1, c_layers, **c_hyper))
    # plain T=0.7 with its first 4 candidates per problem: the same amount of data as ESamp's 4
    plain4 = [c == "plain_t07" and r["sample"] < 4 for c, r in zip(pool.condition, pool.records, strict=True)]
    add("plain_t07_only", train("plain_t07_only", plain4, c_layers, **c_hyper))
    add("esamp_t07_only", train("esamp_t07_only", [c == "esamp_t07" for c in pool.condition], c_layers, **c_hyper))
    lofo: dict[str, GatedLinearHead] = {}
    for family in TRAIN_FAMILIES:
        add(family, train(f"without_{family}", [f != family for f in pool.family], c_layers, **c_hyper), lofo)
    current = load_head(shipped_head_path())
    assert isinstance(current, GatedLinearHead)

    # ------------------------------------------------------------------ evaluate
    def evaluate(test: Candidates, named: dict[str, GatedLinearHead], ks: list[int]) -> tuple[list[Group], dict]:
        scores = {"mean_logprob": mean_logprob(test)} | {n: scores_of(h, test.features, d) for n, h in named.items()}
        groups = groups_of(test, scores)
        selectors = ["random", "majority", "argmax:mean_logprob", *[f"argmax:{n}" for n in named],
                     *[f"vote:{n}" for n in named], *[f"zvote:{n}" for n in named], "oracle"]  # fmt: skip
        return groups, best_of_n(groups, selectors, ks, matches=answers_match, draws=DRAWS, seed=0)

    results: dict[str, Any] = {"heads": info, "chosen": chosen, "learned_layers": learned}
    s1 = tests["section1"]
    s1_named = {"current": current, **{n: heads[n] for n in heads}}
    groups, bon = evaluate(s1, s1_named, KS)
    results["section1"] = {
        "problems": len(groups), "candidates": len(s1.records),
        "per_sample_accuracy": float(np.mean([r["correct"] for r in s1.records])),
        "pass_at_k": unbiased_pass_at_k(groups, KS), "best_of_n": bon,
        "paired": {f"{k}": {
            "chosen - current (argmax)": paired(groups, f"argmax:{chosen}", "argmax:current", k, DRAWS, 0),
            "chosen - majority (argmax)": paired(groups, f"argmax:{chosen}", "majority", k, DRAWS, 0),
            "chosen - current (zvote)": paired(groups, f"zvote:{chosen}", "zvote:current", k, DRAWS, 0),
        } for k in (8, 16)},
    }  # fmt: skip
    atomic_write_json(work / "section1_scores.json", [
        {"problem_id": g.problem_id, "correct": list(g.correct), "answers": list(g.answers), "reference": g.reference,
         "scores": {k: list(v) for k, v in g.scores.items()}} for g in groups])  # fmt: skip

    # leave one family out: the head trained without a family, on that family's test set
    results["lofo"] = {}
    for family, head in lofo.items():
        test = s1 if family == SECTION1_FAMILY else tests.get(family)
        if test is None:
            continue
        named = {"without": head, "with": heads[chosen], "current": current}
        g, b = evaluate(test, named, [1, 4, 8])
        results["lofo"][family] = {
            "problems": len(g), "best_of_n_8": {s: b[s][8] for s in b},
            "without - majority": paired(g, "argmax:without", "majority", 8, DRAWS, 0),
            "zvote without - majority": paired(g, "zvote:without", "majority", 8, DRAWS, 0),
            "without - current": paired(g, "argmax:without", "argmax:current", 8, DRAWS, 0),
        }  # fmt: skip
    # plain <-> ESamp candidates
    results["transfer"] = {}
    for name in ("section1", "section1_esamp"):
        if name not in tests:
            continue
        named = {n: heads[n] for n in ("plain_t07_only", "esamp_t07_only", chosen) if n in heads}
        named["current"] = current
        k = 8
        g, b = evaluate(tests[name], named, [1, k])
        accuracy = float(np.mean([r["correct"] for r in tests[name].records]))
        results["transfer"][name] = {"problems": len(g), "best_of_n_8": {s: b[s][k] for s in b},
                                     "per_sample_accuracy": accuracy}  # fmt: skip
    if args.save_head is not None:
        save_head(heads[chosen], args.save_head)
        print(f"[analyse] saved {chosen} to {args.save_head}", flush=True)
    results.update({
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "train": {"candidates": len(pool.records), "problems": len({r["problem_id"] for r in pool.records}),
                  "validation_problems": len({r["problem_id"] for r in val.records}),
                  "by_family": {f: sum(1 for x in pool.family if x == f) for f in TRAIN_FAMILIES},
                  "positive_rate": float(np.mean([r["correct"] for r in pool.records]))},
        "seconds": time.perf_counter() - t0,
    })  # fmt: skip
    atomic_write_json(work / "results.json", results)
    report(results)
    return results


def analyse_more(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped recipe (every 4th layer + final, BCE and Bradley-Terry) on every single-digit
    train problem sampled at plain T=0.7 x 8 (section 1's condition), outside the validation set;
    compared with the current head on the section-1 set, paired."""
    work: Path = args.work_dir
    manifest = read_manifest(work / "test" / "section1")
    d = FeatureSpec.from_dict(manifest["spec"]).hidden_size
    examples = _more_examples(work, d)
    s1 = read_set(work / "test" / "section1", "section1", "")
    current = load_head(shipped_head_path())
    assert isinstance(current, GatedLinearHead)
    named: dict[str, GatedLinearHead] = {"current": current}
    info: dict[str, Any] = {}
    for loss in ("bce", "bradley_terry"):
        result = fit(examples, head_spec(manifest, LAYER_SETS["every4"]), loss=loss, epochs=40, lr=1e-3, seed=0)
        named[loss] = result.head
        keys = ("n_train_problems", "n_val_problems", "best_epoch", "best_val_bon_accuracy", "seconds")
        info[loss] = {k: result.summary[k] for k in keys}
        print(f"[more] {loss}: {info[loss]}", flush=True)
    scores = {"mean_logprob": mean_logprob(s1)} | {n: scores_of(h, s1.features, d) for n, h in named.items()}
    groups = groups_of(s1, scores)
    selectors = ["majority", *[f"argmax:{n}" for n in named], *[f"zvote:{n}" for n in named], "oracle"]
    bon = best_of_n(groups, selectors, KS, matches=answers_match, draws=DRAWS, seed=0)
    res = {
        "problems": len({e.group for e in examples}), "candidates": len(examples), "heads": info, "best_of_n": bon,
        "paired_8": {f"{n} - current": paired(groups, f"argmax:{n}", "argmax:current", 8, DRAWS, 0)
                     for n in ("bce", "bradley_terry")},
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
    }  # fmt: skip
    atomic_write_json(work / "results_more.json", res)
    for sel in selectors:
        print(f"| {sel} | " + " | ".join(fmt(bon[sel][k]) for k in KS) + " |")
    for n, r in res["paired_8"].items():
        print(f"paired N=8 {n}: {fmt_diff(r)}")
    if args.save_head is not None:
        # the loss is picked on fit's validation split, never on the test set (ties: BCE)
        best = max(("bce", "bradley_terry"), key=lambda n: (info[n]["best_val_bon_accuracy"] or 0.0, n == "bce"))
        save_head(named[best], args.save_head)
        print(f"[more] saved {best} to {args.save_head}", flush=True)
    return res


def _more_examples(work: Path, d: int) -> list[Example]:
    """analyse-more's training set: every single-digit train problem at plain T=0.7 x 8, minus validation."""
    parts = [read_set(work / "train" / SECTION1_FAMILY / name, SECTION1_FAMILY, name)
             for name in ("plain_t07", "plain_t07_more")]  # fmt: skip
    idx = column_index(LAYER_SETS["every4"], d)
    return [Example(features=f.index_select(1, idx), label=bool(r["correct"]), group=r["problem_id"])
            for part in parts for f, r in zip(part.features, part.records, strict=True)
            if not in_validation(r) and f.shape[0] > 0]  # fmt: skip


def confirm(args: argparse.Namespace) -> dict[str, Any]:
    """A confirming run for analyse-more's heads: fitted again with a second seed, and scored with
    the current head on a fresh held-out sample, ``--fresh`` (a collect folder of single-digit
    test problems outside section 1's set: esamp_study's ``vanilla`` candidates, 200 x 16 at
    plain T=0.7). Its token features are recomputed post hoc in float32 (that study decoded in
    bfloat16), so every head scores the states it was trained on."""
    from esamp_agents import load_model
    from esamp_agents.hidden_reward.features import posthoc_features

    if args.fresh is None:
        raise SystemExit(
            "confirm needs --fresh FOLDER (e.g. benchmarks/out/esamp_study/single_digit/generations/vanilla)"
        )
    t0 = time.perf_counter()
    work: Path = args.work_dir
    manifest = read_manifest(work / "test" / "section1")
    d = FeatureSpec.from_dict(manifest["spec"]).hidden_size
    spec = head_spec(manifest, LAYER_SETS["every4"])
    current = load_head(shipped_head_path())
    assert isinstance(current, GatedLinearHead) and list(current.spec.layers) == LAYER_SETS["every4"]
    examples = _more_examples(work, d)
    named: dict[str, GatedLinearHead] = {"current": current}
    info: dict[str, Any] = {}
    for loss in ("bce", "bradley_terry"):
        for seed in (0, 1):
            result = fit(examples, spec, loss=loss, epochs=40, lr=1e-3, seed=seed)
            named[f"{loss}_s{seed}"] = result.head
            info[f"{loss}_s{seed}"] = {k: result.summary[k] for k in ("best_epoch", "best_val_bon_accuracy")}
            print(f"[confirm] {loss} seed {seed}: {info[f'{loss}_s{seed}']}", flush=True)

    records = [r for r in read_records(args.fresh) if r["task"] == SECTION1_FAMILY]
    s1 = read_set(work / "test" / "section1", "section1", "")
    section1 = s1.records
    train_keys = {r["key"] for name in ("plain_t07", "plain_t07_more")
                  for r in read_records(work / "train" / SECTION1_FAMILY / name)}  # fmt: skip
    # no problem of section 1 and no fact of training (the splits are by fact; the test facts recur
    # in section 1's problems under other phrasings and numbers of candidates, which is expected)
    leaks = ({r["problem_id"] for r in records} & {r["problem_id"] for r in section1}) | (
        {r["key"] for r in records} & train_keys
    )
    if leaks:
        raise SystemExit(f"--fresh shares {len(leaks)} problems/facts with section 1 or training: {sorted(leaks)[:3]}")
    shared_facts = len({r["key"] for r in records} & {r["key"] for r in section1})
    loaded = load_model("embedded", device="cpu", dtype="float32")
    t = time.perf_counter()
    feats = posthoc_features(loaded, [r["prompt_token_ids"] for r in records], [r["token_ids"] for r in records],
                             spec, batch_size=16)  # fmt: skip
    print(f"[confirm] post-hoc features of {len(records)} candidates in {time.perf_counter() - t:.0f} s", flush=True)
    fresh = Candidates(records, feats)

    def fresh_scores(head: GatedLinearHead) -> list[float]:  # the features hold exactly the head's columns
        return [float(v) for start in range(0, len(feats), 64)
                for v in score_examples(head, feats[start : start + 64]).tolist()]  # fmt: skip

    out: dict[str, Any] = {"heads": info, "fresh_facts_also_in_section1": shared_facts}
    for name, cands, scorer in (("fresh", fresh, fresh_scores),
                                ("section1", s1, lambda h: scores_of(h, s1.features, d))):  # fmt: skip
        scores = {"mean_logprob": mean_logprob(cands)} | {n: scorer(h) for n, h in named.items()}
        groups = groups_of(cands, scores)
        selectors = ["random", "majority", "argmax:mean_logprob", *[f"argmax:{n}" for n in named],
                     *[f"zvote:{n}" for n in named], "oracle"]  # fmt: skip
        ks = [k for k in KS if k <= min(len(g.correct) for g in groups)]
        out[name] = {
            "problems": len(groups), "candidates": len(cands.records),
            "per_sample_accuracy": float(np.mean([r["correct"] for r in cands.records])),
            "pass_at_k": unbiased_pass_at_k(groups, ks),
            "best_of_n": best_of_n(groups, selectors, ks, matches=answers_match, draws=DRAWS, seed=0),
            "paired_8": {f"{n} - current": paired(groups, f"argmax:{n}", "argmax:current", 8, DRAWS, 0)
                         for n in named if n != "current"}
                        | {"current - majority": paired(groups, "argmax:current", "majority", 8, DRAWS, 0)},
        }  # fmt: skip
        print(f"\n{name}: {len(groups)} problems, per-sample {100 * out[name]['per_sample_accuracy']:.1f}%")
        print("| selector | " + " | ".join(f"N={k}" for k in ks) + " |")
        for sel in selectors:
            print(f"| {sel} | " + " | ".join(fmt(out[name]["best_of_n"][sel][k]) for k in ks) + " |")
        for n, r in out[name]["paired_8"].items():
            print(f"paired N=8 {n}: {fmt_diff(r)}")
    out.update({
        "fresh_folder": str(args.fresh),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "seconds": time.perf_counter() - t0,
    })  # fmt: skip
    atomic_write_json(work / "results_confirm.json", out)
    return out


def report(res: dict[str, Any]) -> None:
    s1 = res["section1"]
    print("\nsection 1 held-out, Best-of-N (%):")
    print("| selector | " + " | ".join(f"N={k}" for k in KS) + " |")
    for sel, r in s1["best_of_n"].items():
        print(f"| {sel} | " + " | ".join(fmt(r[str(k)] if str(k) in r else r[k]) for k in KS) + " |")
    for k, rows in s1["paired"].items():
        for name, r in rows.items():
            print(f"paired N={k} {name}: {fmt_diff(r)}")
    print("\nheads (validation BoN, external):")
    for n, i in res["heads"].items():
        print(f"  {n}: {100 * i['val_bon']:.1f} ({i['train_problems']} problems, layers {i['layers']})")
    print("\nleave one family out (BoN@8):")
    for fam, r in res["lofo"].items():
        b = r["best_of_n_8"]
        print(f"  {fam}: without {fmt(b['argmax:without'])}, with {fmt(b['argmax:with'])}, current "
              f"{fmt(b['argmax:current'])}, majority {fmt(b['majority'])}, oracle {fmt(b['oracle'])}; "
              f"without - majority {fmt_diff(r['without - majority'])}")  # fmt: skip
    print("\ntransfer (BoN@8):")
    for name, r in res["transfer"].items():
        print(f"  {name}: " + ", ".join(f"{s} {fmt(v)}" for s, v in r["best_of_n_8"].items() if s.startswith("argmax")))


if __name__ == "__main__":
    print(json.dumps({"error": "run benchmarks/head_study.py analyse"}))
