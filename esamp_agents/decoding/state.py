"""What one batched decode carries from step to step.

The engine's loop is prefill -> (step)* -> finish around one :class:`DecodeState`, which
also builds the results at the end (everything moves to the host once).
Everything the loop mutates lives here, so a step is a function of the state, and
two planned extensions have a place to go without another rewrite:

* **Constrained decoding** (a grammar matcher per row): ``DecodeState.constraints``
  holds :class:`RowConstraint` objects (:class:`~esamp_agents.constrained.matcher.GrammarConstraint`).
  Each step, they set forbidden tokens' logits to ``-inf`` *before* the sampling
  filters, so ESamp's fusion (which only touches finite survivors) can never bring
  one back; after sampling, a constraint may finish rows (the grammar is complete),
  which then end with "stop".
* **Continuous batching** (:mod:`esamp_agents.decoding.scheduler`): one engine call is a
  :class:`DecodeJob` around its own state (its sampling parameters, generator, Distillers,
  constraints, text tracking), so concurrent calls step side by side and share only the
  model's forward: the scheduler merges their KV caches into one batch, and a job's rows
  join after its own prefill and leave with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from esamp_agents.decoding.distiller import BatchedDistiller
from esamp_agents.decoding.observers import DecodeObserver
from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.decoding.results import Candidate, PromptResult
from esamp_agents.decoding.sampling import Candidates
from esamp_agents.decoding.text_tracking import TextTracker, cut_at_stop

TextCallback = Callable[[int, int, str], None]
"""``on_text(prompt_index, sample_index, delta)``: streamed text that is final."""

TokenCallback = Callable[[int, int, int, float, "list[tuple[int, float]] | None"], None]
"""``on_token(prompt_index, sample_index, token_id, logprob, top)``: each token as it is sampled."""


@runtime_checkable
class RowConstraint(Protocol):
    """A per-row restriction of the next token (the seam for grammar-constrained decoding)."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``[rows, vocab]`` logits with the tokens a row may not emit this step set to ``-inf``
        (at least one stays finite per live row)."""

    def advance(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor | None:
        """Consume this step's tokens; return ``[rows]`` bool of rows that are now complete, or None."""


class Workspace:
    """Tensors reused from step to step, by name. A fresh multi-MB tensor each step (the
    ``[rows, vocab]`` logits and their exponentials) is a fresh mapping on the CPU: the
    allocator returns large blocks to the OS when they are freed, so every step paid one
    page fault per 4 KB it wrote (1.1 M faults in a 16 x 16 decode of 32 tokens)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The buffer ``name`` (uninitialised), reallocated only when its shape, dtype or device changes."""
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf


@dataclass
class Request:
    """One prompt and the batch rows that sample its candidates (``rows[s]`` is sample ``s``)."""

    index: int
    prompt_ids: list[int]
    rows: range


@dataclass
class StepRecord:
    """Per-step outputs, kept on the device and moved to the host once, when the decode ends."""

    tokens: list[torch.Tensor] = field(default_factory=list)  # [rows] each
    logprobs: list[torch.Tensor] = field(default_factory=list)  # [rows]
    top: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # ([rows, k] ids, [rows, k] logprobs)
    novelty: list[torch.Tensor] = field(default_factory=list)  # [rows], from step 1 on (ESamp only)
    loss: list[torch.Tensor] = field(default_factory=list)  # [groups], from step 1 on (ESamp only)


