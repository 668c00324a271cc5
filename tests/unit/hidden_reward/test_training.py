"""Fitting the reward head on synthetic features whose label sits in a few gated tokens."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn import functional as F

from esamp_agents.hidden_reward.head import FeatureSpec, load_head, save_head
from esamp_agents.hidden_reward.training import (
    Example,
    _loss_terms,
    bon_accuracy,
    fit,
    pad_features,
    score_examples,
    split_groups,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: thread-pool wake-ups cost more than the work (8 ms per op on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPEC = FeatureSpec("hidden", 8, "synthetic", 4, 1, (0, 1))
FAST = {"epochs": 25, "lr": 0.02, "patience": 25}


def make_examples(
    n_groups: int = 40,
    cands: int = 6,
    seed: int = 0,
    flip: frozenset[str] = frozenset(),
    shift: frozenset[str] = frozenset(),
) -> list[Example]:
    """Per candidate 4-12 tokens; 2-3 "marker" tokens (feature 0 high) carry the label in feature 1,
    the rest carry loud noise there, so a gate that opens on markers pays. ``flip`` groups carry the
    opposite sign (a validation set that disagrees with training); ``shift`` groups are offset by +5."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in range(n_groups):
        name = f"p{g}"
        kind = g % 10  # mostly mixed groups, some all-wrong, one all-right
        n_right = 0 if kind == 8 else cands if kind == 9 else 1 + int(torch.randint(0, 2, (1,), generator=gen))
        for c in range(cands):
            label = c < n_right
            t = int(torch.randint(4, 13, (1,), generator=gen))
            x = torch.randn(t, SPEC.dim, generator=gen)
            marker = torch.randperm(t, generator=gen)[: 2 + int(torch.randint(0, 2, (1,), generator=gen))]
            x[:, 0] = -2.0 + 0.3 * x[:, 0]
            x[:, 1] = 2.0 * x[:, 1]
            sign = (1.0 if label else -1.0) * (-1.0 if name in flip else 1.0)
            x[marker, 0] = 2.0 + 0.3 * torch.randn(len(marker), generator=gen)
            x[marker, 1] = 1.5 * sign + 0.3 * torch.randn(len(marker), generator=gen)
            if name in shift:
                x = x + 5.0
            out.append(Example(x.half() if c % 2 else x, label, name))
    return out


def val_score(result, examples):
    val = [ex for ex in examples if ex.group in set(result.val_groups)]
    r = score_examples(result.head, [ex.features for ex in val])
    acc = bon_accuracy(r, [ex.label for ex in val], [ex.group for ex in val])
    loss = F.binary_cross_entropy_with_logits(r, torch.tensor([float(ex.label) for ex in val])).item()
    return acc, loss


def test_helpers_pad_bon_and_pair_losses():
    feats, mask = pad_features([torch.ones(2, 3, dtype=torch.float16), torch.ones(4, 3)])
    assert feats.shape == (2, 4, 3) and feats.dtype == torch.float32
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    assert feats[0, 2:].abs().sum().item() == 0.0
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 2.0])
    labels = [False, True, True, False, False, False]
    groups = ["a", "a", "b", "b", "c", "c"]
    assert bon_accuracy(rewards, labels, groups) == 1.0  # c has no correct one; b's tie goes to the first
    assert bon_accuracy(rewards, [not x for x in labels], groups) == pytest.approx(1 / 3)
    assert math.isnan(bon_accuracy(rewards, [False] * 6, groups))
    r = torch.tensor([1.0, 0.0, 2.0, 0.5, -1.0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    gid = torch.tensor([0, 0, 1, 1, 1])
    s, n = _loss_terms(r, y, gid, "bradley_terry", 1.0)
    assert n == 3  # (0,1), (2,3), (2,4): never across groups
    expected = -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(1.5)) + F.logsigmoid(torch.tensor(3.0)))
    assert s.item() == pytest.approx(expected.item(), abs=1e-6)
    s, n = _loss_terms(r, y, gid, "hinge", 2.0)
    assert n == 3 and s.item() == pytest.approx(1.0 + 0.5 + 0.0)
    s, n = _loss_terms(r, y, gid, "bce", 1.0)
    assert n == 5 and s.item() == pytest.approx(F.binary_cross_entropy_with_logits(r, y, reduction="sum").item())


