"""Sampling N chat candidates with logprobs from real OpenAI-compatible APIs, with bounded retries.

:func:`sample_with_logprobs` (and :func:`asample_with_logprobs`) asks for N candidates with
logprobs, in chunks if wanted, retrying 429/5xx/timeouts/connection errors/malformed or
truncated bodies with bounded exponential backoff, and never drops a candidate already
received: on failure, :class:`SamplingError` carries the partial result. The result scores
directly with :class:`esamp_agents.adapters.logprob_reward.LogprobReward`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from esamp_agents.adapters._fields import field_of, text_of
from esamp_agents.validation import check_int


@dataclass
class Attempt:
    """One request: which chunk, how many candidates asked and got, and what happened."""

    chunk: int
    attempt: int
    requested: int
    received: int
    outcome: str  # "ok", "partial", "rate_limited", "server_error", "timeout", "connection", "malformed", "fatal"
    detail: str = ""
    status: int | None = None
    seconds: float = 0.0


@dataclass
class SampleResult:
    """Every candidate received (OpenAI ``Choice`` objects, re-indexed 0..k-1) and the attempt log.

    Scores directly: ``LogprobReward(...).score_response(result)``.
    """

    requested: int
    model: str
    choices: list[Any] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )
    error: str | None = None

    @property
    def complete(self) -> bool:
        return len(self.choices) >= self.requested

    @property
    def texts(self) -> list[str]:
        return [text_of(field_of(field_of(c, "message"), "content")) for c in self.choices]


class SamplingError(RuntimeError):
    """Sampling gave up; ``partial`` holds every candidate received before that."""

    def __init__(self, message: str, partial: SampleResult) -> None:
        super().__init__(message)
        self.partial = partial


class LogprobsUnsupportedError(SamplingError):
    """The API refused logprobs for this model (reasoning models do); ``partial`` as for SamplingError."""


_RETRY_STATUS = frozenset({408, 409, 429})


def _classify(exc: BaseException) -> tuple[str, int | None, float | None]:
    """(outcome, HTTP status, server-asked delay) for a failed call; outcome "fatal" is not retried."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        delay = _retry_after(getattr(exc, "response", None))
        if status == 429:
            return "rate_limited", status, delay
        if status in _RETRY_STATUS or status >= 500:
            return "server_error", status, delay
        return "fatal", status, None
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None, None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None, None
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, UnicodeDecodeError)):
        return "malformed", None, None
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return "timeout" if isinstance(exc, TimeoutError) else "connection", None, None
    return "fatal", None, None


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def _choices_of(response: Any) -> list[Any]:
    """The choices of a parsed response, or ValueError when the body is not a chat completion."""
    choices = field_of(response, "choices") if not isinstance(response, (str, bytes)) else None
    if not isinstance(choices, list):
        shown = repr(response)[:120]
        raise ValueError(f"the response is not a chat completion (no 'choices' list): {shown}")
    for c in choices:
        if field_of(c, "message") is None:
            raise ValueError("a choice has no 'message': the body is malformed or truncated")
    return choices


def _reindex(choice: Any, index: int) -> Any:
    if hasattr(choice, "model_copy"):
        return choice.model_copy(update={"index": index})
    if isinstance(choice, Mapping):
        return {**choice, "index": index}
    return choice


def _add_usage(total: dict[str, int], usage: Any) -> None:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = field_of(usage, key)
        if isinstance(value, int):
            total[key] += value


def _check_seconds(name: str, value: Any, *, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        allowed = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name}={value!r} is out of range; allowed: a finite number of seconds {allowed}")


