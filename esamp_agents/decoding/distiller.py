"""The Distiller: one small network per prompt, predicting h_L from h_1.

All prompts' Distillers live in stacked weight tensors (``[prompts, ...]``) and
run as batched matmuls, so P prompts cost one set of kernels, not P. Each
prompt's loss only touches its own slice of the weights, gradient clipping is
per prompt, and Adam is element-wise, so prompts never train on each other's
rows. Architecture (paper, App. E.2): two residual SwiGLU blocks of width 384;
parameters, loss and optimiser state in float32 whatever the LLM's dtype.

The gradients are written by hand into buffers allocated once, not by autograd: at
decode shapes (a few rows per prompt) autograd's graph, its freshly allocated
gradient tensors (each a new multi-MB allocation the OS must zero) and the clip's
temporaries cost more than the arithmetic itself (BENCHMARKS.md section 14).
``tests/unit/decoding/test_distiller.py`` checks the hand-written gradients against autograd.

With ``overlap=True`` the update runs off the decode loop's critical path, as in the paper's
pipeline: :meth:`BatchedDistiller.step` starts it on a side lane (a CUDA stream on a GPU, one
worker thread elsewhere) and returns; the next use of the weights waits for it. The step's
inputs are already known when it starts and nothing reads the weights until the next step's
prediction, so the sampler computes exactly what the synchronous order computes.

With ``params.distiller_update_every = k > 1`` each :meth:`BatchedDistiller.step` only keeps
the forward's activations until k have been kept, then takes one clipped Adam step on the mean
of those k losses. The weights do not change in between, so that is the exact gradient of the
mean loss; what changes is how often the Distiller learns (a documented option, not a default).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from esamp_agents.decoding.params import ESampParams

NUM_BLOCKS = 2
# Up to this many rows per prompt, the clip's norm is computed from the gradients' small factors
# (cost rows^2 x width) instead of reading the gradients back (cost d x width per weight).
GRAM_MAX_ROWS = 64
_WORKER: ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    """The one thread every overlapped CPU update runs on (created on first use)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esamp-distiller")
        return _WORKER


@dataclass
class PendingUpdate:
    """What one Adam step needs from a forward: the block activations and dLoss/dprediction."""

    activations: list[tuple[torch.Tensor, ...]]
    grad_prediction: torch.Tensor


