"""Validated parameter sets for sampling and for Exploratory Sampling, and the one table of
their public names.

Every check runs in ``__post_init__`` so a bad value fails before any model work
starts, with a message that names the value and the allowed range.

:data:`PARAMS` is derived from the two dataclasses' fields (name, default, type, and the
one-line doc kept in each field's metadata); :data:`PUBLIC_SPELLINGS` is the only place where a
public name differs from a field name. The LangChain classes, the CLI, the server and the eval
harness read their parameter lists from here, so they cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Literal, get_type_hints

from esamp_agents.validation import check_int, check_range

DEFAULT_MAX_BATCH_ROWS = 64
"""Rows (prompts x n over all concurrent calls) an engine decodes together, unless told otherwise."""

MAX_TOP_LOGPROBS = 20


def _param(default: Any, doc: str) -> Any:
    """A dataclass field whose one-line doc travels with it (into :data:`PARAMS`, CLI help and pydantic)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class SamplingParams:
    """How each candidate is sampled (HF ``generate`` semantics for the filters).

    Filters apply in HF's order: temperature, top-k, top-p, min-p. ``top_k=0``,
    ``top_p=1`` and ``min_p=0`` switch a filter off. ``temperature=0`` is greedy.
    ``ignore_eos`` keeps sampling past end-of-turn tokens (for benchmarks that need
    every row to do the same work).
    """

    n: int = _param(1, "Candidates per prompt.")
    max_new_tokens: int = _param(256, "Maximum new tokens per candidate.")
    temperature: float = _param(0.7, "Softmax temperature; 0 = greedy.")
    top_k: int = _param(50, "Keep only the k most likely tokens; 0 = off.")
    top_p: float = _param(1.0, "Nucleus sampling: keep the smallest set of tokens holding this mass; 1 = off.")
    min_p: float = _param(0.0, "Drop tokens less likely than min_p x the top token's probability; 0 = off.")
    stop: tuple[str, ...] = _param((), "Stop strings: a candidate ends before the first one it produces.")
    seed: int | None = _param(None, "Random seed for reproducible candidates; unset = unseeded.")
    top_logprobs: int = _param(0, f"Alternatives per token to report with the logprobs (0 to {MAX_TOP_LOGPROBS}).")
    ignore_eos: bool = _param(
        False, "Keep sampling past end-of-turn tokens, so every candidate gets the full token budget."
    )

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
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r} must be True or False")
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
    ``distiller_update_every=k`` predicts every step but trains once per k steps, on the k
    steps' rows together: the update's weight traffic (most of ESamp's cost on a small model,
    BENCHMARKS.md section 14) is paid k times less often, and the novelty signal lags by up to
    k - 1 steps (its quality effect: section 16).
    """

    beta: float = _param(0.1, "Exploration strength; 0 switches ESamp off (plain sampling). The paper's is 0.25.")
    distiller_width: int = _param(384, "Hidden width of the Distiller MLP.")
    lr: float = _param(4e-4, "Adam learning rate of the Distiller's online updates.")
    adam_eps: float = _param(1e-4, "Adam epsilon of the Distiller.")
    grad_clip: float = _param(0.5, "Gradient-norm clip of each Distiller update.")
    warm_start_steps: int = _param(
        20, "Adam steps fitting each prompt's Distiller on its prefill states first (0 = the paper's recipe)."
    )
    warm_start_lr: float = _param(2e-3, "Learning rate of the warm-start steps.")
    shared_distiller: bool = _param(
        False, "Train one Distiller on all prompts of a request instead of one per prompt (the paper's)."
    )
    distiller_update_every: int = _param(
        1,
        "Train the Distiller once per this many decode steps, on their mean loss (1 = every step, the paper's).",
    )

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
        check_int("distiller_update_every", self.distiller_update_every, 1, 1024)

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


# --------------------------------------------------------------------------- the table

ParamGroup = Literal["sampling", "esamp"]

PUBLIC_SPELLINGS: dict[str, tuple[str, ...]] = {
    "max_new_tokens": ("max_tokens", "max_new_tokens"),
    "lr": ("distiller_lr", "lr"),
}
"""Field name -> accepted spellings, the public name first. The only fields whose public name
differs: ``max_tokens`` is the OpenAI/LangChain spelling, ``distiller_lr`` says whose rate it is."""


@dataclass(frozen=True)
class ParamSpec:
    """One public ESamp/sampling parameter, as :data:`PARAMS` derives it from a dataclass field."""

    name: str
    """The public spelling (LangChain field, per-call keyword, CLI flag, request key)."""
    group: ParamGroup
    """``"sampling"`` (a :class:`SamplingParams` field) or ``"esamp"`` (an :class:`ESampParams` field)."""
    field: str
    """The dataclass field it sets."""
    aliases: tuple[str, ...]
    """Other accepted spellings (the field name, where it differs from ``name``)."""
    default: Any
    type: Any
    """The field's resolved annotation (``int``, ``float``, ``int | None``...)."""
    doc: str

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _specs(cls: type, group: ParamGroup) -> tuple[ParamSpec, ...]:
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.default is MISSING or "doc" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} needs a default and a doc (use _param(default, doc))")
        name, *aliases = PUBLIC_SPELLINGS.get(f.name, (f.name,))
        out.append(ParamSpec(name, group, f.name, tuple(aliases), f.default, hints[f.name], f.metadata["doc"]))
    return tuple(out)


