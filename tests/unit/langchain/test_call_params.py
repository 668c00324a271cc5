"""One table of ESamp/sampling parameters: the LangChain fields, per-call keys and identifying
params are all derived from it, so they can never drift apart again."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest

from esamp_agents.decoding.params import (
    PARAM_KEYS,
    PARAMS,
    PUBLIC_SPELLINGS,
    ESampParams,
    SamplingParams,
    build_params,
    esamp_preset,
    lookup_param,
    param_keys,
    param_names,
    param_specs,
    public_values,
)
from esamp_agents.langchain import common
from esamp_agents.langchain.chat_model import ChatESamp
from esamp_agents.langchain.llm import ESampLLM

CLASSES = [ChatESamp, ESampLLM]


# The mixin's fields that are not engine parameters (model access, LangChain plumbing).
NON_PARAM_FIELDS = {"model_name", "loaded_model", "device", "dtype", "logprobs", "streaming", "cache"}


# A valid, non-default value for every public parameter (a new parameter must be added here).
OVERRIDES: dict[str, Any] = {
    "n": 3,
    "max_tokens": 9,
    "temperature": 0.3,
    "top_k": 7,
    "top_p": 0.5,
    "min_p": 0.05,
    "stop": ["x"],
    "seed": 5,
    "top_logprobs": 2,
    "ignore_eos": True,
    "beta": 0.5,
    "distiller_width": 64,
    "distiller_lr": 1e-3,
    "adam_eps": 1e-5,
    "grad_clip": 1.0,
    "warm_start_steps": 3,
    "warm_start_lr": 1e-3,
    "shared_distiller": True,
    "distiller_update_every": 3,
}


def _engine_value(name: str, value: Any) -> Any:
    return tuple(value) if name == "stop" else value


def _field_of(config: common.CallConfig, name: str) -> Any:
    spec = PARAM_KEYS[name]
    return getattr(config.sampling if spec.group == "sampling" else config.esamp, spec.field)


def test_table_is_derived_from_the_dataclass_fields():
    assert [s.field for s in param_specs("sampling")] == [f.name for f in fields(SamplingParams)]
    assert [s.field for s in param_specs("esamp")] == [f.name for f in fields(ESampParams)]
    for spec in PARAMS:
        owner = SamplingParams() if spec.group == "sampling" else ESampParams()
        assert spec.default == getattr(owner, spec.field)
        assert spec.doc and "\n" not in spec.doc
    assert param_names() == tuple(OVERRIDES)
    assert lookup_param("max_new_tokens").name == "max_tokens"
    assert lookup_param("lr").name == "distiller_lr"
    assert param_keys("esamp")["distiller_lr"] == "lr"
    assert set(param_keys("sampling")) == {k for s in param_specs("sampling") for k in s.spellings}
    # Only the alias table makes a public name differ from its field.
    assert {s.field for s in PARAMS if s.name != s.field} == set(PUBLIC_SPELLINGS)


def test_build_params_round_trips_every_parameter():
    sampling, esamp = build_params(OVERRIDES)
    assert public_values(sampling, esamp) == {k: _engine_value(k, v) for k, v in OVERRIDES.items()}
    by_alias, _ = build_params({"max_new_tokens": 11, "stop": None})
    assert (by_alias.max_new_tokens, by_alias.stop) == (11, ())


def test_build_params_keeps_the_base_it_is_given():
    paper = esamp_preset("paper")
    _, esamp = build_params({"beta": 0.5}, esamp=paper)
    assert esamp == ESampParams.paper(beta=0.5)


@pytest.mark.parametrize(
    ("values", "needles"),
    [
        ({"temprature": 0.5}, ["'temprature'", "allowed:", "temperature", "distiller_lr", "max_new_tokens"]),
        ({"max_tokens": 3, "max_new_tokens": 4}, ["max_tokens=3", "max_new_tokens=4", "one of max_tokens"]),
        ({"lr": 1e-3, "distiller_lr": 1e-3}, ["lr=0.001", "distiller_lr=0.001", "same parameter"]),
        ({"ignore_eos": "yes"}, ["ignore_eos='yes'", "True or False"]),
        ({"shared_distiller": 1}, ["shared_distiller=1", "True or False"]),
        ({"top_p": 0}, ["top_p=0", "0 < top_p <= 1"]),
        ({"distiller_update_every": 0}, ["distiller_update_every=0", "1 <= distiller_update_every <= 1024"]),
    ],
)
def test_build_params_errors_name_the_value_and_the_allowed(values, needles):
    with pytest.raises(ValueError) as info:
        build_params(values)
    for needle in needles:
        assert needle in str(info.value)


def test_lookup_and_group_errors():
    with pytest.raises(ValueError, match=r"unknown parameter 'bta'; allowed: adam_eps, beta"):
        lookup_param("bta")
    with pytest.raises(ValueError, match=r"group='sample'.*'sampling', 'esamp'"):
        param_specs("sample")  # type: ignore[arg-type]


def test_mixin_fields_call_keys_and_identifying_params_cover_exactly_the_table():
    names = set(param_names())
    mixin_fields = set(common.ESampLangChainMixin.model_fields)
    assert mixin_fields - NON_PARAM_FIELDS == names
    assert set(common._CALL_KEYS) == set(PARAM_KEYS) | {"model", "model_name", "logprobs"}
    assert {common._CALL_KEYS[k] for k in PARAM_KEYS} == names
    for cls in CLASSES:
        model = cls(model="embedded")
        assert names <= set(cls.model_fields)
        assert set(model._identifying_params) == names | {"model_name", "logprobs"}
        for spec in PARAMS:
            info = cls.model_fields[spec.name]
            assert info.description == spec.doc
            assert set(info.validation_alias.choices if info.validation_alias else [spec.name]) == set(spec.spellings)


@pytest.mark.parametrize("cls", CLASSES)
def test_defaults_follow_the_table_except_the_langchain_ones(cls):
    model = cls(model="embedded")
    for spec in PARAMS:
        expected = {"max_tokens": common.DEFAULT_MAX_TOKENS, "stop": None}.get(spec.name, spec.default)
        assert getattr(model, spec.name) == expected, spec.name
    config = model._resolve_call(None, {})
    assert config.sampling == SamplingParams(max_new_tokens=common.DEFAULT_MAX_TOKENS)
    assert config.esamp == ESampParams()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("key", sorted(PARAM_KEYS))
def test_every_spelling_overrides_per_call_and_at_construction(cls, key):
    name = PARAM_KEYS[key].name
    value = OVERRIDES[name]
    model = cls(model="embedded")
    assert _field_of(model._resolve_call(None, {key: value}), name) == _engine_value(name, value)
    built = cls(model="embedded", **{key: value})
    assert getattr(built, name) == value
    assert built._identifying_params[name] == value
    assert _field_of(built._resolve_call(None, {}), name) == _engine_value(name, value)


@pytest.mark.parametrize("cls", CLASSES)
def test_all_overrides_at_once_reach_the_engine_params(cls):
    config = cls(model="embedded")._resolve_call(None, dict(OVERRIDES))
    assert public_values(config.sampling, config.esamp) == {k: _engine_value(k, v) for k, v in OVERRIDES.items()}
    assert config.logprobs  # top_logprobs > 0 implies logprobs


@pytest.mark.parametrize("cls", CLASSES)
def test_unknown_names_fail_clearly(cls):
    model = cls(model="embedded")
    with pytest.raises(ValueError, match=r"unknown keyword argument 'ignore_eoss'.*allowed:.*ignore_eos"):
        model._resolve_call(None, {"ignore_eoss": True})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['shared_distillr'\].*shared_distiller"):
        cls(model="embedded", shared_distillr=True)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"ignore_eos": "yes"}, "ignore_eos='yes'"), ({"shared_distiller": 2}, "shared_distiller=2")],
)
def test_bad_new_params_fail_per_call(cls, kwargs, named):
    with pytest.raises(ValueError, match=named):
        cls(model="embedded")._resolve_call(None, kwargs)


@pytest.mark.parametrize("cls", CLASSES)
def test_tracing_params_follow_every_spelling(cls):
    model = cls(model="embedded", max_tokens=8, temperature=0.2)
    assert model._get_ls_params()["ls_max_tokens"] == 8
    assert model._get_ls_params(max_new_tokens=5)["ls_max_tokens"] == 5
    assert model._get_ls_params(max_tokens=6)["ls_max_tokens"] == 6
    assert model._get_ls_params(temperature=0.9)["ls_temperature"] == 0.9
    assert model._get_ls_params(stop=["y"])["ls_stop"] == ["y"]


def test_server_accepts_every_esamp_spelling_of_the_table():
    from esamp_agents.serving.protocol import (
        ESAMP_BODY_FIELDS,
        ParsedRequest,
        RequestError,
        ServeDefaults,
        parse_request,
    )

    assert set(ESAMP_BODY_FIELDS) == {key for spec in param_specs("esamp") for key in spec.spellings}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    esamp_values = {name: OVERRIDES[name] for name in param_names("esamp")}
    request = parse_request({**body, **esamp_values}, "chat", ServeDefaults(), 1000)
    assert isinstance(request, ParsedRequest)
    assert request.esamp == build_params(esamp_values)[1]
    assert parse_request({**body, "lr": 2e-3}, "chat", ServeDefaults(), 1000).esamp.lr == 2e-3
    with pytest.raises(RequestError, match=r"shared_distiller='yes' must be True or False"):
        parse_request({**body, "shared_distiller": "yes"}, "chat", ServeDefaults(), 1000)


def test_static_field_stubs_match_the_table() -> None:
    """The TYPE_CHECKING stub in langchain/common.py (what IDEs and type checkers see) lists
    exactly the generated fields, with the same annotations."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(common))
    stub = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_ParamFields")
    stubbed = {n.target.id: ast.unparse(n.annotation) for n in stub.body if isinstance(n, ast.AnnAssign)}
    generated = common.ESampLangChainMixin.model_fields
    assert list(stubbed) == list(param_names())
    for name, annotation in stubbed.items():
        runtime = generated[name].annotation
        assert annotation == getattr(runtime, "__name__", None) or annotation == str(runtime), name
