"""The server's request protocol for tools and structured output, with no model: every bad input is
a :class:`RequestError` naming the field and the allowed values (a 400 before any decoding), and
good ones become the grammar, tools and messages the backend decodes with."""

from __future__ import annotations

from typing import Any

import pytest

from esamp_agents.serving.protocol import RESPONSE_FORMATS, TOOL_CHOICES, RequestError, ServeDefaults, parse_request

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": PARAMS}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def parse(kind: str = "chat", **fields: Any):
    body = {"model": "m", **({"messages": USER} if kind == "chat" else {"prompt": "x"}), **fields}
    return parse_request(body, kind, ServeDefaults(), 1000)


def tool(name: Any = "f", parameters: Any = None, **function: Any) -> dict[str, Any]:
    fn = {"name": name, **function}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


def json_schema(**spec: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA, **spec}}


# --------------------------------------------------------------------------- good requests


def test_tools_become_specs_a_call_grammar_and_prompt_tools():
    request = parse(tools=[WEATHER, TIME])
    assert [s.name for s in request.tools] == ["get_weather", "get_time"]
    # one call per reply unless the client asks for several (a small model repeats its call otherwise)
    assert request.tool_choice == "auto" and not request.parallel_tool_calls and request.calls_tools
    assert parse(tools=[WEATHER], parallel_tool_calls=True).parallel_tool_calls
    assert request.grammar is not None and request.grammar.kind == "lark"
    assert request.prompt_tools == request.tools
    assert request.tools[0].description == "Weather" and dict(request.tools[0].parameters) == PARAMS


@pytest.mark.parametrize(
    ("choice", "resolved"),
    [
        ("auto", "auto"),
        ("required", "required"),
        ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
    ],
)
def test_tool_choice_resolves(choice, resolved):
    request = parse(tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
    assert request.tool_choice == resolved and not request.parallel_tool_calls
    start = request.grammar.source.splitlines()[0]  # free text is allowed only under "auto"
    assert start == ("start: TEXT | calls" if resolved == "auto" else "start: calls")


def test_tool_choice_none_keeps_tools_out_of_the_prompt_and_grammar():
    request = parse(tools=[WEATHER], tool_choice="none")
    assert request.tool_choice == "none" and not request.calls_tools
    assert request.prompt_tools == () and request.grammar is None


def test_no_tools_means_no_constraint():
    for request in (parse(), parse(tools=[]), parse(response_format={"type": "text"}), parse(parallel_tool_calls=True)):
        assert request.tools == () and request.tool_choice == "none" and request.grammar is None
        assert request.response_format == "text"


def test_response_formats_become_grammars():
    assert parse(response_format={"type": "json_object"}).grammar.kind == "json_object"
    request = parse(response_format=json_schema(strict=True, description="a person"))
    assert request.response_format == "json_schema" and request.grammar.schema == SCHEMA
    no_schema = parse(response_format={"type": "json_schema", "json_schema": {"name": "any"}})
    assert no_schema.grammar.kind == "json_object"  # OpenAI's schema is optional: any JSON object


def test_tool_turns_are_kept_for_the_template():
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "X"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "developer", "content": "Be brief."},
    ]
    request = parse(messages=messages, tools=[WEATHER])
    assert request.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "X"}}],
    }
    assert request.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert request.messages[3] == {"role": "system", "content": "Be brief."}


def test_constraints_combine_with_n_stop_and_logprobs():
    request = parse(tools=[WEATHER], tool_choice="required", n=2, stop=["\n\n"], logprobs=True, top_logprobs=3)
    assert request.n == 2 and request.sampling.stop == ("\n\n",) and request.top_logprobs == 3
    assert request.grammar is not None


# --------------------------------------------------------------------------- bad requests


