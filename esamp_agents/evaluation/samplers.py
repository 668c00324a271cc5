"""Sampler specs for the evaluation harness: strings such as ``vanilla``, ``esamp:0.25:warm20``, ``minp:0.05``.

A spec names one way to sample candidates and spells it canonically, so its cache folder
is stable across runs: ``vanilla`` (plain sampling), ``esamp`` (the package's ESamp defaults),
``esamp:BETA`` (no warm start) / ``esamp:BETA:warmSTEPS`` (Exploratory Sampling) and ``minp:P``
(plain sampling with min-p), each with optional ``:key=value`` options (:data:`SAMPLER_USAGE`);
temperature, top-k, top-p and the token budget are shared by the run unless a sampler sets ``:t=``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from esamp_agents.decoding.params import ESampParams, SamplingParams, build_params

SAMPLER_USAGE = (
    "allowed: vanilla, esamp (the defaults), esamp:BETA, esamp:BETA:warmSTEPS (0 < BETA <= 100, 0 <= STEPS <= 10000), "
    "minp:P (0 < P < 1), each optionally followed by ':t=TEMPERATURE' (0 < T <= 10); esamp also by "
    "':warm_lr=LR' (0 < LR <= 1), ':width=W' (1 <= W <= 65536), ':shared' (one Distiller for all prompts), "
    "':every=K' (train the Distiller every K steps, 1 <= K <= 1024) and ':min_p=P'"
)


def _num(x: float) -> str:
    """Shortest exact spelling of a float, without a trailing '.0' (stable folder names)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Sampler:
    """One way to sample candidates; ``name`` is its canonical spelling, ``folder`` its cache folder.

    ``None`` options take the run's shared setting (temperature) or the :class:`ESampParams` default.
    """

    kind: Literal["vanilla", "esamp", "minp"]
    beta: float = 0.0
    min_p: float = 0.0
    warm_start_steps: int = 0
    warm_start_lr: float | None = None
    distiller_width: int | None = None
    shared_distiller: bool = False
    distiller_update_every: int | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        plain = (
            self.beta == 0
            and self.warm_start_steps == 0
            and self.warm_start_lr is None
            and self.distiller_width is None
            and not self.shared_distiller
            and self.distiller_update_every is None
        )
        ok = {
            "vanilla": plain and self.min_p == 0,
            "esamp": 0 < self.beta <= 100 and 0 <= self.min_p < 1 and 0 <= self.warm_start_steps <= 10000,
            "minp": plain and 0 < self.min_p < 1,
        }
        temperature_ok = self.temperature is None or 0 < self.temperature <= 10
        if not ok.get(self.kind, False) or not temperature_ok:
            raise ValueError(f"{self!r} is not a valid sampler; {SAMPLER_USAGE}")
        if self.kind == "esamp":
            self.esamp_params()  # range-checks width and warm-start lr

    @property
    def name(self) -> str:
        if self.kind == "vanilla":
            parts = ["vanilla"]
        elif self.kind == "minp":
            parts = ["minp", _num(self.min_p)]
        else:
            parts = ["esamp", _num(self.beta)]
            if self.warm_start_steps:
                parts.append(f"warm{self.warm_start_steps}")
            if self.warm_start_lr is not None:
                parts.append(f"warm_lr={_num(self.warm_start_lr)}")
            if self.distiller_width is not None:
                parts.append(f"width={self.distiller_width}")
            if self.shared_distiller:
                parts.append("shared")
            if self.distiller_update_every is not None:
                parts.append(f"every={self.distiller_update_every}")
            if self.min_p:
                parts.append(f"min_p={_num(self.min_p)}")
        if self.temperature is not None:
            parts.append(f"t={_num(self.temperature)}")
        return ":".join(parts)

    @property
    def folder(self) -> str:
        return self.name.replace(":", "_")  # no ':' in paths (Windows)

    def esamp_params(self) -> ESampParams:
        """This sampler's ESamp settings: its own options over the :class:`ESampParams` defaults."""
        options = {
            "beta": self.beta,
            "warm_start_steps": self.warm_start_steps,
            "shared_distiller": self.shared_distiller,
            "warm_start_lr": self.warm_start_lr,
            "distiller_width": self.distiller_width,
            "distiller_update_every": self.distiller_update_every,
        }
        return build_params({k: v for k, v in options.items() if v is not None})[1]

    def sampling_params(
        self, *, n: int, temperature: float, top_k: int, top_p: float, max_tokens: int, seed: int
    ) -> SamplingParams:
        """The run's shared settings, with this sampler's min-p and (if set) its own temperature."""
        own_temperature = temperature if self.temperature is None else self.temperature
        values = {"n": n, "max_tokens": max_tokens, "temperature": own_temperature, "top_k": top_k, "top_p": top_p}
        return build_params({**values, "min_p": self.min_p, "seed": seed})[0]


def _parse_float(text: str, spec: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"sampler {spec!r}: {what}={text!r} is not a number; {SAMPLER_USAGE}") from None
    if not math.isfinite(value):
        raise ValueError(f"sampler {spec!r}: {what}={text!r} is not finite; {SAMPLER_USAGE}")
    return value


