"""Validated parameter sets for sampling and for Exploratory Sampling.

Every check runs in ``__post_init__`` so a bad value fails before any model work
starts, with a message that names the value and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from esamp_agents.validation import check_int, check_range

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How each candidate is sampled (HF ``generate`` semantics for the filters).

    Filters apply in HF's order: temperature, top-k, top-p, min-p. ``top_k=0``,
    ``top_p=1`` and ``min_p=0`` switch a filter off. ``temperature=0`` is greedy.
    ``ignore_eos`` keeps sampling past end-of-turn tokens (for benchmarks that need
    every row to do the same work).
    """

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        check_int("n", self.n, 1)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_range("temperature", self.temperature, 0.0, allowed="temperature >= 0 (0 = greedy)")
        if math.isinf(self.temperature):
            raise ValueError(f"temperature={self.temperature!r} is out of range; allowed: a finite value >= 0")
        check_int("top_k", self.top_k, 0)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True, allowed="0 < top_p <= 1")
        check_range("min_p", self.min_p, 0.0, 1.0, high_open=True, allowed="0 <= min_p < 1")
        check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.seed is not None:
            check_int("seed", self.seed, 0, 2**63 - 1)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop={self.stop!r}: every stop sequence must be a non-empty string")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ESampParams:
    """Exploratory Sampling settings.

    The defaults are the small-scale configuration the study of BENCHMARKS.md section 8 found
    to hurt least on the embedded 135M model: beta 0.1 with each prompt's Distiller first fitted
    on the prompt's own prefill states (20 Adam steps at lr 2e-3; a deviation from the paper).
    :meth:`paper` is the paper's recipe exactly (beta 0.25, a fresh Distiller).

    ``beta=0`` switches ESamp off: the engine then runs plain sampling and never builds a
    Distiller. ``warm_start_steps=0`` skips the warm start. ``shared_distiller=True`` trains one
    Distiller on all prompts of a request instead of one per prompt (the paper's is per prompt).
    """

    beta: float = 0.1
    distiller_width: int = 384
    lr: float = 4e-4
    adam_eps: float = 1e-4
    grad_clip: float = 0.5
    warm_start_steps: int = 20
    warm_start_lr: float = 2e-3
    shared_distiller: bool = False

    def __post_init__(self) -> None:
        check_range("beta", self.beta, 0.0, 100.0, allowed="0 <= beta <= 100 (0 = plain sampling)")
        check_int("distiller_width", self.distiller_width, 1, 65536)
        check_range("lr", self.lr, 0.0, 1.0, low_open=True, allowed="0 < lr <= 1")
        check_range("adam_eps", self.adam_eps, 0.0, 1.0, low_open=True, allowed="0 < adam_eps <= 1")
        check_range("grad_clip", self.grad_clip, 0.0, None, low_open=True, allowed="grad_clip > 0")
        check_int("warm_start_steps", self.warm_start_steps, 0, 10000)
        check_range("warm_start_lr", self.warm_start_lr, 0.0, 1.0, low_open=True, allowed="0 < warm_start_lr <= 1")
        if not isinstance(self.shared_distiller, bool):
            raise ValueError(f"shared_distiller={self.shared_distiller!r} must be True or False")

    @classmethod
    def paper(cls, beta: float = 0.25) -> ESampParams:
        """The paper's recipe: a fresh per-prompt Distiller (width 384, Adam lr 4e-4), beta 0.25."""
        return cls(beta=beta, distiller_width=384, lr=4e-4, adam_eps=1e-4, grad_clip=0.5, warm_start_steps=0)

    @property
    def enabled(self) -> bool:
        return self.beta > 0.0


ESAMP_PRESETS = ("default", "paper")


def esamp_preset(name: str, **overrides: Any) -> ESampParams:
    """``"default"`` (this package's measured defaults) or ``"paper"``, with non-None overrides applied."""
    if name == "default":
        base = ESampParams()
    elif name == "paper":
        base = ESampParams.paper()
    else:
        raise ValueError(f"preset={name!r} is not known; allowed: {', '.join(ESAMP_PRESETS)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split flat keyword arguments into (sampling, esamp, rest)."""
    s_names = {f.name for f in fields(SamplingParams)}
    e_names = {f.name for f in fields(ESampParams)}
    sampling = {k: v for k, v in kwargs.items() if k in s_names}
    esamp = {k: v for k, v in kwargs.items() if k in e_names}
    rest = {k: v for k, v in kwargs.items() if k not in s_names and k not in e_names}
    return sampling, esamp, rest


__all__ = [
    "ESAMP_PRESETS",
    "MAX_TOP_LOGPROBS",
    "ESampParams",
    "SamplingParams",
    "esamp_preset",
    "split_kwargs",
]
