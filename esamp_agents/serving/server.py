"""``esamp-agents serve``: :class:`Server` runs the ASGI app (:mod:`esamp_agents.serving.app`) on uvicorn.

So any OpenAI client (the ``openai`` package, ``ChatOpenAI(base_url=...)``, curl) gets N
diverse candidates with logprobs from the local model. uvicorn runs in a background thread
with its own event loop; the :class:`~esamp_agents.serving.backend.OpenAIBackend` hands requests
to the engine, whose scheduler decodes them together in one continuously batched decode (up to
``max_batch_rows`` rows, i.e. prompts x n over all requests); the rest wait in a bounded queue
(``max_queue``; beyond it a 503 with ``Retry-After``).

Defaults for fields a request leaves out: ``temperature`` 1, ``top_p`` 1, ``max_tokens`` 256
(capped by the context window), ``top_k`` 0 (off, as OpenAI has none), ESamp's ``beta`` from
``--preset`` or ``--beta``. Model names: ``/v1/models`` lists one name (``served_name``; by
default the name the model was loaded with, e.g. ``"embedded"``). A request's ``model`` must
be that name or the loaded model's full identity, else 404 (``model_not_found``), unless the
server runs with ``accept_any_model=True`` (``--accept-any-model``). Responses always carry
the served name.

FastAPI and uvicorn are the optional extra ``serve`` (``pip install 'esamp-agents[serve]'``);
this module imports them only when a server starts.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading
import time
from typing import Any, TextIO

from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, load_model
from esamp_agents.decoding.params import DEFAULT_MAX_BATCH_ROWS
from esamp_agents.serving.backend import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_QUEUE, OpenAIBackend
from esamp_agents.serving.fields import is_int
from esamp_agents.serving.protocol import ServeDefaults

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
SHUTDOWN_GRACE_S = 10.0
"""Seconds :meth:`Server.stop` lets open connections finish after their requests were cancelled."""
_INSTALL = "pip install 'esamp-agents[serve]'"


def require_serve_dependencies() -> None:
    """Raise ImportError naming the extra to install when FastAPI or uvicorn is missing."""
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"esamp-agents serve needs {' and '.join(missing)}, which is not installed; install it with: {_INSTALL}"
        )


def _check_port(port: Any) -> int:
    if not is_int(port) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} is out of range; allowed: 0 <= port <= 65535 (0 = any free port)")
    return int(port)


def _positive(name: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
    return int(value)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Server:
    """The OpenAI-compatible server in a background thread (uvicorn).

    >>> with Server("embedded", port=0) as server:  # doctest: +SKIP
    ...     client = openai.OpenAI(base_url=server.url, api_key="unused")
    ...     client.chat.completions.create(model="embedded", messages=[...], n=4, logprobs=True)

    ``model`` is a name/path (loaded on :meth:`start`) or a :class:`LoadedModel`. ``port=0``
    picks a free port (read it from :attr:`port` / :attr:`url` after ``start``). ``api_key``
    makes every request present ``Authorization: Bearer <api_key>`` (``/health`` and
    ``/openapi.json`` excepted). Leaving the ``with`` block (or :meth:`stop`) refuses new
    requests, cancels queued and running ones and closes the port.
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
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
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
        self.max_batch_rows = _positive("max_batch_rows", max_batch_rows)
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
        self._socket: socket.socket | None = None
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            return self._port
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """The OpenAI ``base_url`` (``http://HOST:PORT/v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def _build_backend(self) -> OpenAIBackend:
        loaded = self.model if isinstance(self.model, LoadedModel) else None
        if loaded is None:
            loaded = load_model(str(self.model), device=self.device, dtype=self.dtype)
        served = self.served_name
        if served is None:
            served = str(self.model) if isinstance(self.model, str) else loaded.name
            if served.startswith(f"{EMBEDDED}:"):  # the embedded model's identity names its file too
                served = EMBEDDED
        return OpenAIBackend(
            loaded,
            served_name=served,
            accept_any_model=self.accept_any_model,
            defaults=self.defaults,
            max_batch_tokens=self.max_batch_tokens,
            max_queue=self.max_queue,
            max_batch_rows=self.max_batch_rows,
        )

    def start(self) -> Server:
        """Load the model (if named), bind, and serve in a daemon thread; returns self once it answers."""
        if self._thread is not None:
            raise RuntimeError(f"the server is already running at {self.url}")
        require_serve_dependencies()
        import uvicorn

        from esamp_agents.serving.app import create_app

        sock = _bind(self.host, self._port)  # an OSError (port taken) comes out here, before any loading
        try:
            backend = self._build_backend()
        except BaseException:
            sock.close()
            raise
        app = create_app(backend, api_key=self.api_key, max_body_bytes=self.max_body_bytes, log_stream=self.log_stream)
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
            timeout_keep_alive=30,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="esamp-serve", daemon=True)
        self.backend, self._socket, self._uvicorn, self._thread = backend, sock, server, thread
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Refuse new requests, cancel queued and running ones, let connections close, release the port."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self.backend is not None:
            self.backend.close()  # in-flight requests end now (a stream gets its last events)
        self._uvicorn.should_exit = True
        thread.join(SHUTDOWN_GRACE_S + 5)
        if thread.is_alive():
            self._uvicorn.force_exit = True
            thread.join(5)
        if self._socket is not None:
            self._socket.close()

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
    """Serve until Ctrl-C, SIGTERM (in the main thread) or ``stop_event``; ``kwargs`` go to :class:`Server`."""
    out = out if out is not None else sys.stdout
    server = Server(model, host=host, port=port, **kwargs)
    if not is_loopback(host):
        print(
            f"warning: serving on {host}, reachable from other machines"
            + ("" if kwargs.get("api_key") else " with no API key (--api-key)"),
            file=sys.stderr,
        )
    stop = stop_event or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server.start()
        assert server.backend is not None
        print(f"serving {server.backend.served_name!r} at {server.url} (Ctrl-C stops)", file=out, flush=True)
        while not stop.wait(0.5):  # a short wait, so Ctrl-C is noticed at once
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PORT",
    "Server",
    "is_loopback",
    "require_serve_dependencies",
    "serve_forever",
]
