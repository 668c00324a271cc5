"""Every validation path of SamplingParams / ESampParams: the message names the value and the allowed range."""

from __future__ import annotations

import pytest

from esamp_agents.decoding.params import MAX_TOP_LOGPROBS, ESampParams, SamplingParams, split_kwargs

NAN = float("nan")
INF = float("inf")

# (field, bad value, substrings the message must hold: the value and the allowed range)
SAMPLING_BAD = [
    ("n", 0, ["n=0", "1 <= n"]),
    ("n", -3, ["n=-3", "1 <= n"]),
    ("n", 2.0, ["n=2.0", "integer >= 1"]),
    ("n", True, ["n=True", "integer >= 1"]),
    ("n", "4", ["n='4'", "integer >= 1"]),
    ("max_new_tokens", 0, ["max_new_tokens=0", "1 <= max_new_tokens"]),
    ("max_new_tokens", None, ["max_new_tokens=None", "integer >= 1"]),
    ("temperature", -0.1, ["temperature=-0.1", "temperature >= 0"]),
    ("temperature", NAN, ["temperature=nan", "temperature >= 0"]),
    ("temperature", INF, ["temperature=inf", "finite value >= 0"]),
    ("temperature", "hot", ["temperature='hot'", "not a number"]),
    ("temperature", False, ["temperature=False", "not a number"]),
    ("top_k", -1, ["top_k=-1", "0 <= top_k"]),
    ("top_k", 5.5, ["top_k=5.5", "integer >= 0"]),
    ("top_p", 0.0, ["top_p=0.0", "0 < top_p <= 1"]),
    ("top_p", 1.01, ["top_p=1.01", "0 < top_p <= 1"]),
    ("top_p", NAN, ["top_p=nan", "0 < top_p <= 1"]),
    ("min_p", 1.0, ["min_p=1.0", "0 <= min_p < 1"]),
    ("min_p", -0.01, ["min_p=-0.01", "0 <= min_p < 1"]),
    ("top_logprobs", -1, ["top_logprobs=-1", f"0 <= top_logprobs <= {MAX_TOP_LOGPROBS}"]),
    ("top_logprobs", MAX_TOP_LOGPROBS + 1, [f"top_logprobs={MAX_TOP_LOGPROBS + 1}", f"<= {MAX_TOP_LOGPROBS}"]),
    ("seed", -1, ["seed=-1", "0 <= seed <= 9223372036854775807"]),
    ("seed", 2**63, [f"seed={2**63}", "<= 9223372036854775807"]),
    ("seed", 1.5, ["seed=1.5", "integer >= 0"]),
    ("stop", ("ok", ""), ["stop=('ok', '')", "non-empty string"]),
    ("stop", [3], ["stop=[3]", "non-empty string"]),
    ("stop", "", ["stop=''", "non-empty string"]),
]

ESAMP_BAD = [
    ("beta", -0.01, ["beta=-0.01", "0 <= beta <= 100"]),
    ("beta", 100.5, ["beta=100.5", "0 <= beta <= 100"]),
    ("beta", NAN, ["beta=nan", "0 <= beta <= 100"]),
    ("beta", "0.25", ["beta='0.25'", "not a number"]),
    ("distiller_width", 0, ["distiller_width=0", "1 <= distiller_width <= 65536"]),
    ("distiller_width", 65537, ["distiller_width=65537", "<= 65536"]),
    ("distiller_width", 384.0, ["distiller_width=384.0", "integer >= 1"]),
    ("lr", 0.0, ["lr=0.0", "0 < lr <= 1"]),
    ("lr", 2.0, ["lr=2.0", "0 < lr <= 1"]),
    ("adam_eps", 0.0, ["adam_eps=0.0", "0 < adam_eps <= 1"]),
    ("adam_eps", 1.5, ["adam_eps=1.5", "0 < adam_eps <= 1"]),
    ("grad_clip", 0.0, ["grad_clip=0.0", "grad_clip > 0"]),
    ("grad_clip", -1.0, ["grad_clip=-1.0", "grad_clip > 0"]),
    ("grad_clip", NAN, ["grad_clip=nan", "grad_clip > 0"]),
    ("warm_start_steps", -1, ["warm_start_steps=-1", "0 <= warm_start_steps <= 10000"]),
    ("warm_start_steps", 10001, ["warm_start_steps=10001", "<= 10000"]),
    ("warm_start_steps", 2.5, ["warm_start_steps=2.5", "integer >= 0"]),
    ("warm_start_lr", 0.0, ["warm_start_lr=0.0", "0 < warm_start_lr <= 1"]),
    ("warm_start_lr", 1.5, ["warm_start_lr=1.5", "0 < warm_start_lr <= 1"]),
]


@pytest.mark.parametrize(("field", "value", "needles"), SAMPLING_BAD, ids=lambda x: repr(x)[:30])
def test_sampling_params_rejects(field, value, needles):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize(("field", "value", "needles"), ESAMP_BAD, ids=lambda x: repr(x)[:30])
def test_esamp_params_rejects(field, value, needles):
    with pytest.raises(ValueError) as info:
        ESampParams(**{field: value})
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_sampling_defaults_and_edges_are_accepted():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p, p.stop, p.seed) == (1, 0.7, 50, 1.0, 0.0, (), None)
    assert not p.greedy
    edge = SamplingParams(
        n=1, max_new_tokens=1, temperature=0, top_k=0, top_p=1.0, min_p=0.0, seed=0, top_logprobs=MAX_TOP_LOGPROBS
    )
    assert edge.greedy
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1


def test_stop_is_normalised_to_a_tuple():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_esamp_defaults_are_the_measured_small_scale_ones():
    e = ESampParams()
    assert (e.beta, e.distiller_width, e.lr, e.adam_eps, e.grad_clip, e.warm_start_steps, e.warm_start_lr) == (
        0.1, 384, 4e-4, 1e-4, 0.5, 20, 2e-3,
    )  # fmt: skip
    paper = ESampParams.paper()
    assert (paper.beta, paper.warm_start_steps, paper.shared_distiller) == (0.25, 0, False)
    assert e.enabled
    assert not ESampParams(beta=0).enabled
    assert ESampParams(beta=100).beta == 100


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().n = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ESampParams().beta = 1.0  # type: ignore[misc]


def test_split_kwargs_routes_every_name():
    sampling, esamp, rest = split_kwargs({"n": 4, "top_p": 0.9, "beta": 0.1, "lr": 1e-3, "model": "embedded"})
    assert sampling == {"n": 4, "top_p": 0.9}
    assert esamp == {"beta": 0.1, "lr": 1e-3}
    assert rest == {"model": "embedded"}
    assert SamplingParams(**sampling).n == 4
    assert ESampParams(**esamp).lr == 1e-3