def _check_sampling_args(
    messages: Any,
    n: Any,
    model: Any,
    top_logprobs: Any,
    max_retries: Any,
    timeout: Any,
    chunk: Any,
    backoff: Any,
    max_backoff: Any,
    deadline: Any,
) -> None:
    """Every argument checked before the first request."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"messages={messages!r} is invalid; allowed: a non-empty list of chat messages")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r} is empty; allowed: a model name")
    check_int("n", n, 1, 1_000_000)
    check_int("top_logprobs", top_logprobs, 0, 20)
    check_int("max_retries", max_retries, 0, 100)
    if chunk is not None:
        check_int("chunk", chunk, 1, 128)
    _check_seconds("timeout", timeout)
    _check_seconds("backoff", backoff, zero_ok=True)
    _check_seconds("max_backoff", max_backoff, zero_ok=True)
    if deadline is not None:
        _check_seconds("deadline", deadline)


_Action = tuple[str, Any]


def _sampler(
    messages: Sequence[Any],
    n: int,
    model: str,
    top_logprobs: int,
    max_retries: int,
    chunk: int | None,
    backoff: float,
    max_backoff: float,
    deadline: float | None,
    create_kwargs: dict[str, Any],
) -> Generator[_Action, Any, SampleResult]:
    """The retry logic as a generator of actions ("call", kwargs) / ("sleep", seconds), so one
    implementation serves the sync and the async client."""
    result = SampleResult(requested=n, model=model)
    size = chunk or min(n, 128)
    start = time.monotonic()
    seed = create_kwargs.pop("seed", None)
    chunk_index = 0
    while len(result.choices) < n:
        want = min(size, n - len(result.choices))
        got_in_chunk = 0
        failures = 0
        while got_in_chunk < want:
            ask = want - got_in_chunk
            kwargs = {
                **create_kwargs,
                "model": model,
                "messages": list(messages),
                "n": ask,
                "logprobs": True,
                "top_logprobs": top_logprobs,
            }
            if seed is not None:  # a fixed seed per request would repeat the same candidates
                kwargs["seed"] = int(seed) + len(result.choices)
            t0 = time.monotonic()
            kind, payload = yield ("call", kwargs)
            seconds = time.monotonic() - t0
            attempt = Attempt(chunk_index, failures, ask, 0, "ok", seconds=seconds)
            delay: float | None = None
            if kind == "ok":
                try:
                    choices = _choices_of(payload)
                except ValueError as exc:
                    attempt.outcome, attempt.detail = "malformed", str(exc)
                else:
                    usable = choices[:ask]
                    for c in usable:
                        result.choices.append(_reindex(c, len(result.choices)))
                    result.responses.append(payload)
                    _add_usage(result.usage, field_of(payload, "usage"))
                    got_in_chunk += len(usable)
                    attempt.received = len(usable)
                    if len(usable) < ask:
                        attempt.outcome = "partial"
                        attempt.detail = f"asked for {ask} candidates, got {len(usable)}"
            else:
                outcome, status, delay = _classify(payload)
                attempt.outcome, attempt.status = outcome, status
                attempt.detail = f"{type(payload).__name__}: {payload}"
                if outcome == "fatal":
                    result.attempts.append(attempt)
                    result.error = _fatal_message(payload, status, result)
                    return result
            result.attempts.append(attempt)
            if attempt.outcome == "ok":
                continue
            failures += 1
            if failures > max_retries:
                result.error = (
                    f"gave up after {failures} failed attempts on chunk {chunk_index} "
                    f"(max_retries={max_retries}); last: {attempt.outcome} {attempt.detail}; "
                    f"kept {len(result.choices)} of {n} candidates"
                )
                return result
            wait = min(backoff * 2 ** (failures - 1), max_backoff) * (1 + 0.25 * random.random())
            if delay is not None:
                wait = max(wait, min(delay, max_backoff))
            if deadline is not None and time.monotonic() - start + wait > deadline:
                result.error = (
                    f"the deadline of {deadline}s would pass before the next retry; last: {attempt.outcome} "
                    f"{attempt.detail}; kept {len(result.choices)} of {n} candidates"
                )
                return result
            if wait > 0:
                yield ("sleep", wait)
        chunk_index += 1
    return result


def _fatal_message(exc: BaseException, status: int | None, result: SampleResult) -> str:
    text = str(exc)
    kept = f"kept {len(result.choices)} of {result.requested} candidates"
    if status == 400 and "logprob" in text.lower():
        return (
            f"the API refused logprobs for model {result.model!r} (reasoning models do): {text}; {kept}. "
            "Use LogprobReward(on_missing='nan') with candidates sampled without logprobs, or another model"
        )
    where = f"HTTP {status}" if status is not None else type(exc).__name__
    return f"not retried ({where}): {text}; {kept}"


def _finish(result: SampleResult, raise_on_error: bool) -> SampleResult:
    if result.error is None or not raise_on_error:
        return result
    message = f"sampling {result.requested} candidates from {result.model!r} failed: {result.error}"
    if "refused logprobs" in result.error:
        raise LogprobsUnsupportedError(message, result)
    raise SamplingError(message, result)


def _prepared_client(client: Any, timeout: float) -> Any:
    """The client with its own retries off (this module retries) and the per-request timeout."""
    with_options = getattr(client, "with_options", None)
    return with_options(max_retries=0, timeout=timeout) if callable(with_options) else client


def sample_with_logprobs(
    client: Any,
    messages: Sequence[Any],
    n: int,
    model: str,
    *,
    top_logprobs: int = 20,
    max_retries: int = 3,
    timeout: float = 30.0,
    chunk: int | None = None,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    deadline: float | None = None,
    raise_on_error: bool = True,
    **create_kwargs: Any,
) -> SampleResult:
    """Sample ``n`` chat candidates with logprobs from an ``openai.OpenAI``-compatible client.

    ``chunk`` splits ``n`` into requests of at most that many candidates (default: one request,
    at most 128). Each request that fails with 408/409/429/5xx, a timeout (``timeout`` seconds
    per request), a connection error or a malformed/truncated body is retried up to
    ``max_retries`` times, waiting ``backoff * 2**k`` seconds (at most ``max_backoff``; a
    server's Retry-After is honoured up to that cap); a request that returns fewer candidates
    than asked keeps them and asks for the rest. ``deadline`` bounds the whole call's seconds.
    Other errors (400, 401, 404...) are not retried. After the budget, :class:`SamplingError`
    (``raise_on_error=True``) or the returned result's ``error`` says what happened, and
    ``partial``/the result keeps EVERY candidate received. A given ``seed`` is offset per
    request so chunks do not repeat each other. ``create_kwargs`` (``max_tokens``,
    ``temperature``, ``extra_body``...) go to ``chat.completions.create``.
    """
    _check_sampling_args(messages, n, model, top_logprobs, max_retries, timeout, chunk, backoff, max_backoff, deadline)
    api = _prepared_client(client, timeout)
    gen = _sampler(messages, n, model, top_logprobs, max_retries, chunk, backoff, max_backoff, deadline, create_kwargs)
    reply: Any = None
    try:
        while True:
            kind, arg = gen.send(reply)
            if kind == "sleep":
                time.sleep(arg)
                reply = None
                continue
            try:
                reply = ("ok", api.chat.completions.create(**arg))
            except Exception as exc:
                reply = ("error", exc)
    except StopIteration as stop:
        return _finish(stop.value, raise_on_error)


async def asample_with_logprobs(
    client: Any,
    messages: Sequence[Any],
    n: int,
    model: str,
    *,
    top_logprobs: int = 20,
    max_retries: int = 3,
    timeout: float = 30.0,
    chunk: int | None = None,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    deadline: float | None = None,
    raise_on_error: bool = True,
    **create_kwargs: Any,
) -> SampleResult:
    """:func:`sample_with_logprobs` for an ``openai.AsyncOpenAI`` client (same arguments and policy)."""
    _check_sampling_args(messages, n, model, top_logprobs, max_retries, timeout, chunk, backoff, max_backoff, deadline)
    api = _prepared_client(client, timeout)
    gen = _sampler(messages, n, model, top_logprobs, max_retries, chunk, backoff, max_backoff, deadline, create_kwargs)
    reply: Any = None
    try:
        while True:
            kind, arg = gen.send(reply)
            if kind == "sleep":
                await asyncio.sleep(arg)
                reply = None
                continue
            try:
                reply = ("ok", await api.chat.completions.create(**arg))
            except Exception as exc:
                reply = ("error", exc)
    except StopIteration as stop:
        return _finish(stop.value, raise_on_error)


__all__ = [
    "Attempt",
    "LogprobsUnsupportedError",
    "SampleResult",
    "SamplingError",
    "asample_with_logprobs",
    "sample_with_logprobs",
]
