"""The chat fields that constrain decoding (``tools``, ``tool_choice``, ``parallel_tool_calls``,
``response_format``) and the tool fields of conversation messages, checked before any decoding
so a bad schema is a 400 (see :mod:`esamp_agents.serving.protocol` for the semantics)."""

from __future__ import annotations

import re
from typing import Any

from esamp_agents.constrained.grammar import Grammar, GrammarError
from esamp_agents.messages import to_chat_message
from esamp_agents.serving.fields import RequestError, bool_field
from esamp_agents.tool_calling import ToolSpec, resolve_tool_choice, tool_call_grammar, tool_spec

TOOL_CHOICES = ("auto", "none", "required")
"""The string values of ``tool_choice`` (or ``{"type": "function", "function": {"name": <tool>}}``)."""
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
"""The ``response_format`` types served."""
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for response_format.json_schema.name
_TOOL_CHOICE_ALLOWED = "'auto', 'none', 'required' or {'type': 'function', 'function': {'name': <a tool's name>}}"
_FORMAT_ALLOWED = (
    "{'type': 'text'}, {'type': 'json_object'} or "
    "{'type': 'json_schema', 'json_schema': {'name': <name>, 'schema': <JSON schema object>, 'strict': <bool>}}"
)


def tool_fields(message: dict[str, Any], parsed: dict[str, Any], where: str) -> dict[str, Any]:
    """``parsed`` with the message's tool fields (an assistant's ``tool_calls``, a tool turn's
    ``tool_call_id``), in the shape :func:`~esamp_agents.messages.to_chat_message` gives the template."""
    role = parsed["role"]
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise RequestError(
                f"{where}.tool_calls is only allowed on an assistant message, not role {role!r}",
                param=f"{where}.tool_calls",
            )
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise RequestError(
                f"{where}.tool_calls={calls!r} is invalid; allowed: a list of "
                "{'id', 'type': 'function', 'function': {'name', 'arguments': <JSON text>}} objects",
                param=f"{where}.tool_calls",
            )
        for j, call in enumerate(calls):
            function = call.get("function")
            if call.get("type", "function") != "function" or not isinstance(function, dict):
                raise RequestError(
                    f"{where}.tool_calls[{j}]={call!r} is not a function call; allowed: "
                    "{'id', 'type': 'function', 'function': {'name', 'arguments'}}",
                    param=f"{where}.tool_calls[{j}]",
                )
            parsed.setdefault("tool_calls", []).append(call)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise RequestError(
                f"{where}.tool_call_id={call_id!r} is missing or invalid; allowed: the id of the tool call answered",
                param=f"{where}.tool_call_id",
                code="missing_required_parameter",
            )
        parsed["tool_call_id"] = call_id
        if isinstance(message.get("name"), str):
            parsed["name"] = message["name"]
    try:
        return to_chat_message(parsed)
    except ValueError as exc:
        raise RequestError(
            f"{where}: {exc}; allowed: tool calls whose function has a name and arguments as JSON object text",
            param=f"{where}.tool_calls",
            code="invalid_value",
        ) from None


