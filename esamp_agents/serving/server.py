"""``esamp-agents serve``: an OpenAI-compatible HTTP server over the local model, with ESamp.

So any OpenAI client (the ``openai`` package, ``ChatOpenAI(base_url=...)``, curl) gets N
diverse candidates with logprobs from the local model. Standard library only:
``ThreadingHTTPServer`` parses requests in parallel, and ONE worker thread owns the engine,
so concurrent requests are queued and decoded one at a time (the engine serialises on the
model's lock anyway; the queue also bounds how many wait).

Endpoints (under ``/v1``): ``POST /chat/completions``, ``POST /completions``, ``GET /models``,
``GET /models/{id}``; ``GET /health`` answers ``{"status": "ok"}``.

Request fields, with OpenAI's semantics: ``model``, ``messages`` / ``prompt``, ``n``
(1..128), ``temperature`` (0..2, default 1), ``top_p`` (0 < top_p <= 1, default 1),
``max_tokens`` / ``max_completion_tokens`` (default 256, capped by the context window),
``stop`` (a string or up to 4), ``seed``, ``stream`` (n = 1 only) with ``stream_options``
``{"include_usage": true}``; chat ``logprobs: true`` + ``top_logprobs`` (0..20); completions
``logprobs: int`` (0..20; OpenAI caps it at 5). Extra body fields (``extra_body`` in the
``openai`` client): ESamp's ``beta`` (0 = plain sampling; default ``--preset``'s or ``--beta``),
``distiller_width``, ``distiller_lr`` (alias ``lr``), ``adam_eps``, ``grad_clip``,
``warm_start_steps``, ``warm_start_lr``, and the sampling filters ``top_k`` (default 0 =
off, as OpenAI has none) and ``min_p``, and ``ignore_eos``. Harmless OpenAI fields (``user``,
``store``, ``metadata``...) are ignored; features a local text model lacks (tools, penalties,
``logit_bias``, JSON mode, ``echo``) get a 400 rather than a silent no-op, as does any
unknown field.

Model names: ``/v1/models`` lists one name (``served_name``; by default the name the model was
loaded with, e.g. ``"embedded"``). A request's ``model`` must be that name or the loaded
model's full identity, else 404 (``model_not_found``), unless the server runs with
``accept_any_model=True`` (``--accept-any-model``): then any name is served by the one model,
for clients that insist on their own model name. Responses always carry the served name.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request (bad JSON, a value out of range, a prompt too long for the context window), 401 for
a wrong API key (only when the server has one), 404 for an unknown model or path, 413 for a
body over the size limit, 503 when the queue is full or the server is stopping, 500 for an
internal error (with its message). Streams send ``data: {chunk}\\n\\n`` events and
``data: [DONE]``; with logprobs requested, a stream's token logprobs come in its final chunk.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, load_model
from esamp_agents.decoding.params import ESAMP_PRESETS, MAX_TOP_LOGPROBS, ESampParams, SamplingParams, esamp_preset
from esamp_agents.decoding.results import Candidate, GenerationResult
from esamp_agents.openai_format import TokenRenderer, chat_logprobs, completion_logprobs, renderer_for, request_usage

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 256
MAX_N = 128
"""OpenAI's limit on ``n``."""
MAX_STOP = 4
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_BATCH_TOKENS = 1 << 18
"""rows x (prompt + max_tokens) per request: bounds the preallocated KV cache."""
DEFAULT_MAX_QUEUE = 64
"""What OpenAI sends for a logprob it cannot represent; used for non-finite values."""

