"""The batched Distiller: per-prompt isolation, live-row masking, learning."""

from __future__ import annotations

import torch

from esamp_agents.decoding.distiller import BatchedDistiller
from esamp_agents.decoding.params import ESampParams

D = 16


def make(prompts: int = 2, seed: int = 0, **kw: float) -> BatchedDistiller:
    return BatchedDistiller(
        prompts, D, ESampParams(distiller_width=8, **kw), generator=torch.Generator().manual_seed(seed)
    )


def train(
    dist: BatchedDistiller, h1: torch.Tensor, target: torch.Tensor, live: torch.Tensor, steps: int
) -> list[float]:
    losses = []
    for _ in range(steps):
        _, _, loss = dist.predict_and_loss(h1, target, live)
        dist.step(loss)
        losses.append(loss.detach().clone())
    return losses


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h1 = torch.randn(2, 4, D, generator=g)
    target = torch.tanh(h1 @ torch.randn(D, D, generator=g))
    return h1, target


def test_prompts_never_train_on_each_others_rows() -> None:
    h1, target = data(0)
    live = torch.ones(2, 4, dtype=torch.bool)
    a, b = make(), make()
    train(a, h1, target, live, 5)
    h1_b, target_b = h1.clone(), target.clone()
    h1_b[1] *= 50.0  # prompt 1's rows become wildly different (and its gradients get clipped)
    target_b[1] = -target_b[1]
    train(b, h1_b, target_b, live, 5)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        assert torch.equal(wa[0], wb[0]), "prompt 0's Distiller changed with prompt 1's data"
        assert not torch.equal(wa[1], wb[1])


def test_finished_rows_never_train() -> None:
    h1, target = data(1)
    live = torch.tensor([[True, True, False, False], [True, False, False, False]])
    a, b = make(), make()
    train(a, h1, target, live, 3)
    h1_b = h1.clone()
    h1_b[~live] = 1e3  # garbage in dead rows
    train(b, h1_b, target, live, 3)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        assert torch.equal(wa, wb)


def test_a_prompt_with_no_live_rows_gets_zero_loss() -> None:
    h1, target = data(2)
    live = torch.tensor([[True] * 4, [False] * 4])
    _, _, loss = make().predict_and_loss(h1, target, live)
    assert loss[1].item() == 0.0 and loss[0].item() > 0.0


def test_loss_falls_with_training() -> None:
    h1, target = data(3)
    live = torch.ones(2, 4, dtype=torch.bool)
    losses = train(make(lr=1e-2), h1, target, live, 60)
    assert (losses[-1] < 0.5 * losses[0]).all()


def test_gradient_clip_is_per_prompt() -> None:
    h1, target = data(4)
    live = torch.ones(2, 4, dtype=torch.bool)
    scale = torch.tensor([1e-3, 1e3]).view(2, 1, 1)  # prompt 0: tiny gradients, prompt 1: huge
    dist = make(grad_clip=0.5)
    _, _, loss = dist.predict_and_loss(h1 * scale.clamp(max=1.0), target * scale, live)
    raw = torch.autograd.grad(loss.sum(), dist.weights, retain_graph=True)
    dist.step(loss)  # leaves the clipped gradients in .grad
    norm = lambda gs, p: torch.sqrt(sum(g[p].pow(2).sum() for g in gs))  # noqa: E731
    clipped = [w.grad for w in dist.weights]
    assert norm(raw, 1) > 0.5 and abs(norm(clipped, 1) - 0.5) < 1e-3
    assert norm(raw, 0) < 0.5
    for r, c in zip(raw, clipped, strict=True):
        torch.testing.assert_close(r[0], c[0])  # prompt 0 is not scaled by prompt 1's norm


def test_warm_start_fits_prompt_states() -> None:
    h1, target = data(5)
    live = torch.ones(2, 4, dtype=torch.bool)
    dist = make()
    before = dist.predict_and_loss(h1, target, live)[2].detach()
    dist.warm_start(h1, target, live, steps=30, lr=1e-2)
    after = dist.predict_and_loss(h1, target, live)[2].detach()
    assert (after < before).all()


def test_parameter_count_matches_the_paper_shape() -> None:
    dist = BatchedDistiller(1, 576, ESampParams())
    assert dist.num_parameters_per_prompt == 2 * 3 * 576 * 384
    assert all(w.dtype == torch.float32 for w in dist.weights)
