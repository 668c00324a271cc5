"""Token filters and the sampling step, with HF ``generate`` semantics.

Filters run in HF's order (temperature, top-k, top-p, min-p). When ``top_k`` is
set, everything after it works on the ``k`` surviving candidates instead of the
whole vocabulary (HF sorts all 49k logits for top-p; the result is the same).
The survivors are also where ESamp's bonus is added, so the Distiller's logits
are only ever needed for them: no second full vocabulary projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class Candidates:
    """Per-row sampling candidates.

    ``ids`` is ``[rows, k]`` vocabulary ids (``None``: the whole vocabulary, in
    order) and ``scores`` the tempered logits with ``-inf`` where a filter
    removed the token.
    """

    ids: torch.Tensor | None
    scores: torch.Tensor

    def vocab_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Map positions in ``scores`` to vocabulary ids."""
        return positions if self.ids is None else self.ids.gather(-1, positions.unsqueeze(-1)).squeeze(-1)


def top_p_mask(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where HF's TopPLogitsWarper removes a token (at least one survives)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    return remove_sorted.scatter(-1, order, remove_sorted)


def min_p_mask(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """True where HF's MinPLogitsWarper removes a token (the most likely one stays)."""
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return remove.scatter(-1, probs.argmax(dim=-1, keepdim=True), False)


def filter_candidates(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> Candidates:
    """Apply temperature, top-k, top-p and min-p to ``[rows, vocab]`` float32 logits."""
    ids: torch.Tensor | None = None
    if 0 < top_k < logits.shape[-1]:
        # HF keeps every token tied with the k-th score; ties of float logits at the
        # boundary are vanishingly rare and this keeps exactly k. The k survivors are
        # tempered after the top-k (the same values, without a [rows, vocab] copy).
        scores, ids = torch.topk(logits, top_k, dim=-1)
        if temperature != 1.0:
            scores = scores / temperature
    else:
        scores = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:
        scores = scores.masked_fill(top_p_mask(scores, top_p), NEG_INF)
    if min_p > 0.0:
        scores = scores.masked_fill(min_p_mask(scores, min_p), NEG_INF)
    return Candidates(ids=ids, scores=scores)


def log_normaliser(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits, -1, keepdim=True)`` computed as torch computes it (shifted by the row
    maximum), with the ``[rows, vocab]`` exponentials written into ``scratch`` (same shape)."""
    maxes = logits.amax(-1, keepdim=True)
    maxes = maxes.masked_fill(maxes.abs() == float("inf"), 0.0)
    torch.sub(logits, maxes, out=scratch).exp_()
    return scratch.sum(-1, keepdim=True).log_().add_(maxes)


def sample_positions(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one position per row from ``softmax(scores)``."""
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
