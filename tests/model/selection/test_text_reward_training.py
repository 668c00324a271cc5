"""A real text reward model: fine-tune the installed all-MiniLM-L6-v2 on a tiny learnable task,
load it with SequenceClassifierReward (no glue), and check it ranks held-out candidates."""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from esamp_agents.cli.app import main
from esamp_agents.selection.rewards import SequenceClassifierReward
from esamp_agents.selection.text_reward_training import SUMMARY_FILE, prompt_of, train_text_reward

SUFFIX = "Write the final answer as 'Answer: <number>'."


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One CPU thread: a 22M-parameter BERT trains faster so on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(problems: int, seed: int) -> list[dict[str, Any]]:
    """Right answers labelled True; wrong ones hedge with 'maybe' (the learnable signal)."""
    rng = random.Random(seed)
    out = []
    for p in range(problems):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        q = f"What is {a} + {b}?"
        out.append({"problem_id": f"p{p}", "question": q, "text": f"Answer: {a + b}", "correct": True})
        out.append({"problem_id": f"p{p}", "question": q, "text": f"maybe Answer: {a + b + 1}", "correct": False})
    return out


def train(out: Path) -> Any:
    return train_text_reward(
        synthetic(12, 0), out, suffix=SUFFIX, epochs=4, lr=2e-4, batch_size=4, max_length=64,
        val_fraction=0.25, seed=2, patience=4,
    )  # fmt: skip


def test_trains_loads_ranks_and_repeats(tmp_path):
    fit = train(tmp_path / "rm")
    assert fit.path == tmp_path / "rm"
    names = sorted(p.name for p in fit.path.iterdir())
    assert "model.safetensors" in names and SUMMARY_FILE in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no temporary folder left
    summary = json.loads((fit.path / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary["candidates"] == 24 and summary["positives"] == 12
    assert summary["val_problems"] == 3 and summary["train_problems"] == 9
    assert summary["epochs_run"] == len(fit.history) == 4
    assert 1 <= summary["best_epoch"] <= 4
    assert summary["max_length"] == 64 and summary["prompt_format"] == "{question} {suffix}"
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in fit.history)
    assert fit.history[-1]["val_loss"] < fit.history[0]["val_loss"]  # it learned

    reward = SequenceClassifierReward(fit.path)
    assert reward.max_length == 64  # scoring truncates as training did
    held_out = [
        ("What is 20 + 30?", "Answer: 50", "maybe Answer: 51"),
        ("What is 11 + 4?", "Answer: 15", "maybe Answer: 16"),
    ]
    for question, right, wrong in held_out:
        scores = reward.score_texts(prompt_of(question, SUFFIX), [right, wrong])
        assert all(math.isfinite(s) for s in scores)
        assert scores[0] > scores[1], (question, scores)
    long = reward.encode(prompt_of("What is 1 + 1?", SUFFIX), "word " * 200)
    assert len(long) == 64

    again = train(tmp_path / "rm2")
    twin = SequenceClassifierReward(again.path)
    probe = prompt_of("What is 2 + 6?", SUFFIX)
    texts = ["Answer: 8", "maybe Answer: 9", "Answer: 10"]
    assert reward.score_texts(probe, texts) == twin.score_texts(probe, texts)
    assert [h["train_loss"] for h in fit.history] == [h["train_loss"] for h in again.history]


def test_cli_trains_from_a_collection_folder_and_replaces_its_own_output(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    manifest = {"format": "esamp-agents/collect-api", "format_version": 1, "model": "gpt", "suffix": SUFFIX}
    (data / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    rows = synthetic(4, 1)
    for i, r in enumerate(rows):
        r.update(call=i // 2, call_records=2, sample=i % 2)
    (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "rm"
    argv = ["train-text-reward", str(data), "--out", str(out), "--epochs", "1", "--max-length", "32",
            "--batch-size", "4", "--val-fraction", "0.25"]  # fmt: skip
    for _ in range(2):  # the second run replaces the first run's folder
        buf = io.StringIO()
        assert main(argv, out=buf) == 0
        assert f"wrote {out}" in buf.getvalue()
    summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary["suffix"] == SUFFIX and summary["candidates"] == 8 and summary["max_length"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "rm"]
    scores = SequenceClassifierReward(out).score_texts(prompt_of("What is 1 + 2?", SUFFIX), ["Answer: 3"])
    assert math.isfinite(scores[0])
