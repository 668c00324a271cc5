"""The OpenAI-compatible HTTP server (``esamp-agents serve``).

- :mod:`~esamp_agents.serving.protocol`: request parsing and validation (no engine, no HTTP);
- :mod:`~esamp_agents.serving.backend`: the job queue and the one engine worker (no HTTP);
- :mod:`~esamp_agents.serving.http`: the ``http.server`` front end, :class:`Server`, :func:`serve_forever`.
"""

from __future__ import annotations

from esamp_agents.serving.http import Server, serve_forever

__all__ = ["Server", "serve_forever"]
