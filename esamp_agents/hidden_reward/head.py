"""The ELHSR gated linear reward head, its streaming form, and its checkpoints.

One linear map reads each response token's features ``x_t`` and gives a gate logit and a
token reward; the candidate's reward is the gated mean of the token rewards (see
``shared/spec/ELHSR.md``). Checkpoints are safetensors files whose metadata say what the head
was trained on (a :class:`FeatureSpec`), so a head is never applied to features of another
model or layer choice by accident. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from esamp_agents.hidden_reward.logprob_features import EXTRA_FEATURES, MAX_TOP_K, token_row_dim
from esamp_agents.hidden_reward.token_index import INDEX_KINDS, MAX_BUCKETS
from esamp_agents.validation import check_int as _check_int

if TYPE_CHECKING:
    from esamp_agents.hidden_reward.token_head import TokenTableHead

FeatureKind = Literal["hidden", "logprobs", "logprob_tokens"]
FEATURE_KINDS: tuple[str, ...] = ("hidden", "logprobs", "logprob_tokens")
FORMAT_NAME = "esamp-agents/reward-head"
FORMAT_VERSION = 1
GATE_EPS = 1e-8
"""Floor of the gate sum: R = sum g r / max(sum g, GATE_EPS) (the reference's value)."""
MIN_STD = 1e-6


class RewardHeadError(ValueError):
    """A checkpoint cannot be read as a reward head (corrupt, foreign, or inconsistent)."""


class IncompatibleHeadError(RewardHeadError):
    """A valid head was trained on other features than the ones in use."""


@dataclass(frozen=True)
class FeatureSpec:
    """What a head reads; stored in every checkpoint and checked on load.

    ``kind="hidden"``: per token, the concatenated ``hidden_states[l]`` for ``l`` in ``layers``
    (0 = embeddings, ``num_layers`` = after the final norm), so ``dim = len(layers) * hidden_size``.
    ``kind="logprobs"``: the top-k logprob features of :mod:`esamp_agents.hidden_reward.logprob_features`,
    ``dim = top_k + 8``; ``layers`` must be empty.
    ``kind="logprob_tokens"``: packed rows that also keep token identity
    (:func:`~esamp_agents.hidden_reward.logprob_features.token_row_dim`), read by a
    :class:`~esamp_agents.hidden_reward.token_head.TokenTableHead` whose tables have
    ``index_size`` rows of a ``token_index`` (``vocab`` or ``hash``). For the logprob kinds
    ``base_model`` names the model whose logprobs the head was trained on (an API's model name).
    """

    kind: FeatureKind
    dim: int
    base_model: str
    hidden_size: int
    num_layers: int
    layers: tuple[int, ...] = ()
    top_k: int = 0
    token_index: str = ""
    index_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"kind={self.kind!r} is not a feature kind; allowed: {', '.join(FEATURE_KINDS)}")
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"base_model={self.base_model!r} must be a non-empty string (the policy model's name)")
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("dim", self.dim, 1)
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise ValueError(f"layers={self.layers!r} must be a sequence of integers")
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if self.kind != "logprob_tokens" and (self.token_index or self.index_size):
            raise ValueError(
                f"token_index={self.token_index!r} and index_size={self.index_size!r} "
                "are only for kind='logprob_tokens'"
            )
        if self.kind == "hidden":
            if not layers:
                raise ValueError("layers=() is empty; kind='hidden' needs at least one hidden_states index")
            for layer in layers:
                _check_int("layers entry", layer, 0, self.num_layers)
            if list(layers) != sorted(set(layers)):
                raise ValueError(f"layers={layers!r} must be sorted ascending with no repeats")
            if self.top_k != 0:
                raise ValueError(f"top_k={self.top_k!r} must be 0 for kind='hidden'")
            want = len(layers) * self.hidden_size
            if self.dim != want:
                raise ValueError(
                    f"dim={self.dim} does not match {len(layers)} layers x hidden_size {self.hidden_size} = {want}"
                )
        else:
            if layers:
                raise ValueError(f"layers={layers!r} must be empty for kind={self.kind!r}")
            _check_int("top_k", self.top_k, 1, MAX_TOP_K)
            want = self.top_k + EXTRA_FEATURES if self.kind == "logprobs" else token_row_dim(self.top_k)
            if self.dim != want:
                how = (
                    f"top_k {self.top_k} + {EXTRA_FEATURES}"
                    if self.kind == "logprobs"
                    else (f"the packed token row of top_k {self.top_k} ({EXTRA_FEATURES + 1} + 3 x top_k)")
                )
                raise ValueError(f"dim={self.dim} does not match {how} = {want}")
            if self.kind == "logprob_tokens":
                if self.token_index not in INDEX_KINDS:
                    raise ValueError(f"token_index={self.token_index!r} is unknown; allowed: {', '.join(INDEX_KINDS)}")
                _check_int("index_size", self.index_size, 1 if self.token_index == "vocab" else 2, MAX_BUCKETS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        if not isinstance(d, dict):
            raise ValueError(f"a feature spec must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"feature spec has unknown keys {unknown}; allowed: {sorted(names)}")
        missing = sorted(n for n in ("kind", "dim", "base_model", "hidden_size", "num_layers") if n not in d)
        if missing:
            raise ValueError(f"feature spec lacks keys {missing}")
        return cls(**d)

    def describe_model(self) -> str:
        return f"{self.base_model!r} (hidden {self.hidden_size}, {self.num_layers} layers)"


def _model_mismatch(
    spec: FeatureSpec, base_model: str | None, hidden_size: int | None, num_layers: int | None
) -> str | None:
    """Message when a given model fact differs from the spec's, else None."""
    given = {"base_model": base_model, "hidden_size": hidden_size, "num_layers": num_layers}
    if all(v is None or getattr(spec, k) == v for k, v in given.items()):
        return None
    parts = [
        f"hidden {hidden_size}" if hidden_size is not None else "",
        f"{num_layers} layers" if num_layers is not None else "",
    ]
    facts = ", ".join(p for p in parts if p)
    used = (repr(base_model) if base_model is not None else "a model") + (f" ({facts})" if facts else "")
    return f"reward head was trained on base model {spec.describe_model()} but the model in use is {used}"


def check_compatible(spec: FeatureSpec, *, base_model: str, hidden_size: int, num_layers: int) -> None:
    """Raise :class:`IncompatibleHeadError` unless ``spec`` was made for this model."""
    message = _model_mismatch(spec, base_model, hidden_size, num_layers)
    if message is not None:
        raise IncompatibleHeadError(message)


def _spec_difference(stored: FeatureSpec, expected: FeatureSpec) -> str | None:
    diffs = [
        f"{f.name} {getattr(stored, f.name)!r} vs expected {getattr(expected, f.name)!r}"
        for f in fields(FeatureSpec)
        if getattr(stored, f.name) != getattr(expected, f.name)
    ]
    if not diffs:
        return None
    return "reward head reads other features than expected: " + "; ".join(diffs)


class GatedLinearHead(torch.nn.Module):
    """R = sum_t g_t r_t / max(sum_t g_t, 1e-8), g_t = sigmoid(w_g.x_t + b_g), r_t = w_r.x_t + b_r.

    ``gate=False`` makes R the plain mean of r_t (the gate output is then unused). One
    ``nn.Linear(dim, 2)`` in float32: output 0 is the gate logit, output 1 the token reward.
    ``feature_mean``/``feature_std`` standardise inputs inside the head, so a checkpoint
    carries them; zeros/ones mean no standardisation.
    """

    def __init__(self, spec: FeatureSpec, gate: bool = True) -> None:
        super().__init__()
        if not isinstance(spec, FeatureSpec):
            raise ValueError(f"spec must be a FeatureSpec, got {type(spec).__name__}")
        if not isinstance(gate, bool):
            raise ValueError(f"gate={gate!r} must be True or False")
        self.spec = spec
        self.gate = gate
        self.linear = torch.nn.Linear(spec.dim, 2, dtype=torch.float32)
        self.register_buffer("feature_mean", torch.zeros(spec.dim, dtype=torch.float32))
        self.register_buffer("feature_std", torch.ones(spec.dim, dtype=torch.float32))
        self.training_summary: dict[str, Any] = {}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.linear.weight.device

    def set_standardisation(self, mean: Tensor, std: Tensor) -> None:
        """Use ``(x - mean) / std`` as the input; ``std`` is clamped to >= 1e-6."""
        store_standardisation(self, mean, std)

    def token_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` [..., dim] any float dtype -> (gate_logit [...], token_reward [...]) in float32."""
        if x.shape[-1] != self.spec.dim:
            raise ValueError(f"features have last dimension {x.shape[-1]} but the head reads dim={self.spec.dim}")
        converted = x.to(device=self.device, dtype=torch.float32)
        if converted is x:
            converted = (x - self.feature_mean) / self.feature_std
        else:  # a fresh copy: standardise in place rather than allocate another
            converted.sub_(self.feature_mean).div_(self.feature_std)
        out = self.linear(converted)
        return out[..., 0], out[..., 1]

    def init_weights(self, generator: torch.Generator) -> None:
        """nn.Linear's default bounds, drawn from ``generator`` (so a seed fixes the start)."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.linear.in_features)
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            self.linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """``features`` [B, T, dim], ``mask`` [B, T] (bool or 0/1) -> R [B]; a row with no tokens -> 0."""
        return gated_mean(self, features, mask)


def store_standardisation(head: Any, mean: Tensor, std: Tensor) -> None:
    """Check ``mean``/``std`` against the head's ``feature_mean`` buffer and store them (std >= 1e-6)."""
    d = head.feature_mean.shape[0]
    if tuple(mean.shape) != (d,) or tuple(std.shape) != (d,):
        raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} must have shape ({d},)")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise ValueError("mean and std must be finite")
    with torch.no_grad():
        head.feature_mean.copy_(mean.to(torch.float32))
        head.feature_std.copy_(std.to(torch.float32).clamp(min=MIN_STD))


def gated_mean(head: Any, features: Tensor, mask: Tensor) -> Tensor:
    """R = sum g r / max(sum g, eps) over the live tokens (plain mean without a gate), for any head
    with ``token_outputs`` and ``gate``."""
    if features.dim() != 3 or tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"features {tuple(features.shape)} and mask {tuple(mask.shape)} must be [B, T, dim] and [B, T]"
        )
    gate_logit, reward = head.token_outputs(features)
    live = mask.to(device=reward.device) != 0
    zero = torch.zeros((), dtype=reward.dtype, device=reward.device)
    # where(), not multiplication: padding may hold anything, NaN included
    reward = torch.where(live, reward, zero)
    if not head.gate:
        return reward.sum(-1) / live.sum(-1).clamp(min=1).to(reward.dtype)
    g = torch.where(live, torch.sigmoid(gate_logit), zero)
    return (g * reward).sum(-1) / g.sum(-1).clamp(min=GATE_EPS)


class GatedSums:
    """Streaming form of :meth:`GatedLinearHead.forward` for a decode-time observer.

    Keeps per-row float64 sums (``weighted`` = sum g r, ``gate`` = sum g, ``reward_sum`` = sum r,
    ``count``) instead of the tokens; :meth:`rewards` equals ``forward`` on the same tokens.
    """

    def __init__(self, head: GatedLinearHead, rows: int, device: torch.device | str | None = None) -> None:
        _check_int("rows", rows, 0)
        self.head = head
        dev = torch.device(device) if device is not None else head.device
        if dev.type == "mps":  # no float64 there
            dev = torch.device("cpu")
        self.weighted = torch.zeros(rows, dtype=torch.float64, device=dev)
        self.gate = torch.zeros_like(self.weighted)
        self.reward_sum = torch.zeros_like(self.weighted)
        self.count = torch.zeros_like(self.weighted)

    @property
    def rows(self) -> int:
        return self.weighted.shape[0]

    def update(self, x: Tensor, live: Tensor) -> None:
        """Add one token per live row: ``x`` [rows, dim], ``live`` [rows] bool."""
        if x.dim() != 2 or x.shape[0] != self.rows or tuple(live.shape) != (self.rows,):
            raise ValueError(
                f"x {tuple(x.shape)} and live {tuple(live.shape)} must be [{self.rows}, dim] and [{self.rows}]"
            )
        with torch.no_grad():
            gate_logit, reward = self.head.token_outputs(x)
            dev = self.weighted.device
            live = live.to(device=dev) != 0
            g = torch.sigmoid(gate_logit).to(device=dev, dtype=torch.float64)
            r = reward.to(device=dev, dtype=torch.float64)
            zero = torch.zeros((), dtype=torch.float64, device=dev)
            g = torch.where(live, g, zero)
            r = torch.where(live, r, zero)
            self.weighted += g * r
            self.gate += g
            self.reward_sum += r
            self.count += live.to(torch.float64)

    def rewards(self) -> Tensor:
        """R per row in float32 (0 for rows that saw no token)."""
        if self.head.gate:
            out = self.weighted / self.gate.clamp(min=GATE_EPS)
        else:
            out = self.reward_sum / self.count.clamp(min=1.0)
        return out.to(torch.float32)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esamp-agents")
    except PackageNotFoundError:
        return "unknown"


def _wanted_shapes(spec: FeatureSpec) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
    """(float tensors a head of ``spec`` holds, with shapes; other tensors it holds: a vocab index)."""
    if spec.kind != "logprob_tokens":
        d = spec.dim
        return {"linear.weight": (2, d), "linear.bias": (2,), "feature_mean": (d,), "feature_std": (d,)}, ()
    s, rows = spec.top_k + EXTRA_FEATURES, spec.index_size
    want = {
        "linear.weight": (2, s), "linear.bias": (2,), "feature_mean": (s,), "feature_std": (s,),
        "chosen_table": (rows, 2), "alt_table": (rows, 2),
    }  # fmt: skip
    return want, ("token_bytes", "token_offsets") if spec.token_index == "vocab" else ()


def _check_tensors(spec: FeatureSpec, tensors: dict[str, Tensor], where: str) -> None:
    want, others = _wanted_shapes(spec)
    names = set(tensors)
    if names != set(want) | set(others):
        allowed = [*want, *others]
        raise RewardHeadError(
            f"{where} holds tensors {sorted(names)}; a reward head of kind {spec.kind!r} has exactly {allowed}"
        )
    for name, shape in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise RewardHeadError(
                f"{where}: tensor {name} has shape {tuple(t.shape)} but the feature spec (dim={spec.dim}) needs {shape}"
            )
        if not t.is_floating_point():
            raise RewardHeadError(f"{where}: tensor {name} has dtype {t.dtype}; expected a float dtype")
        if not torch.isfinite(t).all():
            raise RewardHeadError(f"{where}: tensor {name} holds NaN or infinite values")
    if (tensors["feature_std"] <= 0).any():
        raise RewardHeadError(f"{where}: feature_std must be positive everywhere")


def _head_tensors(head: Any) -> dict[str, Tensor]:
    """What a checkpoint stores: the state dict in float32, plus a token head's index."""
    tensors = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in head.state_dict().items()}
    index = getattr(head, "index", None)
    if index is not None:
        tensors.update(index.to_tensors())
    return tensors


def save_head(head: GatedLinearHead | TokenTableHead, path: str | Path) -> Path:
    """Write ``head`` to a safetensors file with its spec and training summary; returns the path.

    Writes a temporary file in the same folder, then renames it over ``path``, so a crash or
    an error never leaves a half-written checkpoint nor damages an existing one.
    """
    from safetensors.torch import save_file

    from esamp_agents.hidden_reward.token_head import TokenTableHead

    if not isinstance(head, (GatedLinearHead, TokenTableHead)):
        raise ValueError(f"head must be a GatedLinearHead or TokenTableHead, got {type(head).__name__}")
    if isinstance(head, TokenTableHead) and head.embedding is not None:
        raise ValueError("the head's tables are still tied to an embedding: call head.materialise() before saving")
    path = Path(path)
    spec = FeatureSpec.from_dict(head.spec.to_dict())  # re-validates a spec altered after construction
    tensors = _head_tensors(head)
    _check_tensors(spec, tensors, "head to save")
    try:
        summary = json.dumps(head.training_summary)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"training_summary cannot be stored as JSON: {exc}") from exc
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "spec": json.dumps(spec.to_dict()),
        "gate": json.dumps(head.gate),
        "training_summary": summary,
        "package_version": _package_version(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_head(
    path: str | Path,
    *,
    expect: FeatureSpec | None = None,
    base_model: str | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
) -> GatedLinearHead | TokenTableHead:
    """Read a head written by :func:`save_head` (safetensors only; nothing is unpickled).

    ``base_model``/``hidden_size``/``num_layers`` (any subset) and ``expect`` (a whole spec)
    are checked against the stored spec; any mismatch raises :class:`IncompatibleHeadError`
    naming both values.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reward head checkpoint not found: {path}")
    if not path.is_file():
        raise RewardHeadError(f"reward head checkpoint {path} is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise RewardHeadError(f"{path} is not a safetensors file ({type(exc).__name__}: {exc})") from exc
    if metadata.get("format") != FORMAT_NAME or "format_version" not in metadata:
        raise RewardHeadError(
            f"{path} has no reward head format version in its metadata "
            f"(format={metadata.get('format')!r}); it was not written by save_head"
        )
    if metadata["format_version"] != str(FORMAT_VERSION):
        raise RewardHeadError(
            f"{path} has reward head format version {metadata['format_version']!r}; "
            f"this package reads version {FORMAT_VERSION}"
        )
    try:
        spec = FeatureSpec.from_dict(json.loads(metadata["spec"]))
        gate = json.loads(metadata["gate"])
        summary = json.loads(metadata.get("training_summary", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise RewardHeadError(f"{path} has an invalid spec/gate/summary in its metadata: {exc}") from exc
    if not isinstance(gate, bool) or not isinstance(summary, dict):
        raise RewardHeadError(f"{path}: metadata gate={gate!r} must be a bool and training_summary a JSON object")
    _check_tensors(spec, tensors, str(path))
    message = _model_mismatch(spec, base_model, hidden_size, num_layers)
    if message is not None:
        raise IncompatibleHeadError(message)
    if expect is not None:
        message = _spec_difference(spec, expect)
        if message is not None:
            raise IncompatibleHeadError(message)
    if spec.kind == "logprob_tokens":
        from esamp_agents.hidden_reward.token_head import TokenTableHead
        from esamp_agents.hidden_reward.token_index import TokenIndex

        try:
            index = TokenIndex.from_tensors(spec.token_index, spec.index_size, tensors)
        except ValueError as exc:
            raise RewardHeadError(f"{path}: its token index is damaged: {exc}") from exc
        head: GatedLinearHead | TokenTableHead = TokenTableHead(spec, index, gate=gate)
        state = {k: t.to(torch.float32) for k, t in tensors.items() if k not in ("token_bytes", "token_offsets")}
    else:
        head = GatedLinearHead(spec, gate=gate)
        state = {k: t.to(torch.float32) for k, t in tensors.items()}
    head.load_state_dict(state)
    head.training_summary = summary
    return head


__all__ = [
    "FEATURE_KINDS",
    "FORMAT_VERSION",
    "FeatureKind",
    "FeatureSpec",
    "GatedLinearHead",
    "GatedSums",
    "IncompatibleHeadError",
    "RewardHeadError",
    "check_compatible",
    "gated_mean",
    "load_head",
    "save_head",
    "store_standardisation",
]
