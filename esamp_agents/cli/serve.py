"""The ``esamp-agents serve`` command: its arguments, checked before the model loads, then
:func:`esamp_agents.serving.serve_forever`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

from esamp_agents.cli.flags import add_param_flag, param_flag_values
from esamp_agents.decoding.loading import EMBEDDED
from esamp_agents.decoding.params import DEFAULT_MAX_BATCH_ROWS, ESAMP_PRESETS, build_params, esamp_preset
from esamp_agents.serving.backend import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_QUEUE
from esamp_agents.serving.protocol import DEFAULT_MAX_TOKENS, ServeDefaults
from esamp_agents.serving.server import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT,
    _check_port,
    _positive,
    require_serve_dependencies,
    serve_forever,
)

# The request defaults this command sets, flags from the parameter table; the sampling ones
# default to OpenAI's (a client that sends no temperature gets 1, no top-k filter).
SERVE_FLAGS: dict[str, dict[str, Any]] = {
    "beta": {"default": None, "default_text": "default: the preset's"},
    "temperature": {"default": 1.0, "default_text": "default 1, as OpenAI"},
    "top_k": {"default": 0, "default_text": "default 0 = off, as OpenAI"},
}


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
    for name, options in SERVE_FLAGS.items():
        add_param_flag(s, name, **options)
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
    s.add_argument(
        "--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests waiting before a 503 with Retry-After"
    )
    s.add_argument(
        "--max-batch-rows",
        type=int,
        default=DEFAULT_MAX_BATCH_ROWS,
        help=f"rows (prompts x n, over all requests) decoded together (default {DEFAULT_MAX_BATCH_ROWS})",
    )
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body accepted (default {DEFAULT_MAX_BODY_BYTES}; larger ones get a 413)",
    )
    s.add_argument("--log-requests", action="store_true", help="log each request to stderr")
    return s


def run_serve(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``esamp-agents serve``: validate everything, load the model, serve until Ctrl-C."""
    _check_port(args.port)
    for name in ("default_max_tokens", "max_batch_tokens", "max_queue", "max_batch_rows", "max_body_bytes"):
        _positive(name.replace("_", "-"), getattr(args, name))
    sampling, esamp = build_params(param_flag_values(args, SERVE_FLAGS), esamp=esamp_preset(args.preset))
    defaults = ServeDefaults(
        temperature=sampling.temperature, top_k=sampling.top_k, max_tokens=args.default_max_tokens, esamp=esamp
    )
    try:
        require_serve_dependencies()  # before the model loads
    except ImportError as exc:
        raise ValueError(str(exc)) from None
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
            max_batch_rows=args.max_batch_rows,
            max_body_bytes=args.max_body_bytes,
            log_stream=sys.stderr if args.log_requests else None,
        )
    except OSError as exc:  # e.g. the port is taken
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    return 0


__all__ = ["add_serve_command", "run_serve"]
