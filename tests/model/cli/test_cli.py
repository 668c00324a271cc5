"""The command line, run in-process on the shared embedded model (the registry hands it the session's copy)."""

from __future__ import annotations

import io
import json
import math

from esamp_agents.cli import demo
from esamp_agents.cli.app import main

FAST = ["--max-tokens", "6", "--seed", "0"]


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = main(argv, out=out)
    return code, out.getvalue()


def run_json(argv: list[str]) -> dict:
    code, text = run([*argv, "--json"])
    assert code == 0, text
    return json.loads(text)


def test_generate_prints_n_candidates(embedded):
    code, text = run(["generate", "What is 2 + 2?", "-n", "3", *FAST])
    assert code == 0
    assert "=== prompt 1/1: What is 2 + 2?" in text
    for i in range(3):
        assert f"--- [{i}] finish=" in text
    assert "--- [3]" not in text
    assert text.count("mean_logprob=") == 3
    assert "1 prompt(s), 3 candidates" in text


def test_generate_json_is_machine_readable_and_seeded(embedded):
    argv = ["generate", "Name a colour.", "-n", "2", *FAST, "--beta", "0.25", "--top-p", "0.9"]
    doc = run_json(argv)
    assert doc["model"] == embedded.name
    assert doc["chat_template"] is True
    assert doc["sampling"]["n"] == 2 and doc["sampling"]["top_p"] == 0.9 and doc["sampling"]["max_new_tokens"] == 6
    assert doc["esamp"]["beta"] == 0.25
    [result] = doc["results"]
    assert result["prompt"] == "Name a colour."
    cands = result["candidates"]
    assert [c["index"] for c in cands] == [0, 1]
    for c in cands:
        assert c["finish_reason"] in ("stop", "length")
        assert 1 <= c["completion_tokens"] <= 6
        assert c["mean_logprob"] is None or (math.isfinite(c["mean_logprob"]) and c["mean_logprob"] <= 0)
        assert isinstance(c["text"], str)
    assert doc["stats"]["generated_tokens"] == sum(c["completion_tokens"] for c in cands)
    # Same seed, same candidates.
    again = run_json(argv)
    assert [c["text"] for c in again["results"][0]["candidates"]] == [c["text"] for c in cands]


def test_no_chat_sends_the_raw_prompt(embedded):
    chat = run_json(["generate", "Once upon a time", "-n", "1", *FAST])
    raw = run_json(["generate", "Once upon a time", "-n", "1", *FAST, "--no-chat"])
    assert raw["chat_template"] is False
    raw_tokens = raw["results"][0]["candidates"][0]["prompt_tokens"]
    assert raw_tokens == len(embedded.tokenizer("Once upon a time")["input_ids"])
    # The chat template wraps the prompt in a system turn and role markers.
    assert chat["results"][0]["candidates"][0]["prompt_tokens"] > raw_tokens + 10


def test_prompts_file_batches_keep_order(embedded, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("What is 1 + 1?\n\nName a fruit.\nSay hi.\n", encoding="utf-8")
    doc = run_json(["generate", "--prompts-file", str(path), "-n", "1", "--batch-size", "2", *FAST])
    assert [r["prompt"] for r in doc["results"]] == ["What is 1 + 1?", "Name a fruit.", "Say hi."]
    assert all(len(r["candidates"]) == 1 for r in doc["results"])
    assert doc["stats"]["prompts"] == 3
    assert "prompt" in capsys.readouterr().err  # the tqdm bar over prompts (2 batches)


def test_run_demo_small(embedded):
    out = io.StringIO()
    report = demo.run_demo(questions=2, n=2, max_new_tokens=8, seed=1, chooser=demo.majority_vote, out=out)
    text = out.getvalue()
    assert len(report.rows) == 2
    assert all(len(r.candidates) == 2 and len(r.answers) == 2 for r in report.rows)
    assert report.generated_tokens == sum(c.completion_tokens for r in report.rows for c in r.candidates)
    assert 0.0 <= report.accuracy <= report.pass_at_n <= 1.0
    assert "Q1. " in text and "Q2. " in text
    assert "chosen (majority):" in text and "accuracy (majority):" in text and "pass@2" in text


def test_demo_chooser_is_pluggable(embedded):
    def oracle(candidates, answers):
        return target

    target = demo.make_questions(1, seed=5)[0].answer
    report = demo.run_demo(questions=1, n=2, max_new_tokens=4, seed=5, chooser=oracle, out=io.StringIO())
    assert report.rows[0].chosen == target
    assert report.accuracy == 1.0


def test_demo_command(embedded):
    code, text = run(["demo", "--questions", "1", "-n", "2", "--max-tokens", "6", "--chooser", "logprob"])
    assert code == 0
    assert "Q1. " in text
    assert "chosen (logprob):" in text
    assert "accuracy (logprob):" in text


def test_demo_default_chooser_is_the_shipped_reward_head(embedded):
    out = io.StringIO()
    report = demo.run_demo(questions=2, n=3, max_new_tokens=24, seed=2, out=out)
    text = out.getvalue()
    assert all(isinstance(c.extras["reward"], float) for r in report.rows for c in r.candidates)
    assert "chosen (reward-vote):" in text
    assert any(line.split()[:3] == ["#", "answer", "reward"] for line in text.splitlines() if line.strip())
    for row in report.rows:
        if row.chosen is not None:
            assert row.chosen in row.answers
