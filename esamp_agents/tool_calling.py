"""Tool calling for local models, with no LangChain: tool specs, the call syntax, its grammar, parsing.

The model calls a tool by writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the Hermes/Qwen syntax most open chat templates with tool support use). Decoding is
constrained by :func:`tool_call_grammar`, so the JSON always parses and matches one tool's
parameter schema (no keys beyond its properties); with ``tool_choice="auto"`` the grammar
allows either a text answer (any text that does not start with ``<``) or tool calls.

The tools reach the model through its chat template when the template reads ``tools``;
otherwise (SmolLM2's template has no tool support) :func:`render_for_template` puts them in
the system message in the documented format below (:data:`TOOLS_PROMPT`), writes earlier
calls back as ``<tool_call>`` text and tool results as ``<tool_response>`` user turns.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from esamp_agents.constrained.grammar import JSON_OPTIONS, Grammar, GrammarError, check_json_schema, closed_schema

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOL_CHOICES = ("auto", "required", "none")  # or a tool's name ("any" is read as "required")

TOOLS_PROMPT = (
    "You can call these tools:\n<tools>\n{tools}\n</tools>\n"
    'To call a tool, reply with {open}{{"name": <tool name>, "arguments": <arguments as a JSON object>}}{close}. '
    "Each result comes back inside {ropen}{rclose}; then answer the user."
)
"""The system-prompt format for chat templates without tool support (one tool per line)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its name, what it does, and the JSON schema of its arguments (an object)."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def openai(self) -> dict[str, Any]:
        """OpenAI's tool shape, which chat templates with tool support read."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


@dataclass
class ToolCall:
    """A parsed call: ``args`` always a dict; ``id`` unique per call (``call_...``)."""

    name: str
    args: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ParsedReply:
    """A reply split into its text and its tool calls; ``invalid`` holds (raw text, why) pairs."""

    content: str
    calls: list[ToolCall]
    invalid: list[tuple[str, str]]


def tool_spec(tool: Mapping[str, Any]) -> ToolSpec:
    """An OpenAI tool dict (``{"type": "function", "function": {...}}`` or the bare function) -> ToolSpec."""
    if not isinstance(tool, Mapping):
        raise ValueError(f"tool of type {type(tool).__name__} is not supported; allowed: an OpenAI tool dict")
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(function, Mapping):
        raise ValueError(f"tool {dict(tool)!r} is not a function tool; allowed: type 'function'")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"tool name {name!r} is not valid; allowed: 1-64 letters, digits, '_', '.', '-'")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ValueError(f"tool {name!r} has no object schema for its arguments (parameters={parameters!r})")
    try:
        checked = check_json_schema(parameters)
    except GrammarError as exc:
        raise ValueError(f"tool {name!r}: {exc}") from None
    return ToolSpec(name, str(function.get("description") or ""), checked)


def tool_specs(tools: Sequence[Mapping[str, Any]]) -> list[ToolSpec]:
    """Check and convert a tool list. A name given twice (e.g. a pydantic model and its JSON
    schema) is one tool: the first definition is kept."""
    specs: dict[str, ToolSpec] = {}
    for tool in tools:
        spec = tool_spec(tool)
        specs.setdefault(spec.name, spec)
    return list(specs.values())


def resolve_tool_choice(choice: Any, specs: Sequence[ToolSpec]) -> str:
    """LangChain/OpenAI ``tool_choice`` -> "auto", "required", "none" or a tool's name.

    Accepted: None (auto), "auto", "none", "any"/"required", True (the only tool, or required),
    a tool's name, ``{"type": "function", "function": {"name": ...}}`` or ``{"name": ...}``.
    """
    names = [s.name for s in specs]
    if choice is None:
        return "auto"
    if choice is True:
        if len(names) == 1:
            return names[0]
        choice = "required"  # checked below like the string (no tools bound: an error)
    if isinstance(choice, Mapping):
        inner = choice.get("function", choice)
        choice = inner.get("name") if isinstance(inner, Mapping) else None
        if choice is None:
            raise ValueError(f"tool_choice dict {dict(inner or {})!r} names no tool; allowed: {{'name': <tool>}}")
    if not isinstance(choice, str):
        raise ValueError(f"tool_choice {choice!r} is not supported; allowed: auto, any, required, none, a tool name")
    if choice == "any":
        return "required"
    if choice in TOOL_CHOICES:
        if choice != "none" and not specs:
            raise ValueError(f"tool_choice={choice!r} but no tools are bound")
        return choice
    if choice not in names:
        raise ValueError(f"tool_choice {choice!r} is not a bound tool; allowed: auto, any, required, none, {names}")
    return choice


def _call_schema(specs: Sequence[ToolSpec]) -> dict[str, Any]:
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": s.name}, "arguments": closed_schema(dict(s.parameters))},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for s in specs
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": dict(JSON_OPTIONS)}


def tool_call_grammar(specs: Sequence[ToolSpec], choice: str, parallel: bool = True) -> Grammar | None:
    """The grammar for ``choice`` (from :func:`resolve_tool_choice`); None for "none" (plain text)."""
    if choice == "none" or not specs:
        return None
    allowed = specs if choice in ("auto", "required") else [s for s in specs if s.name == choice]
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = "TEXT | calls" if choice == "auto" else "calls"
    lark = "\n".join(
        [
            f"start: {start}",
            f"calls: {calls}",
            f"call: {json.dumps(CALL_OPEN)} args {json.dumps(CALL_CLOSE)}",
            f"args: %json {json.dumps(_call_schema(allowed))}",
            r"TEXT: /[^<](.|\n)*/",
        ]
    )
    try:
        return Grammar.lark(lark)
    except GrammarError as exc:
        raise ValueError(f"the tools' argument schemas cannot be enforced: {exc}") from None


def format_call(name: str, args: Mapping[str, Any]) -> str:
    return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': dict(args)}, ensure_ascii=False)}{CALL_CLOSE}"


def parse_tool_calls(text: str, specs: Sequence[ToolSpec] = ()) -> ParsedReply:
    """Split ``text`` into its content and ``<tool_call>`` blocks.

    Each block's JSON is read by a JSON decoder (so ``</tool_call>`` inside a string does not
    end it); a block that is not closed, not JSON, or names an unknown tool goes to ``invalid``.
    """
    calls: list[ToolCall] = []
    invalid: list[tuple[str, str]] = []
    known = {s.name for s in specs}
    decoder = json.JSONDecoder()
    pieces: list[str] = []
    pos = 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        pieces.append(text[pos:start])
        body = start + len(CALL_OPEN)
        first = len(text) - len(text[body:].lstrip(" \n"))  # Hermes/Qwen write "<tool_call>\n{...}\n</tool_call>"
        try:
            payload, end = decoder.raw_decode(text, first)
        except json.JSONDecodeError as exc:
            close = text.find(CALL_CLOSE, body)
            raw = text[body:] if close < 0 else text[body:close]
            why = "the tool call was cut off before </tool_call>" if close < 0 else f"not valid JSON: {exc}"
            invalid.append((raw, why))
            pos = len(text) if close < 0 else close + len(CALL_CLOSE)
            continue
        tail = text[end:].lstrip(" \n")
        if not tail.startswith(CALL_CLOSE):
            invalid.append((text[body:], "the tool call was cut off before </tool_call>"))
            pos = len(text)
            continue
        pos = len(text) - len(tail) + len(CALL_CLOSE)
        raw = text[body:end]
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            invalid.append((raw, "a tool call must be a JSON object with a string 'name'"))
            continue
        args = payload.get("arguments", {})
        if not isinstance(args, dict):
            invalid.append((raw, "'arguments' must be a JSON object"))
        elif known and payload["name"] not in known:
            invalid.append((raw, f"unknown tool {payload['name']!r}; allowed: {sorted(known)}"))
        else:
            calls.append(ToolCall(payload["name"], args))
    pieces.append(text[pos:])
    rest = "".join(pieces)
    return ParsedReply(content=rest.strip() if calls or invalid else rest, calls=calls, invalid=invalid)


def template_reads_tools(chat_template: Any) -> bool:
    """Whether a chat template renders a ``tools`` list (else the system-prompt fallback is used)."""
    return isinstance(chat_template, str) and re.search(r"\btools\b", chat_template) is not None


def _fallback_messages(messages: Sequence[Mapping[str, Any]], specs: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], str(m.get("content") or "")
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(format_call(c["name"], c.get("arguments") or {}) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        elif role == "tool":
            role, content = "user", f"{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}"
        out.append({"role": role, "content": content})
    if specs:
        lines = "\n".join(
            json.dumps({"name": s.name, "description": s.description, "parameters": dict(s.parameters)}) for s in specs
        )
        prompt = TOOLS_PROMPT.format(
            tools=lines, open=CALL_OPEN, close=CALL_CLOSE, ropen=RESPONSE_OPEN, rclose=RESPONSE_CLOSE
        )
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            item["tool_calls"] = [
                {"id": c.get("id"), "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in m["tool_calls"]
            ]
        for key in ("tool_call_id", "name"):
            if m.get(key):
                item[key] = m[key]
        out.append(item)
    return out


def render_for_template(
    messages: Sequence[Mapping[str, Any]], specs: Sequence[ToolSpec], template_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, ``tools=`` argument) for ``apply_chat_template``, by whether the template reads tools."""
    has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not specs and not has_tool_turns:
        return [dict(m) for m in messages], None
    if template_tools:
        return _template_messages(messages), [s.openai() for s in specs] or None
    return _fallback_messages(messages, specs), None


__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "RESPONSE_CLOSE",
    "RESPONSE_OPEN",
    "TOOLS_PROMPT",
    "TOOL_CHOICES",
    "ParsedReply",
    "ToolCall",
    "ToolSpec",
    "format_call",
    "parse_tool_calls",
    "render_for_template",
    "resolve_tool_choice",
    "template_reads_tools",
    "tool_call_grammar",
    "tool_spec",
    "tool_specs",
]
