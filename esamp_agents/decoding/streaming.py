"""Streaming one candidate's text: the engine's generate() on a worker thread, events through a queue.

The consuming thread hands its OpenMP pool back while it waits, so the worker's kernels are not
throttled (:mod:`esamp_agents.decoding.openmp`). Closing the iterator cancels the decode (the
worker sees the cancel flag at its next step) and waits for the worker, so nothing keeps running
after the consumer stops listening.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from esamp_agents.decoding.observers import DecodeObserver
from esamp_agents.decoding.openmp import release_thread_pool
from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.decoding.results import Candidate

if TYPE_CHECKING:
    from esamp_agents.constrained.grammar import Grammar
    from esamp_agents.decoding.engine import ESampEngine


@dataclass
class StreamEvent:
    """A piece of streamed text; the last event also carries the finished candidate."""

    text: str
    candidate: Candidate | None = None


def stream_events(
    engine: ESampEngine,
    ids: list[int],
    sampling: SamplingParams,
    esamp: ESampParams,
    observers: Sequence[DecodeObserver],
    grammar: Grammar | None = None,
) -> Iterator[StreamEvent]:
    """Events of one already-validated prompt (``engine.stream`` checks the arguments first)."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            result = engine.generate(
                [ids], sampling, esamp, observers=observers, cancel=cancel, grammar=grammar,
                on_text=lambda _p, _s, delta: events.put(("text", delta)),
            )  # fmt: skip
            events.put(("done", result[0].candidates[0]))
        except BaseException as exc:
            events.put(("error", exc))

    worker = threading.Thread(target=work, name="esamp-stream", daemon=True)
    worker.start()
    release_thread_pool()  # this thread waits while the worker decodes (see decoding.openmp)
    try:
        while True:
            kind, payload = events.get()
            if kind == "text":
                yield StreamEvent(text=payload)
            elif kind == "done":
                yield StreamEvent(text="", candidate=payload)
                return
            else:
                raise payload
    finally:
        cancel.set()
        worker.join()


__all__ = ["StreamEvent", "stream_events"]
