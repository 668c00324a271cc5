"""The Distiller: one small network per prompt, predicting h_L from h_1.

All prompts' Distillers live in stacked weight tensors (``[prompts, ...]``) and
run as batched matmuls, so P prompts cost one set of kernels, not P. Each
prompt's loss only touches its own slice of the weights, gradient clipping is
per prompt, and Adam is element-wise, so prompts never train on each other's
rows. Architecture (paper, App. E.2): two residual SwiGLU blocks of width 384;
parameters, loss and optimiser state in float32 whatever the LLM's dtype.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from esamp_agents.decoding.params import ESampParams

NUM_BLOCKS = 2


class BatchedDistiller:
    """``num_prompts`` independent Distillers trained online with Adam.

    Rows are laid out prompt-major: ``x`` is ``[num_prompts, rows_per_prompt, d]``.
    """

    def __init__(
        self,
        num_prompts: int,
        hidden_size: int,
        params: ESampParams,
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        self.params = params
        p, d, w = num_prompts, hidden_size, params.distiller_width
        self.weights: list[torch.Tensor] = []
        for _ in range(NUM_BLOCKS):
            for fan_in, shape in ((d, (p, d, w)), (d, (p, d, w)), (w, (p, w, d))):
                bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, without biases
                t = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
                self.weights.append(t.to(device).requires_grad_(True))
        self.optimizer = self._make_optimizer(params.lr)

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        kind = {"fused": True} if self.weights[0].device.type in ("cpu", "cuda") else {"foreach": True}
        return torch.optim.Adam(self.weights, lr=lr, eps=self.params.adam_eps, **kind)

    @property
    def num_parameters_per_prompt(self) -> int:
        return sum(w[0].numel() for w in self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [P, R, d] float32 -> predicted h_L [P, R, d]."""
        for b in range(NUM_BLOCKS):
            w_gate, w_up, w_down = self.weights[3 * b : 3 * b + 3]
            x = x + torch.bmm(F.silu(torch.bmm(x, w_gate)) * torch.bmm(x, w_up), w_down)
        return x

    def predict_and_loss(
        self, h1: torch.Tensor, target: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward with autograd on: returns (prediction, per-row error norm, per-prompt loss).

        Loss per prompt is the mean over its live rows of ||h_L - f(h_1)||^2; rows
        that are not live (finished, padding) contribute nothing.
        """
        with torch.enable_grad():
            pred = self.forward(h1)
            sq_err = (target - pred).pow(2).sum(-1)  # [P, R]
            live_f = live.to(sq_err.dtype)
            loss = (sq_err * live_f).sum(-1) / live_f.sum(-1).clamp(min=1.0)
        return pred, sq_err.detach().sqrt(), loss

    def step(self, loss: torch.Tensor) -> None:
        """Backward of the summed per-prompt losses, per-prompt clipping, one Adam step."""
        for w in self.weights:
            w.grad = None
        with torch.enable_grad():
            loss.sum().backward()
        grads = [w.grad for w in self.weights if w.grad is not None]
        sq = torch.stack([g.pow(2).flatten(1).sum(-1) for g in grads]).sum(0)
        scale = (self.params.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0).view(-1, 1, 1)
        for g in grads:
            g.mul_(scale)
        self.optimizer.step()

    def warm_start(self, h1: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, steps: int, lr: float) -> None:
        """Fit each prompt's Distiller on its own prompt states before decoding (off in the paper)."""
        if steps <= 0:
            return
        optimizer, self.optimizer = self.optimizer, self._make_optimizer(lr)
        for _ in range(steps):
            _, _, loss = self.predict_and_loss(h1, target, mask)
            self.step(loss)
        self.optimizer = optimizer
