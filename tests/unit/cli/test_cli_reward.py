"""The reward commands end to end: collect -> train-reward -> score, and their argument errors."""

from __future__ import annotations

import io

import pytest

from esamp_agents.cli.app import main
from esamp_agents.cli.reward import parse_layers


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, out=out), out.getvalue()


def test_parse_layers():
    assert parse_layers("all", 30) == "all"
    assert parse_layers("every4", 30) == [4, 8, 12, 16, 20, 24, 28, 30]
    assert parse_layers("final", 30) == [30]
    assert parse_layers("3,-1", 30) == [3, -1]
    with pytest.raises(ValueError, match="allowed: all, every4, final"):
        parse_layers("middle", 30)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["collect", "--task", "nope:3", "--out", "x"], "nope"),
        (["collect", "--task", "single_digit:2", "--out", "x", "-n", "0"], "-n=0 is out of range"),
        (["score", "--prompt", "hi"], "at least one response"),
        (["score", "--head", "/no/such/head.safetensors", "--prompt", "hi", "yo"], "no such file"),
        (["train-reward", "/no/such/folder", "--out", "h.safetensors"], "no manifest.json"),
    ],
)
def test_errors_exit_2_before_loading(argv, message, capsys):
    code, _ = run(argv)
    assert code == 2
    assert message in capsys.readouterr().err