def _parse_options(spec: str, kind: str, tokens: list[str]) -> dict[str, Any]:
    """The ``:key=value`` / ``:shared`` options after a sampler's positional parts."""
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for token in tokens:
        key, eq, value = token.partition("=")
        esamp_only = key in ("warm_lr", "width", "shared", "every", "min_p")
        if key in seen or (esamp_only and kind != "esamp") or (bool(eq) == (key == "shared")):
            raise ValueError(f"sampler {spec!r}: option {token!r} is not understood here; {SAMPLER_USAGE}")
        seen.add(key)
        if key == "t":
            t = _parse_float(value, spec, "t")
            if not 0.0 < t <= 10.0:
                raise ValueError(f"sampler {spec!r}: t={t!r} is out of range; allowed: 0 < t <= 10")
            out["temperature"] = t
        elif key == "warm_lr":
            lr = _parse_float(value, spec, "warm_lr")
            if not 0.0 < lr <= 1.0:
                raise ValueError(f"sampler {spec!r}: warm_lr={lr!r} is out of range; allowed: 0 < warm_lr <= 1")
            out["warm_start_lr"] = lr
        elif key == "width":
            if not value.isdigit() or not 1 <= int(value) <= 65536:
                raise ValueError(f"sampler {spec!r}: width={value!r} is out of range; allowed: 1 <= width <= 65536")
            out["distiller_width"] = int(value)
        elif key == "every":
            if not value.isdigit() or not 1 <= int(value) <= 1024:
                raise ValueError(f"sampler {spec!r}: every={value!r} is out of range; allowed: 1 <= every <= 1024")
            out["distiller_update_every"] = int(value)
        elif key == "min_p":
            p = _parse_float(value, spec, "min_p")
            if not 0.0 < p < 1.0:
                raise ValueError(f"sampler {spec!r}: min_p={p!r} is out of range; allowed: 0 < min_p < 1")
            out["min_p"] = p
        elif key == "shared":
            out["shared_distiller"] = True
        else:
            raise ValueError(f"sampler {spec!r}: option {token!r} is not understood; {SAMPLER_USAGE}")
    return out


def parse_sampler(spec: str | Sampler) -> Sampler:
    """``vanilla``, ``esamp[:BETA[:warmSTEPS]]`` or ``minp:P``, then options -> :class:`Sampler` (range-checked)."""
    if isinstance(spec, Sampler):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"sampler {spec!r} must be a string; {SAMPLER_USAGE}")
    kind, *rest = spec.strip().split(":")
    positional = [t for t in rest if "=" not in t and t != "shared"]
    options = rest[len(positional) :]
    if positional != rest[: len(positional)]:
        raise ValueError(f"sampler {spec!r}: options must come after BETA/STEPS/P; {SAMPLER_USAGE}")
    if kind == "vanilla" and not positional:
        return Sampler("vanilla", **_parse_options(spec, kind, options))
    if kind == "esamp" and len(positional) <= 2:
        beta = _parse_float(positional[0], spec, "BETA") if positional else ESampParams.beta
        if not 0.0 < beta <= 100.0:
            raise ValueError(
                f"sampler {spec!r}: BETA={beta!r} is out of range; allowed: 0 < BETA <= 100 (for beta 0 use 'vanilla')"
            )
        warm = 0 if positional else ESampParams.warm_start_steps  # bare 'esamp': the package defaults
        if len(positional) == 2:
            match = re.fullmatch(r"warm(\d+)", positional[1])
            if match is None or int(match.group(1)) > 10000:
                raise ValueError(
                    f"sampler {spec!r}: {positional[1]!r} is not warmSTEPS with 0 <= STEPS <= 10000; {SAMPLER_USAGE}"
                )
            warm = int(match.group(1))
        return Sampler("esamp", beta=beta, warm_start_steps=warm, **_parse_options(spec, kind, options))
    if kind == "minp" and len(positional) == 1:
        p = _parse_float(positional[0], spec, "P")
        if not 0.0 < p < 1.0:
            raise ValueError(f"sampler {spec!r}: P={p!r} is out of range; allowed: 0 < P < 1")
        return Sampler("minp", min_p=p, **_parse_options(spec, kind, options))
    raise ValueError(f"sampler {spec!r} is not understood; {SAMPLER_USAGE}")


def parse_samplers(specs: Sequence[str | Sampler]) -> list[Sampler]:
    """Parse every sampler; two spellings of the same sampler (``esamp`` and ``esamp:0.1:warm20``) are rejected."""
    if isinstance(specs, (str, Sampler)) or not isinstance(specs, Sequence) or not specs:
        raise ValueError(f"samplers={specs!r} must be a non-empty list; {SAMPLER_USAGE}")
    out: list[Sampler] = []
    seen: dict[str, str | Sampler] = {}
    for spec in specs:
        sampler = parse_sampler(spec)
        if sampler.name in seen:
            raise ValueError(f"samplers {seen[sampler.name]!r} and {spec!r} are the same sampler ({sampler.name})")
        seen[sampler.name] = spec
        out.append(sampler)
    return out


__all__ = ["SAMPLER_USAGE", "Sampler", "parse_sampler", "parse_samplers"]
