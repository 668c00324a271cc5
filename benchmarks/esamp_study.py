"""ESamp configuration study at small scale (issue #8): which settings, if any, make it pay off?

Sweeps ESamp's knobs on the embedded model against plain sampling at the same temperature and
filters, on problems from the package's own seeded task generators that were used to pick
nothing else, with N candidates per problem; every metric comes with a bootstrap interval over
problems, and every ESamp config gets a paired difference against its plain twin.

Two phases, both resumable (generations are cached by ``esamp_agents.hidden_reward.collect`` through
``esamp_agents.evaluation.harness``, one folder per sampler; a killed run redoes at most one engine call):

    # generate (run groups on separate cores: OMP_NUM_THREADS=1 taskset -c 0 ...)
    python benchmarks/esamp_study.py generate --task single_digit --group core
    # report: metrics, paired differences, plots, study.json + study.md (regenerates nothing)
    python benchmarks/esamp_study.py report

Groups (``--group``; ``--samplers`` overrides):
- ``core``: plain, the paper recipe (``esamp:0.25``) and beta {0.05, 0.1, 0.25, 0.5} with a warm
  start (20 Adam steps on the prompt's prefill states);
- ``axes``: temperature {0.5, 1.0}, min-p 0.05, Distiller width 128, one shared Distiller,
  warm start off, warm-start lr 5e-4, each around ``--beta``;
- ``task2``: plain, the paper recipe and beta {0.1, 0.25} with a warm start, on a second task.

Problems: the ``test`` split of each task, minus every problem that earlier benchmarks looked
at (reward_bon's held-out set and the 48 problems that chose the demo's beta), then a seeded
draw of ``--problems``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from esamp_agents.evaluation.tasks import Problem, available_problems, generate_problems, load_problems  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "out" / "esamp_study"
# Problem sets earlier sessions looked at (reported on or picked a setting with): never reused here.
SEEN_PROBLEM_SETS = ("single_digit:200:0:test", "single_digit:48:1:test")
WARM = "warm20"
DEFAULT_PROBLEMS = 200


def group_samplers(group: str, beta: float) -> list[str]:
    b = repr(float(beta)).removesuffix(".0")
    esamp = f"esamp:{b}:{WARM}"
    if group == "core":
        return ["vanilla", "esamp:0.25", *(f"esamp:{x}:{WARM}" for x in ("0.05", "0.1", "0.25", "0.5"))]
    if group == "task2":
        return ["vanilla", "esamp:0.25", f"esamp:0.1:{WARM}", f"esamp:0.25:{WARM}"]
    if group == "axes":
        return [
            "vanilla:t=0.5",
            f"{esamp}:t=0.5",
            "vanilla:t=1",
            f"{esamp}:t=1",
            "minp:0.05",
            f"{esamp}:min_p=0.05",
            f"{esamp}:width=128",
            f"{esamp}:shared",
            f"esamp:{b}",
            f"{esamp}:warm_lr=0.0005",
        ]
    raise ValueError(f"group={group!r} is not known; allowed: core, axes, task2")


def study_problems(task: str, count: int, seed: int) -> list[Problem]:
    """A seeded draw of ``count`` test-split problems that no earlier benchmark looked at."""
    seen = {p.id for spec in SEEN_PROBLEM_SETS for p in load_problems(spec)}
    everything = generate_problems(task, available_problems(task, "test"), seed=0, split="test")
    fresh = sorted((p for p in everything if p.id not in seen), key=lambda p: p.id)
    if not 1 <= count <= len(fresh):
        raise ValueError(f"problems={count} is out of range; allowed: 1 <= problems <= {len(fresh)} for {task}")
    # a smaller count is a prefix of the default draw (a quick report reads the same cache)
    return random.Random(f"esamp-study:{task}:{seed}").sample(fresh, max(count, DEFAULT_PROBLEMS))[:count]


def _engine(dtype: str) -> Any:
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.loading import load_model

    return ESampEngine(load_model("embedded", dtype=dtype))


def _run(args: argparse.Namespace, samplers: Sequence[str], *, report: bool) -> dict[str, Any]:
    from esamp_agents.evaluation.harness import run_eval

    problems = study_problems(args.task, args.problems, args.seed)
    return run_eval(
        problems,
        list(samplers),
        n=args.n,
        ks=[k for k in (1, 2, 4, 8, 16) if k <= args.n],
        out_dir=Path(args.out) / args.task,
        engine=_engine(args.dtype),
        reward_head="shipped",
        diversity=report,
        plots=report,
        seed=args.seed,
        temperature=0.7,
        max_tokens=args.max_tokens,
        prompts_per_call=args.prompts_per_call,
        meta={"study": "esamp_study", "dtype": args.dtype},
    )


def cmd_generate(args: argparse.Namespace) -> int:
    samplers = args.samplers or group_samplers(args.group, args.beta)
    start = time.perf_counter()
    _run(args, samplers, report=False)
    print(f"[study] {args.task}: {len(samplers)} samplers done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- report

DIFF_METRICS = ("accuracy", "pass@8", "majority@8", "reward_bon@8", "reward_vote@8")


def _known_samplers() -> list[str]:
    """Every sampler any group can run, in report order (plain first, then the paper recipe)."""
    names = ["vanilla", "esamp:0.25", *group_samplers("core", 0.25)]
    for beta in (0.05, 0.1, 0.25, 0.5):
        names += group_samplers("axes", beta)
    return list(dict.fromkeys(names))


def _complete_samplers(task_dir: Path, problems: Sequence[Problem], n: int, extra: Sequence[str]) -> list[str]:
    """Samplers whose cache folder holds all ``n`` candidates of every problem."""
    from esamp_agents.evaluation.harness import GENERATIONS
    from esamp_agents.evaluation.samplers import parse_sampler
    from esamp_agents.hidden_reward.collect import read_records

    wanted = {p.id for p in problems}
    found = []
    for name in dict.fromkeys([*_known_samplers(), *extra]):
        folder = task_dir / GENERATIONS / parse_sampler(name).folder
        if not (folder / "manifest.json").exists():
            continue
        counts: dict[str, int] = {}
        for r in read_records(folder):
            counts[r["problem_id"]] = counts.get(r["problem_id"], 0) + 1
        if all(counts.get(pid, 0) >= n for pid in wanted):
            found.append(parse_sampler(name).name)
    return found


def _twin(name: str) -> str:
    """The plain sampler an ESamp sampler is compared with: same temperature and min-p."""
    from esamp_agents.evaluation.samplers import parse_sampler

    s = parse_sampler(name)
    plain = f"minp:{s.min_p}" if s.min_p else "vanilla"
    return parse_sampler(plain + (f":t={s.temperature}" if s.temperature is not None else "")).name


def _base(name: str) -> str:
    """The ESamp sampler a cheaper-Distiller variant is compared with: the same sampler without its
    width, shared and update-interval options (the sampler itself when it has none)."""
    from dataclasses import replace

    from esamp_agents.evaluation.samplers import parse_sampler

    s = parse_sampler(name)
    if s.kind != "esamp":
        return s.name
    return replace(s, distiller_width=None, shared_distiller=False, distiller_update_every=None).name


def _per_problem(groups: list[list[dict[str, Any]]], rewards: list[float], seed: int, draws: int = 32) -> dict:
    """One value per problem for each paired metric (subsets of 8 drawn the same way for every sampler)."""
    import numpy as np

    from esamp_agents.evaluation.metrics import pass_at_k
    from esamp_agents.evaluation.selectors import Group, select_accuracy
    from esamp_agents.evaluation.tasks import answers_match

    out: dict[str, list[float]] = {m: [] for m in DIFF_METRICS}
    n = len(groups[0])
    for j, g in enumerate(groups):
        correct = [bool(r["correct"]) for r in g]
        group = Group(
            problem_id=g[0]["problem_id"],
            correct=correct,
            answers=[r["extracted"] for r in g],
            reference=g[0]["answer"],
            scores={"reward": rewards[j * n : (j + 1) * n]},
        )
        rng = np.random.default_rng([seed, j])
        subsets = [rng.permutation(n)[:8] for _ in range(draws)]
        out["accuracy"].append(float(np.mean(correct)))
        out["pass@8"].append(pass_at_k(n, sum(correct), 8))
        for metric, selector in (("majority@8", "majority"), ("reward_bon@8", "argmax:reward"),
                                 ("reward_vote@8", "vote:reward")):  # fmt: skip
            out[metric].append(
                float(np.mean([select_accuracy(group, selector, idx, rng, answers_match) for idx in subsets]))
            )
    return out


def _paired(a: Sequence[float], b: Sequence[float], seed: int, resamples: int = 2000) -> dict[str, float]:
    """Mean of a - b over problems with a 95% bootstrap interval (problems resampled, pairs kept)."""
    from esamp_agents.evaluation.metrics import bootstrap_ci

    mean, low, high = bootstrap_ci([x - y for x, y in zip(a, b, strict=True)], resamples=resamples, seed=seed)
    return {"mean": mean, "low": low, "high": high}


def _loss_curve(groups: list[list[dict[str, Any]]]) -> list[float]:
    """Mean Distiller loss per decode step over the problems still decoding at that step."""
    curves = [g[0].get("distiller_loss") or [] for g in groups]
    steps = max((len(c) for c in curves), default=0)
    out = []
    for t in range(steps):
        vals = [c[t] for c in curves if len(c) > t and c[t] is not None]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def _report_task(args: argparse.Namespace, task: str, engine: Any) -> dict[str, Any] | None:
    from esamp_agents.evaluation.harness import GENERATIONS, _grouped, reward_scores, run_eval
    from esamp_agents.evaluation.samplers import parse_sampler
    from esamp_agents.hidden_reward.collect import read_records
    from esamp_agents.hidden_reward.reward import HiddenStateReward

    task_dir = Path(args.out) / task
    problems = study_problems(task, args.problems, args.seed)
    samplers = _complete_samplers(task_dir, problems, args.n, args.samplers or [])
    if not samplers:
        print(f"[study] {task}: no complete sampler in {task_dir}", file=sys.stderr)
        return None
    print(f"[study] {task}: {len(samplers)} complete samplers: {' '.join(samplers)}", file=sys.stderr)
    results = run_eval(
        problems, samplers, n=args.n, ks=[k for k in (1, 2, 4, 8, 16) if k <= args.n], out_dir=task_dir,
        engine=engine, reward_head="shipped", diversity=True, plots=True, seed=args.seed, temperature=0.7,
        max_tokens=args.max_tokens, prompts_per_call=args.prompts_per_call, progress=False,
        meta={"study": "esamp_study", "dtype": args.dtype},
    )  # fmt: skip
    head = HiddenStateReward.shipped().head
    wanted = {p.id for p in problems}
    per: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, list[float]] = {}
    for name in samplers:
        folder = task_dir / GENERATIONS / parse_sampler(name).folder
        groups = _grouped([r for r in read_records(folder) if r["problem_id"] in wanted], problems, args.n, folder)
        rewards, _ = reward_scores(folder, [r for g in groups for r in g], head, engine.loaded)
        per[name] = _per_problem(groups, rewards, args.seed)
        if parse_sampler(name).kind == "esamp":
            curves[name] = _loss_curve(groups)
    paired: dict[str, Any] = {}  # ESamp vs its plain twin; "name vs base": a cheaper Distiller vs the full one
    for name in samplers:
        if parse_sampler(name).kind != "esamp":
            continue
        for key, twin in ((name, _twin(name)), (f"{name} vs base", _base(name))):
            if twin in per and twin != name:
                diffs = {m: _paired(per[name][m], per[twin][m], args.seed) for m in DIFF_METRICS}
                paired[key] = {"twin": twin, **diffs}
    return {"task": task, "samplers": samplers, "results": results, "paired": paired, "loss_curves": curves}


def _plot_loss_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("decode step")
    ax.set_ylabel("Distiller loss (mean over prompts)")
    ax.set_title("Online Distiller loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _pct(v: dict[str, Any] | None, signed: bool = False) -> str:
    if not v or v.get("mean") is None:
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * v['mean'])} [{f.format(100 * v['low'])}, {f.format(100 * v['high'])}]"


def _markdown(task_reports: list[dict[str, Any]]) -> str:
    lines = []
    for rep in task_reports:
        res = rep["results"]["samplers"]
        base = res.get("vanilla", {}).get("generation", {}).get("tokens_per_second")
        settings = rep["results"]["settings"]
        lines += [
            f"### {rep['task']} ({rep['results']['problems']['count']} problems x {settings['n']})",
            "",
            "| sampler | per-sample | pass@8 | pass@16 | majority@8 | reward BoN@8 | reward vote@8"
            " | distinct answers | similarity | perplexity | tok/s vs plain |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in rep["samplers"]:
            m = res[name]
            bon = m["best_of_n"]
            div = m["diversity"]
            tps = m["generation"].get("tokens_per_second")
            ratio = f"{tps / base:.2f}" if tps and base else "-"
            sim = div.get("embedding_similarity") or {}
            lines.append(
                f"| `{name}` | {_pct(m['accuracy'])} | {_pct(m['pass_at_k'].get('8'))}"
                f" | {_pct(m['pass_at_k'].get('16'))}"
                f" | {_pct(m['majority_at_k'].get('8'))} | {_pct(bon.get('argmax:reward', {}).get('8'))}"
                f" | {_pct(bon.get('vote:reward', {}).get('8'))} | {div['distinct_answers']['mean']:.2f}"
                f" | {sim.get('mean', float('nan')):.3f} | {m['perplexity']['mean']:.2f} | {ratio} |"
            )
        lines += ["", "Paired differences, ESamp minus its plain twin (same temperature and min-p), or a cheaper "
                  "Distiller minus the full one (twin without width/shared/every), points:", "",
                  "| sampler | twin | per-sample | pass@8 | majority@8 | reward BoN@8 | reward vote@8 |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, d in rep["paired"].items():
            cells = " | ".join(_pct(d[m], signed=True) for m in DIFF_METRICS)
            lines.append(f"| `{name.removesuffix(' vs base')}` | `{d['twin']}` | {cells} |")
        lines.append("")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from esamp_agents.atomic import atomic_write_bytes, atomic_write_json

    engine = _engine(args.dtype)
    reports = [r for task in args.tasks if (r := _report_task(args, task, engine)) is not None]
    if not reports:
        print("[study] nothing to report yet", file=sys.stderr)
        return 1
    out = Path(args.out)
    for rep in reports:
        if rep["loss_curves"]:
            _plot_loss_curves(rep["loss_curves"], out / rep["task"] / "loss_curves.png")
    summary = {
        "command": "python benchmarks/esamp_study.py report " + " ".join(sys.argv[2:]),
        "dtype": args.dtype,
        "tasks": {r["task"]: {k: r[k] for k in ("samplers", "paired", "loss_curves")} for r in reports},
    }
    atomic_write_json(out / "study.json", summary)
    text = _markdown(reports)
    atomic_write_bytes(out / "study.md", text.encode("utf-8"))
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=str(DEFAULT_OUT))
        p.add_argument("--problems", type=int, default=DEFAULT_PROBLEMS)
        p.add_argument("--n", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-tokens", type=int, default=64)
        p.add_argument("--prompts-per-call", type=int, default=4)
        p.add_argument("--dtype", default="bfloat16", help="bfloat16 decodes 1.75x faster than float32 on this CPU")
    gen = sub.choices["generate"]
    gen.add_argument("--task", default="single_digit")
    gen.add_argument("--group", default="core", choices=("core", "axes", "task2"))
    gen.add_argument("--beta", type=float, default=0.25, help="the beta the 'axes' group varies around")
    gen.add_argument("--samplers", nargs="+", help="explicit sampler specs instead of --group")
    rep = sub.choices["report"]
    rep.add_argument("--tasks", nargs="+", default=["single_digit", "word_problems"])
    rep.add_argument("--samplers", nargs="+", help="samplers to report besides the groups' (when complete)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args)
    return cmd_report(args)


if __name__ == "__main__":
    raise SystemExit(main())
