"""Ray Data collection vs the single-process path: throughput, equality, crash and resume (issue #7).

    python benchmarks/ray_collect.py            # ~5 min on 2 cores; writes benchmarks/out/ray_collect.json

1. The same problems are collected three ways into fresh folders: single process (torch on all
   cores), Ray with 1 actor, Ray with 2 actors (one core each). Wall time includes Ray's start
   and each actor's model load, as a user would see it; generated tokens are counted.
2. The three folders must hold the same candidates: tokens, texts and grades exactly; float
   fields (logprobs, Distiller loss) differ at rounding level between a 2-thread process and
   1-thread actors, and the largest difference is reported.
3. Crash and resume: a Ray run in a subprocess is killed (SIGKILL) once some calls are written,
   then the same command is run again; the folder must end with every candidate exactly once,
   equal to the uninterrupted 2-actor run.
``--compare-only`` recomputes the checks from the folders of the last run (no generation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "out"


def _settings(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    from esamp_agents import ESampParams, SamplingParams
    from esamp_agents.evaluation.tasks import load_problems

    sampling = SamplingParams(n=args.n, max_new_tokens=args.max_tokens, seed=args.seed)
    return sampling, ESampParams(beta=0.1, warm_start_steps=20), load_problems(args.task)


def _run(args: argparse.Namespace, mode: str, out: Path) -> dict[str, Any]:
    """One collection: ``local`` or ``rayN`` (N actors)."""
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.hidden_reward.collect import collect
    from esamp_agents.hidden_reward.collect_ray import RayOptions, collect_ray

    sampling, esamp, problems = _settings(args)
    start = time.perf_counter()
    if mode == "local":
        summary = collect(ESampEngine(), problems, out, sampling=sampling, esamp=esamp, progress=False)
    else:
        options = RayOptions(num_workers=int(mode[3:]), cpus_per_worker=max(1, args.cores // int(mode[3:])))
        summary = collect_ray(problems, out, sampling=sampling, esamp=esamp, ray_options=options, progress=False)
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "tokens": summary.tokens, "tokens_per_second": summary.tokens / seconds,
            "candidates": summary.candidates}  # fmt: skip


def _records(folder: Path) -> list[dict[str, Any]]:
    from esamp_agents.hidden_reward.collect import read_records

    return sorted(read_records(folder), key=lambda r: (r["problem_id"], r["sample"]))


BOOKKEEPING = ("call", "call_records", "shard", "offset", "length")  # which call wrote it: order-dependent
FLOATS = ("mean_logprob", "novelty_mean", "logprobs", "distiller_loss")


def _as_list(value: Any) -> list[float]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _compare(a: Path, b: Path) -> dict[str, Any]:
    """Same candidates? Tokens, texts and grades exactly; float fields up to rounding.

    Torch's float rounding depends on its thread count (a 2-thread process vs 1-thread actors),
    and after a resume the calls can carry other numbers (Ray writes calls as they finish).
    """
    ra, rb = _records(a), _records(b)
    exact = all(
        {k: v for k, v in x.items() if k not in BOOKKEEPING + FLOATS}
        == {k: v for k, v in y.items() if k not in BOOKKEEPING + FLOATS}
        for x, y in zip(ra, rb, strict=False)
    )
    worst = 0.0
    for x, y in zip(ra, rb, strict=False):
        for key in FLOATS:
            u, v = _as_list(x[key]), _as_list(y[key])
            worst = max([worst, *(abs(p - q) / max(1.0, abs(q)) for p, q in zip(u, v, strict=False))])
    idents = [(r["problem_id"], r["sample"]) for r in ra]
    return {
        "records": [len(ra), len(rb)],
        "tokens_texts_grades_equal": exact and len(ra) == len(rb),
        "max_float_difference": worst,
        "duplicates": len(idents) - len(set(idents)),
        "missing": len({(r["problem_id"], r["sample"]) for r in rb} - set(idents)),
    }


def _crash_and_resume(args: argparse.Namespace, reference: Path, work: Path) -> dict[str, Any]:
    folder = work / "crashed"
    cmd = [sys.executable, __file__, "--child", str(folder), "--task", args.task, "-n", str(args.n),
           "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), "--cores", str(args.cores)]  # fmt: skip
    child = subprocess.Popen(cmd, start_new_session=True)
    records = folder / "records.jsonl"
    calls_before_kill = 0
    deadline = time.monotonic() + 600
    while child.poll() is None and time.monotonic() < deadline:
        if records.exists():
            calls_before_kill = len({json.loads(line)["call"] for line in records.read_text().splitlines() if line})
            if calls_before_kill >= args.kill_after_calls:
                break
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)  # the driver and everything it started
    child.wait()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, check=False)
    lines_at_kill = len(records.read_text().splitlines()) if records.exists() else 0
    resumed = _run(args, "ray2", folder)
    return {
        "calls_written_before_kill": calls_before_kill,
        "records_before_kill": lines_at_kill,
        "resume": resumed,
        "vs_uninterrupted_ray2": _compare(folder, reference),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="single_digit:24:3:test")
    p.add_argument("-n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--kill-after-calls", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT / "ray_collect.json")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--compare-only", action="store_true", help="recompute the checks of the last run's folders")
    args = p.parse_args(argv)
    if args.child is not None:  # the run that gets killed
        _run(args, "ray2", args.child)
        return 0

    import ray

    from esamp_agents.atomic import atomic_write_json

    work = OUT / "ray_collect"
    if args.compare_only:
        previous = json.loads(args.out.read_text())
        previous.pop("same_candidates", None)
        previous["vs_local"] = {m: _compare(work / m, work / "local") for m in ("ray1", "ray2")}
        crash = previous["crash_and_resume"]
        for stale in ("duplicates", "missing", "equal_to_uninterrupted", "records_after_resume"):
            crash.pop(stale, None)
        crash["vs_uninterrupted_ray2"] = _compare(work / "crashed", work / "ray2")
        atomic_write_json(args.out, previous)
        print(json.dumps(previous, indent=2))
        return 0
    shutil.rmtree(work, ignore_errors=True)
    runs = []
    for mode in ("local", "ray1", "ray2"):
        runs.append(_run(args, mode, work / mode))
        ray.shutdown()  # each Ray run pays its own start, as a fresh job would
        print(json.dumps(runs[-1]), file=sys.stderr)
    same = {m: _compare(work / m, work / "local") for m in ("ray1", "ray2")}
    crash = _crash_and_resume(args, work / "ray2", work)
    local_tps = runs[0]["tokens_per_second"]
    result = {
        "command": "python benchmarks/ray_collect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": {"task": args.task, "n": args.n, "max_tokens": args.max_tokens, "esamp": "beta 0.1, warm 20"},
        "runs": runs,
        "ratio_to_local": {r["mode"]: r["tokens_per_second"] / local_tps for r in runs},
        "vs_local": same,
        "crash_and_resume": crash,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    checks = [*same.values(), crash["vs_uninterrupted_ray2"]]
    ok = all(c["tokens_texts_grades_equal"] and not c["duplicates"] and not c["missing"] for c in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
