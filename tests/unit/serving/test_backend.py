"""How the backend turns a candidate into OpenAI's tool-call shapes, whole and streamed, with no
model: only a complete, grammar-accepted call becomes ``tool_calls``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from esamp_agents.decoding.results import Candidate
from esamp_agents.serving.backend import stream_tail, text_delta, tool_call_message
from esamp_agents.serving.protocol import ParsedRequest, ServeDefaults, parse_request
from esamp_agents.tool_calling import format_call

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}
CALL = format_call("get_weather", {"city": "Zürich"})


def request(**fields: Any) -> ParsedRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(body, "chat", ServeDefaults(), 1000)


def candidate(text: str, satisfied: bool | None = True, finish_reason: str = "stop") -> Candidate:
    extras = {} if satisfied is None else {"constraint_satisfied": satisfied}
    return Candidate(0, text, [1, 2], [-0.1, -0.2], finish_reason, 3, extras=extras)  # type: ignore[arg-type]


def test_a_complete_call_becomes_openai_tool_calls():
    content, calls = tool_call_message(request(tools=[WEATHER]), candidate(CALL + "\n" + CALL))
    assert content is None and len(calls) == 2 and calls[0]["id"] != calls[1]["id"]
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Zürich"}
    assert "Zürich" in calls[0]["function"]["arguments"]  # JSON text, not ASCII-escaped


@pytest.mark.parametrize(
    ("text", "satisfied"),
    [
        (CALL[:-3], False),  # cut by max_tokens
        (CALL, False),  # cut by a stop string: the grammar did not accept it
        (CALL, None),  # no grammar ran
        ("It is sunny. " + CALL, True),  # "auto" took the text branch: a quoted call stays text
        ("It is sunny.", True),
    ],
)
def test_anything_else_stays_text(text, satisfied):
    assert tool_call_message(request(tools=[WEATHER]), candidate(text, satisfied)) is None


def test_no_tool_calls_without_offered_tools():
    assert tool_call_message(request(), candidate(CALL)) is None
    assert tool_call_message(request(tools=[WEATHER], tool_choice="none"), candidate(CALL)) is None


def test_stream_tail_sends_held_back_calls_then_the_finish():
    req = request(tools=[WEATHER])
    _, calls = tool_call_message(req, candidate(CALL))
    choice = {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": calls},
              "logprobs": {"content": []}, "finish_reason": "tool_calls"}  # fmt: skip
    parts = stream_tail(req, choice)
    assert parts[0]["delta"] == {"tool_calls": [{"index": 0, **calls[0]}]}
    assert parts[-1] == {"index": 0, "delta": {}, "logprobs": {"content": []}, "finish_reason": "tool_calls"}
    text = {"index": 0, "message": {"role": "assistant", "content": "Sunny."}, "logprobs": None,
            "finish_reason": "stop"}  # fmt: skip
    assert [p["delta"] for p in stream_tail(req, text)] == [{"content": "Sunny."}, {}]  # held-back text


def test_stream_tail_without_tools_only_finishes():
    req = request()
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": "stop"}
    assert stream_tail(req, choice) == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert text_delta(req, "", first=True)["delta"] == {"role": "assistant", "content": ""}
