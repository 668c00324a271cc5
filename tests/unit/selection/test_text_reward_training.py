"""The text reward trainer without a model: argument checks, out-folder safety, and reading
labelled texts from both collection formats (hand-written folders)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from esamp_agents.cli.app import main
from esamp_agents.selection import text_reward_training as trt
from esamp_agents.selection.text_reward_training import (
    SUMMARY_FILE,
    check_out_dir,
    load_labelled_texts,
    prompt_of,
    train_text_reward,
)


def records(problems: int = 3) -> list[dict[str, Any]]:
    out = []
    for p in range(problems):
        out.append(
            {"problem_id": f"p{p}", "question": f"What is {p} + 1?", "text": f"Answer: {p + 1}", "correct": True}
        )
        out.append({"problem_id": f"p{p}", "question": f"What is {p} + 1?", "text": f"Answer: {p}", "correct": False})
    return out


def write_folder(folder: Path, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def collected(rows: list[dict[str, Any]], *, call_per_problem: bool) -> list[dict[str, Any]]:
    """Rows with the ``call`` / ``call_records`` / ``sample`` fields both formats' readers check."""
    out = []
    calls: dict[str, int] = {}
    for r in rows:
        call = calls.setdefault(r["problem_id"], len(calls)) if call_per_problem else 0
        out.append({**r, "call": call, "sample": sum(1 for o in out if o["problem_id"] == r["problem_id"])})
    for r in out:
        r["call_records"] = sum(1 for o in out if o["call"] == r["call"])
    return out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs=0 is out of range"),
        ({"epochs": 1.5}, "epochs=1.5 must be an integer"),
        ({"lr": 0.0}, "lr=0.0 is out of range; allowed: 0 < lr <= 1"),
        ({"lr": float("nan")}, "lr=nan is not a number"),
        ({"batch_size": 0}, "batch_size=0 is out of range"),
        ({"max_length": 4}, "max_length=4 is out of range"),
        ({"val_fraction": 1.0}, "val_fraction=1.0 is out of range; allowed: 0 <= val_fraction < 1"),
        ({"seed": -1}, "seed=-1 is out of range"),
        ({"patience": 0}, "patience=0 is out of range"),
        ({"warmup_fraction": 2.0}, "warmup_fraction=2.0 is out of range"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 is out of range"),
        ({"suffix": None}, "suffix=None is not a string"),
        ({"base": 3}, "base=3 is not a path"),
        ({"device": "nonsense"}, "device='nonsense' is not a torch device name"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train_text_reward(records(), tmp_path / "rm", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([], "empty or not a sequence"),
        ("text", "empty or not a sequence"),
        ([{"problem_id": "p", "question": "q", "text": "t"}], r"records\[0\] lacks correct"),
        ([{"problem_id": "p", "question": "q", "text": "t", "correct": 1}], r"records\[0\]\['correct'\]=1"),
        (
            [{"problem_id": "p", "question": "q", "text": None, "correct": True}],
            r"records\[0\]\['text'\] is a NoneType",
        ),
        ([["not", "a", "dict"]], r"records\[0\] is a list"),
    ],
)
def test_bad_records_are_named(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        train_text_reward(bad, tmp_path / "rm")


def test_one_problem_cannot_be_split(tmp_path):
    with pytest.raises(ValueError, match="needs at least 2 groups"):
        train_text_reward(records(1), tmp_path / "rm")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_text_reward(tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="exists and is not a text reward folder"):
        train_text_reward(records(), other)
    assert (other / "notes.txt").read_text(encoding="utf-8") == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="not a text reward folder"):
        check_out_dir(a_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "precious"]


def test_a_previous_reward_folder_and_a_new_path_are_accepted(tmp_path):
    old = tmp_path / "rm"
    old.mkdir()
    (old / SUMMARY_FILE).write_text("{}", encoding="utf-8")
    assert check_out_dir(old) == old
    assert check_out_dir(tmp_path / "new") == tmp_path / "new"


def test_missing_parent_is_refused(tmp_path):
    with pytest.raises(ValueError, match="its parent folder does not exist"):
        train_text_reward(records(), tmp_path / "no" / "rm")


def test_a_failure_leaves_no_temporary_folder_and_keeps_the_old_model(tmp_path, monkeypatch):
    old = tmp_path / "rm"
    old.mkdir()
    (old / SUMMARY_FILE).write_text('{"old": true}', encoding="utf-8")
    seen: list[Path] = []

    def failing_load(base: Any, max_length: int, seed: int) -> Any:
        seen.extend(p for p in tmp_path.iterdir() if p.name.startswith(".rm.tmp-"))
        raise RuntimeError("boom")

    monkeypatch.setattr(trt, "_load_base", failing_load)
    with pytest.raises(RuntimeError, match="boom"):
        train_text_reward(records(), old)
    assert len(seen) == 1  # the temporary folder existed while working ...
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]  # ... and is gone
    assert json.loads((old / SUMMARY_FILE).read_text(encoding="utf-8")) == {"old": True}


