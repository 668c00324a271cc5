"""Labelled data collection on the real embedded model: format, resume after a crash, loading."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from esamp_agents import ESampParams, SamplingParams
from esamp_agents.evaluation.tasks import extract_answer, generate_problems
from esamp_agents.hidden_reward.collect import (
    MANIFEST,
    RECORDS,
    CollectFormatError,
    collect,
    load_examples,
    read_manifest,
    read_records,
)
from esamp_agents.hidden_reward.features import hidden_spec, posthoc_features

SAMPLING = SamplingParams(n=2, max_new_tokens=24, temperature=0.7, seed=7)
ESAMP = ESampParams(beta=0.25)
PER_CALL = 2  # 3 problems -> calls [p0, p1] and [p2]


@pytest.fixture(scope="module")
def problems():
    return generate_problems("single_digit", 3, seed=0)


@pytest.fixture(scope="module")
def spec(embedded):
    return hidden_spec(embedded, (15, -1))


@pytest.fixture(scope="module")
def base(tmp_path_factory, engine, problems, spec) -> Path:
    """An uninterrupted collection: 3 problems x 2 samples with features."""
    out = tmp_path_factory.mktemp("collect") / "base"
    summary = collect(
        engine, problems, out, sampling=SAMPLING, esamp=ESAMP, spec=spec, prompts_per_call=PER_CALL, progress=False
    )
    assert (summary.problems_done, summary.problems_skipped, summary.candidates, summary.calls) == (3, 0, 6, 2)
    return out


def run(engine, problems, out, spec=None, **kw):
    args = {"sampling": SAMPLING, "esamp": ESAMP, "spec": spec, "prompts_per_call": PER_CALL, "progress": False} | kw
    return collect(engine, problems, out, **args)


def test_records_and_shards_are_consistent(base: Path, problems, spec, embedded) -> None:
    manifest = read_manifest(base)
    assert manifest["model"] == embedded.name and manifest["spec"] == spec.to_dict()
    assert manifest["sampling"]["n"] == 2 and manifest["esamp"]["beta"] == 0.25
    records = read_records(base)
    assert [(r["problem_id"], r["sample"]) for r in records] == [(p.id, s) for p in problems for s in range(2)]
    rows: dict[str, int] = {}
    for r in records:
        assert r["length"] == len(r["token_ids"]) >= 1
        assert r["offset"] == rows.get(r["shard"], 0)  # contiguous, in record order
        rows[r["shard"]] = r["offset"] + r["length"]
        assert isinstance(r["correct"], bool) and r["extracted"] == extract_answer(r["text"])
        assert r["novelty_mean"] is None or r["novelty_mean"] > 0
        assert r["prompt_token_ids"] == embedded.chat_token_ids(
            [{"role": "user", "content": r["question"] + " " + manifest["suffix"]}]
        )
    assert sorted(rows) == ["shards/shard-00000.safetensors", "shards/shard-00001.safetensors"]
    for name, total in rows.items():
        with safe_open(str(base / name), framework="pt") as f:
            assert list(f.keys()) == ["features"]
            feats = f.get_tensor("features")
        assert feats.shape == (total, spec.dim) and feats.dtype == torch.float16


def test_resume_of_a_complete_run_redoes_nothing(base: Path, engine, problems, spec) -> None:
    before = (base / RECORDS).read_bytes()
    summary = run(engine, problems, base, spec)
    assert (summary.problems_done, summary.problems_skipped, summary.candidates) == (3 - 3, 3, 0)
    assert (base / RECORDS).read_bytes() == before


@pytest.mark.parametrize("keep_first_line", [False, True], ids=["call-lost", "call-half-written"])
def test_crash_resume_redoes_exactly_the_missing_problem(
    base: Path, tmp_path: Path, engine, problems, spec, keep_first_line: bool
) -> None:
    crashed = tmp_path / "crashed"
    shutil.copytree(base, crashed)
    lines = (crashed / RECORDS).read_bytes().splitlines(keepends=True)
    last_call = [i for i, line in enumerate(lines) if json.loads(line)["call"] == 1]
    assert len(last_call) == 2
    kept = lines[: last_call[1] if keep_first_line else last_call[0]]
    torn = lines[last_call[-1]][:37]  # a partial line: the crash hit mid-write
    (crashed / RECORDS).write_bytes(b"".join(kept) + torn)
    assert len(read_records(crashed)) == 4  # the torn line and the half call are not read

    summary = run(engine, problems, crashed, spec)
    assert (summary.problems_done, summary.problems_skipped, summary.candidates) == (1, 2, 2)
    assert read_records(crashed) == read_records(base)  # same seeds: same candidates as uninterrupted
    assert (crashed / RECORDS).read_bytes() == (base / RECORDS).read_bytes()
    shard = "shards/shard-00001.safetensors"  # the orphan shard was overwritten with the same features
    with safe_open(str(crashed / shard), framework="pt") as a, safe_open(str(base / shard), framework="pt") as b:
        assert torch.equal(a.get_tensor("features"), b.get_tensor("features"))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sampling": replace(SAMPLING, temperature=0.9)}, r"different sampling \(temperature: stored 0.7, now 0.9\)"),
        ({"esamp": ESampParams(beta=0.0)}, r"different esamp \(beta"),
        ({"suffix": "Answer:"}, "different suffix"),
        ({"spec": None}, "different spec"),
    ],
)
def test_manifest_mismatch_names_the_field(base: Path, engine, problems, spec, change, match: str) -> None:
    before = (base / RECORDS).read_bytes()
    with pytest.raises(CollectFormatError, match=match):
        run(engine, problems, base, **({"spec": spec} | change))
    assert (base / RECORDS).read_bytes() == before


def test_load_examples_from_shards_equals_posthoc(base: Path, embedded, spec) -> None:
    records = read_records(base)
    examples = load_examples(base)
    assert [(e.group, e.label) for e in examples] == [(r["problem_id"], r["correct"]) for r in records]
    post = posthoc_features(
        embedded, [r["prompt_token_ids"] for r in records], [r["token_ids"] for r in records], spec, dtype=torch.float32
    )
    for e, p in zip(examples, post, strict=True):
        assert e.features.dtype == torch.float16
        torch.testing.assert_close(e.features.float(), p, rtol=2e-3, atol=2e-3)  # float16 storage
    # another layer choice is recomputed post hoc from the stored tokens
    other = hidden_spec(embedded, (0, 5))
    recomputed = load_examples(base, loaded=embedded, spec=other)
    assert [e.features.shape for e in recomputed] == [(len(r["token_ids"]), other.dim) for r in records]
    with pytest.raises(ValueError, match="pass loaded="):
        load_examples(base, spec=other)


def test_spec_none_stores_labels_only_and_loads_post_hoc(
    base: Path, tmp_path: Path, engine, problems, spec, embedded
) -> None:
    out = tmp_path / "labels-only"
    summary = run(engine, problems, out, None)
    assert summary.candidates == 6 and summary.tokens == sum(len(r["token_ids"]) for r in read_records(out))
    assert read_manifest(out)["spec"] is None and not (out / "shards").exists()
    records = read_records(out)
    # observers never change sampling: the same candidates as the run that stored features
    strip = {"shard", "offset", "length"}
    assert [{k: v for k, v in r.items() if k not in strip} for r in read_records(base)] == records
    with pytest.raises(ValueError, match="stores no features"):
        load_examples(out)
    examples = load_examples(out, loaded=embedded, spec=spec)
    for e, stored in zip(examples, load_examples(base), strict=True):
        torch.testing.assert_close(e.features, stored.features, rtol=2e-3, atol=2e-3)
        assert e.label == stored.label and e.group == stored.group


def test_collect_validates_before_work(tmp_path: Path, engine, problems, spec) -> None:
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="seed=None"):
        run(engine, problems, out, spec, sampling=replace(SAMPLING, seed=None))
    with pytest.raises(ValueError, match="appears twice"):
        run(engine, [problems[0], problems[0]], out, spec)
    with pytest.raises(ValueError, match="prompts_per_call=0"):
        run(engine, problems, out, spec, prompts_per_call=0)
    assert not out.exists()
    with pytest.raises(CollectFormatError, match="not a collection folder"):
        read_records(tmp_path)
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(CollectFormatError, match="not written by"):
        read_manifest(tmp_path)
