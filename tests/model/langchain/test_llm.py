"""ESampLLM against the real embedded model: N candidates, streaming, async, validation."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import get_llm_cache, set_llm_cache

from esamp_agents import ESampParams
from esamp_agents.decoding.loading import ModelLoadError
from esamp_agents.langchain.llm import ESampLLM
from tests.fakes import TokenRecorder

PROMPT = "The capital of France is"
COUNT = "1, 2, 3,"


@pytest.fixture(scope="module")
def llm(embedded) -> ESampLLM:
    return ESampLLM(loaded_model=embedded, model="embedded", max_tokens=8, temperature=0.8, seed=7)


def test_generate_returns_n_candidates_per_prompt(llm):
    result = llm.generate([PROMPT, COUNT], n=3)
    assert [len(g) for g in result.generations] == [3, 3]
    for gens in result.generations:
        assert [g.generation_info["candidate_index"] for g in gens] == [0, 1, 2]
        for g in gens:
            info = g.generation_info
            assert isinstance(g.text, str)
            assert info["finish_reason"] in ("stop", "length")
            assert info["model_name"] == "embedded"
            assert 1 <= info["completion_tokens"] <= 8
            assert info["prompt_tokens"] > 0
            assert info["mean_logprob"] <= 0
            assert info["novelty_mean"] > 0  # ESamp on (beta=0.25 by default)
            assert "logprobs" not in info
    usage = result.llm_output["token_usage"]
    completion = sum(g.generation_info["completion_tokens"] for gens in result.generations for g in gens)
    assert usage["completion_tokens"] == completion
    assert usage["total_tokens"] == usage["prompt_tokens"] + completion
    losses = result.llm_output["distiller_loss"]
    assert len(losses) == 2 and all(len(curve) > 0 for curve in losses)


def test_invoke_returns_the_first_candidate(llm):
    first = llm.generate([PROMPT], n=3).generations[0][0].text
    assert llm.invoke(PROMPT, n=3) == first


def test_batch_is_one_call_with_first_candidates(llm):
    expected = [gens[0].text for gens in llm.generate([PROMPT, COUNT]).generations]
    assert llm.batch([PROMPT, COUNT]) == expected


def test_async_matches_sync(llm):
    expected = llm.invoke(PROMPT)
    batch_expected = llm.batch([PROMPT, COUNT])

    async def run() -> tuple[str, list[str]]:
        return await llm.ainvoke(PROMPT), await llm.abatch([PROMPT, COUNT])

    one, many = asyncio.run(run())
    assert one == expected
    assert many == batch_expected


def test_stream_concatenation_equals_invoke_and_fires_callbacks(llm):
    expected = llm.invoke(PROMPT, max_tokens=12)
    recorder = TokenRecorder()
    chunks = list(llm.stream(PROMPT, max_tokens=12, config={"callbacks": [recorder]}))
    assert len(chunks) > 2
    assert "".join(chunks) == expected
    assert "".join(recorder.tokens) == expected
    assert len(recorder.tokens) == len(chunks)


def test_astream_concatenation_equals_invoke_and_fires_callbacks(llm):
    expected = llm.invoke(PROMPT, max_tokens=12)
    recorder = TokenRecorder()

    async def run() -> list[str]:
        return [c async for c in llm.astream(PROMPT, max_tokens=12, config={"callbacks": [recorder]})]

    chunks = asyncio.run(run())
    assert len(chunks) > 2
    assert "".join(chunks) == expected
    assert "".join(recorder.tokens) == expected


def test_stream_last_chunk_carries_finish_reason(llm):
    chunks = list(llm._stream(PROMPT, max_tokens=8))
    assert all(c.generation_info is None for c in chunks[:-1])
    info = chunks[-1].generation_info
    assert info["finish_reason"] in ("stop", "length")
    assert info["completion_tokens"] >= 1 and info["model_name"] == "embedded"


def test_streaming_needs_n_1(llm):
    with pytest.raises(ValueError, match="n=2"):
        list(llm.stream(PROMPT, n=2))
    with pytest.raises(ValueError, match="n=2"):
        ESampLLM(model="embedded", streaming=True, n=2)


def test_streaming_field_fires_tokens_during_generate(embedded):
    llm = ESampLLM(loaded_model=embedded, max_tokens=8, seed=3, streaming=True)
    recorder = TokenRecorder()
    text = llm.invoke(PROMPT, config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == text


def test_stop_strings_cut_the_output(llm):
    plain = llm.invoke(COUNT, temperature=0, max_tokens=10)
    assert "5" in plain
    result = llm.generate([COUNT], stop=["5"], temperature=0, max_tokens=10)
    gen = result.generations[0][0]
    assert gen.text == plain[: plain.index("5")]
    assert gen.generation_info["finish_reason"] == "stop"
    assert gen.generation_info["stop_sequence"] == "5"
    streamed = "".join(llm.stream(COUNT, stop=["5"], temperature=0, max_tokens=10))
    assert streamed == gen.text


def test_seed_reproducibility(llm):
    first = [g.text for g in llm.generate([PROMPT], n=3, seed=11).generations[0]]
    again = [g.text for g in llm.generate([PROMPT], n=3, seed=11).generations[0]]
    other = [g.text for g in llm.generate([PROMPT], n=3, seed=12).generations[0]]
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n": 0}, "n=0"),
        ({"temperature": -1}, "temperature=-1"),
        ({"top_p": 0}, "top_p=0"),
        ({"beta": -1}, "beta=-1"),
        ({"max_tokens": 0}, "max_new_tokens=0"),
        ({"top_logprobs": 99}, "top_logprobs=99"),
        ({"lr": 0}, "lr=0"),
    ],
)
def test_bad_params_fail_before_decoding(llm, no_decoding, kwargs, named):
    with pytest.raises(ValueError, match=named):
        ESampLLM(model="embedded", **kwargs)
    with pytest.raises(ValueError, match=named):
        llm.invoke(PROMPT, **kwargs)


def test_bad_prompts_and_unknown_kwargs_fail_before_decoding(llm, no_decoding):
    with pytest.raises(ValueError, match="prompt 0"):
        llm.invoke("")
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate([PROMPT, "   "])
    with pytest.raises(ValueError, match="temprature"):
        llm.invoke(PROMPT, temprature=0.5)
    with pytest.raises(ValueError, match="temprature"):
        ESampLLM(temprature=0.5)
    with pytest.raises(ValueError, match="dtype='float8'"):
        ESampLLM(dtype="float8")


def test_remote_api_options_are_accepted_and_ignored():
    llm = ESampLLM(model="embedded", timeout=30, max_retries=2, api_key="unused", max_new_tokens=12, lr=1e-3)
    assert llm.max_tokens == 12 and llm.distiller_lr == 1e-3
    assert not hasattr(llm, "api_key")


def test_logprobs_in_openai_shape(llm, embedded):
    gen = llm.generate([PROMPT], temperature=0, max_tokens=6, top_logprobs=2).generations[0][0]
    content = gen.generation_info["logprobs"]["content"]
    assert len(content) == gen.generation_info["completion_tokens"]  # length-capped: no end token
    for item in content:
        assert set(item) == {"token", "bytes", "logprob", "top_logprobs"}
        assert item["logprob"] <= 0
        assert len(item["top_logprobs"]) == 2
        # greedy: the chosen token is the most likely one
        assert item["top_logprobs"][0]["token"] == item["token"]
        assert item["top_logprobs"][0]["logprob"] == pytest.approx(item["logprob"], abs=1e-5)
    assert bytes(b for item in content for b in item["bytes"]).decode("utf-8") == gen.text
    plain = llm.generate([PROMPT], temperature=0, max_tokens=6, logprobs=True).generations[0][0]
    assert all(item["top_logprobs"] == [] for item in plain.generation_info["logprobs"]["content"])


def test_get_token_ids_uses_the_local_tokenizer(llm, embedded):
    text = "Exploratory sampling, héllo!"
    expected = embedded.tokenizer.encode(text, add_special_tokens=False)
    assert llm.get_token_ids(text) == expected
    assert llm.get_num_tokens(text) == len(expected)


def test_concurrent_threads_share_one_model_safely(llm):
    seeds = [1, 2, 3, 4]
    expected = [llm.invoke(PROMPT, seed=s) for s in seeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda s: llm.invoke(PROMPT, seed=s), seeds))
    assert got == expected


def test_no_cache_by_default(llm, embedded):
    previous = get_llm_cache()
    cache = InMemoryCache()
    set_llm_cache(cache)
    try:
        assert llm.cache is False
        llm.invoke(PROMPT)
        assert cache._cache == {}
        cached = ESampLLM(loaded_model=embedded, max_tokens=8, seed=1, cache=True)
        cached.invoke(PROMPT)
        assert len(cache._cache) == 1
    finally:
        set_llm_cache(previous)


def test_lazy_loading_and_from_model(embedded):
    lazy = ESampLLM(model="no-such-org/no-such-model")  # nothing is loaded here
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        lazy.invoke(PROMPT)
    eager = ESampLLM.from_model(embedded, max_tokens=8)
    assert eager.loaded_model is embedded
    assert eager.model_name == embedded.name
    assert ESampLLM.from_model_id("embedded", device="cpu").loaded_model is embedded
    assert "loaded_model" not in eager.model_dump()


def test_tracing_params_follow_per_call_model(llm):
    params = llm._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "esamp"
    assert params["ls_model_type"] == "llm"
    assert params["ls_model_name"] == "embedded"
    assert params["ls_temperature"] == 0.8
    assert params["ls_max_tokens"] == 8
    assert params["ls_stop"] == ["x"]
    assert llm._get_ls_params(model="other")["ls_model_name"] == "other"
    assert llm._llm_type == "esamp"
    assert llm._identifying_params["beta"] == ESampParams().beta
