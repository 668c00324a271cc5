"""The knobs the configuration study sweeps: sampler options, the shared Distiller, the paper preset."""

from __future__ import annotations

import pytest
import torch

from esamp_agents import ESampParams
from esamp_agents.decoding.distiller import BatchedDistiller
from esamp_agents.evaluation.samplers import Sampler, parse_sampler


def test_paper_preset_is_the_papers_recipe() -> None:
    paper = ESampParams.paper()
    assert (paper.beta, paper.distiller_width, paper.lr, paper.warm_start_steps, paper.shared_distiller) == (
        0.25, 384, 4e-4, 0, False,
    )  # fmt: skip
    assert ESampParams.paper(beta=0.5).beta == 0.5


def test_shared_distiller_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"shared_distiller='yes' must be True or False"):
        ESampParams(shared_distiller="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("vanilla:t=0.5", "vanilla:t=0.5"),
        ("minp:0.05:t=1.0", "minp:0.05:t=1"),
        ("esamp:0.1:warm20:t=1:min_p=0.05:shared:width=128", "esamp:0.1:warm20:width=128:shared:min_p=0.05:t=1"),
        ("esamp:0.25:warm20:warm_lr=0.0005", "esamp:0.25:warm20:warm_lr=0.0005"),
        ("esamp:0.1:warm20:t=1:every=4:width=128", "esamp:0.1:warm20:width=128:every=4:t=1"),
    ],
)
def test_sampler_options_have_one_canonical_name(spec: str, name: str) -> None:
    sampler = parse_sampler(spec)
    assert sampler.name == name
    assert parse_sampler(sampler.name) == sampler
    assert ":" not in sampler.folder


def test_sampler_options_reach_the_parameters() -> None:
    s = parse_sampler("esamp:0.1:warm20:width=128:shared:every=3:min_p=0.05:t=1")
    es = s.esamp_params()
    assert (es.beta, es.warm_start_steps, es.distiller_width, es.shared_distiller) == (0.1, 20, 128, True)
    assert es.distiller_update_every == 3
    assert parse_sampler("esamp").esamp_params().distiller_update_every == 1  # unset: the default
    sp = s.sampling_params(n=4, temperature=0.7, top_k=50, top_p=1.0, max_tokens=8, seed=0)
    assert (sp.temperature, sp.min_p) == (1.0, 0.05)
    plain = parse_sampler("vanilla").sampling_params(n=4, temperature=0.7, top_k=50, top_p=1.0, max_tokens=8, seed=0)
    assert plain.temperature == 0.7  # no t= option: the run's shared temperature


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("vanilla:shared", r"option 'shared' is not understood here"),
        ("minp:0.1:width=3", r"option 'width=3' is not understood here"),
        ("esamp:0.1:t=0", r"t=0.0 is out of range; allowed: 0 < t <= 10"),
        ("esamp:0.1:width=0", r"width='0' is out of range; allowed: 1 <= width <= 65536"),
        ("esamp:0.1:every=0", r"every='0' is out of range; allowed: 1 <= every <= 1024"),
        ("vanilla:every=2", r"option 'every=2' is not understood here"),
        ("esamp:0.1:warm_lr=2", r"warm_lr=2.0 is out of range; allowed: 0 < warm_lr <= 1"),
        ("esamp:0.1:min_p=1", r"min_p=1.0 is out of range; allowed: 0 < min_p < 1"),
        ("esamp:t=1:0.1", r"options must come after BETA/STEPS/P"),
        ("esamp:0.1:t=1:t=2", r"option 't=2' is not understood here"),
        ("esamp:0.1:colour=red", r"option 'colour=red' is not understood"),
    ],
)
def test_bad_sampler_options_name_the_value(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_sampler(spec)


def test_sampler_dataclass_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="not a valid sampler"):
        Sampler("vanilla", shared_distiller=True)
    with pytest.raises(ValueError, match="distiller_width=0 is out of range"):
        Sampler("esamp", beta=0.1, distiller_width=0)
    with pytest.raises(ValueError, match="not a valid sampler"):
        Sampler("vanilla", distiller_update_every=2)


def test_one_shared_distiller_trains_on_all_rows() -> None:
    """Shared = a BatchedDistiller over one group holding every prompt's rows."""
    params = ESampParams(distiller_width=8)
    shared = BatchedDistiller(1, 6, params, generator=torch.Generator().manual_seed(0))
    h1, target = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    live = torch.tensor([[True, True, False, True]])
    _, novelty, loss = shared.predict_and_loss(h1, target, live)
    assert loss.shape == (1,) and novelty.shape == (1, 4)
    before = [w.detach().clone() for w in shared.weights]
    shared.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, shared.weights, strict=True))


def test_presets_and_overrides() -> None:
    from esamp_agents.decoding.params import esamp_preset

    assert esamp_preset("paper") == ESampParams.paper()
    assert esamp_preset("default") == ESampParams()
    tuned = esamp_preset("paper", beta=0.5, warm_start_steps=None)  # None = keep the preset's
    assert (tuned.beta, tuned.warm_start_steps) == (0.5, 0)
    with pytest.raises(ValueError, match=r"preset='fast' is not known; allowed: default, paper"):
        esamp_preset("fast")


def test_generate_and_serve_take_a_preset() -> None:
    from esamp_agents.cli.app import build_parser

    args = build_parser().parse_args(["generate", "hi", "--preset", "paper"])
    assert (args.preset, args.beta, args.warm_start_steps) == ("paper", None, None)
    args = build_parser().parse_args(["serve", "--preset", "paper", "--beta", "0.3"])
    assert (args.preset, args.beta) == ("paper", 0.3)


def test_plots_give_every_sampler_its_own_style_beyond_ten() -> None:
    pytest.importorskip("matplotlib")
    from esamp_agents.evaluation.plots import _style

    styles = [(tuple(_style(i, 14)[0]), _style(i, 14)[1]) for i in range(14)]
    assert len(set(styles)) == 14
    assert [_style(i, 3)[0] for i in range(3)] == ["C0", "C1", "C2"]
