"""OpenAI's wire shapes for local candidates: token rendering, logprobs and usage.

One module for the LangChain classes and the server alike (it imports no LangChain), so the
metadata a ``ChatESamp`` user reads and the JSON an OpenAI client receives cannot drift.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from esamp_agents.decoding.results import Candidate, GenerationResult, PromptResult

# OpenAI's JSON has no -inf: a token the filters removed gets this logprob on the wire.
LOGPROB_PLACEHOLDER = -9999.0


class TokenRenderer:
    """Token ids -> OpenAI ``{token, bytes, logprob}`` entries, exact bytes for byte-level BPE.

    Building one inspects the tokenizer; use :func:`renderer_for` to share one per tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = backend is not None and "ByteLevel" in repr(getattr(backend, "decoder", ""))
        self._byte_decoder: dict[str, int] = {}
        self._ids_by_bytes: dict[bytes, int] | None = None
        if self._byte_level:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_decoder = {v: k for k, v in bytes_to_unicode().items()}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id])
        if self._byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(ch in self._byte_decoder for ch in piece):
                return text, [self._byte_decoder[ch] for ch in piece]
        return text, list(text.encode("utf-8"))

    def ids_by_bytes(self) -> dict[bytes, int]:
        """Every token's exact bytes -> its id (the lowest id when two tokens spell the same bytes):
        maps an API's tokens, which arrive as bytes, back to this tokenizer's ids."""
        if self._ids_by_bytes is None:
            table: dict[bytes, int] = {}
            for tid in range(len(self.tokenizer)):
                table.setdefault(bytes(self.token(tid)[1]), tid)
            self._ids_by_bytes = table
        return self._ids_by_bytes

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.token(token_id)
        return {"token": text, "bytes": raw, "logprob": float(logprob)}


_renderers: weakref.WeakKeyDictionary[Any, TokenRenderer] = weakref.WeakKeyDictionary()
_renderers_lock = threading.Lock()


def renderer_for(tokenizer: Any) -> TokenRenderer:
    """The shared :class:`TokenRenderer` of ``tokenizer`` (built once, dropped with it)."""
    with _renderers_lock:
        renderer = _renderers.get(tokenizer)
        if renderer is None:
            renderer = _renderers[tokenizer] = TokenRenderer(tokenizer)
        return renderer


def content_token_count(candidate: Candidate, eos_ids: Iterable[int]) -> int:
    """Tokens that belong to the text: the closing end-of-turn token is not shown."""
    count = len(candidate.token_ids)
    if count and candidate.stop_sequence is None and candidate.token_ids[-1] in set(eos_ids):
        count -= 1
    return count


def wire_logprob(x: float) -> float:
    """A logprob JSON can carry (non-finite values -> :data:`LOGPROB_PLACEHOLDER`)."""
    return float(x) if math.isfinite(x) else LOGPROB_PLACEHOLDER


def chat_logprobs(
    candidate: Candidate,
    renderer: TokenRenderer,
    eos_ids: Sequence[int],
    *,
    top: int | None = None,
    wire: bool = False,
) -> dict[str, Any]:
    """``{"content": [{token, bytes, logprob, top_logprobs}]}`` as in OpenAI chat completions.

    ``top`` keeps the first ``top`` alternatives (default: all recorded); ``wire=True`` makes it
    JSON-safe (non-finite logprobs -> :data:`LOGPROB_PLACEHOLDER`) and adds ``refusal: None``.
    """
    content = [
        token_logprob_entry(
            renderer,
            candidate.token_ids[i],
            candidate.logprobs[i],
            candidate.top_logprobs[i] if candidate.top_logprobs else [],
            top=top,
            wire=wire,
        )
        for i in range(content_token_count(candidate, eos_ids))
    ]
    return {"content": content, "refusal": None} if wire else {"content": content}


def token_logprob_entry(
    renderer: TokenRenderer,
    token_id: int,
    logprob: float,
    alternatives: Sequence[tuple[int, float]],
    *,
    top: int | None = None,
    wire: bool = False,
) -> dict[str, Any]:
    """One token's ``{token, bytes, logprob, top_logprobs}`` (the first ``top`` alternatives;
    ``wire``: non-finite logprobs -> :data:`LOGPROB_PLACEHOLDER`)."""
    fix = wire_logprob if wire else float
    item = renderer.entry(token_id, fix(logprob))
    kept = alternatives if top is None else alternatives[:top]
    item["top_logprobs"] = [renderer.entry(tid, fix(lp)) for tid, lp in kept]
    return item


def completion_logprobs(chat: dict[str, Any]) -> dict[str, Any]:
    """Chat-shaped logprobs -> the legacy completions shape (tokens, token_logprobs, ...)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for item in chat["content"]:
        tokens.append(item["token"])
        token_logprobs.append(item["logprob"])
        alternatives: dict[str, float] = {}
        for alt in item["top_logprobs"]:
            alternatives.setdefault(alt["token"], alt["logprob"])
        top.append(alternatives)
        offsets.append(offset)
        offset += len(item["token"])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def prompt_usage(result: PromptResult) -> dict[str, int]:
    """OpenAI ``usage`` of one prompt and all its candidates."""
    prompt_tokens = len(result.prompt_token_ids)
    completion = sum(c.completion_tokens for c in result.candidates)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def request_usage(result: GenerationResult) -> dict[str, int]:
    """OpenAI ``usage`` of a whole request (all prompts)."""
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for pr in result:
        for key, value in prompt_usage(pr).items():
            total[key] += value
    return total


__all__ = [
    "LOGPROB_PLACEHOLDER",
    "TokenRenderer",
    "chat_logprobs",
    "completion_logprobs",
    "content_token_count",
    "prompt_usage",
    "renderer_for",
    "request_usage",
    "token_logprob_entry",
    "wire_logprob",
]
