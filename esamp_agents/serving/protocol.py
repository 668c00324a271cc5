"""The OpenAI request protocol of ``esamp-agents serve``: parsing and validating request bodies.

Kept apart from the engine and from HTTP so the front end (:mod:`esamp_agents.serving.app`, ASGI)
refuses a bad request the same way, before any work starts: :func:`parse_request` turns a JSON
body into a :class:`ParsedRequest` or raises :class:`RequestError`, which carries OpenAI's error
shape (``{"error": {"message", "type", "param", "code"}}``) and the HTTP status to send it with.

Fields, with OpenAI's semantics: ``model``, ``messages`` / ``prompt``, ``n`` (1..128),
``temperature`` (0..2), ``top_p`` (0 < top_p <= 1), ``max_tokens`` / ``max_completion_tokens``,
``stop`` (a string or up to 4), ``seed``, ``stream`` (any n, any number of prompts) with ``stream_options``
``{"include_usage": true}``; chat ``logprobs: true`` + ``top_logprobs`` (0..20); completions
``logprobs: int`` (0..20). Extra body fields: the ESamp settings of :data:`ESAMP_BODY_FIELDS`
and the sampling filters ``top_k``, ``min_p`` and ``ignore_eos``. Harmless OpenAI fields
(``user``, ``store``, ``metadata``...) are ignored; features a local text model lacks
(penalties, ``logit_bias``, legacy ``functions``, ``echo``) are refused, as is any unknown field.

Chat requests may constrain the output (grammar-constrained decoding, checked here so a bad
schema is a 400 before any decoding): ``tools`` (OpenAI function tools) with ``tool_choice``
(``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}``)
and ``parallel_tool_calls`` (default false here, unlike OpenAI's true: a small local model
allowed "one or more" calls tends to repeat its call until max_tokens cuts it off, so a client
that never sets it, such as ``ChatOpenAI.bind_tools``, gets one whole call; send true for
several); or ``response_format`` ``{"type": "text"}``,
``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
(not together with tools). Conversations may hold assistant turns with ``tool_calls`` and
``role: "tool"`` results (``tool_call_id``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from esamp_agents.constrained.grammar import Grammar, GrammarError
from esamp_agents.decoding.params import MAX_TOP_LOGPROBS, ESampParams, SamplingParams, param_keys
from esamp_agents.messages import ROLES, to_chat_message
from esamp_agents.tool_calling import ToolSpec, resolve_tool_choice, tool_call_grammar, tool_spec

DEFAULT_MAX_TOKENS = 256
MAX_N = 128
"""OpenAI's limit on ``n``."""
MAX_STOP = 4

