"""A logprob reward head that keeps token identity: the gated linear head plus per-token tables.

The statistics-only logprob head (sorted top-k logprobs, chosen rank, entropies) cannot tell
an answer digit from a comma, so its gate cannot find the tokens that matter. This head adds
what an API does tell: WHICH tokens were chosen and offered. Per token t,

    [gate logit, reward] = W s_t + b + C[c_t] + sum_i p_ti A[a_ti]

with ``s_t`` the standardised statistics, ``c_t`` the chosen token's row and ``a_ti`` the top-k
alternatives' rows of a :class:`~esamp_agents.hidden_reward.token_index.TokenIndex`, ``p_ti``
their top-k-renormalised probabilities, and ``C``, ``A`` tables of two numbers per row. The
candidate's reward is the gated mean, as in ELHSR (:func:`~esamp_agents.hidden_reward.head.gated_mean`).

The tables are either free (one learned pair per row) or, while training, tied to a fixed token
embedding ``E`` (``C = E U_c``, ``A = E U_a``: tokens with similar embeddings get similar weights,
which generalises from little data); :meth:`TokenTableHead.materialise` turns tied tables into
free ones with identical outputs, so a checkpoint never needs the embedding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from esamp_agents.hidden_reward.head import FeatureSpec, gated_mean, store_standardisation
from esamp_agents.hidden_reward.logprob_features import logprob_feature_dim
from esamp_agents.hidden_reward.token_index import TokenIndex


class TokenTableHead(torch.nn.Module):
    """The identity-keeping logprob head (see the module docstring); reads packed token rows."""

    def __init__(self, spec: FeatureSpec, index: TokenIndex, gate: bool = True) -> None:
        super().__init__()
        if not isinstance(spec, FeatureSpec) or spec.kind != "logprob_tokens":
            raise ValueError(f"spec must be a FeatureSpec of kind 'logprob_tokens', got {spec!r}")
        if not isinstance(index, TokenIndex):
            raise ValueError(f"index must be a TokenIndex, got {type(index).__name__}")
        if index.kind != spec.token_index or index.size != spec.index_size:
            raise ValueError(
                f"index ({index.kind}, {index.size} rows) does not match the spec "
                f"({spec.token_index}, {spec.index_size} rows)"
            )
        if not isinstance(gate, bool):
            raise ValueError(f"gate={gate!r} must be True or False")
        self.spec = spec
        self.index = index
        self.gate = gate
        self.stats_dim = logprob_feature_dim(spec.top_k)
        self.linear = torch.nn.Linear(self.stats_dim, 2, dtype=torch.float32)
        self.register_buffer("feature_mean", torch.zeros(self.stats_dim, dtype=torch.float32))
        self.register_buffer("feature_std", torch.ones(self.stats_dim, dtype=torch.float32))
        self.chosen_table: torch.nn.Parameter | None = torch.nn.Parameter(torch.zeros(index.size, 2))
        self.alt_table: torch.nn.Parameter | None = torch.nn.Parameter(torch.zeros(index.size, 2))
        # a buffer, so .to(device) moves it; not persistent: checkpoints hold materialised tables
        self.embedding: Tensor | None
        self.register_buffer("embedding", None, persistent=False)
        self.training_summary: dict[str, Any] = {}

    # ---- parametrisation
    def tie_to_embedding(self, embedding: Tensor) -> None:
        """Train the tables as ``embedding @ U`` (``embedding`` [index.size, d], fixed; U starts at 0)."""
        if embedding.dim() != 2 or embedding.shape[0] != self.index.size:
            raise ValueError(f"embedding {tuple(embedding.shape)} must be [{self.index.size}, d]")
        if not bool(torch.isfinite(embedding).all()):
            raise ValueError("embedding holds NaN or infinite values")
        d = embedding.shape[1]
        self.chosen_table = None
        self.alt_table = None
        self.embedding = embedding.detach().to(device=self.device, dtype=torch.float32)
        self.chosen_proj = torch.nn.Parameter(torch.zeros(d, 2, device=self.device))
        self.alt_proj = torch.nn.Parameter(torch.zeros(d, 2, device=self.device))

    def materialise(self) -> None:
        """Tied tables -> free tables with the same values (a no-op when they are free already)."""
        if self.embedding is None:
            return
        with torch.no_grad():
            chosen = self.embedding @ self.chosen_proj
            alt = self.embedding @ self.alt_proj
        del self.chosen_proj, self.alt_proj
        self.embedding = None
        self.chosen_table = torch.nn.Parameter(chosen)
        self.alt_table = torch.nn.Parameter(alt)

    def tables(self) -> tuple[Tensor, Tensor]:
        if self.embedding is not None:
            return self.embedding @ self.chosen_proj, self.embedding @ self.alt_proj
        assert self.chosen_table is not None and self.alt_table is not None
        return self.chosen_table, self.alt_table

    # ---- the GatedLinearHead interface
    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.linear.weight.device

    def init_weights(self, generator: torch.Generator) -> None:
        """Linear part: nn.Linear's default bounds from ``generator``; tables at 0 (start = statistics only)."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.stats_dim)
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            self.linear.bias.uniform_(-bound, bound, generator=generator)
            for p in (
                self.chosen_table,
                self.alt_table,
                getattr(self, "chosen_proj", None),
                getattr(self, "alt_proj", None),
            ):
                if p is not None:
                    p.zero_()

    def set_standardisation(self, mean: Tensor, std: Tensor) -> None:
        """Standardise the statistics columns: ``mean``/``std`` of shape (stats,) or of the packed row (dim,)."""
        if tuple(mean.shape) == (self.spec.dim,) and tuple(std.shape) == (self.spec.dim,):
            mean, std = mean[: self.stats_dim], std[: self.stats_dim]
        store_standardisation(self, mean, std)

    def token_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Packed rows ``x`` [..., dim] -> (gate_logit [...], token_reward [...]) in float32."""
        if x.shape[-1] != self.spec.dim:
            raise ValueError(f"features have last dimension {x.shape[-1]} but the head reads dim={self.spec.dim}")
        x = x.to(device=self.device, dtype=torch.float32)
        s, k = self.stats_dim, self.spec.top_k
        stats = (x[..., :s] - self.feature_mean) / self.feature_std
        last = self.index.size - 1
        chosen = torch.nan_to_num(x[..., s]).long().clamp(0, last)
        alts = torch.nan_to_num(x[..., s + 1 : s + 1 + k]).long().clamp(0, last)
        weights = torch.nan_to_num(x[..., s + 1 + k :])
        chosen_table, alt_table = self.tables()
        out = self.linear(stats) + chosen_table[chosen] + (weights.unsqueeze(-1) * alt_table[alts]).sum(-2)
        return out[..., 0], out[..., 1]

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """``features`` [B, T, dim] packed rows, ``mask`` [B, T] -> R [B]; a row with no tokens -> 0."""
        return gated_mean(self, features, mask)


def token_spec(base_model: str, top_k: int, index: TokenIndex) -> FeatureSpec:
    """The spec of a token head over ``index`` for logprobs of ``base_model`` (hidden sizes are unused: 1)."""
    from esamp_agents.hidden_reward.logprob_features import token_row_dim

    return FeatureSpec(
        kind="logprob_tokens", dim=token_row_dim(top_k), base_model=base_model, hidden_size=1, num_layers=1,
        top_k=top_k, token_index=index.kind, index_size=index.size,
    )  # fmt: skip


__all__ = ["TokenTableHead", "token_spec"]
