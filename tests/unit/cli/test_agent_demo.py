"""``esamp-agents agent-demo`` without the model: argument checks, and a run on a stand-in chat model."""

from __future__ import annotations

import io

import pytest

from esamp_agents.cli import main
from esamp_agents.recipes import calculator_agent as ca
from tests.unit.recipes.test_calculator_agent import PolicyChat


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--problems", "0"], "problems=0 is out of range; allowed: 1 <= problems <= 50"),
        (["--n", "0"], "n=0 is out of range; allowed: 1 <= n <= 64"),
        (["--max-tokens", "2"], "max_tokens=2 is out of range"),
        (["--temperature", "-1"], "temperature=-1.0 is out of range; allowed: 0 <= temperature <= 5"),
        (["--question", " "], "question='' is empty"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(argv, message, capsys):
    assert main(["agent-demo", *argv]) == 2
    assert message in capsys.readouterr().err


def test_agent_demo_prints_calls_results_and_the_score(monkeypatch):
    problem = ca.generate_word_problems(1, seed=0)[0]
    monkeypatch.setattr(ca, "_chat", lambda **kwargs: PolicyChat(args={"a": 50, "op": "+", "b": 55}))
    out = io.StringIO()
    assert main(["agent-demo", "--problems", "1"], out=out) == 0
    text = out.getvalue()
    assert f"[1] {problem.question}" in text
    assert "calculator(50 + 55) -> 105" in text and "The answer is 105. (right: 105)" in text
    assert text.rstrip().endswith("1/1 right")


def test_agent_demo_takes_your_own_question_and_best_of_n(monkeypatch):
    made = []

    def chat(**kwargs):
        made.append(kwargs)
        return PolicyChat(args={"a": 6, "op": "*", "b": 7})

    monkeypatch.setattr(ca, "_chat", chat)
    out = io.StringIO()
    assert main(["agent-demo", "--question", "What is 6 times 7?", "--n", "3", "--beta", "0"], out=out) == 0
    assert made[0]["n"] == 3 and made[0]["beta"] == 0.0
    assert "calculator(6 * 7) -> 42" in out.getvalue() and "right" not in out.getvalue()
