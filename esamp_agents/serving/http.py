"""``esamp-agents serve`` over HTTP: an OpenAI-compatible server on the standard library.

So any OpenAI client (the ``openai`` package, ``ChatOpenAI(base_url=...)``, curl) gets N
diverse candidates with logprobs from the local model. ``ThreadingHTTPServer`` parses requests
in parallel and hands them to the :class:`~esamp_agents.serving.backend.OpenAIBackend`, whose one
worker thread owns the engine; this module only maps HTTP to the backend (routes, bodies,
API key, server-sent events). Request fields are described in :mod:`esamp_agents.serving.protocol`.

Endpoints (under ``/v1``): ``POST /chat/completions``, ``POST /completions``, ``GET /models``,
``GET /models/{id}``; ``GET /health`` answers ``{"status": "ok"}``. Defaults for fields a request
leaves out: ``temperature`` 1, ``top_p`` 1, ``max_tokens`` 256 (capped by the context window),
``top_k`` 0 (off, as OpenAI has none), ESamp's ``beta`` from ``--preset`` or ``--beta``.

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
With tools offered, a stream holds the reply back and sends it at the end: as
``delta.tool_calls`` (OpenAI's chunk shape) when it is a complete tool call, else as text.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, load_model
from esamp_agents.serving.backend import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_QUEUE,
    Job,
    OpenAIBackend,
    stream_tail,
    text_delta,
)
from esamp_agents.serving.protocol import RequestError, ServeDefaults, _is_int

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


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
        job = Job(request)
        if request.stream:
            self._stream(job)
            return
        future = self.backend.submit(job, self.backend.complete)
        self._send_json(200, self._wait(future, job))

    def _wait(self, future: Future[Any], job: Job) -> Any:
        try:
            return future.result()
        except CancelledError as exc:
            raise RequestError("the server is shutting down", status=503, type="server_error") from exc
        except RequestError:
            raise
        except Exception as exc:
            job.cancel.set()
            raise RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error") from exc

    def _stream(self, job: Job) -> None:
        future, events = self.backend.start_stream(job)
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

        try:
            if chat:
                self._sse(chunk(text_delta(request, "", first=True)))
            for kind, payload in _chain([first], events):
                if kind == "text":
                    if payload:
                        self._sse(chunk(text_delta(request, payload)))
                elif kind == "done":
                    choice, usage = payload
                    for part in stream_tail(request, choice):
                        self._sse(chunk(part))
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


def _chain(head: list[tuple[str, Any]], rest: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    yield from head
    if head and head[-1][0] != "text":
        return
    yield from rest


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


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


__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_PORT", "Server", "is_loopback", "serve_forever"]
