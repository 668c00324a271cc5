"""Collection on Ray Data (a local Ray cluster on this machine) equals the single-process path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from esamp_agents import ESampParams, SamplingParams
from esamp_agents.evaluation.tasks import generate_problems
from esamp_agents.hidden_reward.collect import RECORDS, collect, read_records
from esamp_agents.hidden_reward.collect_ray import (
    RayOptions,
    collect_ray,
)
from esamp_agents.hidden_reward.features import hidden_spec

SAMPLING = SamplingParams(n=2, max_new_tokens=12, temperature=0.7, seed=11)


ESAMP = ESampParams(beta=0.25, warm_start_steps=2)


PER_CALL = 2  # 4 problems -> calls [p0, p1], [p2, p3]


LOOPBACK = pytest.mark.allow_hosts(["127.0.0.1"])


def _key(record: dict) -> tuple[str, int]:
    return record["problem_id"], record["sample"]


def _records(folder: Path) -> list[dict]:
    return sorted(read_records(folder), key=_key)


def _same_folder(a: Path, b: Path) -> None:
    """Same records (file order may differ: Ray returns calls as they finish) and equal shards."""
    ra, rb = sorted(read_records(a), key=_key), sorted(read_records(b), key=_key)
    assert len(ra) == len(rb) == len({_key(r) for r in rb})  # nothing lost, nothing twice
    assert ra == rb
    shards_a = sorted(p.name for p in (a / "shards").iterdir())
    assert shards_a == sorted(p.name for p in (b / "shards").iterdir())
    for name in shards_a:  # (bytes can differ: safetensors writes its metadata map in no fixed order)
        with (
            safe_open(str(a / "shards" / name), framework="pt") as x,
            safe_open(str(b / "shards" / name), framework="pt") as y,
        ):
            assert x.metadata() == y.metadata()
            assert torch.equal(x.get_tensor("features"), y.get_tensor("features"))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
            configure_logging=False,
        )  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def problems():
    return generate_problems("single_digit", 4, seed=2)


@pytest.fixture(scope="module")
def spec(embedded):
    return hidden_spec(embedded, (15, -1))


@pytest.fixture(scope="module")
def local(tmp_path_factory, engine, problems, spec) -> Path:
    """The single-process reference, with one torch thread like each Ray actor."""
    out = tmp_path_factory.mktemp("local") / "c"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collect(engine, problems, out, sampling=SAMPLING, esamp=ESAMP, spec=spec, prompts_per_call=PER_CALL,
                progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out


def _ray(problems, out: Path, spec, workers: int):
    return collect_ray(
        problems, out, sampling=SAMPLING, esamp=ESAMP, spec=spec, prompts_per_call=PER_CALL,
        ray_options=RayOptions(num_workers=workers), progress=False,
    )  # fmt: skip


@LOOPBACK
def test_ray_with_two_workers_equals_single_process(ray_cluster, local: Path, tmp_path: Path, problems, spec) -> None:
    summary = _ray(problems, tmp_path / "ray", spec, workers=2)
    assert (summary.problems_done, summary.problems_skipped, summary.candidates, summary.calls) == (4, 0, 8, 2)
    _same_folder(local, tmp_path / "ray")
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["esamp"]["warm_start_steps"] == 2 and manifest["spec"] is not None


@LOOPBACK
def test_ray_resumes_a_crashed_run_without_loss_or_duplicates(
    ray_cluster, local: Path, tmp_path: Path, problems, spec
) -> None:
    crashed = tmp_path / "crashed"
    shutil.copytree(local, crashed)
    lines = (crashed / RECORDS).read_bytes().splitlines(keepends=True)
    first_call = [line for line in lines if json.loads(line)["call"] == 0]
    (crashed / RECORDS).write_bytes(b"".join(first_call) + lines[len(first_call)][:41])  # torn mid-write
    summary = _ray(problems, crashed, spec, workers=1)
    assert (summary.problems_done, summary.problems_skipped, summary.candidates) == (2, 2, 4)
    _same_folder(local, crashed)
    again = _ray(problems, crashed, spec, workers=1)  # complete: starts no actor, writes nothing
    assert (again.problems_done, again.problems_skipped) == (0, 4)
    _same_folder(local, crashed)


@LOOPBACK
def test_eval_on_ray_generates_the_same_candidates(ray_cluster, local: Path, tmp_path: Path, engine, problems) -> None:
    from esamp_agents.evaluation.harness import GENERATIONS, run_eval

    results = run_eval(
        problems, ["esamp:0.25:warm2"], n=2, ks=[1, 2], out_dir=tmp_path / "eval", engine=engine, diversity=False,
        plots=False, seed=SAMPLING.seed, max_tokens=SAMPLING.max_new_tokens, prompts_per_call=PER_CALL, progress=False,
        ray_options=RayOptions(num_workers=1), model_load={"model": "embedded", "device": "cpu"},
    )  # fmt: skip
    assert results["samplers"]["esamp:0.25:warm2"]["candidates"] == 8
    drop = ("shard", "offset", "length")  # the reference stored features; eval without a head does not
    got = [
        {k: v for k, v in r.items() if k not in drop}
        for r in _records(tmp_path / "eval" / GENERATIONS / "esamp_0.25_warm2")
    ]
    want = [{k: v for k, v in r.items() if k not in drop} for r in _records(local)]
    assert got == want


def test_eval_ray_arguments_are_checked_before_work(engine, problems, tmp_path: Path) -> None:
    from esamp_agents.evaluation.harness import run_eval

    common = {"n": 2, "ks": [1], "out_dir": tmp_path / "e", "engine": engine, "diversity": False, "plots": False}
    with pytest.raises(ValueError, match="model_load only applies with ray_options"):
        run_eval(problems, ["vanilla"], **common, model_load={"model": "embedded"})
    with pytest.raises(ValueError, match=r"allowed keys are model \(required\), dtype, device"):
        run_eval(problems, ["vanilla"], **common, ray_options=RayOptions(), model_load={"model": "x", "colour": 1})
    assert not (tmp_path / "e").exists()