PARAMS: tuple[ParamSpec, ...] = _specs(SamplingParams, "sampling") + _specs(ESampParams, "esamp")
"""Every public ESamp/sampling parameter, in field order (sampling first)."""

PARAM_KEYS: dict[str, ParamSpec] = {key: spec for spec in PARAMS for key in spec.spellings}
"""Every accepted spelling (public names and aliases) -> its parameter."""

if len(PARAM_KEYS) != sum(len(spec.spellings) for spec in PARAMS) or not set(PUBLIC_SPELLINGS) <= {
    spec.field for spec in PARAMS
}:
    raise TypeError("PARAMS: a spelling is used twice, or PUBLIC_SPELLINGS names a field that does not exist")


def param_specs(group: ParamGroup | None = None) -> tuple[ParamSpec, ...]:
    """The table, or one group of it (``"sampling"`` / ``"esamp"``)."""
    if group is None:
        return PARAMS
    if group not in ("sampling", "esamp"):
        raise ValueError(f"group={group!r} is not known; allowed: 'sampling', 'esamp' or None")
    return tuple(spec for spec in PARAMS if spec.group == group)


def param_names(group: ParamGroup | None = None) -> tuple[str, ...]:
    """The public names (no aliases), in table order."""
    return tuple(spec.name for spec in param_specs(group))


def param_keys(group: ParamGroup | None = None) -> dict[str, str]:
    """Every accepted spelling -> its dataclass field (e.g. ``distiller_lr`` and ``lr`` -> ``lr``)."""
    return {key: spec.field for key, spec in PARAM_KEYS.items() if group is None or spec.group == group}


def lookup_param(key: str) -> ParamSpec:
    """The parameter a spelling names; an unknown one raises ``ValueError`` listing the allowed ones."""
    spec = PARAM_KEYS.get(key) if isinstance(key, str) else None
    if spec is None:
        raise ValueError(f"unknown parameter {key!r}; allowed: {', '.join(sorted(PARAM_KEYS))}")
    return spec


def build_params(
    values: Mapping[str, Any],
    *,
    sampling: SamplingParams | None = None,
    esamp: ESampParams | None = None,
) -> tuple[SamplingParams, ESampParams]:
    """Flat public names or aliases -> validated ``(SamplingParams, ESampParams)``.

    Unset parameters keep ``sampling`` / ``esamp`` (default: the dataclass defaults, e.g. an
    :func:`esamp_preset`). ``stop=None`` means no stop strings. Raises ``ValueError`` for an
    unknown name, for two spellings of one parameter, or for any value out of range.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"values={values!r} is not a mapping; allowed: a dict of parameter names to values")
    chosen: dict[str, str] = {}
    overrides: dict[ParamGroup, dict[str, Any]] = {"sampling": {}, "esamp": {}}
    for key, value in values.items():
        spec = lookup_param(key)
        if spec.field in chosen:
            raise ValueError(
                f"{chosen[spec.field]}={values[chosen[spec.field]]!r} and {key}={value!r} set the same parameter; "
                f"allowed: one of {', '.join(spec.spellings)}"
            )
        chosen[spec.field] = key
        if spec.field == "stop" and value is None:
            value = ()
        overrides[spec.group][spec.field] = value
    base_sampling = sampling if sampling is not None else SamplingParams()
    base_esamp = esamp if esamp is not None else ESampParams()
    return replace(base_sampling, **overrides["sampling"]), replace(base_esamp, **overrides["esamp"])


def public_values(sampling: SamplingParams, esamp: ESampParams) -> dict[str, Any]:
    """The inverse of :func:`build_params`: public name -> value, for every parameter."""
    source: dict[ParamGroup, Any] = {"sampling": sampling, "esamp": esamp}
    return {spec.name: getattr(source[spec.group], spec.field) for spec in PARAMS}


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split flat keyword arguments into (sampling, esamp, rest), by dataclass field name."""
    s_names = {spec.field for spec in param_specs("sampling")}
    e_names = {spec.field for spec in param_specs("esamp")}
    sampling = {k: v for k, v in kwargs.items() if k in s_names}
    esamp = {k: v for k, v in kwargs.items() if k in e_names}
    rest = {k: v for k, v in kwargs.items() if k not in s_names and k not in e_names}
    return sampling, esamp, rest


__all__ = [
    "ESAMP_PRESETS",
    "MAX_TOP_LOGPROBS",
    "PARAMS",
    "PARAM_KEYS",
    "PUBLIC_SPELLINGS",
    "ESampParams",
    "ParamGroup",
    "ParamSpec",
    "SamplingParams",
    "build_params",
    "esamp_preset",
    "lookup_param",
    "param_keys",
    "param_names",
    "param_specs",
    "public_values",
    "split_kwargs",
]
