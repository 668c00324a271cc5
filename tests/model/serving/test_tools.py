"""Tool calling and structured output through ``esamp-agents serve`` with the real embedded model:
the ``openai`` client and LangChain's ``ChatOpenAI`` against grammar-constrained decoding.

Kept small for 2 CPU cores: n <= 2, max_tokens <= 48, one tool call per reply
(``parallel_tool_calls=False``: the 135M model otherwise repeats its call until max_tokens).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from esamp_agents.messages import to_chat_messages
from esamp_agents.tool_calling import tool_specs
from tests.model.serving.wire import assert_openai_error, post

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_PARAMS},
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 12}},
    "required": ["zone"],
    "additionalProperties": False,  # else the small model adds keys until max_tokens
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a time zone", "parameters": TIME_PARAMS},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCED = {"type": "function", "function": {"name": "get_weather"}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def check_calls(message: Any, allowed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tool call names an allowed tool, has a unique id and JSON arguments valid for its schema."""
    assert message.tool_calls, message
    ids = [call.id for call in message.tool_calls]
    assert len(set(ids)) == len(ids) and all(i.startswith("call_") for i in ids)
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.function.name in allowed
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, allowed[call.function.name])
        out.append(args)
    return out


def test_forced_tool_call(client):
    reply = client.chat.completions.create(
        model="embedded", messages=ASK, tools=[WEATHER, TIME], tool_choice=FORCED, parallel_tool_calls=False,
        n=2, max_tokens=48, seed=0, logprobs=True,
    )  # fmt: skip
    assert len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        check_calls(choice.message, {"get_weather": WEATHER_PARAMS})
        assert choice.logprobs.content  # the model's own logprobs, as without tools
    assert reply.usage.completion_tokens >= 2 * 10


def test_required_tool_choice(client):
    reply = client.chat.completions.create(
        model="embedded", messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=[WEATHER, TIME],
        tool_choice="required", parallel_tool_calls=False, max_tokens=48, seed=1,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message, {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS})


def test_cut_off_calls_are_text_not_tool_calls(client):
    common = {"model": "embedded", "messages": ASK, "tools": [WEATHER], "tool_choice": FORCED, "seed": 0}
    reply = client.chat.completions.create(**common, max_tokens=5)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("<tool_call>")  # the raw text, as far as it got
    stopped = client.chat.completions.create(**common, max_tokens=48, stop=["get_weather"])  # the grammar writes it
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls  # cut by the stop string
    assert choice.message.content == '<tool_call>{"name": "'


def test_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = client.chat.completions.create(
        model="embedded", messages=[{"role": "user", "content": "Describe a person as JSON."}], response_format=fmt,
        n=2, max_tokens=40, seed=1, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_multi_turn_with_a_tool_result(embedded, client):
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    reply = client.chat.completions.create(model="embedded", messages=messages, tools=[WEATHER], max_tokens=24, seed=2)
    # the prompt holds the tools, the earlier call and its result (the same rendering as in-process)
    expected = embedded.chat_token_ids(to_chat_messages(messages), tools=tool_specs([WEATHER]))
    assert reply.usage.prompt_tokens == len(expected)
    assert "18 degrees and sunny" in embedded.tokenizer.decode(expected)
    choice = reply.choices[0]
    if choice.finish_reason == "tool_calls":  # "auto": another call is allowed
        check_calls(choice.message, {"get_weather": WEATHER_PARAMS})
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
        assert not choice.message.tool_calls


def test_streamed_tool_call(client):
    chunks = list(
        client.chat.completions.create(
            model="embedded", messages=ASK, tools=[WEATHER], tool_choice=FORCED, parallel_tool_calls=False,
            max_tokens=48, seed=3, stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    parts = [call for d in deltas for call in d.tool_calls or []]
    assert parts and all(p.index == 0 for p in parts) and parts[0].id.startswith("call_")
    assert parts[0].function.name == "get_weather"
    args = json.loads("".join(p.function.arguments or "" for p in parts))
    jsonschema.validate(args, WEATHER_PARAMS)
    assert not "".join(d.content or "" for d in deltas)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_bad_tool_requests_get_400_before_decoding(server):
    body = {"model": "embedded", "messages": ASK, "tools": [WEATHER], "max_tokens": 4}
    cases = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools[0].function.parameters"),
    ]  # fmt: skip
    for change, param in cases:
        status, reply = post(server.url + "/chat/completions", {**body, **change})
        assert status == 400, reply
        assert "allowed" in assert_openai_error(reply, param)["message"]


# --------------------------------------------------------------------------- LangChain's ChatOpenAI


@pytest.fixture(scope="module")
def chat_openai(server) -> Any:
    ChatOpenAI = pytest.importorskip("langchain_openai").ChatOpenAI
    return ChatOpenAI(
        model="embedded", base_url=server.url, api_key="x", max_tokens=48, seed=4, max_retries=0,
        use_responses_api=False,
    )  # fmt: skip


def test_chat_openai_bind_tools(chat_openai):
    bound = chat_openai.bind_tools([WEATHER], tool_choice="get_weather", parallel_tool_calls=False)
    message = bound.invoke("What is the weather in Paris?")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert [c["name"] for c in message.tool_calls] == ["get_weather"] and not message.invalid_tool_calls
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER_PARAMS)
    streamed = None
    for chunk in bound.stream("What is the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [c["name"] for c in streamed.tool_calls] == ["get_weather"]
    jsonschema.validate(streamed.tool_calls[0]["args"], WEATHER_PARAMS)


def test_chat_openai_structured_output(chat_openai):
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        age: int = pydantic.Field(ge=0, le=150)

    person = chat_openai.with_structured_output(Person, method="json_schema").invoke("Describe a person.")
    assert isinstance(person, Person)
