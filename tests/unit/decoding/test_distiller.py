"""The batched Distiller: per-prompt isolation, live-row masking, learning."""

from __future__ import annotations

import pytest
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
        dist.step()
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


def autograd_loss(weights: list[torch.Tensor], h1: torch.Tensor, target: torch.Tensor, live: torch.Tensor):
    """The Distiller's loss written plainly, for autograd to differentiate (the reference)."""
    x = h1
    for b in range(2):
        w_gate, w_up, w_down = weights[3 * b : 3 * b + 3]
        x = x + torch.bmm(torch.nn.functional.silu(torch.bmm(x, w_gate)) * torch.bmm(x, w_up), w_down)
    live_f = live.float()
    return (((target - x) ** 2).sum(-1) * live_f).sum(-1) / live_f.sum(-1).clamp(min=1.0)


@pytest.mark.parametrize("gram_max_rows", [64, 0], ids=["norm-from-factors", "norm-from-gradients"])
def test_hand_written_gradients_match_autograd(gram_max_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("esamp_agents.decoding.distiller.GRAM_MAX_ROWS", gram_max_rows)
    h1, target = data(6)
    live = torch.tensor([[True, False, True, True], [True, True, True, False]])
    dist = make(grad_clip=1e9)  # no clipping: .grad holds the raw gradient after the step
    reference = [w.detach().clone().requires_grad_(True) for w in dist.weights]
    _, novelty, loss = dist.predict_and_loss(h1, target, live)
    ref_loss = autograd_loss(reference, h1, target, live)
    torch.testing.assert_close(loss, ref_loss.detach())
    expected = torch.autograd.grad(ref_loss.sum(), reference)
    dist.step()
    for got, want in zip(dist.grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert novelty.shape == (2, 4) and (novelty >= 0).all()


@pytest.mark.parametrize("gram_max_rows", [64, 0], ids=["norm-from-factors", "norm-from-gradients"])
def test_gradient_clip_is_per_prompt(gram_max_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("esamp_agents.decoding.distiller.GRAM_MAX_ROWS", gram_max_rows)
    h1, target = data(4)
    live = torch.ones(2, 4, dtype=torch.bool)
    scale = torch.tensor([1e-3, 1e3]).view(2, 1, 1)  # prompt 0: tiny gradients, prompt 1: huge
    dist = make(grad_clip=0.5)
    reference = [w.detach().clone().requires_grad_(True) for w in dist.weights]
    inputs = (h1 * scale.clamp(max=1.0), target * scale, live)
    raw = torch.autograd.grad(autograd_loss(reference, *inputs).sum(), reference)
    dist.predict_and_loss(*inputs)
    dist.step()  # leaves the clipped gradients in .grad
    norm = lambda gs, p: torch.sqrt(sum(g[p].pow(2).sum() for g in gs))  # noqa: E731
    clipped = dist.grads
    assert norm(raw, 1) > 0.5 and abs(norm(clipped, 1) - 0.5) < 1e-3
    assert norm(raw, 0) < 0.5
    for r, c in zip(raw, clipped, strict=True):
        torch.testing.assert_close(r[0], c[0], rtol=1e-4, atol=1e-9)  # prompt 0 is not scaled by prompt 1's norm


def test_overlapped_updates_compute_what_synchronous_ones_do() -> None:
    """overlap=True runs each step on a worker thread; the next prediction waits for it."""
    h1, target = data(7)
    live = torch.ones(2, 4, dtype=torch.bool)
    sync, overlapped = make(), make()
    overlapped.overlap = True
    for _ in range(6):
        for dist in (sync, overlapped):
            dist.predict_and_loss(h1, target, live)
            dist.step()
        assert overlapped._running is not None  # the last step is still in flight (or just done)
    overlapped.wait()
    for a, b in zip(sync.weights, overlapped.weights, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_overlapped_update_error_surfaces_at_the_next_wait() -> None:
    dist = make()
    dist.overlap = True
    h1, target = data(8)
    dist.predict_and_loss(h1, target, torch.ones(2, 4, dtype=torch.bool))
    assert dist._pending is not None
    dist._pending.grad_prediction = torch.zeros(3, 4, D)  # a broken update: wrong prompt count
    dist.step()
    with pytest.raises(RuntimeError):
        dist.wait()
    dist.wait()  # reported once; the Distiller is usable again


@pytest.mark.parametrize("every", [2, 3])
def test_training_every_k_steps_is_one_adam_step_on_the_k_losses_mean(every: int) -> None:
    """distiller_update_every=k: the first k-1 steps leave the weights alone, the k-th takes one
    clipped Adam step on the mean of the k forwards' losses (the reference: autograd + torch Adam)."""
    live = torch.tensor([[True, True, False, True], [True, True, True, True]])
    batches = [data(20 + i) for i in range(every)]
    dist = make(distiller_update_every=every, grad_clip=1e9)
    reference = [w.detach().clone().requires_grad_(True) for w in dist.weights]
    before = [w.detach().clone() for w in dist.weights]
    for i, (h1, target) in enumerate(batches):
        dist.predict_and_loss(h1, target, live)
        dist.step()
        if i < every - 1:
            assert dist.steps_kept == i + 1
            assert all(torch.equal(w, b) for w, b in zip(dist.weights, before, strict=True))
    assert dist.steps_kept == 0
    mean_loss = sum(autograd_loss(reference, h1, target, live).sum() for h1, target in batches) / every
    mean_loss.backward()
    for got, want in zip(dist.grads, reference, strict=True):  # the gradient of the mean, not of the sum
        torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-6)
    adam = torch.optim.Adam(reference, lr=dist.params.lr, eps=dist.params.adam_eps)
    adam.step()
    for got, want in zip(dist.weights, reference, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6)


def test_training_every_k_steps_still_learns() -> None:
    h1, target = data(3)
    live = torch.ones(2, 4, dtype=torch.bool)
    losses = train(make(lr=1e-2, distiller_update_every=4), h1, target, live, 120)
    assert (losses[-1] < 0.5 * losses[0]).all()


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.5, True])
def test_update_every_out_of_range_names_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match="distiller_update_every"):
        ESampParams(distiller_update_every=bad)  # type: ignore[arg-type]


def test_a_step_needs_a_prediction_first() -> None:
    with pytest.raises(RuntimeError, match="needs a predict_and_loss"):
        make().step()


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