def test_install_replaces_a_previous_folder_whole(tmp_path):
    out = tmp_path / "rm"
    out.mkdir()
    (out / SUMMARY_FILE).write_text("{}", encoding="utf-8")
    (out / "stale.bin").write_text("old", encoding="utf-8")
    tmp = tmp_path / ".rm.tmp-x"
    tmp.mkdir()
    (tmp / SUMMARY_FILE).write_text('{"new": 1}', encoding="utf-8")
    trt._install(tmp, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE]
    assert json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8")) == {"new": 1}


def test_prompt_matches_problem_prompt():
    from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, Problem

    problem = Problem(id="p", task="t", question="What is 2 + 3?", answer="5", key="p")
    assert prompt_of(problem.question, DEFAULT_SUFFIX) == problem.prompt(DEFAULT_SUFFIX)
    assert prompt_of(problem.question, "") == problem.prompt("") == "What is 2 + 3?"


def test_load_labelled_texts_local_format(tmp_path):
    from esamp_agents.hidden_reward.collect import FORMAT_NAME, FORMAT_VERSION

    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": "m", "suffix": "Answer: N."}
    rows = collected(records(2), call_per_problem=False)
    folder = write_folder(tmp_path / "local", manifest, rows)
    got, suffix = load_labelled_texts(folder)
    assert suffix == "Answer: N."
    assert [(r["problem_id"], r["text"], r["correct"]) for r in got] == [
        ("p0", "Answer: 1", True), ("p0", "Answer: 0", False), ("p1", "Answer: 2", True), ("p1", "Answer: 1", False),
    ]  # fmt: skip


def test_load_labelled_texts_api_format_drops_an_unfinished_call(tmp_path):
    from esamp_agents.adapters.api_collect import FORMAT_NAME, FORMAT_VERSION

    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": "gpt", "suffix": "S"}
    rows = collected(records(3), call_per_problem=True)
    folder = write_folder(tmp_path / "api", manifest, rows[:-1])  # the last problem's call is incomplete
    got, suffix = load_labelled_texts(folder)
    assert suffix == "S"
    assert sorted({r["problem_id"] for r in got}) == ["p0", "p1"]
    assert len(got) == 4


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (None, "does not exist"),
        ({"format": "something-else", "suffix": "S"}, "format='something-else'; allowed"),
        ({"format": "esamp-agents/collect", "format_version": 1}, "suffix=None; allowed: a string"),
        ({"format": "esamp-agents/collect-api", "format_version": 9, "suffix": "S"}, "format_version 9"),
    ],
)
def test_load_labelled_texts_refuses_other_folders(tmp_path, manifest, message):
    folder = tmp_path / "data"
    if manifest is None:
        folder.mkdir()
    else:
        write_folder(folder, manifest, collected(records(1), call_per_problem=False))
    with pytest.raises(ValueError, match=message):
        load_labelled_texts(folder)


def test_load_labelled_texts_refuses_an_empty_folder(tmp_path):
    from esamp_agents.hidden_reward.collect import FORMAT_NAME

    folder = write_folder(tmp_path / "data", {"format": FORMAT_NAME, "format_version": 1, "suffix": "S"}, [])
    with pytest.raises(ValueError, match="holds no complete records"):
        load_labelled_texts(folder)


def test_cli_errors_exit_2_before_training(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    out = io.StringIO()
    assert main(["train-text-reward", str(tmp_path / "missing"), "--out", str(tmp_path / "rm")], out=out) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train-text-reward", str(tmp_path / "missing"), "--out", str(other)], out=out) == 2
    assert "is not a text reward folder" in capsys.readouterr().err
    data = write_folder(
        tmp_path / "data", {"format": "esamp-agents/collect", "format_version": 1, "suffix": "S"},
        collected(records(2), call_per_problem=False),
    )  # fmt: skip
    assert main(["train-text-reward", str(data), "--out", str(tmp_path / "rm"), "--epochs", "0"], out=out) == 2
    assert "epochs=0 is out of range" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other"]
