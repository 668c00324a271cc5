"""The ASGI front end of ``esamp-agents serve``: a FastAPI app over the engine backend.

This module routes, authenticates and streams; it never validates a field itself: a body is
read raw (bounded by ``max_body_bytes``) and handed to :func:`esamp_agents.serving.protocol.parse_request`
through the backend, whose :class:`~esamp_agents.serving.protocol.RequestError` becomes OpenAI's
error shape ``{"error": {"message", "type", "param", "code"}}`` with its status (400 for a bad
request, never FastAPI's 422). The pydantic models of :mod:`esamp_agents.serving.schema` only
document the API in ``/openapi.json``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /health`` (also ``/v1/health``), ``GET /metrics``
(Prometheus text, :mod:`esamp_agents.serving.metrics`), ``GET /openapi.json`` and ``/docs``.
With an API key every endpoint but ``/health``, ``/openapi.json`` and ``/docs`` needs
``Authorization: Bearer <key>`` (else 401). Statuses: 400 bad request, 401 wrong key, 404
unknown model or path, 405 wrong method, 413 body over the limit, 503 queue full or shutting
down (with ``Retry-After``), 500 internal error (with its message).

Streams (``stream: true``, any ``n``, any number of prompts) are server-sent events
``data: {chunk}`` and ``data: [DONE]``: each choice (``choices[0].index`` = prompt x n + sample)
gets its own chunks as its text grows, then a closing chunk with its ``finish_reason`` and, when
requested, logprobs chunk by chunk (each text chunk carries its tokens'; the closing chunk the rest); with
``stream_options.include_usage`` a last chunk carries the usage and no choices. With tools
offered, a choice's reply is held back and sent at its end (as ``delta.tool_calls`` when it is a
complete tool call). The first event decides the status, so a prompt too long for the context
is a 400, not a broken stream. A client that disconnects cancels its request (queued or
decoding); the worker moves on to the next.

No LangChain here (the server imports none).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TextIO

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from esamp_agents.serving import schema
from esamp_agents.serving.backend import Job, OpenAIBackend, stream_tail, text_delta
from esamp_agents.serving.protocol import RequestError

RETRY_AFTER_S = 1
"""Seconds a 503 (queue full, shutting down) asks the client to wait (``Retry-After``)."""
OPEN_PATHS = frozenset({"/health", "/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
"""Paths served without the API key (liveness probes and the schema)."""
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/v1/health", "/metrics")
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schema.ErrorResponse, "description": text}
    for status, text in (
        (400, "a bad request (names the field, its value and what is allowed)"),
        (401, "a wrong or missing API key"),
        (404, "an unknown model"),
        (413, "a body over the size limit"),
        (503, "the queue is full or the server is stopping (see Retry-After)"),
    )
}


def _error_response(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _internal(exc: BaseException) -> RequestError:
    return RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error")


def endpoint_label(path: str) -> str:
    """The metrics label of a path: its route (``/v1/models/{model}``) or ``other``."""
    path = path.rstrip("/") or "/"
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class _Gate:
    """Pure ASGI middleware: the API key, request counts for ``/metrics`` and the request log."""

    def __init__(self, app: Any, backend: OpenAIBackend, api_key: str | None, log_stream: TextIO | None) -> None:
        self.app, self.backend, self.api_key, self.log_stream = app, backend, api_key, log_stream

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key and path not in OPEN_PATHS and not self._authorised(scope):
                error = RequestError(
                    "Incorrect API key provided; send 'Authorization: Bearer <the server's --api-key>'",
                    status=401,
                    code="invalid_api_key",
                )
                await _error_response(error)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.backend.metrics.request(endpoint_label(path), status)
            if self.log_stream is not None:
                client = scope.get("client") or ("-", 0)
                self.log_stream.write(f"{client[0]} - {scope['method']} {path} {status}\n")
                self.log_stream.flush()

    def _authorised(self, scope: dict[str, Any]) -> bool:
        expected = f"Bearer {self.api_key}".encode()
        return any(k == b"authorization" and v == expected for k, v in scope.get("headers", ()))


class _EventStream(Response):
    """A server-sent event stream that notices its client leaving (then cancels the job)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        self.chunks = chunks
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_disconnect()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            self.on_disconnect()
        finally:
            watcher.cancel()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, allow_nan=False).encode("utf-8") + b"\n\n"


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            length = -1
        if length < 0:
            raise RequestError(f"Content-Length={declared!r} is invalid; allowed: the body's size in bytes")
        if length > limit:
            raise RequestError(
                f"the request body has {length} bytes; this server accepts at most {limit} (--max-body-bytes)",
                status=413,
                code="request_too_large",
            )
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise RequestError(
                f"the request body has more than {limit} bytes; this server accepts at most {limit}",
                status=413,
                code="request_too_large",
            )
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(
            f"We could not parse the JSON body of your request ({exc}); send a JSON object",
            code="invalid_json",
        ) from None


