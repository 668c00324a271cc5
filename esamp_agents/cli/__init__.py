"""The ``esamp-agents`` command line: ``app`` (the parser, generate and demo), ``flags`` (flags
derived from the parameter table), ``reward`` (collect/train-reward/score), ``eval``, ``serve``,
``demo`` (the demo's questions and report)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run ``esamp-agents ARGS`` (imports the command modules only when called)."""
    from esamp_agents.cli.app import main as run

    return run(argv, out=out)


__all__ = ["main"]
