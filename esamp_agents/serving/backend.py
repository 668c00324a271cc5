"""The engine side of ``esamp-agents serve``: one worker thread, a bounded job queue, OpenAI bodies.

:class:`OpenAIBackend` knows nothing of HTTP (the ASGI front end is :mod:`esamp_agents.serving.app`):
it validates a body into a :class:`~esamp_agents.serving.protocol.ParsedRequest`,
queues it as a :class:`Job` and answers with an OpenAI response body (built with
:mod:`esamp_agents.openai_format`) or, streamed, with ``("text", (index, delta, logprobs))`` events
(every row of the request: ``index`` is the choice's, ``prompt * n + sample``) and a final
``("done", (choices, usage))``; :func:`text_delta` and :func:`stream_tail` shape the stream's
choices. With tools bound, a candidate whose grammar accepted its whole text becomes
``message.tool_calls`` with ``finish_reason: "tool_calls"`` (:func:`tool_call_message`); a
streamed one holds its text back and sends the calls (or the text) at the end. Up to
``max_batch_rows`` worker threads call the engine at once, and the engine's scheduler
decodes their requests in one continuously batched decode (a request joins the running
batch after its own prefill; see :mod:`esamp_agents.decoding.scheduler`); further requests
wait in a bounded queue. Failures are :class:`~esamp_agents.serving.protocol.RequestError`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from esamp_agents.decoding.loading import LoadedModel
from esamp_agents.decoding.params import DEFAULT_MAX_BATCH_ROWS, SamplingParams
from esamp_agents.decoding.results import Candidate, GenerationResult
from esamp_agents.openai_format import (
    TokenRenderer,
    chat_logprobs,
    completion_logprobs,
    renderer_for,
    request_usage,
    token_logprob_entry,
)
from esamp_agents.serving.metrics import Metrics
from esamp_agents.serving.protocol import ParsedRequest, RequestError, ServeDefaults, parse_request
from esamp_agents.tool_calling import CALL_OPEN, parse_tool_calls

DEFAULT_MAX_BATCH_TOKENS = 1 << 18
"""rows x (prompt + max_tokens) per request: bounds the preallocated KV cache."""
DEFAULT_MAX_QUEUE = 64
"""Requests waiting (for a worker or for room in the batch) before new ones get a 503."""


@dataclass(eq=False)
class Job:
    """One request in the queue: its cancel flag and, when streamed, where the worker posts its events."""

    request: ParsedRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    post: Callable[[tuple[str, Any]], None] | None = None

    @property
    def rows(self) -> int:
        """Rows decoded together: prompts x n."""
        return max(1, len(self.request.prompts)) * self.request.n


class OpenAIBackend:
    """What a front end calls: validation, the job queue and the one engine worker (no HTTP here)."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        served_name: str,
        accept_any_model: bool,
        defaults: ServeDefaults,
        max_batch_tokens: int,
        max_queue: int,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        metrics: Metrics | None = None,
        engine: Any = None,
    ) -> None:
        if engine is None:
            from esamp_agents.decoding.engine import ESampEngine

            engine = ESampEngine(loaded, max_batch_rows=max_batch_rows)
        self.loaded = loaded
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self.served_name = served_name
        self.aliases = {served_name, loaded.name}
        self.accept_any_model = accept_any_model
        self.defaults = defaults
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.created = int(time.time())
        # One thread per request inside the engine: each blocks in engine.generate while the
        # scheduler batches them; more threads than batch rows could never all be decoding.
        self._executor = ThreadPoolExecutor(max_workers=max_batch_rows, thread_name_prefix="esamp-serve-worker")
        self.metrics.gauges = self.load
        self._pending = 0  # queued + running
        self._running = 0
        self._rows_running = 0
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
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
    def submit(self, job: Job, fn: Callable[[Job], Any]) -> Future[Any]:
        with self._lock:
            if self._closed:
                raise RequestError("the server is shutting down", status=503, type="server_error", code="unavailable")
            if self._pending - self._running >= self.max_queue:
                raise RequestError(
                    f"{self._pending - self._running} requests are already queued (limit max_queue="
                    f"{self.max_queue}); retry later",
                    status=503,
                    type="server_error",
                    code="server_overloaded",
                )
            self._pending += 1
            self._jobs.add(job)

        def run() -> Any:
            with self._lock:
                self._running += 1
                self._rows_running += job.rows
            try:
                if job.cancel.is_set():
                    raise RequestError("the request was cancelled", status=503, type="server_error", code="cancelled")
                return fn(job)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._running -= 1
                    self._rows_running -= job.rows
                    self._jobs.discard(job)

        try:
            return self._executor.submit(run)
        except RuntimeError as exc:  # the executor was shut down between the check and here
            with self._lock:
                self._pending -= 1
                self._jobs.discard(job)
            raise RequestError("the server is shutting down", status=503, type="server_error") from exc

    def load(self) -> tuple[int, int]:
        """(rows being decoded, requests waiting) now: the scheduler's view when the engine batches."""
        with self._lock:
            queued, rows = self._pending - self._running, self._rows_running
        stats = getattr(getattr(self.engine, "scheduler", None), "stats", None)
        if stats is None:
            return rows, queued
        return stats.rows_in_flight, queued + stats.waiting

    @property
    def closed(self) -> bool:
        return self._closed

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
            from jinja2 import TemplateError  # what a chat template raises on a conversation it refuses

            try:
                return [self.loaded.chat_token_ids(list(request.messages), tools=request.prompt_tools)]
            except (TemplateError, ValueError) as exc:
                raise RequestError(
                    f"the model's chat template cannot render these messages: {exc}; allowed: a conversation "
                    "the template accepts (e.g. tool results right after the assistant turn that called them)",
                    param="messages",
                ) from None
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

    def _generate(
        self,
        job: Job,
        on_text: Callable[[int, int, str], None] | None = None,
        on_token: Callable[..., None] | None = None,
    ) -> GenerationResult:
        request = job.request
        prompt_ids = self._prompt_ids(request)
        sampling = self._sampling(request, prompt_ids)
        start = time.perf_counter()
        try:
            result = self.engine.generate(
                prompt_ids,
                sampling,
                request.esamp,
                on_text=on_text,
                on_token=on_token,
                cancel=job.cancel,
                add_special_tokens=False,
                grammar=request.grammar,
            )
        except ValueError as exc:  # the engine validates its inputs with ValueError
            raise RequestError(str(exc)) from exc
        tokens = sum(c.completion_tokens for r in result for c in r.candidates)
        self.metrics.generated(tokens, time.perf_counter() - start)
        return result

    def _choice(self, request: ParsedRequest, candidate: Candidate, index: int) -> dict[str, Any]:
        logprobs = None
        if request.logprobs:
            chat = chat_logprobs(
                candidate, self._renderer_once(), self.loaded.eos_token_ids, top=request.top_logprobs, wire=True
            )
            logprobs = chat if request.kind == "chat" else completion_logprobs(chat)
        if request.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": candidate.text, "refusal": None}
            finish_reason = candidate.finish_reason
            called = tool_call_message(request, candidate)
            if called is not None:
                message["content"], message["tool_calls"] = called
                finish_reason = "tool_calls"
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": candidate.text, "logprobs": logprobs, "finish_reason": candidate.finish_reason}

    def complete(self, job: Job) -> dict[str, Any]:
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

    def stream_worker(self, job: Job) -> None:
        """Decode every row, posting ("text", (index, delta, logprobs)) events and then ("done", (choices, usage)).

        ``index`` is the choice's (``prompt * n + sample``), as in :meth:`complete`; ``logprobs``
        (when requested, else None) covers the tokens drawn since the choice's previous text event,
        and each final choice's logprobs hold only the tokens no text event carried, so a choice's
        chunks together carry exactly the logprobs :meth:`complete` would. With tools offered, no
        text events: the reply is only known to be a tool call or text at its end, so
        :func:`stream_tail` sends it then."""
        post = job.post
        assert post is not None
        request = job.request
        n = request.n
        chunks = _ChunkLogprobs(self, request) if request.logprobs else None

        def on_text(p: int, s: int, delta: str) -> None:
            index = p * n + s
            post(("text", (index, delta, chunks.take(index) if chunks is not None else None)))

        text_events = not request.calls_tools
        result = self._generate(
            job,
            on_text=on_text if text_events else None,
            on_token=chunks.add if chunks is not None and text_events else None,
        )
        choices = [
            self._choice(request, c, p * n + c.index) for p, prompt_result in enumerate(result)
            for c in prompt_result.candidates
        ]  # fmt: skip
        if chunks is not None:
            for choice in choices:
                choice["logprobs"] = chunks.rest(choice["index"], choice["logprobs"])
        post(("done", (choices, request_usage(result))))

    def start_stream(self, job: Job, post: Callable[[tuple[str, Any]], None]) -> Future[Any]:
        """Queue a streamed job whose events go to ``post`` (from the worker thread): ``("text", (index,
        delta, logprobs))``..., then ``("done", (choices, usage))``, or ``("error", None)`` when the job failed or
        was cancelled (its future holds why)."""
        job.post = post
        future = self.submit(job, self.stream_worker)
        future.add_done_callback(lambda f: _post_failure(job, f))
        return future

    def stream_iter(self, job: Job) -> tuple[Future[Any], Iterator[tuple[str, Any]]]:
        """:meth:`start_stream` read as a blocking iterator (ends after "done" or "error")."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        return self.start_stream(job, events.put), _events(events)


def tool_call_message(request: ParsedRequest, candidate: Candidate) -> tuple[str | None, list[dict[str, Any]]] | None:
    """(content or None, OpenAI ``tool_calls``) of a candidate that called tools, else None.

    Only a complete call counts: the candidate's grammar accepted its whole text (not cut by
    ``max_tokens`` or a stop string) and it took the grammar's call branch (under ``"auto"`` a
    text answer may quote ``<tool_call>`` later on; that stays text). Arguments are JSON text,
    as OpenAI sends them."""
    if not request.calls_tools or candidate.extras.get("constraint_satisfied") is not True:
        return None
    if not candidate.text.startswith(CALL_OPEN):
        return None
    reply = parse_tool_calls(candidate.text, request.tools)
    if not reply.calls or reply.invalid:
        return None
    calls = [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.args, ensure_ascii=False)},
        }
        for call in reply.calls
    ]
    return reply.content or None, calls


def text_delta(
    request: ParsedRequest, text: str, first: bool = False, index: int = 0, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Streamed choice ``index`` carrying ``text`` (a choice's first chat chunk also names the role)."""
    if request.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}