class BatchedDistiller:
    """``num_prompts`` independent Distillers trained online with Adam.

    Rows are laid out prompt-major: ``x`` is ``[num_prompts, rows_per_prompt, d]``.
    Use: ``predict_and_loss`` (a forward that remembers what the update needs), then
    ``step()`` (one clipped Adam step on that forward's loss).
    """

    def __init__(
        self,
        num_prompts: int,
        hidden_size: int,
        params: ESampParams,
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        overlap: bool = False,
    ) -> None:
        self.params = params
        self.overlap = overlap
        p, d, w = num_prompts, hidden_size, params.distiller_width
        self.weights: list[torch.Tensor] = []
        for _ in range(NUM_BLOCKS):
            for fan_in, shape in ((d, (p, d, w)), (d, (p, d, w)), (w, (p, w, d))):
                bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, without biases
                t = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
                self.weights.append(t.to(device))
        for weight in self.weights:  # allocated once; every step writes them in place
            weight.grad = torch.zeros_like(weight)
        self.optimizer = self._make_optimizer(params.lr)
        self._pending: PendingUpdate | None = None
        self._kept: list[PendingUpdate] = []  # forwards waiting for the next update (update_every > 1)
        # an update started on the side lane: (its future or CUDA stream, the inputs it reads)
        self._running: tuple[Future[None] | Any, PendingUpdate] | None = None
        self._stream: Any = None  # the side CUDA stream, created on the first overlapped update

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        kind = {"fused": True} if self.weights[0].device.type in ("cpu", "cuda") else {"foreach": True}
        return torch.optim.Adam(self.weights, lr=lr, eps=self.params.adam_eps, **kind)

    @property
    def num_parameters_per_prompt(self) -> int:
        return sum(w[0].numel() for w in self.weights)

    @property
    def grads(self) -> list[torch.Tensor]:
        """The gradient buffers of the last :meth:`step` (clipped), one per weight tensor."""
        self.wait()
        return [w.grad for w in self.weights if w.grad is not None]

    def wait(self) -> None:
        """Block until an update started by :meth:`step` has finished (no-op when none runs).
        On CUDA the wait is queued on the current stream, so the host does not block."""
        running, self._running = self._running, None
        if running is None:
            return
        lane, _inputs = running  # the inputs stay referenced until here (CUDA: the side stream reads them)
        if isinstance(lane, Future):
            lane.result()  # re-raises an error of the update here
        else:
            torch.cuda.current_stream(self.weights[0].device).wait_stream(lane)

    def forward(self, x: torch.Tensor, activations: list[tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
        """``x`` [P, R, d] float32 -> predicted h_L [P, R, d]; ``activations`` collects what the
        gradients need, one tuple per block."""
        for b in range(NUM_BLOCKS):
            w_gate, w_up, w_down = self.weights[3 * b : 3 * b + 3]
            gate, up = torch.bmm(x, w_gate), torch.bmm(x, w_up)
            act = F.silu(gate)
            mixed = act * up
            if activations is not None:
                activations.append((x, gate, up, act, mixed))
            x = torch.baddbmm(x, mixed, w_down)  # x + mixed @ w_down
        return x

    def predict_and_loss(
        self, h1: torch.Tensor, target: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward: returns (prediction, per-row error norm, per-prompt loss), and keeps
        what :meth:`step` needs to train on this loss.

        Loss per prompt is the mean over its live rows of ||h_L - f(h_1)||^2; rows
        that are not live (finished, padding) contribute nothing.
        """
        self.wait()
        activations: list[tuple[torch.Tensor, ...]] = []
        pred = self.forward(h1, activations)
        diff = target - pred
        sq_err = diff.pow(2).sum(-1)  # [P, R]
        live_f = live.to(sq_err.dtype)
        count = live_f.sum(-1).clamp(min=1.0)
        loss = (sq_err * live_f).sum(-1) / count
        grad_prediction = diff * (live_f / count.unsqueeze(-1)).unsqueeze(-1) * -2.0
        self._pending = PendingUpdate(activations, grad_prediction)
        return pred, sq_err.sqrt(), loss

    def _factors(self, pending: PendingUpdate) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """d(sum of the prompts' losses)/d(weight) = A^T B for each weight, as small (A, B) pairs.

        Per block, with gate = x Wg, up = x Wu, act = silu(gate), mixed = act * up and
        out = x + mixed Wd: dWd = mixed^T g, d_mixed = g Wd^T, d_up = d_mixed * act,
        d_gate = d_mixed * up * silu'(gate), dWg = x^T d_gate, dWu = x^T d_up and
        dx = g + d_gate Wg^T + d_up Wu^T (not needed for the first block's input). A and B have
        one row per decoded row, so at decode shapes they are tiny next to the gradients."""
        grad = pending.grad_prediction
        factors: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(self.weights)  # type: ignore[list-item]
        for b in reversed(range(NUM_BLOCKS)):
            x, gate, up, act, mixed = pending.activations[b]
            w_gate, w_up, w_down = self.weights[3 * b : 3 * b + 3]
            d_mixed = torch.bmm(grad, w_down.transpose(1, 2))
            d_up = d_mixed * act
            sig = torch.sigmoid(gate)
            d_gate = d_mixed * up * sig * (1.0 + gate * (1.0 - sig))
            factors[3 * b : 3 * b + 3] = [(x, d_gate), (x, d_up), (mixed, grad)]
            if b > 0:
                grad = torch.baddbmm(torch.baddbmm(grad, d_gate, w_gate.transpose(1, 2)), d_up, w_up.transpose(1, 2))
        return factors

    def _clip_scale(self, norm: torch.Tensor) -> torch.Tensor:
        return (self.params.grad_clip / (norm + 1e-6)).clamp(max=1.0).view(-1, 1, 1)

    def _write_clipped_grads(self, pending: PendingUpdate) -> None:
        """The clipped gradients into the buffers. With few rows the per-prompt norm comes from the
        factors (||A^T B||^2 = sum((A A^T) * (B B^T))) and the clip scales B, so the multi-MB
        gradients are written once and never read back for a norm or rescaled in place."""
        factors = self._factors(pending)
        buffers = [w.grad for w in self.weights]
        rows = pending.grad_prediction.shape[1]
        if rows <= GRAM_MAX_ROWS:
            sq = sum(
                (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum((1, 2)) for a, b in factors
            )
            scale = self._clip_scale(sq.clamp(min=0.0).sqrt())
            for buf, (a, b) in zip(buffers, factors, strict=True):
                torch.bmm(a.transpose(1, 2), b * scale, out=buf)
            return
        for buf, (a, b) in zip(buffers, factors, strict=True):
            torch.bmm(a.transpose(1, 2), b, out=buf)
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in buffers])  # [tensors, P]
        scale = self._clip_scale(torch.linalg.vector_norm(norms, dim=0))
        for g in buffers:
            g.mul_(scale)

    def step(self) -> None:
        """Gradients of the last forward's summed per-prompt losses, per-prompt clipping, one Adam
        step (with ``overlap``: started on the side lane; the next prediction waits for it).
        With ``distiller_update_every = k``, only every k-th call updates, on the k forwards' mean loss."""
        self._kept.append(self._take_pending())
        if len(self._kept) < self.params.distiller_update_every:
            return
        pending = _merged(self._kept)
        self._kept = []
        self.wait()
        if not self.overlap:
            self._update(pending)
        elif self.weights[0].device.type == "cuda":
            device = self.weights[0].device
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            self._stream.wait_stream(torch.cuda.current_stream(device))  # the forward's outputs are ready
            with torch.cuda.stream(self._stream):
                self._update(pending)
            self._running = (self._stream, pending)
        else:
            self._running = (_worker().submit(self._update, pending), pending)

    def _take_pending(self) -> PendingUpdate:
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("BatchedDistiller.step() needs a predict_and_loss() first")
        return pending

    def _update(self, pending: PendingUpdate) -> None:
        self._write_clipped_grads(pending)
        self.optimizer.step()

    @property
    def steps_kept(self) -> int:
        """Forwards kept for the next update (0 right after an update; always 0 when every step trains)."""
        return len(self._kept)

    def warm_start(self, h1: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, steps: int, lr: float) -> None:
        """Fit each prompt's Distiller on its own prompt states before decoding (off in the paper)."""
        if steps <= 0:
            return
        self.wait()
        optimizer, self.optimizer = self.optimizer, self._make_optimizer(lr)
        for _ in range(steps):
            self.predict_and_loss(h1, target, mask)
            self._update(self._take_pending())  # in order: each step needs the last one's weights anyway
        self.optimizer = optimizer


def _merged(kept: list[PendingUpdate]) -> PendingUpdate:
    """k forwards' update inputs as one: their rows side by side, dLoss/dprediction divided by k
    (the gradient of the k losses' mean), so one update trains on all of them."""
    if len(kept) == 1:
        return kept[0]
    activations = [
        tuple(torch.cat([p.activations[b][i] for p in kept], dim=1) for i in range(len(kept[0].activations[b])))
        for b in range(len(kept[0].activations))
    ]
    grad = torch.cat([p.grad_prediction for p in kept], dim=1).div_(len(kept))
    return PendingUpdate(activations, grad)
