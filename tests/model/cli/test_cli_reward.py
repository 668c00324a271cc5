"""The reward commands end to end: collect -> train-reward -> score, and their argument errors."""

from __future__ import annotations

import io
import json

from esamp_agents.cli.app import main
from esamp_agents.hidden_reward.head import load_head


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, out=out), out.getvalue()


def test_collect_train_score_round_trip(embedded, tmp_path, capsys):
    data, head = tmp_path / "data", tmp_path / "head.safetensors"
    argv = ["collect", "--task", "single_digit:3:0:train", "--out", str(data), "-n", "3", "--max-tokens", "16"]
    code, text = run(argv)
    assert code == 0 and "problems_done=3" in text
    records = [json.loads(line) for line in (data / "records.jsonl").read_text().splitlines()]
    assert len(records) == 9 and all(isinstance(r["correct"], bool) for r in records)
    assert run(argv)[1].count("problems_skipped=3") == 1  # resumed: nothing redone

    code, text = run(["train-reward", str(data), "--out", str(head), "--layers", "final", "--epochs", "2"])
    assert code == 0 and "wrote" in text
    loaded_head = load_head(head, base_model=embedded.name, hidden_size=576, num_layers=30)
    assert loaded_head.spec.layers == (30,)

    code, text = run(["score", "--head", str(head), "--json", "--prompt", "What is 2 + 3?", "Answer: 5", "Answer: 6"])
    assert code == 0
    scored = json.loads(text)
    assert [s["response"] for s in scored] == ["Answer: 5", "Answer: 6"]
    assert all(isinstance(s["reward"], float) for s in scored)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "What is 2 + 3?", "response": "Answer: 5"}) + "\n")
    code, text = run(["score", "--head", str(head), "--pairs", str(pairs)])
    assert code == 0 and "Answer: 5" in text
    assert abs(float(text.split()[0]) - scored[0]["reward"]) < 1e-4
