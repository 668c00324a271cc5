"""What one generation request returns: candidates grouped by prompt.

Designed for the consumers downstream: the reward head reads ``token_ids`` and
``logprobs``, Best-of-N reads ``text`` and the scores, the OpenAI server reads
``finish_reason``, ``top_logprobs`` and the token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass
class Candidate:
    """One sampled continuation.

    ``token_ids`` are all generated tokens, including the end-of-turn token or the
    token that completed a stop string; ``text`` has special tokens removed and is
    cut just before a stop string. ``logprobs[i]`` is the log-probability of
    ``token_ids[i]`` under the *model* (temperature 1, no filters, no ESamp bonus),
    so it can be recomputed later by one forward pass. ``novelty[i]`` is the
    Distiller's error norm ||h_L - f(h_1)|| at the step that produced token i
    (``None`` when ESamp is off; ``nan`` at the first, always plain, token).
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    prompt_tokens: int
    top_logprobs: list[list[tuple[int, float]]] | None = None
    novelty: list[float] | None = None
    stop_sequence: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("nan")


@dataclass
class PromptResult:
    """The N candidates of one prompt, and its Distiller's training curve."""

    prompt: str
    prompt_token_ids: list[int]
    candidates: list[Candidate]
    distiller_loss: list[float] = field(default_factory=list)


@dataclass
class GenerationStats:
    """Counts and timings of one request (generated tokens, not calls)."""

    prompts: int
    samples_per_prompt: int
    decode_steps: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    distiller_seconds: float

    @property
    def tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.generated_tokens / total if total > 0 else float("nan")


@dataclass
class GenerationResult:
    results: list[PromptResult]
    stats: GenerationStats

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> PromptResult:
        return self.results[i]
