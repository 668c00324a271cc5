"""Reasoning-agent recipes built on ESamp candidates and Best-of-N selection (``esamp_agents.recipes``).

- :mod:`~esamp_agents.recipes.math_reasoning`: candidates -> extracted answers -> reward-weighted vote.
- :mod:`~esamp_agents.recipes.tool_agent`: Best-of-N at each model step of a tool-using agent.
- :mod:`~esamp_agents.recipes.code_generation`: candidate programs tested in sandboxed subprocesses.
- :mod:`~esamp_agents.recipes.calculator_agent`: an offline ``create_agent`` agent that solves word
  problems with a calculator tool (forced call, then text), with Best-of-N over its tool calls.
  Its ``calculator_agent`` function is not re-exported here (it shares the module's name).

Names load lazily, so importing one recipe does not import the others' dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MathResult": "math_reasoning",
    "math_reasoning_chain": "math_reasoning",
    "BestOfNChatModel": "tool_agent",
    "BestOfNMiddleware": "tool_agent",
    "BestOfNStep": "tool_agent",
    "choose_reply": "tool_agent",
    "CodeResult": "code_generation",
    "TestRun": "code_generation",
    "code_generation_chain": "code_generation",
    "extract_code": "code_generation",
    "run_tests": "code_generation",
    "CallVoteReward": "calculator_agent",
    "ToolStepPolicy": "calculator_agent",
    "best_of_n_calculator_agent": "calculator_agent",
    "generate_word_problems": "calculator_agent",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except AttributeError:
        if name == "BestOfNMiddleware":
            raise AttributeError(
                "BestOfNMiddleware needs the optional langchain package (v1): pip install langchain"
            ) from None
        raise


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [  # BestOfNMiddleware is left out: it exists only with the optional langchain package
    "BestOfNChatModel",
    "BestOfNStep",
    "CallVoteReward",
    "CodeResult",
    "MathResult",
    "TestRun",
    "ToolStepPolicy",
    "best_of_n_calculator_agent",
    "choose_reply",
    "code_generation_chain",
    "extract_code",
    "generate_word_problems",
    "math_reasoning_chain",
    "run_tests",
]
