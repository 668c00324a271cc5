"""Tool calling and structured output plumbing of ChatESamp/ESampLLM, without the model: every bad
input fails at bind time (before any decoding or weight loading), and decoded candidates turn into
the right AIMessages (a cut-off call is never a valid one)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from esamp_agents import ChatESamp, ESampLLM
from esamp_agents.constrained import Grammar, GrammarError
from esamp_agents.decoding.results import Candidate
from esamp_agents.langchain.tools import (
    CallConstraint,
    ToolTextGate,
    message_chunk,
    reply_message,
    response_grammar,
    split_constraint,
    split_grammar,
)
from esamp_agents.selection.best_of_n import BestOfN
from esamp_agents.tool_calling import tool_specs
from tests.fakes import ScriptedNChat


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


class Joke(TypedDict):
    setup: str
    punchline: str


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def candidate(text: str, finish: str = "stop", satisfied: bool | None = True) -> Candidate:
    extras = {} if satisfied is None else {"constraint_satisfied": satisfied}
    return Candidate(
        index=0, text=text, token_ids=[1], logprobs=[-0.1], finish_reason=finish, prompt_tokens=3, extras=extras
    )  # type: ignore[arg-type]


def test_split_constraint_builds_one_grammar_per_call():
    none, rest = split_constraint({"n": 2})
    assert none == CallConstraint() and rest == {"n": 2} and none.grammar is None
    tools, rest = split_constraint({"tools": [multiply], "tool_choice": "any", "n": 2})
    assert rest == {"n": 2}
    assert [s.name for s in tools.specs] == ["multiply"] and tools.choice == "required"
    assert tools.grammar is not None and tools.grammar.kind == "lark" and tools.calls_tools
    # "none": tools are not shown and replies are plain text
    off, _ = split_constraint({"tools": [multiply], "tool_choice": "none"})
    assert off.grammar is None and off.prompt_tools == () and not off.calls_tools
    fmt, _ = split_constraint(
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}
    )
    assert fmt.grammar is not None and fmt.grammar.kind == "json_schema" and not fmt.calls_tools


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tools": [multiply], "tool_choice": "divide"}, "'divide' is not a bound tool"),
        ({"tool_choice": "any"}, "no tools are bound"),
        ({"tools": [multiply], "parallel_tool_calls": "yes"}, "parallel_tool_calls='yes'"),
        ({"tools": [multiply], "response_format": {"type": "json_object"}}, "one of them per call"),
        ({"grammar": "a+"}, "is not a Grammar"),
        ({"response_format": {"type": "xml"}}, "allowed: {'type': one of"),
        ({"response_format": {"type": "json_schema"}}, "needs {'json_schema'"),
        ({"tools": ["not a tool"]}, r"tools\[0\]"),
    ],
)
def test_split_constraint_refuses_bad_input_with_the_reason(kwargs: dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        split_constraint(kwargs)


def test_unsupported_schema_features_fail_before_decoding():
    with pytest.raises(GrammarError, match="uniqueItems"):
        response_grammar({"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(GrammarError, match="invalid JSON schema"):
        response_grammar({"type": "json_schema", "json_schema": {"schema": {"type": "object", "required": "x"}}})


def test_bind_tools_and_structured_output_check_everything_at_bind_time():
    chat = ChatESamp(max_tokens=8)  # no weights are loaded by any of this (the unit guard would refuse)
    bound = chat.bind_tools([multiply, WEATHER], tool_choice="weather")
    assert [t["function"]["name"] for t in bound.kwargs["tools"]] == ["multiply", "weather"]
    assert bound.kwargs["tool_choice"] == "weather" and "parallel_tool_calls" not in bound.kwargs
    with pytest.raises(ValueError, match="not a bound tool"):
        chat.bind_tools([multiply], tool_choice="weather")
    assert [s.name for s in tool_specs([WEATHER, WEATHER])] == ["weather"]  # one tool given twice
    with pytest.raises(ValueError, match="strict="):
        chat.bind_tools([multiply], strict="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method='xml'"):
        chat.with_structured_output(Person, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schema is required"):
        chat.with_structured_output(None)
    with pytest.raises(GrammarError, match="uniqueItems"):
        chat.with_structured_output(
            {"title": "T", "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
        )
    with pytest.raises(ValueError, match="unknown keyword"):
        chat.with_structured_output(Person, tools=[])
    for schema in (Person, Joke, {"title": "T", "type": "object", "properties": {"x": {"type": "integer"}}}):
        for method in ("json_schema", "function_calling", "json_mode"):
            assert chat.with_structured_output(schema, method=method, include_raw=True) is not None


def test_esamp_llm_takes_a_grammar_but_no_tools():
    grammar, rest = split_grammar({"grammar": Grammar.regex("(yes|no)"), "n": 2})
    assert grammar == Grammar.regex("(yes|no)") and rest == {"n": 2}
    per_prompt, _ = split_grammar({"grammar": [Grammar.json_object(), None]})
    assert per_prompt == [Grammar.json_object(), None]
    fmt, _ = split_grammar({"response_format": {"type": "json_object"}})
    assert fmt == Grammar.json_object()
    with pytest.raises(ValueError, match="takes no tools"):
        split_grammar({"tools": [WEATHER]})
    with pytest.raises(ValueError, match="one of them"):
        split_grammar({"grammar": Grammar.json_object(), "response_format": {"type": "json_object"}})
    with pytest.raises(ValueError, match="entries must be Grammar"):
        split_grammar({"grammar": ["x"]})
    with pytest.raises(ValueError, match="entries for 1 prompts"):
        ESampLLM(max_tokens=4).invoke("hi", grammar=[Grammar.json_object(), None])


def test_reply_message_reads_calls_and_never_reports_a_cut_off_call():
    tools = CallConstraint(tuple(tool_specs([WEATHER])), "required")
    text = '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    message, finish = reply_message(candidate(text), tools)
    assert finish == "tool_calls" and message.content == ""
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("weather", {"city": "Oslo"})]
    assert message.tool_calls[0]["id"].startswith("call_") and not message.invalid_tool_calls
    cut, finish = reply_message(candidate('<tool_call>{"name": "weather", "argu', "length", False), tools)
    assert finish == "length" and not cut.tool_calls and "cut off" in cut.invalid_tool_calls[0]["error"]
    # a complete call followed by a cut-off second one: nothing is valid
    both, finish = reply_message(candidate(text + "\n<tool_call>{", "length", False), tools)
    assert finish == "length" and not both.tool_calls and len(both.invalid_tool_calls) == 2
    auto = CallConstraint(tuple(tool_specs([WEATHER])), "auto")
    answer, finish = reply_message(candidate("It is sunny."), auto)
    assert (answer.content, answer.tool_calls, finish) == ("It is sunny.", [], "stop")
    plain, finish = reply_message(candidate('{"a": 1}'), CallConstraint())
    assert plain.content == '{"a": 1}' and finish == "stop"
    chunk = message_chunk(message)
    assert chunk.tool_call_chunks[0]["name"] == "weather" and json.loads(chunk.tool_call_chunks[0]["args"]) == {
        "city": "Oslo"
    }


def test_tool_text_gate_streams_text_and_holds_calls_back():
    text = ToolTextGate(active=True)
    assert [text.push(p) for p in ["It", " is", " sunny"]] == ["It", " is", " sunny"] and text.decided is False
    call = ToolTextGate(active=True)
    assert [call.push(p) for p in ["<tool", "_call>{", '"name"']] == ["", "", ""] and call.decided is True
    off = ToolTextGate(active=False)
    assert off.push("<b>") == "<b>"


def _reply(calls: list[tuple[str, dict[str, Any]]] | None = None, invalid: bool = False, text: str = "") -> AIMessage:
    tool_calls = [
        {"name": n, "args": a, "id": f"call_{i}", "type": "tool_call"} for i, (n, a) in enumerate(calls or [])
    ]
    bad = [{"name": None, "args": "{", "id": None, "error": "cut off", "type": "invalid_tool_call"}] if invalid else []
    return AIMessage(content=text, tool_calls=tool_calls, invalid_tool_calls=bad)


class LongestText:
    """A post-hoc reward that prefers longer texts (so a broken reply would win on score alone)."""

    name = "long"

    def score(self, question: Any, candidates: list[Any]) -> list[float]:
        return [float(len(c.text)) for c in candidates]


def test_best_of_n_ranks_broken_tool_calls_last_and_votes_over_calls():
    broken = _reply(invalid=True, text="x" * 200)  # the longest text, but its call did not come out whole
    oslo, paris = _reply([("weather", {"city": "Oslo"})]), _reply([("weather", {"city": "Paris"})])
    chat = ScriptedNChat(script=[[broken, oslo, paris, oslo]])
    best = BestOfN(chat.bind_tools([WEATHER], tool_choice="any"), n=4, rewards=[LongestText()], include_candidates=True)
    result = best.invoke([HumanMessage("weather?")])
    assert result.output.tool_calls and result.chosen.index != 0
    assert result.candidates[-1].index == 0  # validity first, whatever the score
    assert '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>' in {
        c.text for c in result.candidates
    }
    chat = ScriptedNChat(script=[[broken, oslo, paris, oslo]])
    vote = BestOfN(chat.bind_tools([WEATHER], tool_choice="any"), n=4, strategy="vote", include_candidates=True)
    voted = vote.invoke([HumanMessage("weather?")])
    assert voted.output.tool_calls[0]["args"] == {"city": "Oslo"}  # 2 votes against 1; the broken one cannot vote
    assert [v[2] for v in voted.metadata["votes"]] == [2, 1]