ESAMP_BODY_FIELDS: dict[str, str] = param_keys("esamp")
"""Extra request body fields for ESamp (``extra_body`` in the ``openai`` client) -> the :class:`ESampParams` field:
every spelling in the params table (``beta``, ``distiller_lr``/``lr``, ``shared_distiller``...)."""
_IGNORED = frozenset({"user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})
_COMMON = frozenset(
    {
        "model", "n", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "stream_options",
        "top_k", "min_p", "ignore_eos", "logprobs", "frequency_penalty", "presence_penalty", "logit_bias",
        *ESAMP_BODY_FIELDS,
    }
)  # fmt: skip
_CHAT_ONLY = frozenset(
    {
        "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
        "functions", "function_call", "response_format", "modalities",
    }
)  # fmt: skip
_COMPLETION_ONLY = frozenset({"prompt", "echo", "suffix", "best_of"})
# The roles OpenAI's chat API takes, mapped as everywhere else in the package (esamp_agents.messages).
_ROLES = {role: ROLES[role] for role in ("system", "developer", "user", "assistant", "tool")}
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


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error response."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_field(body: dict[str, Any], name: str, low: int, high: int | None, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    allowed = f"an integer {low} <= {name}" + (f" <= {high}" if high is not None else "")
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise RequestError(f"{name}={value!r} is invalid; allowed: {allowed}", param=name, code="invalid_value")
    return int(value)


def _number_field(body: dict[str, Any], name: str, default: float, allowed: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise RequestError(f"{name}={value!r} is not a number; allowed: {allowed}", param=name, code="invalid_type")
    return float(value)


def _bool_field(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name}={value!r} must be true or false", param=name, code="invalid_type")
    return value


def _check_unsupported(body: dict[str, Any], kind: str) -> None:
    allowed = _COMMON | (_CHAT_ONLY if kind == "chat" else _COMPLETION_ONLY)
    for key in body:
        if key not in allowed and key not in _IGNORED:
            raise RequestError(
                f"Unrecognized request argument supplied: {key}", param=key, code="unrecognized_argument"
            )
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value not in (None, 0, 0.0):
            raise RequestError(f"{name}={value!r} is not supported by this server; allowed: 0 or absent", param=name)
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported by this server; allowed: {} or absent", param="logit_bias")
    for name, modern in (("functions", "tools"), ("function_call", "tool_choice")):
        if body.get(name) not in (None, [], "none", "auto"):
            raise RequestError(
                f"{name} (OpenAI's deprecated function calling) is not supported by this server; allowed: {modern}",
                param=name,
            )
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise RequestError(f"modalities={modalities!r} is not supported; allowed: ['text']", param="modalities")
    if kind == "completion":
        if body.get("echo"):
            raise RequestError("echo=true is not supported by this server", param="echo")
        if body.get("suffix"):
            raise RequestError("suffix is not supported by this server", param="suffix")
        best_of = body.get("best_of")
        if best_of is not None and best_of != 1 and best_of != body.get("n", 1):
            raise RequestError(
                f"best_of={best_of!r} is not supported; allowed: absent, 1, or equal to n", param="best_of"
            )


@dataclass(frozen=True)
class ServeDefaults:
    """Defaults for fields a request leaves out (OpenAI's where it has one)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    esamp: ESampParams = field(default_factory=ESampParams)


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request; token work (chat template, lengths) happens in the worker."""

    kind: str  # "chat" or "completion"
    model: str
    messages: tuple[dict[str, Any], ...] = ()  # as esamp_agents.messages.to_chat_message makes them
    prompts: tuple[str | tuple[int, ...], ...] = ()
    n: int = 1
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    esamp: ESampParams = field(default_factory=ESampParams)
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"  # resolved: "auto", "required", "none" or a tool's name ("none" without tools)
    parallel_tool_calls: bool = False
    response_format: str = "text"  # one of RESPONSE_FORMATS
    grammar: Grammar | None = None  # what decoding is constrained to (tool calls or JSON), None = free text

    @property
    def calls_tools(self) -> bool:
        """Whether the model is offered the tools (so its reply is read for tool calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def prompt_tools(self) -> tuple[ToolSpec, ...]:
        """The tools the prompt shows the model: none under ``tool_choice="none"``."""
        return self.tools if self.calls_tools else ()


def _parse_messages(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            f"messages={messages!r} is invalid; allowed: a non-empty list of {{role, content}} objects",
            param="messages",
            code="invalid_value",
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if role not in _ROLES:
            raise RequestError(f"{where}.role={role!r} is invalid; allowed: {', '.join(_ROLES)}", param=f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
                    parts.append(str(part.get("text", part.get("refusal", ""))))
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(
                        f"{where}.content[{j}] has type {kind!r}; this text-only model accepts type 'text'",
                        param=f"{where}.content",
                    )
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(
                f"{where}.content={content!r} is invalid; allowed: a string or a list of text parts",
                param=f"{where}.content",
            )
        out.append(_tool_fields(m, {"role": role, "content": content}, where))
    return tuple(out)


def _tool_fields(message: dict[str, Any], parsed: dict[str, Any], where: str) -> dict[str, Any]:
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


def _parse_tools(body: dict[str, Any]) -> tuple[ToolSpec, ...]:
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


def _parse_tool_choice(body: dict[str, Any], specs: tuple[ToolSpec, ...]) -> str:
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


def _parse_response_format(body: dict[str, Any]) -> tuple[str, Grammar | None]:
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


def _parse_constraints(body: dict[str, Any]) -> dict[str, Any]:
    """The chat fields that constrain decoding -> ParsedRequest fields (tools, their choice, the grammar)."""
    tools = _parse_tools(body)
    choice = _parse_tool_choice(body, tools)
    parallel = _bool_field(body, "parallel_tool_calls", default=False)  # see the module docstring
    fmt, grammar = _parse_response_format(body)
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


def _parse_prompts(body: dict[str, Any], vocab_size: int) -> tuple[str | tuple[int, ...], ...]:
    prompt = body.get("prompt")
    allowed = "a non-empty string, a list of strings, a list of token ids, or a list of token-id lists"
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise RequestError(f"prompt={prompt!r} is invalid; allowed: {allowed}", param="prompt", code="invalid_value")
    out: list[str | tuple[int, ...]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str) and p.strip():
            out.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(
                    f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})", param="prompt"
                )
            out.append(tuple(p))
        else:
            raise RequestError(f"prompt {i} is {p!r}; allowed: {allowed}", param="prompt", code="invalid_value")
    return tuple(out)


def parse_request(body: Any, kind: str, defaults: ServeDefaults, vocab_size: int) -> ParsedRequest:
    """A JSON body -> :class:`ParsedRequest`, or :class:`RequestError` naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_unsupported(body, kind)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("you must provide a model parameter", param="model", code="missing_required_parameter")
    messages = _parse_messages(body) if kind == "chat" else ()
    constraints = _parse_constraints(body) if kind == "chat" else {}
    prompts = _parse_prompts(body, vocab_size) if kind == "completion" else ()
    n = _int_field(body, "n", 1, MAX_N, 1) or 1
    temperature = _number_field(body, "temperature", defaults.temperature, "0 <= temperature <= 2")
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(
            f"temperature={temperature!r} is out of range; allowed: 0 <= temperature <= 2",
            param="temperature",
            code="invalid_value",
        )
    max_tokens = _int_field(body, "max_tokens", 1, None, None)
    if kind == "chat":
        completion_tokens = _int_field(body, "max_completion_tokens", 1, None, None)
        if max_tokens is not None and completion_tokens is not None and max_tokens != completion_tokens:
            raise RequestError(
                f"max_tokens={max_tokens} and max_completion_tokens={completion_tokens} disagree; send one of them",
                param="max_completion_tokens",
            )
        max_tokens = completion_tokens if completion_tokens is not None else max_tokens
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise RequestError(
            f"stop={stop!r} is invalid; allowed: a string or a list of up to {MAX_STOP} strings", param="stop"
        )
    stream = _bool_field(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise RequestError("stream_options is only allowed when stream=true", param="stream_options")
        if not isinstance(stream_options, dict):
            raise RequestError(f"stream_options={stream_options!r} must be an object", param="stream_options")
        include_usage = _bool_field(stream_options, "include_usage")
    logprobs, top_logprobs = _parse_logprobs(body, kind)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise RequestError(f"seed={seed!r} is invalid; allowed: an integer 0 <= seed < 2**63", param="seed")
    try:
        sampling = SamplingParams(
            n=n,
            max_new_tokens=max_tokens or 1,
            temperature=temperature,
            top_k=_int_field(body, "top_k", 0, None, defaults.top_k) or 0,
            top_p=_number_field(body, "top_p", defaults.top_p, "0 < top_p <= 1"),
            min_p=_number_field(body, "min_p", defaults.min_p, "0 <= min_p < 1"),
            stop=stops,
            seed=seed,
            top_logprobs=top_logprobs,
            ignore_eos=_bool_field(body, "ignore_eos"),
        )
    except ValueError as exc:
        raise RequestError(str(exc), param=str(exc).split("=", 1)[0], code="invalid_value") from exc
    esamp_values = {}
    for key, target in ESAMP_BODY_FIELDS.items():
        if body.get(key) is not None:
            esamp_values[target] = body[key]
    try:
        esamp = replace(defaults.esamp, **esamp_values)
    except (ValueError, TypeError) as exc:
        raise RequestError(str(exc), param=str(exc).split("=", 1)[0], code="invalid_value") from exc
    return ParsedRequest(
        kind=kind,
        model=model,
        messages=messages,
        prompts=prompts,
        n=n,
        max_tokens=max_tokens,
        sampling=sampling,
        esamp=esamp,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        stream=stream,
        include_usage=include_usage,
        **constraints,
    )


def _parse_logprobs(body: dict[str, Any], kind: str) -> tuple[bool, int]:
    if kind == "chat":
        logprobs = _bool_field(body, "logprobs")
        top = _int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        return logprobs, top or 0
    value = body.get("logprobs")
    if value is None:
        return False, 0
    top = _int_field(body, "logprobs", 0, MAX_TOP_LOGPROBS, 0) or 0
    return True, top


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "ESAMP_BODY_FIELDS",
    "MAX_N",
    "MAX_STOP",
    "RESPONSE_FORMATS",
    "TOOL_CHOICES",
    "ParsedRequest",
    "RequestError",
    "ServeDefaults",
    "parse_request",
]
