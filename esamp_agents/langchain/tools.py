"""Tool calling and structured output for ``ChatESamp``: LangChain inputs -> one decode constraint.

Per-call keywords (set by ``bind_tools``, ``with_structured_output`` or ``bind``):
``tools`` (``BaseTool``, functions, pydantic models, OpenAI dicts), ``tool_choice``
(``auto``, ``any``/``required``, ``none``, a tool name), ``parallel_tool_calls``,
``response_format`` (OpenAI's: ``{"type": "json_object"}`` or ``{"type": "json_schema",
"json_schema": {"schema": ...}}``) and ``grammar`` (a :class:`~esamp_agents.constrained.Grammar`).
:func:`split_constraint` checks them all before any decoding and turns them into the grammar
the decode runs under (see :mod:`esamp_agents.tool_calling` for the call syntax) and the tools
the prompt shows; :func:`reply_message` turns a decoded candidate back into an ``AIMessage``
with ``tool_calls`` (ids, parsed args) or ``invalid_tool_calls`` (a call cut off by
``max_tokens`` is never reported as valid).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, InvalidToolCall, ToolCall, ToolCallChunk
from langchain_core.utils.function_calling import convert_to_openai_tool

from esamp_agents.constrained.grammar import Grammar, GrammarError
from esamp_agents.decoding.results import Candidate
from esamp_agents.tool_calling import (
    CALL_OPEN,
    ToolSpec,
    parse_tool_calls,
    resolve_tool_choice,
    tool_call_grammar,
    tool_specs,
)

CONSTRAINT_KEYS: tuple[str, ...] = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "grammar")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def to_openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """LangChain tool inputs -> OpenAI tool dicts, each converted once (errors name the tool)."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools={tools!r} is not a list; allowed: a list of tools")
    converted = []
    for i, tool in enumerate(tools):
        try:
            converted.append(convert_to_openai_tool(tool))
        except Exception as exc:  # langchain raises ValueError/TypeError/others for unconvertible objects
            raise ValueError(f"tools[{i}] ({tool!r}) has no usable schema: {exc}") from None
    return converted