@dataclass
class DecodeState:
    """The batch between two steps: model inputs, row status, sampling state and outputs so far.

    ``hidden[layer]`` holds the states (``[rows, d]``) that produce this step's token;
    ``positions`` is the position the sampled token will be fed at and ``width`` the
    number of mask columns the cache covers so far.
    """

    requests: list[Request]
    cache: Any
    mask: torch.Tensor  # [rows, prompt width + max_new_tokens]; generated positions are always 1
    positions: torch.Tensor  # [rows]
    width: int
    hidden: dict[int, torch.Tensor]
    generator: torch.Generator
    eos_ids: frozenset[int]  # ids that end a row ({-1} when none do)
    eos: torch.Tensor  # the same ids on the device
    tracker: TextTracker
    distiller: BatchedDistiller | None
    groups: int  # Distiller groups: one per request, or one shared
    live: torch.Tensor  # [rows] bool: the row's next token still belongs to its candidate
    lengths: torch.Tensor  # [rows] tokens generated per row
    stopped_by_string: torch.Tensor  # [rows] bool
    completed: torch.Tensor  # [rows] bool: a constraint finished the row (its grammar is complete)
    # Host copy of ``live``, kept when tokens come to the host anyway (text tracking), so
    # "is anything still live?" costs no device sync; None otherwise.
    host_live: list[bool] | None = None
    constraints: tuple[RowConstraint, ...] = ()
    record: StepRecord = field(default_factory=StepRecord)
    workspace: Workspace = field(default_factory=Workspace)
    step: int = 0
    prefill_seconds: float = 0.0
    distiller_seconds: float = 0.0

    @property
    def rows(self) -> int:
        return int(self.live.shape[0])

    def results(self, sampling: SamplingParams, on_text: TextCallback | None, lengths: list[int]) -> list[PromptResult]:
        """Move everything to the host once and build each request's candidates (``lengths``: per row)."""
        record, tracker = self.record, self.tracker
        tokens = torch.stack(record.tokens, 1).tolist()  # [rows, steps]
        logprobs = torch.stack(record.logprobs, 1).tolist()
        by_string = self.stopped_by_string.tolist()
        completed = self.completed.tolist()
        satisfied = [getattr(c, "accepted", None) for c in self.constraints]
        top_ids = top_lps = None
        if record.top:
            top_ids = torch.stack([t[0] for t in record.top], 1).tolist()  # [rows, steps, k]
            top_lps = torch.stack([t[1] for t in record.top], 1).tolist()
        use_esamp = self.distiller is not None
        novelty = None
        if use_esamp:
            first = [float("nan")] * len(tokens)
            later = torch.stack(record.novelty, 1).tolist() if record.novelty else [[] for _ in tokens]
            novelty = [[f, *rest] for f, rest in zip(first, later, strict=True)]
        losses = torch.stack(record.loss, 1).tolist() if record.loss else [[] for _ in range(self.groups)]

        results: list[PromptResult] = []
        for request in self.requests:
            candidates = []
            for s, row in enumerate(request.rows):
                length = lengths[row]
                ids = tokens[row][:length]
                text = tracker.decode(ids)
                stop_seq = None
                if by_string[row]:
                    text, stop_seq = cut_at_stop(text, sampling.stop)
                ended = by_string[row] or completed[row] or (length > 0 and ids[-1] in self.eos_ids)
                if on_text is not None:
                    rest = tracker.delta(row, final_text=text)
                    if rest:
                        on_text(request.index, s, rest)
                extras: dict[str, Any] = {}
                for accepted in satisfied:
                    verdict = accepted(row) if accepted is not None else None
                    if verdict is not None:  # the row had a grammar: is its text a complete sentence of it?
                        extras["constraint_satisfied"] = bool(verdict and not by_string[row])
                candidates.append(
                    Candidate(
                        index=s,
                        text=text,
                        token_ids=ids,
                        logprobs=logprobs[row][:length],
                        finish_reason="stop" if ended else "length",
                        prompt_tokens=len(request.prompt_ids),
                        top_logprobs=(
                            [
                                list(zip(i, v, strict=True))
                                for i, v in zip(top_ids[row][:length], top_lps[row][:length], strict=True)
                            ]  # type: ignore[index]
                            if top_ids is not None
                            else None
                        ),
                        novelty=novelty[row][:length] if novelty is not None else None,
                        stop_sequence=stop_seq,
                        extras=extras,
                    )
                )
            # decode steps >= 1 while any of this request's rows was live; a shared Distiller's curve is everyone's
            steps_live = max(lengths[row] for row in request.rows)
            curve = losses[0 if self.groups == 1 else request.index]
            results.append(
                PromptResult(
                    prompt=tracker.decode(request.prompt_ids),
                    prompt_token_ids=request.prompt_ids,
                    candidates=candidates,
                    distiller_loss=curve[: max(steps_live - 1, 0)] if use_esamp else [],
                )
            )
        return results


@dataclass(eq=False)
class DecodeJob:
    """One engine call between steps: what it asked for, and (once prefilled) its state.

    Everything a step reads or changes is the job's own, so the same steps run a call
    alone (:meth:`~esamp_agents.decoding.engine.ESampEngine.generate` inline) or beside
    others in one batch (:class:`~esamp_agents.decoding.scheduler.BatchScheduler`).
    """

    encoded: list[list[int]]
    sampling: SamplingParams
    esamp: ESampParams
    observers: Sequence[DecodeObserver] = ()
    on_text: TextCallback | None = None
    cancel: threading.Event | None = None
    constraints: Sequence[RowConstraint] = ()
    on_token: TokenCallback | None = None
    state: DecodeState | None = None
    tokens: Any = None  # this step's tokens ([rows]), fed at the next forward
    live_check_every: int = 1
    decode_started: float = 0.0

    @property
    def rows(self) -> int:
        return len(self.encoded) * self.sampling.n

    @property
    def feeds_left(self) -> int:
        """Forwards this job may still need (the last sampled token is never fed)."""
        done = self.state.step if self.state is not None else 0
        return max(self.sampling.max_new_tokens - 1 - done, 0)


@dataclass
class Proposal:
    """One step of one job up to ESamp's bonus: the model's logits, the filter survivors and the
    Distiller's error (split from the draw so the scheduler can project many jobs' errors at once)."""

    model_logits: torch.Tensor  # [rows, vocab], what logprobs are read from
    raw_logits: torch.Tensor  # before any soft cap
    cands: Candidates | None = None
    greedy: torch.Tensor | None = None  # [rows] tokens of a greedy step
    error: torch.Tensor | None = None  # [rows, d] h_L - f(h_1) (ESamp from step 1 on)
    loss: torch.Tensor | None = None  # [groups] this step's Distiller loss
    bonus: torch.Tensor | None = None  # [rows, k] W . error on the candidates, when projected for a batch


__all__ = [
    "DecodeJob",
    "DecodeState",
    "Proposal",
    "Request",
    "RowConstraint",
    "StepRecord",
    "TextCallback",
    "TokenCallback",
    "Workspace",
]
