"""The hidden-state hook: read chosen layers' states while the engine decodes.

The engine already runs every forward with ``output_hidden_states``; an observer
receives, per decode step, the states of the layers it asked for at the position
that *produced* the token sampled in that step (so the first response token's
state is the prompt's last position, and the end-of-turn token is covered
without one more forward). Nothing is recomputed and nothing is kept by the
engine: an observer that needs only running sums (the hidden-state reward) keeps
memory independent of length.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DecodeObserver(Protocol):
    """Receives per-step hidden states. Layer ``0`` is the embedding output and
    layer ``num_layers`` is the final-norm output (the input of the LM head);
    negative indices count from the end, as in HF ``hidden_states``."""

    layers: tuple[int, ...]

    def on_start(self, num_prompts: int, samples_per_prompt: int, hidden_size: int) -> None:
        """Called once before the first step; rows are ``prompt * n + sample``."""

    def on_step(self, step: int, hidden: dict[int, torch.Tensor], token_ids: torch.Tensor, live: torch.Tensor) -> None:
        """``hidden[layer]`` is ``[rows, hidden_size]`` (model dtype); ``token_ids`` the
        tokens sampled from them; ``live`` marks rows whose token belongs to the
        candidate (False for rows that had already finished). On an accelerator a few
        steps with every row finished may follow the last real one (the engine asks the
        device whether rows are live only now and then); read only the live rows."""

    def on_finish(self) -> None:
        """Called once after the last step."""
