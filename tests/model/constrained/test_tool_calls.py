"""Tool calls on the real model: with tool_choice "required" (or a tool's name) every sample
is a parseable call to a bound tool whose arguments validate against that tool's schema."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from esamp_agents import ESampParams, SamplingParams
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.tool_calling import parse_tool_calls, resolve_tool_choice, tool_call_grammar, tool_specs

TOOLS = tool_specs([
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                    "additionalProperties": False}}},
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 24}},
                    "required": ["expression"], "additionalProperties": False}}},
])  # fmt: skip
MAX_NEW = 64


def prompt(engine: ESampEngine, text: str) -> list[int]:
    return engine.loaded.chat_token_ids([{"role": "user", "content": text}], tools=TOOLS)


def check_calls(candidate: Any, allowed: set[str]) -> list[Any]:
    assert candidate.finish_reason == "stop" and len(candidate.token_ids) < MAX_NEW, candidate.text
    assert candidate.extras["constraint_satisfied"] is True
    reply = parse_tool_calls(candidate.text, TOOLS)
    assert reply.invalid == [] and reply.calls and reply.content == "", candidate.text
    schemas = {s.name: s.parameters for s in TOOLS}
    for call in reply.calls:
        assert call.name in allowed
        jsonschema.validate(call.args, schemas[call.name])
    return reply.calls


@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_required_tool_choice_gives_a_valid_call_in_every_sample(engine: ESampEngine, beta: float) -> None:
    grammar = tool_call_grammar(TOOLS, resolve_tool_choice("required", TOOLS), parallel=False)
    prompts = [prompt(engine, "What's the weather in Paris?"), prompt(engine, "What is 12 * 7?")]
    out = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=MAX_NEW, temperature=0.8, seed=6),
                          ESampParams(beta=beta), grammar=grammar)  # fmt: skip
    names = [[c.name for cand in r.candidates for c in check_calls(cand, {"get_weather", "calculator"})]
             for r in out.results]  # fmt: skip
    assert all(len(n) == 4 for n in names)  # one call per sample (parallel=False)


def test_named_tool_choice_forces_that_tool(engine: ESampEngine) -> None:
    choice = resolve_tool_choice({"type": "function", "function": {"name": "calculator"}}, TOOLS)
    grammar = tool_call_grammar(TOOLS, choice, parallel=False)
    sampling = SamplingParams(n=4, max_new_tokens=MAX_NEW, temperature=0.8, seed=6)
    out = engine.generate([prompt(engine, "What's the weather in Rome?")], sampling, grammar=grammar)  # "wrong" tool
    for c in out[0].candidates:
        assert [call.name for call in check_calls(c, {"calculator"})] == ["calculator"]