# Request field -> ESampParams field.
_ESAMP_KEYS = {
    "beta": "beta",
    "distiller_width": "distiller_width",
    "distiller_lr": "lr",
    "lr": "lr",
    "adam_eps": "adam_eps",
    "grad_clip": "grad_clip",
    "warm_start_steps": "warm_start_steps",
    "warm_start_lr": "warm_start_lr",
}
_IGNORED = frozenset(
    {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
)
_COMMON = frozenset(
    {
        "model", "n", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "stream_options",
        "top_k", "min_p", "ignore_eos", "logprobs", "frequency_penalty", "presence_penalty", "logit_bias",
        *_ESAMP_KEYS,
    }
)  # fmt: skip
_CHAT_ONLY = frozenset(
    {
        "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
        "function_call", "response_format", "modalities",
    }
)  # fmt: skip
_COMPLETION_ONLY = frozenset({"prompt", "echo", "suffix", "best_of"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


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
    for name in ("tools", "functions"):
        if body.get(name):
            raise RequestError(f"{name} (tool calling) is not supported by this server", param=name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise RequestError(f"{name}={body.get(name)!r} needs tools, which this server does not support", param=name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(
            f"response_format={fmt!r} is not supported; allowed: {{'type': 'text'}}", param="response_format"
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
    messages: tuple[dict[str, str], ...] = ()
    prompts: tuple[str | tuple[int, ...], ...] = ()
    n: int = 1
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    esamp: ESampParams = field(default_factory=ESampParams)
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False


def _parse_messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
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
        out.append({"role": _ROLES[role], "content": content})
    return tuple(out)


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
    if stream and n != 1:
        raise RequestError(f"n={n} cannot be streamed; allowed: n=1 when stream=true", param="n", code="invalid_value")
    if stream and len(prompts) > 1:
        raise RequestError(f"{len(prompts)} prompts cannot be streamed; allowed: one prompt", param="prompt")
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
    for key, target in _ESAMP_KEYS.items():
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


# --------------------------------------------------------------------------- responses


# --------------------------------------------------------------------------- backend


@dataclass(eq=False)
class _Job:
    request: ParsedRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue[tuple[str, Any]] | None = None


class OpenAIBackend:
    """What the HTTP layer calls: validation, the job queue and the one engine worker."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        served_name: str,
        accept_any_model: bool,
        defaults: ServeDefaults,
        max_batch_tokens: int,
        max_queue: int,
    ) -> None:
        from esamp_agents.decoding.engine import ESampEngine

        self.loaded = loaded
        self.engine = ESampEngine(loaded)
        self.served_name = served_name
        self.aliases = {served_name, loaded.name}
        self.accept_any_model = accept_any_model
        self.defaults = defaults
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.created = int(time.time())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esamp-serve-worker")
        self._pending = 0
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()
        self._closed = False

    # ---- models
    def model_card(self) -> dict[str, Any]:
        return {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "esamp-agents"}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def check_model(self, name: str) -> None:
        if name not in self.aliases and not self.accept_any_model:
            raise RequestError(
                f"The model `{name}` does not exist; this server serves {self.served_name!r} "
                "(start it with --accept-any-model to serve any name)",
                param="model",
                code="model_not_found",
                status=404,
            )

    def parse(self, body: Any, kind: str) -> ParsedRequest:
        request = parse_request(body, kind, self.defaults, self.loaded.vocab_size)
        self.check_model(request.model)
        return request

    # ---- queue
    def submit(self, job: _Job, fn: Callable[[_Job], Any]) -> Future[Any]:
        with self._lock:
            if self._closed:
                raise RequestError("the server is shutting down", status=503, type="server_error", code="unavailable")
            if self._pending >= self.max_queue:
                raise RequestError(
                    f"{self._pending} requests are already queued (limit {self.max_queue}); retry later",
                    status=503,
                    type="server_error",
                    code="server_overloaded",
                )
            self._pending += 1
            self._jobs.add(job)

        def run() -> Any:
            try:
                if job.cancel.is_set():
                    raise RequestError("the request was cancelled", status=503, type="server_error", code="cancelled")
                return fn(job)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._jobs.discard(job)

        try:
            return self._executor.submit(run)
        except RuntimeError as exc:  # the executor was shut down between the check and here
            with self._lock:
                self._pending -= 1
                self._jobs.discard(job)
            raise RequestError("the server is shutting down", status=503, type="server_error") from exc

    def close(self) -> None:
        """Refuse new jobs, cancel queued and running ones, wait for the worker."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- work (runs in the worker thread only)
    def _renderer_once(self) -> TokenRenderer:
        return renderer_for(self.loaded.tokenizer)

    def _prompt_ids(self, request: ParsedRequest) -> list[list[int]]:
        tokenizer = self.loaded.tokenizer
        if request.kind == "chat":
            return [self.loaded.chat_token_ids(list(request.messages))]
        ids = []
        for p in request.prompts:
            ids.append(list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p))
        return ids

    def _sampling(self, request: ParsedRequest, prompt_ids: list[list[int]]) -> SamplingParams:
        """The request's sampling with max_tokens settled against the context and batch limits."""
        window = self.loaded.context_window
        longest = max(len(ids) for ids in prompt_ids)
        rows = len(prompt_ids) * request.n
        param = "messages" if request.kind == "chat" else "prompt"
        room = min(window - longest, self.max_batch_tokens // rows - longest)
        if request.max_tokens is None:
            if room < 1:
                raise RequestError(
                    f"the prompt has {longest} tokens, which leaves no room to generate: the context window is "
                    f"{window} tokens and the per-request limit is {self.max_batch_tokens} tokens over "
                    f"{rows} rows",
                    param=param,
                    code="context_length_exceeded",
                )
            return replace(request.sampling, max_new_tokens=min(self.defaults.max_tokens, room))
        if longest + request.max_tokens > window:
            raise RequestError(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{longest + request.max_tokens} tokens ({longest} in the {param}, {request.max_tokens} in the "
                "completion). Please reduce the length of the prompt or the completion.",
                param=param,
                code="context_length_exceeded",
            )
        need = rows * (longest + request.max_tokens)
        if need > self.max_batch_tokens:
            raise RequestError(
                f"n={request.n} x {len(prompt_ids)} prompt(s) x ({longest} prompt + {request.max_tokens} completion "
                f"tokens) = {need} tokens exceeds this server's per-request limit of {self.max_batch_tokens}; "
                "lower n or max_tokens",
                param="n",
                code="request_too_large",
            )
        return replace(request.sampling, max_new_tokens=request.max_tokens)

    def _generate(self, job: _Job, on_text: Callable[[int, int, str], None] | None = None) -> GenerationResult:
        request = job.request
        prompt_ids = self._prompt_ids(request)
        sampling = self._sampling(request, prompt_ids)
        try:
            return self.engine.generate(
                prompt_ids, sampling, request.esamp, on_text=on_text, cancel=job.cancel, add_special_tokens=False
            )
        except ValueError as exc:  # the engine validates its inputs with ValueError
            raise RequestError(str(exc)) from exc

    def _choice(self, request: ParsedRequest, candidate: Candidate, index: int) -> dict[str, Any]:
        logprobs = None
        if request.logprobs:
            chat = chat_logprobs(
                candidate, self._renderer_once(), self.loaded.eos_token_ids, top=request.top_logprobs, wire=True
            )
            logprobs = chat if request.kind == "chat" else completion_logprobs(chat)
        if request.kind == "chat":
            message = {"role": "assistant", "content": candidate.text, "refusal": None}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": candidate.finish_reason}
        return {"index": index, "text": candidate.text, "logprobs": logprobs, "finish_reason": candidate.finish_reason}

    def complete(self, job: _Job) -> dict[str, Any]:
        """A whole (non-streamed) response body."""
        request = job.request
        result = self._generate(job)
        choices = []
        for p, prompt_result in enumerate(result):
            for c in prompt_result.candidates:
                choices.append(self._choice(request, c, p * request.n + c.index))
        chat = request.kind == "chat"
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": choices,
            "usage": request_usage(result),
            "system_fingerprint": None,
        }

    def stream_worker(self, job: _Job) -> None:
        """Decode one candidate, posting ("text", delta) events and then ("done", body parts)."""
        assert job.events is not None
        events = job.events
        result = self._generate(job, on_text=lambda _p, _s, delta: events.put(("text", delta)))
        candidate = result[0].candidates[0]
        events.put(("done", (self._choice(job.request, candidate, 0), request_usage(result))))


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request; the backend and limits are class attributes set by :class:`Server`."""

    protocol_version = "HTTP/1.1"
    server_version = "esamp-agents"
    timeout = 300  # seconds an idle keep-alive connection is kept
    backend: OpenAIBackend
    max_body_bytes: int
    api_key: str | None
    log_stream: TextIO | None

    def log_message(self, format: str, *args: Any) -> None:
        if self.log_stream is not None:
            self.log_stream.write(f"{self.address_string()} - {format % args}\n")
            self.log_stream.flush()

    # ---- plumbing
    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, error.body())

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _authorised(self) -> bool:
        if not self.api_key:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.api_key}"

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send Content-Length", status=411)
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RequestError(f"Content-Length={length_header!r} is missing or invalid", status=411)
        if length > self.max_body_bytes:
            self.close_connection = True  # the body stays unread
            raise RequestError(
                f"the request body has {length} bytes; this server accepts at most {self.max_body_bytes}",
                status=413,
                code="request_too_large",
            )
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(
                f"We could not parse the JSON body of your request ({exc}); send a JSON object",
                code="invalid_json",
            ) from exc

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            if not self._authorised():
                if self.command == "POST":
                    self.close_connection = True
                raise RequestError(
                    "Incorrect API key provided", status=401, code="invalid_api_key", type="invalid_request_error"
                )
            fn()
        except RequestError as exc:
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # anything else is our bug: report it, keep serving
            self.close_connection = True
            self._send_error(
                RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error")
            )

    # ---- routes
    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        path = self._path()
        if path == "/v1/models":
            self._send_json(200, self.backend.models())
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            self.backend.check_model(name)
            self._send_json(200, {**self.backend.model_card(), "id": name})
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif path in ("/v1/chat/completions", "/v1/completions"):
            raise RequestError(f"use POST for {path}", status=405, code="method_not_allowed")
        else:
            raise RequestError(f"Unknown request URL: GET {path}", status=404, code="unknown_url")

    def _post(self) -> None:
        path = self._path()
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
        if path not in kinds:
            self.close_connection = True  # its body stays unread
            raise RequestError(f"Unknown request URL: POST {path}", status=404, code="unknown_url")
        body = self._read_json()
        request = self.backend.parse(body, kinds[path])
        job = _Job(request)
        if request.stream:
            self._stream(job)
            return
        future = self.backend.submit(job, self.backend.complete)
        self._send_json(200, self._wait(future, job))

    def _wait(self, future: Future[Any], job: _Job) -> Any:
        try:
            return future.result()
        except CancelledError as exc:
            raise RequestError("the server is shutting down", status=503, type="server_error") from exc
        except RequestError:
            raise
        except Exception as exc:
            job.cancel.set()
            raise RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error") from exc

    def _stream(self, job: _Job) -> None:
        job.events = queue.Queue()
        future = self.backend.submit(job, self.backend.stream_worker)
        future.add_done_callback(lambda f: _post_failure(job, f))
        events = _events(job.events)
        # The first event decides the status: a too-long prompt is a 400, not a broken stream.
        first = next(events)
        if first[0] == "error":
            self._wait(future, job)  # raises the RequestError or a 500
            return
        request = job.request
        chat = request.kind == "chat"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": self.backend.served_name,
                "choices": [choice] if choice is not None else [],
            }
            if request.include_usage:
                body["usage"] = usage
            return body

        def delta(text: str, first_chunk: bool = False) -> dict[str, Any]:
            if chat:
                d: dict[str, Any] = {"content": text}
                if first_chunk:
                    d = {"role": "assistant", "content": text}
                return {"index": 0, "delta": d, "logprobs": None, "finish_reason": None}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": None}

        try:
            if chat:
                self._sse(chunk(delta("", first_chunk=True)))
            for kind, payload in _chain([first], events):
                if kind == "text":
                    if payload:
                        self._sse(chunk(delta(payload)))
                elif kind == "done":
                    choice, usage = payload
                    last = delta("")
                    last["logprobs"] = choice["logprobs"]
                    last["finish_reason"] = choice["finish_reason"]
                    if chat:
                        last["delta"] = {}
                    self._sse(chunk(last))
                    if request.include_usage:
                        self._sse(chunk(None, usage))
                    break
                else:  # an error after the stream started: report it in the stream, then end
                    try:
                        self._wait(future, job)
                        error = RequestError("the stream ended unexpectedly", status=500, type="server_error")
                    except RequestError as exc:
                        error = exc
                    self._sse(error.body())
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away: stop decoding
            job.cancel.set()

    def _sse(self, body: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(body, allow_nan=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()


def _post_failure(job: _Job, future: Future[Any]) -> None:
    """Wake the streaming handler when its job failed or was cancelled before any event."""
    if job.events is not None and (future.cancelled() or future.exception() is not None):
        job.events.put(("error", None))


def _events(events: queue.Queue[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    while True:
        item = events.get()
        yield item
        if item[0] != "text":
            return


def _chain(head: list[tuple[str, Any]], rest: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    yield from head
    if head and head[-1][0] != "text":
        return
    yield from rest


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


# --------------------------------------------------------------------------- Server


def _check_port(port: Any) -> int:
    if not _is_int(port) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} is out of range; allowed: 0 <= port <= 65535 (0 = any free port)")
    return int(port)


def _positive(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
    return int(value)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """The OpenAI-compatible server in a background thread.

    >>> with Server("embedded", port=0) as server:  # doctest: +SKIP
    ...     client = openai.OpenAI(base_url=server.url, api_key="unused")
    ...     client.chat.completions.create(model="embedded", messages=[...], n=4, logprobs=True)

    ``model`` is a name/path (loaded on :meth:`start`) or a :class:`LoadedModel`. ``port=0``
    picks a free port (read it from :attr:`port` / :attr:`url` after ``start``). ``api_key``
    makes every request present ``Authorization: Bearer <api_key>``.
    """

    def __init__(
        self,
        model: LoadedModel | str = EMBEDDED,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        served_name: str | None = None,
        accept_any_model: bool = False,
        defaults: ServeDefaults | None = None,
        device: str | None = None,
        dtype: str = "auto",
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        log_stream: TextIO | None = None,
    ) -> None:
        if not isinstance(model, (str, LoadedModel)) or (isinstance(model, str) and not model.strip()):
            raise ValueError(f"model={model!r} is invalid; allowed: 'embedded', an HF id or path, or a LoadedModel")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host={host!r} is invalid; allowed: an address such as '127.0.0.1'")
        self.host = host
        self._port = _check_port(port)
        if served_name is not None and (not isinstance(served_name, str) or not served_name.strip()):
            raise ValueError(f"served_name={served_name!r} is empty; allowed: a non-empty string")
        if not isinstance(accept_any_model, bool):
            raise ValueError(f"accept_any_model={accept_any_model!r} must be True or False")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ValueError("api_key='' is empty; allowed: a non-empty string or None")
        self.max_body_bytes = _positive("max_body_bytes", max_body_bytes)
        self.max_batch_tokens = _positive("max_batch_tokens", max_batch_tokens)
        self.max_queue = _positive("max_queue", max_queue)
        self.defaults = defaults or ServeDefaults()
        _positive("defaults.max_tokens", self.defaults.max_tokens)
        self.model = model
        self.served_name = served_name
        self.accept_any_model = accept_any_model
        self.device = device
        self.dtype = dtype
        self.api_key = api_key
        self.log_stream = log_stream
        self.backend: OpenAIBackend | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            return self._port
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The OpenAI ``base_url`` (``http://HOST:PORT/v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Server:
        """Load the model (if named), bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError(f"the server is already running at {self.url}")
        loaded = self.model if isinstance(self.model, LoadedModel) else None
        if loaded is None:
            loaded = load_model(str(self.model), device=self.device, dtype=self.dtype)
        served = self.served_name
        if served is None:
            served = str(self.model) if isinstance(self.model, str) else loaded.name
            if served.startswith(f"{EMBEDDED}:"):  # the embedded model's identity names its file too
                served = EMBEDDED
        self.backend = OpenAIBackend(
            loaded,
            served_name=served,
            accept_any_model=self.accept_any_model,
            defaults=self.defaults,
            max_batch_tokens=self.max_batch_tokens,
            max_queue=self.max_queue,
        )
        handler = type(
            "ESampHandler",
            (_Handler,),
            {
                "backend": self.backend,
                "max_body_bytes": self.max_body_bytes,
                "api_key": self.api_key,
                "log_stream": self.log_stream,
            },
        )
        self._httpd = _HTTPServer((self.host, self._port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="esamp-serve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cancel queued and running work, release the port."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self.backend is not None:
            self.backend.close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(
    model: LoadedModel | str = EMBEDDED,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    out: TextIO | None = None,
    stop_event: threading.Event | None = None,
    **kwargs: Any,
) -> None:
    """Run the server until Ctrl-C (or ``stop_event``); ``kwargs`` go to :class:`Server`."""
    out = out if out is not None else sys.stdout
    server = Server(model, host=host, port=port, **kwargs)
    if not is_loopback(host):
        print(
            f"warning: serving on {host}, reachable from other machines"
            + ("" if kwargs.get("api_key") else " with no API key (--api-key)"),
            file=sys.stderr,
        )
    server.start()
    assert server.backend is not None
    print(f"serving {server.backend.served_name!r} at {server.url} (Ctrl-C stops)", file=out, flush=True)
    try:
        (stop_event or threading.Event()).wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


# --------------------------------------------------------------------------- CLI


def add_serve_command(subparsers: Any, add_model_args: Callable[[argparse.ArgumentParser], None] | None = None) -> Any:
    """Register ``serve`` on the main parser's subparsers (``add_model_args`` adds --model/--device/--dtype)."""
    s = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat/completions, completions, models) with ESamp",
        description="Serve the local model over OpenAI's API with Exploratory Sampling: any OpenAI client "
        "(or ChatOpenAI(base_url=...)) gets n diverse candidates with logprobs. Extra body field 'beta' "
        "sets ESamp's strength per request.",
    )
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}, loopback only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    if add_model_args is not None:
        add_model_args(s)
    else:
        s.add_argument("--model", default=EMBEDDED, help="'embedded', an HF model id, or a local path")
        s.add_argument("--device", default=None, help="torch device (default: cuda if available)")
        s.add_argument("--dtype", default="auto", help="weights dtype: auto, float32, bfloat16, float16")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    s.add_argument("--accept-any-model", action="store_true", help="serve any requested model name")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    s.add_argument(
        "--preset",
        choices=ESAMP_PRESETS,
        default="default",
        help="ESamp settings for requests: default (the package's) or paper (beta 0.25, no warm start)",
    )
    s.add_argument("--beta", type=float, default=None, help="default ESamp strength (0 = off; default: the preset's)")
    s.add_argument("--temperature", type=float, default=1.0, help="default temperature (default 1, as OpenAI)")
    s.add_argument("--top-k", type=int, default=0, help="default top-k filter (default 0 = off, as OpenAI)")
    s.add_argument(
        "--default-max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"max_tokens when a request gives none (default {DEFAULT_MAX_TOKENS})",
    )
    s.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help="per-request limit on n x (prompt + max_tokens) (bounds the KV cache)",
    )
    s.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests waiting before 503")
    s.add_argument("--log-requests", action="store_true", help="log each request to stderr")
    return s


def run_serve(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``esamp-agents serve``: validate everything, load the model, serve until Ctrl-C."""
    _check_port(args.port)
    for name in ("default_max_tokens", "max_batch_tokens", "max_queue"):
        _positive(name.replace("_", "-"), getattr(args, name))
    esamp = esamp_preset(args.preset, beta=args.beta)
    SamplingParams(temperature=args.temperature, top_k=args.top_k)  # range checks only
    defaults = ServeDefaults(
        temperature=args.temperature, top_k=args.top_k, max_tokens=args.default_max_tokens, esamp=esamp
    )
    try:
        serve_forever(
            args.model,
            args.host,
            args.port,
            out=out,
            served_name=args.served_model_name,
            accept_any_model=args.accept_any_model,
            defaults=defaults,
            device=args.device,
            dtype=args.dtype,
            api_key=args.api_key,
            max_batch_tokens=args.max_batch_tokens,
            max_queue=args.max_queue,
            log_stream=sys.stderr if args.log_requests else None,
        )
    except OSError as exc:  # e.g. the port is taken
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    return 0


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "OpenAIBackend",
    "ParsedRequest",
    "RequestError",
    "ServeDefaults",
    "Server",
    "add_serve_command",
    "is_loopback",
    "parse_request",
    "run_serve",
    "serve_forever",
]