class _ChunkLogprobs:
    """Per-choice logprobs of a stream: the tokens drawn since the last text event go with the next one."""

    def __init__(self, backend: OpenAIBackend, request: ParsedRequest) -> None:
        self.renderer = backend._renderer_once()
        self.request = request
        self.pending: dict[int, list[dict[str, Any]]] = {}
        self.sent: dict[int, int] = {}
        self.offset: dict[int, int] = {}  # completions: text offset of the next chunk's first token

    def add(self, p: int, s: int, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        entry = token_logprob_entry(self.renderer, token, logprob, top or [], top=self.request.top_logprobs, wire=True)
        self.pending.setdefault(p * self.request.n + s, []).append(entry)

    def take(self, index: int) -> dict[str, Any] | None:
        entries = self.pending.pop(index, [])
        if not entries:
            return None
        self.sent[index] = self.sent.get(index, 0) + len(entries)
        return self._shape(index, entries)

    def rest(self, index: int, whole: dict[str, Any] | None) -> dict[str, Any] | None:
        """The part of a choice's whole logprobs that no text event carried."""
        if whole is None:
            return None
        sent = self.sent.get(index, 0)
        if self.request.kind == "chat":
            return {**whole, "content": whole["content"][sent:]}
        return {key: values[sent:] for key, values in whole.items()}

    def _shape(self, index: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
        if self.request.kind == "chat":
            return {"content": entries, "refusal": None}
        shaped = completion_logprobs({"content": entries})
        start = self.offset.get(index, 0)
        shaped["text_offset"] = [start + o for o in shaped["text_offset"]]
        self.offset[index] = start + sum(len(e["token"]) for e in entries)
        return shaped


def stream_tail(request: ParsedRequest, choice: dict[str, Any]) -> list[dict[str, Any]]:
    """The streamed choices after the text deltas, from the whole ``choice`` (as :meth:`OpenAIBackend.complete`
    builds it): text held back while tools were offered, or the tool calls as OpenAI streams them
    (``delta.tool_calls=[{"index", "id", "type", "function": {"name", "arguments"}}]``), then the
    closing choice with ``finish_reason`` and the logprobs."""
    out: list[dict[str, Any]] = []
    index = choice["index"]
    if request.kind == "chat" and request.calls_tools:
        message = choice["message"]
        if message["content"]:
            out.append(text_delta(request, message["content"], index=index))
        for i, call in enumerate(message.get("tool_calls") or []):
            delta = {"tool_calls": [{"index": i, **call}]}
            out.append({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
    last = text_delta(request, "", index=index)
    if request.kind == "chat":
        last["delta"] = {}
    last["logprobs"] = choice["logprobs"]
    last["finish_reason"] = choice["finish_reason"]
    out.append(last)
    return out


def _post_failure(job: Job, future: Future[Any]) -> None:
    """Wake the streaming front end when its job failed or was cancelled before any event."""
    if job.post is not None and (future.cancelled() or future.exception() is not None):
        job.post(("error", None))


def _events(events: queue.Queue[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    while True:
        item = events.get()
        yield item
        if item[0] != "text":
            return


__all__ = [
    "DEFAULT_MAX_BATCH_TOKENS",
    "DEFAULT_MAX_QUEUE",
    "Job",
    "OpenAIBackend",
    "stream_tail",
    "text_delta",
    "tool_call_message",
]