BAD_CHAT: list[tuple[dict[str, Any], str, str]] = [
    # (fields, param, a piece of the message)
    ({"tools": "get_weather"}, "tools", "allowed: a list of"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "'retrieval'"),
    ({"tools": ["f"]}, "tools[0].type", "allowed:"),
    ({"tools": [{"type": "function", "function": "f"}]}, "tools[0].function", "allowed:"),
    ({"tools": [tool(name=None)]}, "tools[0].function.name", "name=None is missing"),
    ({"tools": [tool(name="has space")]}, "tools[0].function.name", "'has space'"),
    ({"tools": [tool(parameters={"type": "array"})]}, "tools[0].function.parameters", "'array'"),
    ({"tools": [tool(parameters=[1])]}, "tools[0].function.parameters", "allowed:"),
    ({"tools": [tool(parameters={"type": "object", "properties": {"x": {"type": "strin"}}})]},
     "tools[0].function.parameters", "'strin'"),
    ({"tools": [tool(parameters={"type": "object", "properties": {"x": {"type": "string", "if": {}}}})]},
     "tools[0].function.parameters", "if"),  # a keyword the grammar engine cannot enforce
    ({"tools": [tool(description=3)]}, "tools[0].function.description", "allowed: a string"),
    ({"tools": [tool(strict="yes")]}, "tools[0].function.strict", "allowed: true, false or null"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "unique"),
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools are given"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "tools"),
    ({"tools": [WEATHER], "tool_choice": "any"}, "tool_choice", "allowed: 'auto', 'none', 'required'"),
    ({"tools": [WEATHER], "tool_choice": "get_weather"}, "tool_choice", "'get_weather'"),  # OpenAI wants the dict
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "one of ['get_weather']"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice", "allowed:"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "function": {"name": "get_weather"}}},
     "tool_choice", "allowed:"),
    ({"tools": [WEATHER], "tool_choice": True}, "tool_choice", "True"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tools": [WEATHER], "response_format": json_schema()}, "response_format", "cannot be combined"),
    ({"response_format": "json"}, "response_format", "allowed: {'type': 'text'}"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'xml'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "allowed:"),
    ({"response_format": json_schema(name="has space")}, "response_format.json_schema.name", "'has space'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name", "None"),
    ({"response_format": json_schema(strict="yes")}, "response_format.json_schema.strict", "true, false or null"),
    ({"response_format": json_schema(schema="{}")}, "response_format.json_schema.schema", "a JSON schema object"),
    ({"response_format": json_schema(schema={"type": "nope"})}, "response_format.json_schema.schema", "'nope'"),
    ({"response_format": json_schema(schema={"type": "object", "dependentSchemas": {"a": {}}})},
     "response_format.json_schema.schema", "dependentSchemas"),
    ({"functions": [{"name": "f"}]}, "functions", "allowed: tools"),
    ({"function_call": {"name": "f"}}, "function_call", "allowed: tool_choice"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages[0].tool_call_id", "missing"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls", "'user'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": "f"}]}, "messages[0].tool_calls", "allowed:"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function"}]}]},
     "messages[0].tool_calls[0]", "allowed:"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages[0].tool_calls", "not JSON"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls", "no function name"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "text"), BAD_CHAT)
def test_bad_tool_and_format_fields_name_the_field_and_allowed_values(fields, param, text):
    with pytest.raises(RequestError) as info:
        parse(**fields)
    error = info.value
    assert error.param == param and error.status == 400, error.body()
    assert text in error.message
    body = error.body()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param and body["message"] == error.message


@pytest.mark.parametrize("field", ["tools", "tool_choice", "parallel_tool_calls", "response_format"])
def test_completions_refuse_chat_only_fields(field):
    with pytest.raises(RequestError, match=f"Unrecognized request argument supplied: {field}") as info:
        parse("completion", **{field: None})
    assert info.value.param == field


def test_allowed_value_tables():
    assert TOOL_CHOICES == ("auto", "none", "required")
    assert RESPONSE_FORMATS == ("text", "json_object", "json_schema")