@pytest.mark.parametrize("loss", ["bce", "bradley_terry", "hinge"])
def test_fit_learns_each_loss(loss):
    examples = make_examples()
    before = [ex.features.clone() for ex in examples[:4]]
    result = fit(examples, SPEC, loss=loss, **FAST)
    assert result.summary["best_val_bon_accuracy"] >= 0.85, result.history
    acc, _ = val_score(result, examples)
    assert acc == result.summary["best_val_bon_accuracy"]
    assert result.head.num_parameters == 2 * SPEC.dim + 2
    # the inputs are neither converted nor modified
    assert all(torch.equal(a, ex.features) for a, ex in zip(before, examples[:4], strict=True))
    assert examples[1].features.dtype == torch.float16
    used = result.summary["n_train_problems_used"]
    if loss == "bce":
        assert used == result.summary["n_train_problems"]
    else:  # groups without both labels carry no pairs
        assert used < result.summary["n_train_problems"]


def test_gate_beats_no_gate_on_gate_worthy_data():
    examples = make_examples(seed=1)
    gated = fit(examples, SPEC, **FAST).summary["best_val_bon_accuracy"]
    plain = fit(examples, SPEC, gate=False, **FAST).summary["best_val_bon_accuracy"]
    assert gated >= plain


def test_fit_is_reproducible_and_seed_matters():
    examples = make_examples(n_groups=20)
    a = fit(examples, SPEC, epochs=4, seed=5)
    b = fit(examples, SPEC, epochs=4, seed=5)
    c = fit(examples, SPEC, epochs=4, seed=6)
    for k, v in a.head.state_dict().items():
        assert torch.equal(v, b.head.state_dict()[k])
    assert a.history == b.history and a.val_groups == b.val_groups
    assert not torch.equal(a.head.linear.weight, c.head.linear.weight)


def test_split_is_by_group_seeded_and_stratified():
    examples = make_examples(n_groups=30)
    train, val = split_groups(examples, 0.2, seed=3)
    assert not set(train) & set(val)
    assert set(train) | set(val) == {ex.group for ex in examples}
    assert len(val) == 6 and split_groups(examples, 0.2, seed=3) == (train, val)
    assert split_groups(examples, 0.2, seed=4) != (train, val)
    assert split_groups(examples, 0.0, seed=3) == ([f"p{g}" for g in range(30)], [])
    # stratified: 24 mixed groups, 3 all-wrong, 3 all-right -> 5 mixed + 1 other in validation
    mixed = {ex.group for ex in examples if ex.label} & {ex.group for ex in examples if not ex.label}
    assert len(set(val) & mixed) in (4, 5)
    result = fit(examples, SPEC, epochs=2, seed=3)
    assert (result.train_groups, result.val_groups) == (train, val)
    assert result.summary["n_val_candidates"] == sum(ex.group in set(val) for ex in examples)
    assert result.summary["n_train_problems"] + result.summary["n_val_problems"] == 30


def test_best_validation_epoch_is_returned_not_the_last():
    n_groups, seed = 40, 2
    examples = make_examples(n_groups=n_groups)
    _, val = split_groups(examples, 0.2, seed=seed)
    # validation disagrees with training, so training makes validation worse: the best epoch is early
    examples = make_examples(n_groups=n_groups, flip=frozenset(val))
    result = fit(examples, SPEC, epochs=30, lr=0.02, patience=3, seed=seed)
    h, s = result.history, result.summary
    keys = [(r["val_bon_accuracy"], -r["val_loss"]) for r in h]
    assert s["best_epoch"] == 1 + keys.index(max(keys))
    assert s["stopped_early"] and s["epochs_run"] == s["best_epoch"] + 3 < 30
    acc, loss = val_score(result, examples)
    best = h[s["best_epoch"] - 1]
    assert acc == best["val_bon_accuracy"] == s["best_val_bon_accuracy"]
    assert loss == pytest.approx(best["val_loss"], abs=1e-5)
    assert loss != pytest.approx(h[-1]["val_loss"], abs=1e-3)
    assert result.head.training_summary is s


