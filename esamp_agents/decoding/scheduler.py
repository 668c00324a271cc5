"""Continuous batching: concurrent engine calls decode in one running batch.

Every :meth:`~esamp_agents.decoding.engine.ESampEngine.generate` call becomes a
:class:`~esamp_agents.decoding.state.DecodeJob` for the engine's one batch loop. The caller that
finds the loop idle runs it on its own thread until its own job is done (so a lone call never
changes threads: GNU OpenMP slows a second decoding thread, see :mod:`esamp_agents.decoding.openmp`);
jobs still running then go on in a scheduler thread, gone as soon as there is no work. Each iteration:

1. **admit** waiting jobs, first come first served, while the rows in flight stay within
   ``max_batch_rows`` (a job larger than the cap runs when the batch is empty), and prefill
   each one alone, exactly as it would be prefilled without company;
2. **step** every job (sample -> record -> retire) with its own sampling parameters, seeded
   generator, Distillers, grammar matchers and stop strings; finished jobs get their result;
3. **rebuild** the batch's KV cache when jobs joined (or when finished jobs hold more rows than
   the live ones): blocks of rows, right-aligned (:mod:`esamp_agents.decoding.batch_cache`);
4. **feed** every row's token in ONE forward (and one LM-head projection for the next step;
   ESamp's whole-vocabulary bonus, when jobs sample without a small top-k, is also projected
   for all of them at once).

A job's rows join together and leave together (its sampler draws for all its rows each step,
as alone, so a seed gives the same draws in any company). What batching can change is float
rounding: the forward of a row in a batch of 12 rows is not bit-identical to the forward of
the same row alone (other matrix shapes, other kernel blocking), so on CPU float32 greedy and
seeded tokens match unless two candidates were within rounding of each other.

Like vLLM's scheduler (without its paged KV blocks or chunked prefill) and transformers'
``continuous_batching`` (without its paged cache), a joining prompt is prefilled between two
decode steps: the running rows wait one prefill, and the new request's first token comes after
one prefill plus one step instead of after everything queued ahead of it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from esamp_agents.decoding.batch_cache import Block, merge, mergeable, merged_mask
from esamp_agents.decoding.openmp import release_thread_pool
from esamp_agents.decoding.params import DEFAULT_MAX_BATCH_ROWS
from esamp_agents.decoding.results import GenerationResult
from esamp_agents.decoding.state import DecodeJob, Workspace

if TYPE_CHECKING:
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.state import Proposal


@dataclass
class SchedulerStats:
    """What the scheduler did so far, and what it holds now (for /metrics and tests)."""

    jobs: int = 0  # jobs finished (with a result or an error)
    joined_running: int = 0  # jobs admitted while other jobs were decoding
    shared_jobs: int = 0  # finished jobs that shared at least one forward with another job
    rebuilds: int = 0  # KV-cache merges
    peak_rows: int = 0  # most rows in one forward
    peak_jobs: int = 0  # most jobs in one batch
    rows_in_flight: int = 0
    jobs_in_flight: int = 0
    waiting: int = 0


@dataclass(eq=False)
class _Ticket:
    job: DecodeJob
    future: Future[GenerationResult] = field(default_factory=Future)
    row: int = -1  # first row in the merged batch (-1: not in it)
    done: bool = False
    shared: bool = False  # decoded beside another job at least once


class _Batch:
    """The running batch's model side: which jobs own which rows, the shared cache and mask."""

    def __init__(self, engine: ESampEngine) -> None:
        self.engine = engine
        self.workspace = Workspace()  # the merged logits' buffer, kept across resets
        self.reset()

    def reset(self) -> None:
        self.tickets: list[_Ticket] = []  # row order; finished ones stay until the next rebuild
        self.merged = False  # False: at most one job, decoding on its own prefill cache
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.width = 0
        self.raw_logits: torch.Tensor | None = None  # [rows, vocab] from the last merged forward

    @property
    def live(self) -> list[_Ticket]:
        return [t for t in self.tickets if not t.done]

    @property
    def rows(self) -> int:
        return sum(t.job.rows for t in self.tickets)

    def logits_for(self, ticket: _Ticket) -> torch.Tensor | None:
        if not self.merged or ticket.row < 0 or self.raw_logits is None:
            return None
        return self.raw_logits[ticket.row : ticket.row + ticket.job.rows]

    def update(self, joined: list[_Ticket]) -> bool:
        """Take in the jobs that joined; rebuild the cache when needed. True when it was rebuilt."""
        live = [*self.live, *(t for t in joined if not t.done)]
        if not live:
            self.reset()
            return False
        if not self.merged and len(live) == 1:  # one job alone decodes on its own prefill cache
            self.tickets = live
            return False
        live_rows = sum(t.job.rows for t in live)
        if self.merged and not joined and self.rows - live_rows <= live_rows:
            return False  # finished jobs' rows ride along (fed padding) until the next rebuild
        self._rebuild(live)
        return True

    def _rebuild(self, live: list[_Ticket]) -> None:
        blocks, masks = [], []
        for t in live:
            state = t.job.state
            assert state is not None
            if self.merged and t.row >= 0:
                blocks.append(Block(self.cache, t.row, t.job.rows, self.width, state.width))
            else:
                blocks.append(Block(state.cache, 0, t.job.rows, state.width, state.width))
            masks.append((state.mask, state.width))
        widest = max(state_width for _, state_width in masks)
        capacity = widest + max(t.job.feeds_left for t in live) + 1
        cache, width = merge(self.engine.loaded.config, blocks, capacity)
        mask = merged_mask(masks, width, capacity)
        row = 0
        for t in live:
            t.row = row
            row += t.job.rows
            assert t.job.state is not None
            t.job.state.cache = None  # its rows live in the batch cache now
        self.tickets, self.cache, self.mask, self.width, self.merged = live, cache, mask, width, True
        self.raw_logits = None

    def feed(self) -> None:
        """One forward for every row: each live job's tokens (padding for finished rows and jobs)."""
        engine = self.engine
        if not self.merged:
            (ticket,) = self.tickets
            state = ticket.job.state
            assert state is not None
            engine._feed(state, ticket.job.tokens)
            return
        pad = engine.loaded.pad_token_id
        inputs, positions = [], []
        for t in self.tickets:
            state = t.job.state
            assert state is not None
            if t.done:
                inputs.append(torch.full_like(state.positions, pad))
            else:
                inputs.append(torch.where(state.live, t.job.tokens, torch.full_like(t.job.tokens, pad)))
            positions.append(state.positions)
        assert self.mask is not None
        self.width += 1
        self.cache, hidden_states = engine._forward(
            torch.cat(inputs).unsqueeze(-1),
            self.mask[:, : self.width],
            torch.cat(positions).unsqueeze(-1),
            self.cache,
        )
        final = engine.loaded.num_layers
        self.raw_logits = engine._logits(hidden_states[final][:, -1], self.workspace)
        for t in self.tickets:
            state = t.job.state
            assert state is not None
            if t.done:
                continue
            rows = slice(t.row, t.row + t.job.rows)
            state.hidden = {i: hidden_states[i][rows, -1] for i in state.hidden}
            state.positions = state.positions + 1
            state.width += 1
            state.step += 1