def response_grammar(response_format: Any) -> Grammar | None:
    """OpenAI's ``response_format`` -> its grammar (None for text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping) or response_format.get("type") not in RESPONSE_FORMATS:
        raise ValueError(
            f"response_format={response_format!r} is not supported; "
            f"allowed: {{'type': one of {list(RESPONSE_FORMATS)}}}"
        )
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
    return Grammar.json_schema(schema)


@dataclass(frozen=True)
class CallConstraint:
    """What one call may emit: the grammar it decodes under and the tools its prompt shows."""

    specs: tuple[ToolSpec, ...] = ()
    choice: str = "auto"
    grammar: Grammar | None = None

    @property
    def calls_tools(self) -> bool:
        """Replies are read for tool calls (tools bound and not ``tool_choice="none"``)."""
        return bool(self.specs) and self.choice != "none"

    @property
    def prompt_tools(self) -> tuple[ToolSpec, ...]:
        return self.specs if self.calls_tools else ()


def split_constraint(kwargs: dict[str, Any]) -> tuple[CallConstraint, dict[str, Any]]:
    """Per-call kwargs -> (the checked constraint, the other kwargs). Raises ValueError/GrammarError."""
    if not any(key in kwargs for key in CONSTRAINT_KEYS):
        return CallConstraint(), kwargs
    rest = dict(kwargs)
    values = {key: rest.pop(key, None) for key in CONSTRAINT_KEYS}
    tools, grammar = values["tools"], values["grammar"]
    if grammar is not None and not isinstance(grammar, Grammar):
        raise ValueError(f"grammar={grammar!r} is not a Grammar; allowed: esamp_agents.constrained.Grammar")
    fmt = response_grammar(values["response_format"])
    parallel = values["parallel_tool_calls"]
    if parallel is not None and not isinstance(parallel, bool):
        raise ValueError(f"parallel_tool_calls={parallel!r} must be True or False")
    specs = tuple(tool_specs(to_openai_tools(tools))) if tools else ()
    if values["tool_choice"] is not None and not specs:
        raise ValueError(f"tool_choice={values['tool_choice']!r} but no tools are bound; bind tools first")
    choice = resolve_tool_choice(values["tool_choice"], specs) if specs else "none"
    # One call per reply unless asked: a small model given the choice tends to repeat its call
    # until max_tokens cuts it off (then no call is valid). Agents loop, so one call per turn is enough.
    grammars = [g for g in (grammar, fmt, tool_call_grammar(specs, choice, parallel is True)) if g]
    if len(grammars) > 1:
        raise ValueError(
            "grammar, response_format (json) and tools (with tool_choice other than 'none') each constrain the "
            "whole reply; allowed: one of them per call"
        )
    return CallConstraint(specs, choice, grammars[0] if grammars else None), rest


def split_grammar(kwargs: dict[str, Any]) -> tuple[Grammar | list[Grammar | None] | None, dict[str, Any]]:
    """``ESampLLM``'s per-call ``grammar`` (one Grammar, or a list with one per prompt) or
    ``response_format`` -> (the engine's ``grammar=`` argument, the other kwargs)."""
    if "tools" in kwargs or "tool_choice" in kwargs:
        raise ValueError("ESampLLM takes no tools (a completion model); use ChatESamp.bind_tools")
    if "grammar" not in kwargs and "response_format" not in kwargs:
        return None, kwargs
    rest = dict(kwargs)
    grammar, fmt = rest.pop("grammar", None), response_grammar(rest.pop("response_format", None))
    if grammar is not None and fmt is not None:
        raise ValueError("grammar and response_format both constrain the output; allowed: one of them")
    if isinstance(grammar, (list, tuple)):
        bad = [type(g).__name__ for g in grammar if g is not None and not isinstance(g, Grammar)]
        if bad:
            raise ValueError(f"grammar list entries must be Grammar or None, got {bad[0]}")
        return list(grammar), rest
    if grammar is not None and not isinstance(grammar, Grammar):
        raise ValueError(f"grammar={grammar!r} is not a Grammar; allowed: esamp_agents.constrained.Grammar or a list")
    return grammar or fmt, rest


def _tool_call_dict(call: Any) -> ToolCall:
    return ToolCall(name=call.name, args=call.args, id=call.id, type="tool_call")


def _invalid(name: str | None, args: str, call_id: str | None, error: str) -> InvalidToolCall:
    return InvalidToolCall(name=name, args=args, id=call_id, error=error, type="invalid_tool_call")


def reply_message(candidate: Candidate, constraint: CallConstraint, **fields: Any) -> tuple[AIMessage, str]:
    """A candidate -> (its AIMessage, finish reason: "tool_calls" when it calls tools)."""
    if not constraint.calls_tools:
        return AIMessage(content=candidate.text, **fields), candidate.finish_reason
    parsed = parse_tool_calls(candidate.text, constraint.specs)
    complete = candidate.extras.get("constraint_satisfied", True)
    invalid = [_invalid(None, raw, None, why) for raw, why in parsed.invalid]
    if not complete and parsed.calls:  # cut off after some calls: none of them is reported as valid
        invalid = [_invalid(c.name, json.dumps(c.args), c.id, "the reply was cut off") for c in parsed.calls] + invalid
        calls = []
    else:
        calls = [_tool_call_dict(c) for c in parsed.calls]
    message = AIMessage(content=parsed.content, tool_calls=calls, invalid_tool_calls=invalid, **fields)
    return message, "tool_calls" if calls else candidate.finish_reason


def message_chunk(message: AIMessage, **fields: Any) -> AIMessageChunk:
    """The last streamed chunk of a tool-calling reply: its content and its calls as chunks."""
    chunks = [
        ToolCallChunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i, type="tool_call_chunk")
        for i, c in enumerate(message.tool_calls)
    ]
    return AIMessageChunk(
        content=message.content, tool_call_chunks=chunks, invalid_tool_calls=message.invalid_tool_calls, **fields
    )


class ToolTextGate:
    """Streaming with tools bound: a reply starting with ``<`` is a tool call (the grammar allows
    text only when it does not), so it is held back and sent as tool calls at the end; any other
    reply streams as text."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.decided: bool | None = None if active else False  # True: holding a tool call back
        self.held = ""

    def push(self, text: str) -> str:
        if self.decided is False:
            return text
        self.held += text
        if self.decided is None and self.held:
            self.decided = self.held.startswith(CALL_OPEN[0])
            if not self.decided:
                out, self.held = self.held, ""
                return out
        return ""


__all__ = [
    "CONSTRAINT_KEYS",
    "CallConstraint",
    "GrammarError",
    "ToolTextGate",
    "message_chunk",
    "reply_message",
    "response_grammar",
    "split_constraint",
    "split_grammar",
    "to_openai_tools",
]
