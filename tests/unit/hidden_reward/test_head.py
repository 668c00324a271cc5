"""The gated linear reward head, its streaming sums, and its checkpoints (synthetic, no model)."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from esamp_agents.hidden_reward import head as reward_head
from esamp_agents.hidden_reward.head import (
    FeatureSpec,
    GatedLinearHead,
    GatedSums,
    IncompatibleHeadError,
    RewardHeadError,
    check_compatible,
    load_head,
    save_head,
)

MODEL = "embedded:SmolLM2-135M-Instruct.Q4_1.gguf"


def hidden_spec(layers=(0, 2), hidden_size=3, num_layers=2, base_model=MODEL) -> FeatureSpec:
    return FeatureSpec("hidden", len(layers) * hidden_size, base_model, hidden_size, num_layers, tuple(layers))


def random_head(spec: FeatureSpec, gate: bool = True, seed: int = 0) -> GatedLinearHead:
    torch.manual_seed(seed)
    head = GatedLinearHead(spec, gate=gate)
    with torch.no_grad():
        head.linear.weight.normal_()
        head.linear.bias.normal_()
    return head


# ---------------------------------------------------------------- FeatureSpec


def test_spec_round_trip_and_parameter_count():
    spec = hidden_spec()
    assert spec.dim == 6
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and isinstance(again.layers, tuple)
    assert GatedLinearHead(spec).num_parameters == 2 * 6 + 2
    lp = FeatureSpec("logprobs", 28, MODEL, 576, 30, top_k=20)
    assert FeatureSpec.from_dict(lp.to_dict()) == lp


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "logits"}, "kind='logits'"),
        ({"base_model": ""}, "base_model=''"),
        ({"hidden_size": 0}, "hidden_size=0"),
        ({"layers": ()}, "layers=() is empty"),
        ({"layers": (0, 3), "dim": 6}, "layers entry=3 is out of range; allowed: 0 <= layers entry <= 2"),
        ({"layers": (2, 0), "dim": 6}, "sorted"),
        ({"layers": (1, 1), "dim": 6}, "sorted"),
        ({"dim": 7}, "dim=7 does not match 2 layers x hidden_size 3 = 6"),
        ({"top_k": 5}, "top_k=5 must be 0"),
    ],
)
def test_spec_rejects_bad_values(kwargs, message):
    d = hidden_spec().to_dict() | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        FeatureSpec.from_dict(d)


def test_spec_logprobs_rules_and_dict_keys():
    with pytest.raises(ValueError, match=r"dim=20 does not match top_k 20 \+ 8 = 28"):
        FeatureSpec("logprobs", 20, MODEL, 576, 30, top_k=20)
    with pytest.raises(ValueError, match="top_k=21 is out of range"):
        FeatureSpec("logprobs", 29, MODEL, 576, 30, top_k=21)
    with pytest.raises(ValueError, match="must be empty for kind='logprobs'"):
        FeatureSpec("logprobs", 28, MODEL, 576, 30, layers=(1,), top_k=20)
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        FeatureSpec.from_dict(hidden_spec().to_dict() | {"extra": 1})
    with pytest.raises(ValueError, match=r"lacks keys \['dim'\]"):
        FeatureSpec.from_dict({k: v for k, v in hidden_spec().to_dict().items() if k != "dim"})


# ---------------------------------------------------------------- forward


def test_forward_hand_computed_gated_mean():
    spec = FeatureSpec("hidden", 2, MODEL, 2, 1, (1,))
    head = GatedLinearHead(spec)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # gate reads x0, reward reads 2*x1
        head.linear.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[[0.0, 1.0], [math.log(3.0), -1.0]]])  # g = 0.5, 0.75; r = 3, -1
    expected = (0.5 * 3 + 0.75 * -1) / (0.5 + 0.75)
    assert head(x, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(expected, abs=1e-6)
    gate_logit, reward = head.token_outputs(x[0])
    assert torch.allclose(gate_logit, torch.tensor([0.0, math.log(3.0)]))
    assert torch.allclose(reward, torch.tensor([3.0, -1.0]))
    assert reward.dtype == torch.float32


def test_padding_invariance_and_empty_row():
    spec = hidden_spec()
    head = random_head(spec)
    x = torch.randn(3, 4, spec.dim)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    r = head(x, mask)
    padded = torch.cat([x, torch.full((3, 5, spec.dim), float("nan"))], dim=1)
    padded[0, 3] = 1e6  # a padded position inside the row, holding garbage
    r_padded = head(padded, torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1))
    assert torch.allclose(r, r_padded, atol=1e-6)
    assert r[2].item() == 0.0 and r_padded[2].item() == 0.0
    # 0/1 float mask means the same as bool
    assert torch.allclose(head(x, mask.float()), r)
    # each row equals the head on its own live tokens
    single = head(x[0:1, :3], torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(single, r[0:1], atol=1e-6)


def test_no_gate_is_plain_mean():
    spec = hidden_spec()
    head = random_head(spec, gate=False)
    x = torch.randn(2, 5, spec.dim)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    _, reward = head.token_outputs(x)
    expected = torch.stack([reward[0, :2].mean(), reward[1].mean()])
    assert torch.allclose(head(x, mask), expected, atol=1e-6)
    assert head(x, torch.zeros(2, 5)).abs().max().item() == 0.0


def test_standardisation_equivalence_and_dtypes():
    spec = hidden_spec()
    plain = random_head(spec)
    standardised = random_head(spec)
    mean, std = torch.randn(spec.dim), torch.rand(spec.dim) + 0.5
    standardised.set_standardisation(mean, std)
    x = torch.randn(2, 4, spec.dim) * 3 + 1
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(standardised(x, mask), plain((x - mean) / std, mask), atol=1e-5)
    # float16 / float64 inputs give float32 outputs; the caller's tensor is untouched
    x16 = x.half()
    before = x16.clone()
    out16 = standardised(x16, mask)
    assert out16.dtype == torch.float32 and torch.equal(x16, before)
    assert torch.allclose(out16, standardised(x16.float(), mask), atol=1e-6)
    assert standardised(x.double(), mask).dtype == torch.float32
    # std is clamped
    standardised.set_standardisation(mean, torch.zeros(spec.dim))
    assert standardised.feature_std.min().item() == pytest.approx(1e-6)


def test_forward_rejects_bad_shapes():
    head = random_head(hidden_spec())
    with pytest.raises(ValueError, match="last dimension 5 but the head reads dim=6"):
        head(torch.randn(1, 2, 5), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"mask \(1, 3\)"):
        head(torch.randn(1, 2, 6), torch.ones(1, 3))


# ---------------------------------------------------------------- GatedSums


@pytest.mark.parametrize("gate", [True, False])
def test_gated_sums_match_forward(gate):
    spec = hidden_spec()
    head = random_head(spec, gate=gate, seed=3)
    head.set_standardisation(torch.randn(spec.dim), torch.rand(spec.dim) + 0.5)
    rows, steps = 4, 7
    x = torch.randn(rows, steps, spec.dim)
    lengths = torch.tensor([7, 3, 0, 5])
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    sums = GatedSums(head, rows)
    for t in range(steps):
        step_x = x[:, t].clone()
        step_x[~mask[:, t]] = float("nan")  # finished rows may carry garbage
        sums.update(step_x, mask[:, t])
    assert sums.weighted.dtype == torch.float64
    assert torch.equal(sums.count, lengths.double())
    got = sums.rewards()
    assert got.dtype == torch.float32
    assert (got - head(x, mask)).abs().max().item() <= 1e-5
    assert got[2].item() == 0.0
    with pytest.raises(ValueError, match=r"must be \[4, dim\]"):
        sums.update(torch.randn(3, spec.dim), torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------- checkpoints


def trained_like_head() -> GatedLinearHead:
    spec = hidden_spec()
    head = random_head(spec, gate=False, seed=7)
    head.set_standardisation(torch.randn(spec.dim), torch.rand(spec.dim) + 0.1)
    head.training_summary = {"loss": "bce", "best_epoch": 3, "best_val_bon_accuracy": 0.75, "nested": {"a": [1, 2]}}
    return head


def test_save_load_round_trip(tmp_path):
    head = trained_like_head()
    path = save_head(head, tmp_path / "sub" / "head.safetensors")
    assert path == tmp_path / "sub" / "head.safetensors" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.safetensors"]  # no temp file left
    loaded = load_head(path, expect=head.spec, base_model=MODEL, hidden_size=3, num_layers=2)
    assert loaded.spec == head.spec and loaded.gate is False
    assert loaded.training_summary == head.training_summary
    for (k, a), (k2, b) in zip(head.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b) and b.dtype == torch.float32
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "1" and json.loads(meta["spec"]) == head.spec.to_dict()
    assert meta["package_version"]


def test_failed_save_keeps_existing_file(tmp_path, monkeypatch):
    path = save_head(trained_like_head(), tmp_path / "head.safetensors")
    original = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_head(random_head(hidden_spec()), path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]
    monkeypatch.undo()

    bad = trained_like_head()
    object.__setattr__(bad.spec, "dim", 99)  # a spec corrupted after construction
    with pytest.raises(ValueError, match="dim=99"):
        save_head(bad, path)
    unjsonable = trained_like_head()
    unjsonable.training_summary = {"t": torch.zeros(1)}
    with pytest.raises(ValueError, match="training_summary cannot be stored as JSON"):
        save_head(unjsonable, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]


def write_raw(path: Path, tensors: dict, metadata: dict | None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def good_parts() -> tuple[dict, dict]:
    head = trained_like_head()
    path_tensors = {k: v.clone() for k, v in head.state_dict().items()}
    meta = {
        "format": "esamp-agents/reward-head",
        "format_version": "1",
        "spec": json.dumps(head.spec.to_dict()),
        "gate": "false",
        "training_summary": "{}",
        "package_version": "0",
    }
    return path_tensors, meta


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward head checkpoint not found"):
        load_head(tmp_path / "missing.safetensors")
    with pytest.raises(RewardHeadError, match="is not a file"):
        load_head(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(RewardHeadError, match="is not a safetensors file"):
        load_head(junk)

    tensors, meta = good_parts()
    assert load_head(write_raw(tmp_path / "ok.safetensors", tensors, meta)).gate is False

    no_meta = write_raw(tmp_path / "no_meta.safetensors", tensors, None)
    with pytest.raises(RewardHeadError, match="no reward head format version"):
        load_head(no_meta)
    no_version = write_raw(
        tmp_path / "nv.safetensors", tensors, {k: v for k, v in meta.items() if k != "format_version"}
    )
    with pytest.raises(RewardHeadError, match="no reward head format version"):
        load_head(no_version)
    future = write_raw(tmp_path / "v2.safetensors", tensors, meta | {"format_version": "2"})
    with pytest.raises(RewardHeadError, match="format version '2'; this package reads version 1"):
        load_head(future)
    bad_spec = write_raw(tmp_path / "spec.safetensors", tensors, meta | {"spec": '{"kind": "hidden"}'})
    with pytest.raises(RewardHeadError, match="invalid spec"):
        load_head(bad_spec)

    wrong_shape = tensors | {"linear.weight": torch.zeros(2, 5)}
    with pytest.raises(RewardHeadError, match=r"linear.weight has shape \(2, 5\) but the feature spec \(dim=6\)"):
        load_head(write_raw(tmp_path / "shape.safetensors", wrong_shape, meta))
    missing = {k: v for k, v in tensors.items() if k != "feature_std"}
    with pytest.raises(RewardHeadError, match=r"reward head of kind .hidden. has exactly"):
        load_head(write_raw(tmp_path / "missing_t.safetensors", missing, meta))
    nan = tensors | {"linear.bias": torch.tensor([0.0, float("nan")])}
    with pytest.raises(RewardHeadError, match="NaN"):
        load_head(write_raw(tmp_path / "nan.safetensors", nan, meta))


def test_load_rejects_other_model_naming_both(tmp_path):
    head = trained_like_head()
    path = save_head(head, tmp_path / "h.safetensors")
    expected = (
        f"reward head was trained on base model '{MODEL}' (hidden 3, 2 layers) "
        "but the model in use is 'other' (hidden 896, 24 layers)"
    )
    with pytest.raises(IncompatibleHeadError) as info:
        load_head(path, base_model="other", hidden_size=896, num_layers=24)
    assert str(info.value) == expected
    with pytest.raises(IncompatibleHeadError, match=r"model in use is a model \(hidden 4\)"):
        load_head(path, hidden_size=4)
    with pytest.raises(IncompatibleHeadError, match=r"\(hidden 3, 2 layers\) but the model in use is 'other'$"):
        load_head(path, base_model="other")
    other_layers = hidden_spec(layers=(1, 2))
    with pytest.raises(IncompatibleHeadError, match=r"layers \(0, 2\) vs expected \(1, 2\)"):
        load_head(path, expect=other_layers)
    with pytest.raises(IncompatibleHeadError, match=re.escape(expected)):
        check_compatible(head.spec, base_model="other", hidden_size=896, num_layers=24)
    check_compatible(head.spec, base_model=MODEL, hidden_size=3, num_layers=2)  # no error
    assert issubclass(IncompatibleHeadError, ValueError)


def test_load_never_unpickles(tmp_path, monkeypatch):
    head = trained_like_head()
    path = save_head(head, tmp_path / "h.safetensors")
    pickled = tmp_path / "state.pt"
    torch.save(head.state_dict(), pickled)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    assert load_head(path).spec == head.spec
    with pytest.raises(RewardHeadError, match="is not a safetensors file"):
        load_head(pickled)
    source = Path(reward_head.__file__).read_text()
    assert "torch.load" not in source
    assert not re.search(r"import pickle|pickle\.|from pickle", source)