class BatchScheduler:
    """Runs an engine's calls in one continuously batched decode (see the module docstring)."""

    def __init__(self, engine: ESampEngine, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS) -> None:
        self.engine = engine
        self.max_batch_rows = max_batch_rows
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: deque[_Ticket] = deque()
        self._thread: threading.Thread | None = None
        self._merges = mergeable(engine._new_cache(2))

    def on_scheduler_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, job: DecodeJob) -> GenerationResult:
        """Queue ``job`` and wait for its result (an interrupted wait cancels the job).

        When no decode is running, the calling thread runs the loop itself until its own job is
        done (one caller alone decodes on its own thread, as HF ``generate`` does), then hands any
        jobs that joined meanwhile to a scheduler thread. A caller that waits hands its OpenMP
        worker pool back first (:func:`~esamp_agents.decoding.openmp.release_thread_pool`), so the
        decoding thread's kernels keep spinning between regions instead of sleeping."""
        ticket = _Ticket(job)
        with self._cond:
            self._waiting.append(ticket)
            self.stats.waiting = len(self._waiting)
            drive = self._thread is None
            if drive:
                self._thread = threading.current_thread()
            self._cond.notify()
        if drive:
            self._drive(ticket)
        else:
            release_thread_pool()
        try:
            return ticket.future.result()
        except BaseException:
            if job.cancel is not None:
                job.cancel.set()
            raise

    # ---------------------------------------------------------------- the decoding thread
    def _drive(self, ticket: _Ticket) -> None:
        """Run the loop on the calling thread until ``ticket`` is done. Should the caller be
        interrupted outside a step (a step's own failure is handled in the loop), every job in
        its batch fails with that error and the waiting ones go on in a scheduler thread."""
        batch = _Batch(self.engine)
        try:
            self._loop(batch, until=ticket)
        except BaseException as exc:
            with self._cond:
                self._fail_all({*batch.live, ticket}, exc, ticket)
                self._hand_off(_Batch(self.engine))
            raise

    def _loop(self, batch: _Batch, until: _Ticket | None = None) -> None:
        """Iterate until no job is left, or (``until``: a caller driving) until that job is done."""
        while True:
            with self._cond:
                if until is not None and until.done:
                    self._hand_off(batch)
                    return
                joined = self._admit(batch)
                if not joined and not batch.live:
                    self._go_idle()
                    return
            try:
                with self.engine.loaded.lock, torch.no_grad():
                    self._iterate(batch, joined)
            except BaseException as exc:  # a shared step failed (e.g. out of memory): every job in it fails
                self._fail_all([*batch.live, *joined], exc, until)
                batch = _Batch(self.engine)

    def _hand_off(self, batch: _Batch) -> None:
        """The driving caller's job is done: the jobs left (running or waiting) go on in a
        scheduler thread (not a daemon: exit waits for it; it leaves as soon as it is idle)."""
        if not batch.live and not self._waiting:
            self._go_idle()
            return
        self._thread = threading.Thread(target=self._loop, args=(batch,), name="esamp-batch")
        self._thread.start()
        release_thread_pool()  # this caller stops decoding; its pool would slow the new thread's

    def _go_idle(self) -> None:
        self._thread = None
        self.stats.rows_in_flight = self.stats.jobs_in_flight = 0

    def _admit(self, batch: _Batch) -> list[_Ticket]:
        """Waiting jobs that fit now, in arrival order (a job that does not fit blocks those after it)."""
        joined: list[_Ticket] = []
        rows = sum(t.job.rows for t in batch.live)
        busy = bool(batch.live)
        while self._waiting:
            ticket = self._waiting[0]
            if (busy or joined) and (not self._merges or rows + ticket.job.rows > self.max_batch_rows):
                break
            self._waiting.popleft()
            joined.append(ticket)
            rows += ticket.job.rows
        if busy:
            self.stats.joined_running += len(joined)
        self.stats.waiting = len(self._waiting)
        return joined

    def _iterate(self, batch: _Batch, joined: list[_Ticket]) -> None:
        started: list[_Ticket] = []
        for t in joined:
            try:
                self.engine._start(t.job)
                started.append(t)
            except BaseException as exc:  # only this job (its prefill, a Distiller warm start...)
                self._fail(t, exc)
        engine = self.engine
        proposals: dict[_Ticket, Proposal] = {}
        for t in [*batch.live, *started]:
            try:
                assert t.job.state is not None
                proposals[t] = engine._propose(t.job.state, t.job.sampling, batch.logits_for(t))
            except BaseException as exc:
                self._fail(t, exc)
        self._project_together(proposals)
        for t, proposal in proposals.items():
            try:
                if engine._step(t.job, proposal):
                    result = engine._complete(t.job)
                    t.done = True
                    self.stats.jobs += 1
                    self.stats.shared_jobs += t.shared
                    t.future.set_result(result)
            except BaseException as exc:
                self._fail(t, exc)
        if batch.update(started):
            self.stats.rebuilds += 1
        live = batch.live
        self.stats.jobs_in_flight = len(live)
        self.stats.rows_in_flight = sum(t.job.rows for t in live)
        self.stats.peak_jobs = max(self.stats.peak_jobs, len(live))
        if len(live) > 1:
            for t in live:
                t.shared = True
        if live:
            self.stats.peak_rows = max(self.stats.peak_rows, batch.rows)
            batch.feed()

    def _project_together(self, proposals: dict[_Ticket, Proposal]) -> None:
        """ESamp's dense bonus (W . error over the whole vocabulary, for jobs without a small top-k)
        for every such job in ONE projection: each one alone would read the whole LM head again."""
        engine = self.engine
        dense = [p for p in proposals.values() if engine._dense_bonus(p)]
        if len(dense) < 2:
            return
        projected = engine._project(torch.cat([p.error for p in dense if p.error is not None]), None)
        row = 0
        for p in dense:
            assert p.error is not None and p.cands is not None
            part = projected[row : row + p.error.shape[0]]
            p.bonus = part if p.cands.ids is None else part.gather(-1, p.cands.ids)
            row += p.error.shape[0]

    def _fail_all(self, tickets: Iterable[_Ticket], exc: BaseException, driver: _Ticket | None) -> None:
        """Fail every unfinished ticket with ``exc``; an interrupt (not an ``Exception``) is the
        driving caller's own, so the others get a RuntimeError that says what happened."""
        for t in tickets:
            if not t.done:
                self._fail(t, exc if t is driver or isinstance(exc, Exception) else _interrupted(exc))

    def _fail(self, ticket: _Ticket, exc: BaseException) -> None:
        ticket.done = True
        self.stats.jobs += 1
        if not ticket.future.done():
            ticket.future.set_exception(exc)


def _interrupted(exc: BaseException) -> RuntimeError:
    """What the other jobs of a batch get when the caller driving it is interrupted mid-step
    (a KeyboardInterrupt is that caller's, not theirs; the half-done step fails them all)."""
    name = type(exc).__name__
    error = RuntimeError(f"the batch this call decoded in was interrupted ({name}) on the thread driving it")
    error.__cause__ = exc
    return error


__all__ = ["DEFAULT_MAX_BATCH_ROWS", "BatchScheduler", "SchedulerStats"]