def parse_tools(body: dict[str, Any]) -> tuple[ToolSpec, ...]:
    """``tools`` -> specs, each checked (a name, an object schema the grammar engine can enforce)."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return ()
    shape = "{'type': 'function', 'function': {'name': <name>, 'description': <text>, 'parameters': <JSON schema>}}"
    if not isinstance(tools, list):
        raise RequestError(f"tools={tools!r} is invalid; allowed: a list of {shape}", param="tools")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise RequestError(f"{where} has type {kind!r}; allowed: {shape}", param=f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function={function!r} is invalid; allowed: {shape}", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(
                f"{where}.function.name={name!r} is missing; allowed: 1-64 letters, digits, '_', '.', '-'",
                param=f"{where}.function.name",
                code="missing_required_parameter",
            )
        for key, allowed in (("description", "a string"), ("strict", "true, false or null")):
            value = function.get(key)
            if value is not None and not isinstance(value, str if key == "description" else bool):
                raise RequestError(
                    f"{where}.function.{key}={value!r} is invalid; allowed: {allowed}", param=f"{where}.function.{key}"
                )
        try:
            spec = tool_spec(tool)
            Grammar.json_schema(spec.parameters)  # a keyword the grammar engine cannot enforce fails here
        except ValueError as exc:  # GrammarError is a ValueError
            bad_name = str(exc).startswith("tool name")
            raise RequestError(
                f"{where}: {exc}"
                + ("" if bad_name else "; allowed: a JSON schema of type 'object' the grammar engine can enforce"),
                param=f"{where}.function." + ("name" if bad_name else "parameters"),
                code="invalid_value",
            ) from None
        if any(s.name == spec.name for s in specs):
            raise RequestError(
                f"{where}.function.name={spec.name!r} is used by another tool; allowed: unique tool names",
                param=f"{where}.function.name",
                code="invalid_value",
            )
        specs.append(spec)
    return tuple(specs)


def parse_tool_choice(body: dict[str, Any], specs: tuple[ToolSpec, ...]) -> str:
    """``tool_choice`` -> "auto", "required", "none" or a tool's name (default: "auto" with tools)."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if specs else "none"
    if not specs:
        raise RequestError(
            f"tool_choice={choice!r} is only allowed when tools are given; send tools or leave out tool_choice",
            param="tool_choice",
        )
    names = [s.name for s in specs]
    allowed = _TOOL_CHOICE_ALLOWED.replace("<a tool's name>", f"one of {names}")
    if isinstance(choice, str) and choice not in TOOL_CHOICES:
        raise RequestError(f"tool_choice={choice!r} is invalid; allowed: {allowed}", param="tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise RequestError(f"tool_choice={choice!r} is invalid; allowed: {allowed}", param="tool_choice")
        if name not in names:
            raise RequestError(
                f"tool_choice names the tool {name!r}, which is not in tools; allowed: one of {names}",
                param="tool_choice.function.name",
                code="invalid_value",
            )
    elif not isinstance(choice, str):
        raise RequestError(f"tool_choice={choice!r} is invalid; allowed: {allowed}", param="tool_choice")
    try:
        return resolve_tool_choice(choice, specs)
    except ValueError as exc:  # pragma: no cover - every case is refused above
        raise RequestError(str(exc), param="tool_choice") from None


def parse_response_format(body: dict[str, Any]) -> tuple[str, Grammar | None]:
    """``response_format`` -> its type and the grammar it constrains the output to (None for text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return "text", None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in RESPONSE_FORMATS:
        param = "response_format.type" if isinstance(fmt, dict) else "response_format"
        raise RequestError(f"response_format={fmt!r} is invalid; allowed: {_FORMAT_ALLOWED}", param=param)
    if kind == "text":
        return kind, None
    if kind == "json_object":
        return kind, Grammar.json_object()
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError(
            f"response_format.json_schema={spec!r} is invalid; allowed: {_FORMAT_ALLOWED}",
            param="response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise RequestError(
            f"response_format.json_schema.name={name!r} is invalid; allowed: 1-64 letters, digits, '_' or '-'",
            param="response_format.json_schema.name",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError(
            f"response_format.json_schema.strict={strict!r} is invalid; allowed: true, false or null",
            param="response_format.json_schema.strict",
        )
    schema = spec.get("schema")
    if schema is None:  # OpenAI's schema is optional: then any JSON object
        return kind, Grammar.json_object()
    if not isinstance(schema, dict):
        raise RequestError(
            f"response_format.json_schema.schema={schema!r} is invalid; allowed: a JSON schema object",
            param="response_format.json_schema.schema",
        )
    try:
        return kind, Grammar.json_schema(schema)
    except GrammarError as exc:
        raise RequestError(
            f"response_format.json_schema.schema: {exc}; allowed: a valid JSON schema the grammar engine can enforce",
            param="response_format.json_schema.schema",
            code="invalid_value",
        ) from None


def parse_constraints(body: dict[str, Any]) -> dict[str, Any]:
    """The chat fields that constrain decoding -> ParsedRequest fields (tools, their choice, the grammar)."""
    tools = parse_tools(body)
    choice = parse_tool_choice(body, tools)
    parallel = bool_field(body, "parallel_tool_calls", default=False)  # why: serving.protocol docstring
    fmt, grammar = parse_response_format(body)
    if tools and fmt != "text":
        raise RequestError(
            f"response_format type {fmt!r} cannot be combined with tools; allowed with tools: "
            "response_format {'type': 'text'} or absent (or leave out tools)",
            param="response_format",
        )
    if tools:
        try:
            grammar = tool_call_grammar(tools, choice, parallel)
        except ValueError as exc:
            raise RequestError(
                f"{exc}; allowed: tool parameter schemas the grammar engine can enforce", param="tools"
            ) from None
    return {
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": parallel,
        "response_format": fmt,
        "grammar": grammar,
    }


__all__ = [
    "RESPONSE_FORMATS",
    "TOOL_CHOICES",
    "parse_constraints",
    "parse_response_format",
    "parse_tool_choice",
    "parse_tools",
    "tool_fields",
]
