"""The OpenAI-compatible HTTP server (``esamp-agents serve``).

- :mod:`~esamp_agents.serving.protocol`: request parsing and validation (no engine, no HTTP);
- :mod:`~esamp_agents.serving.backend`: the job queue and the one engine worker (no HTTP);
- :mod:`~esamp_agents.serving.app`: the ASGI app (FastAPI): routes, API key, streaming;
- :mod:`~esamp_agents.serving.schema`: pydantic models of the API, for ``/openapi.json``;
- :mod:`~esamp_agents.serving.metrics`: the Prometheus metrics of ``/metrics``;
- :mod:`~esamp_agents.serving.server`: :class:`Server` (uvicorn in a thread), :func:`serve_forever`.

FastAPI and uvicorn come with ``pip install 'esamp-agents[serve]'``; importing this package
needs neither (starting a server does).
"""

from __future__ import annotations

from esamp_agents.serving.server import Server, serve_forever

__all__ = ["Server", "serve_forever"]