async def _cancel_on_disconnect(receive: Callable[..., Any], job: Job) -> None:
    """After the body is read, the next ASGI message is the client leaving: cancel the job then."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()


async def _result(future: Future[Any], job: Job) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if future.cancelled():  # the backend dropped it (shutting down), not our caller
            raise RequestError("the server is shutting down", status=503, type="server_error") from None
        job.cancel.set()
        raise
    except RequestError:
        raise
    except Exception as exc:
        job.cancel.set()
        raise _internal(exc) from exc


def create_app(
    backend: OpenAIBackend,
    *,
    api_key: str | None = None,
    max_body_bytes: int,
    log_stream: TextIO | None = None,
) -> Any:
    """The ASGI app (FastAPI inside the :class:`_Gate` middleware) serving ``backend``."""
    app = FastAPI(
        title="esamp-agents serve",
        version="1",
        summary="OpenAI-compatible API over a local model with Exploratory Sampling",
        redoc_url=None,
    )

    @app.exception_handler(RequestError)
    async def on_request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            error = RequestError(f"Unknown request URL: {where}", status=404, code="unknown_url")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = RequestError(
                f"{where} is not allowed; allowed methods: {allowed}", status=405, code="method_not_allowed"
            )
        else:
            error = RequestError(str(exc.detail), status=exc.status_code)
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(RequestError(f"{param}: {first.get('msg', exc)}", param=param))

    @app.exception_handler(Exception)
    async def on_bug(_request: Request, exc: Exception) -> JSONResponse:
        return _error_response(_internal(exc))

    async def complete(request: Request, kind: str) -> Response:
        arrived = time.perf_counter()
        body = await _read_json(request, max_body_bytes)
        parsed = backend.parse(body, kind)
        job = Job(parsed)
        if parsed.stream:
            return await stream(job, arrived)
        future = backend.submit(job, backend.complete)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request.receive, job))
        try:
            return JSONResponse(await _result(future, job))
        finally:
            watcher.cancel()

    async def stream(job: Job, arrived: float) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(item: tuple[str, Any]) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                job.cancel.set()

        future = backend.start_stream(job, post)
        first = await events.get()
        if first[0] == "error":
            await _result(future, job)  # raises the RequestError (a 400 for a too-long prompt) or a 500
            raise _internal(RuntimeError("the stream ended before it began"))
        backend.metrics.first_token(time.perf_counter() - arrived)
        request = job.request
        chat = request.kind == "chat"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        rows = max(1, len(request.prompts)) * request.n

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            out: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": backend.served_name,
                "choices": choices,
            }
            if request.include_usage:
                out["usage"] = usage
            return _sse(out)

        async def chunks() -> AsyncIterator[bytes]:
            finished = False
            try:
                if chat:
                    for i in range(rows):
                        yield chunk([text_delta(request, "", first=True, index=i)])
                item = first
                while True:
                    kind, payload = item
                    if kind == "text":
                        index, delta, logprobs = payload
                        if delta:
                            yield chunk([text_delta(request, delta, index=index, logprobs=logprobs)])
                    elif kind == "done":
                        choices, usage = payload
                        for choice in choices:
                            for part in stream_tail(request, choice):
                                yield chunk([part])
                        if request.include_usage:
                            yield chunk([], usage)
                        break
                    elif kind == "error":  # after the stream started: report it in the stream, then end
                        try:
                            await _result(future, job)
                            error = _internal(RuntimeError("the stream ended unexpectedly"))
                        except RequestError as exc:
                            error = exc
                        yield _sse(error.body())
                        break
                    else:  # "disconnect"
                        return
                    item = await events.get()
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:
                    job.cancel.set()

        def disconnected() -> None:
            job.cancel.set()
            events.put_nowait(("disconnect", None))

        return _EventStream(chunks(), disconnected)

    chat_doc = {"200": {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={
            200: {"model": schema.ChatCompletion, "description": "the completion, or an SSE stream"},
            **_ERRORS,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
            },
            "responses": chat_doc,
        },
        summary="Create a chat completion (n candidates with ESamp)",
    )
    async def chat_completions(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={
            200: {"model": schema.Completion, "description": "the completion, or an SSE stream"},
            **_ERRORS,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CompletionRequest"}}},
            },
            "responses": chat_doc,
        },
        summary="Create a text completion",
    )
    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    @app.get("/v1/models", response_model=schema.ModelList, responses={401: _ERRORS[401]})
    async def models() -> Any:
        return backend.models()

    @app.get("/v1/models/{model:path}", response_model=schema.Model, responses={401: _ERRORS[401], 404: _ERRORS[404]})
    async def model(model: str) -> Any:
        backend.check_model(model)
        return {**backend.model_card(), "id": model}

    @app.get("/health", response_model=schema.Health)
    @app.get("/v1/health", response_model=schema.Health, include_in_schema=False)
    async def health() -> Any:
        if backend.closed:
            raise RequestError("the server is shutting down", status=503, type="server_error")
        return {"status": "ok"}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(backend.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _, defs = models_json_schema(
                [(m, "validation") for m in schema.REQUEST_MODELS], ref_template="#/components/schemas/{model}"
            )
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.get("$defs", {}))
            for operations in doc["paths"].values():  # no request is refused with FastAPI's 422 here
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            if api_key:
                doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                doc["security"] = [{"bearer": []}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return _Gate(app, backend, api_key, log_stream)


__all__ = ["OPEN_PATHS", "RETRY_AFTER_S", "create_app", "endpoint_label"]
