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

from dataclasses import dataclass, field, replace
from typing import Any

from esamp_agents.constrained.grammar import Grammar
from esamp_agents.decoding.params import MAX_TOP_LOGPROBS, ESampParams, SamplingParams, param_keys
from esamp_agents.messages import ROLES
from esamp_agents.serving.fields import RequestError, bool_field, int_field, is_int, number_field
from esamp_agents.serving.tool_fields import RESPONSE_FORMATS, TOOL_CHOICES, parse_constraints, tool_fields
from esamp_agents.tool_calling import ToolSpec

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
# --------------------------------------------------------------------------- validation


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
        out.append(tool_fields(m, {"role": role, "content": content}, where))
    return tuple(out)


def _parse_prompts(body: dict[str, Any], vocab_size: int) -> tuple[str | tuple[int, ...], ...]:
    prompt = body.get("prompt")
    allowed = "a non-empty string, a list of strings, a list of token ids, or a list of token-id lists"
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise RequestError(f"prompt={prompt!r} is invalid; allowed: {allowed}", param="prompt", code="invalid_value")
    out: list[str | tuple[int, ...]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str) and p.strip():
            out.append(p)
        elif isinstance(p, list) and p and all(is_int(t) for t in p):
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
    constraints = parse_constraints(body) if kind == "chat" else {}
    prompts = _parse_prompts(body, vocab_size) if kind == "completion" else ()
    n = int_field(body, "n", 1, MAX_N, 1) or 1
    temperature = number_field(body, "temperature", defaults.temperature, "0 <= temperature <= 2")
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(
            f"temperature={temperature!r} is out of range; allowed: 0 <= temperature <= 2",
            param="temperature",
            code="invalid_value",
        )
    max_tokens = int_field(body, "max_tokens", 1, None, None)
    if kind == "chat":
        completion_tokens = int_field(body, "max_completion_tokens", 1, None, None)
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
    stream = bool_field(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise RequestError("stream_options is only allowed when stream=true", param="stream_options")
        if not isinstance(stream_options, dict):
            raise RequestError(f"stream_options={stream_options!r} must be an object", param="stream_options")
        include_usage = bool_field(stream_options, "include_usage")
    logprobs, top_logprobs = _parse_logprobs(body, kind)
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**63):
        raise RequestError(f"seed={seed!r} is invalid; allowed: an integer 0 <= seed < 2**63", param="seed")
    try:
        sampling = SamplingParams(
            n=n,
            max_new_tokens=max_tokens or 1,
            temperature=temperature,
            top_k=int_field(body, "top_k", 0, None, defaults.top_k) or 0,
            top_p=number_field(body, "top_p", defaults.top_p, "0 < top_p <= 1"),
            min_p=number_field(body, "min_p", defaults.min_p, "0 <= min_p < 1"),
            stop=stops,
            seed=seed,
            top_logprobs=top_logprobs,
            ignore_eos=bool_field(body, "ignore_eos"),
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
        logprobs = bool_field(body, "logprobs")
        top = int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        return logprobs, top or 0
    value = body.get("logprobs")
    if value is None:
        return False, 0
    top = int_field(body, "logprobs", 0, MAX_TOP_LOGPROBS, 0) or 0
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
