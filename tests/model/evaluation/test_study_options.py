"""The knobs the configuration study sweeps: sampler options, the shared Distiller, the paper preset."""

from __future__ import annotations

import json
from pathlib import Path

from esamp_agents import ESampParams, SamplingParams
from esamp_agents.evaluation.tasks import generate_problems
from esamp_agents.hidden_reward.collect import MANIFEST, collect, read_records


def test_engine_shared_distiller_reports_one_curve_for_every_prompt(engine) -> None:
    sp = SamplingParams(n=2, max_new_tokens=6, seed=3, ignore_eos=True)
    shared = engine.generate(["What is 2+3?", "Name a colour."], sp, ESampParams(shared_distiller=True))
    per_prompt = engine.generate(["What is 2+3?", "Name a colour."], sp, ESampParams())
    assert len(shared[0].distiller_loss) == len(shared[1].distiller_loss) == 5
    assert shared[0].distiller_loss == shared[1].distiller_loss
    assert per_prompt[0].distiller_loss != per_prompt[1].distiller_loss


def test_collect_records_the_distiller_loss_and_the_dtype(engine, tmp_path: Path) -> None:
    problems = generate_problems("single_digit", 2, seed=5)
    sp = SamplingParams(n=2, max_new_tokens=6, seed=1, ignore_eos=True)
    collect(engine, problems, tmp_path / "c", sampling=sp, esamp=ESampParams(beta=0.25), progress=False)
    records = read_records(tmp_path / "c")
    assert [len(r["distiller_loss"]) if r["distiller_loss"] else None for r in records] == [5, None, 5, None]
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["dtype"] == "float32"
    # A folder written before dtype and shared_distiller were recorded still resumes.
    del manifest["dtype"], manifest["esamp"]["shared_distiller"]
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(manifest))
    again = collect(engine, problems, tmp_path / "c", sampling=sp, esamp=ESampParams(beta=0.25), progress=False)
    assert (again.problems_done, again.problems_skipped) == (0, 2)