def test_no_validation_trains_all_epochs_and_standardises_on_train_only(tmp_path):
    examples = make_examples(n_groups=10)
    result = fit(examples, SPEC, epochs=3, val_fraction=0.0)
    assert len(result.history) == 3 and result.summary["best_epoch"] == 3
    assert "val_loss" not in result.history[0] and result.summary["best_val_bon_accuracy"] is None
    assert result.val_groups == []

    # validation groups are shifted by +5: their tokens must not enter the mean
    _, val = split_groups(examples, 0.3, seed=0)
    shifted = make_examples(n_groups=10, shift=frozenset(val))
    res = fit(shifted, SPEC, epochs=1, val_fraction=0.3)
    train_tokens = torch.cat([ex.features.double() for ex in shifted if ex.group not in set(val)])
    assert torch.allclose(res.head.feature_mean.double(), train_tokens.mean(0), atol=1e-5)
    assert torch.allclose(res.head.feature_std.double(), train_tokens.std(0, unbiased=False), atol=1e-5)
    unstd = fit(shifted, SPEC, epochs=1, val_fraction=0.3, standardize=False)
    assert unstd.head.feature_mean.abs().sum().item() == 0.0

    # the summary travels with the checkpoint
    path = save_head(res.head, tmp_path / "h.safetensors")
    loaded = load_head(path, expect=SPEC)
    assert loaded.training_summary == res.summary
    assert torch.equal(loaded.feature_mean, res.head.feature_mean)


def test_progress_bar(capsys):
    fit(make_examples(n_groups=10), SPEC, epochs=2, progress=True)
    assert "reward head" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "mse"}, "loss='mse' is not a known loss; allowed: bce, bradley_terry, hinge"),
        ({"epochs": 0}, "epochs=0 is out of range"),
        ({"lr": 0.0}, "lr=0.0 is out of range; allowed: 0 < lr <= 1"),
        ({"lr": 2.0}, "lr=2.0 is out of range"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0 is out of range; allowed: 0 <= weight_decay <= 1"),
        ({"groups_per_step": 0}, "groups_per_step=0 is out of range"),
        ({"val_fraction": 1.0}, "val_fraction=1.0 is out of range; allowed: 0 <= val_fraction < 1"),
        ({"patience": 0}, "patience=0 is out of range"),
        ({"hinge_margin": 0.0}, "hinge_margin=0.0 is out of range"),
        ({"seed": -1}, "seed=-1 is out of range"),
        ({"gate": 1}, "gate=1 must be True or False"),
        ({"device": "nonsense"}, "device='nonsense' is not a torch device"),
    ],
)
def test_fit_rejects_bad_hyperparams(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(make_examples(n_groups=4), SPEC, **kwargs)


def test_fit_rejects_bad_data():
    good = make_examples(n_groups=4)
    with pytest.raises(ValueError, match="examples is empty"):
        fit([], SPEC)
    with pytest.raises(ValueError, match=r"examples\[2\].features has shape \(5, 7\) but the spec needs \[T >= 1, 8\]"):
        fit([*good[:2], Example(torch.zeros(5, 7), True, "x"), *good[2:]], SPEC)
    with pytest.raises(ValueError, match=r"examples\[0\].features has shape \(0, 8\)"):
        fit([Example(torch.zeros(0, 8), True, "x"), *good], SPEC)
    nan = torch.zeros(3, 8)
    nan[1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"examples\[1\].features holds NaN or infinite values"):
        fit([good[0], Example(nan, False, "x"), *good[1:]], SPEC)
    with pytest.raises(ValueError, match=r"examples\[0\].label='yes' must be a bool"):
        fit([Example(torch.zeros(3, 8), "yes", "x")], SPEC)
    with pytest.raises(ValueError, match=r"examples\[0\].group='' must be a non-empty string"):
        fit([Example(torch.zeros(3, 8), True, "")], SPEC)
    with pytest.raises(ValueError, match="examples\\[0\\] is a tuple"):
        fit([(torch.zeros(3, 8), True, "x")], SPEC)
    one_group = [ex for ex in good if ex.group == "p0"]
    with pytest.raises(ValueError, match=r"val_fraction=0\.2 needs at least 2 groups"):
        fit(one_group, SPEC)
    assert fit(one_group, SPEC, val_fraction=0.0, epochs=1).summary["n_train_problems"] == 1
    unmixed = [Example(ex.features, ex.group == "p1", ex.group) for ex in good]
    for loss in ("bradley_terry", "hinge"):
        with pytest.raises(ValueError, match="no group has both a correct and a wrong candidate"):
            fit(unmixed, SPEC, loss=loss)
    with pytest.raises(ValueError, match="spec must be a FeatureSpec"):
        fit(good, SPEC.to_dict())
