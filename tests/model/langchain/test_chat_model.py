"""ChatESamp against the real embedded model: N replies, chat template, streaming, async."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.messages import AIMessage, AIMessageChunk, ChatMessage, HumanMessage, SystemMessage

from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.langchain.chat_model import ChatESamp
from esamp_agents.selection.rewards import RewardError
from tests.fakes import TokenRecorder

HELLO = "Hello"
COUNT = "Count from 1 to 10, separated by commas."


@pytest.fixture(scope="module")
def chat(embedded) -> ChatESamp:
    return ChatESamp(loaded_model=embedded, model="embedded", max_tokens=8, temperature=0.8, seed=5)


def test_generate_returns_n_replies_with_metadata(chat):
    result = chat.generate([[HumanMessage(HELLO)]], n=3)
    gens = result.generations[0]
    assert len(gens) == 3
    output_tokens = 0
    for i, g in enumerate(gens):
        meta = g.message.response_metadata
        assert isinstance(g.message, AIMessage)
        assert meta["candidate_index"] == i
        assert meta["finish_reason"] in ("stop", "length")
        assert meta["model_name"] == "embedded"
        assert meta["mean_logprob"] <= 0
        assert meta["novelty_mean"] > 0  # ESamp is on by default
        output_tokens += meta["completion_tokens"]
    usage = gens[0].message.usage_metadata  # the whole request, as ChatOpenAI reports it
    assert usage["output_tokens"] == output_tokens
    assert usage["input_tokens"] == gens[0].message.response_metadata["prompt_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + output_tokens
    assert result.llm_output["token_usage"]["completion_tokens"] == output_tokens
    assert len(result.llm_output["distiller_loss"]) == 1 and result.llm_output["distiller_loss"][0]


def test_generate_several_conversations_combines_llm_output(chat):
    result = chat.generate([[HumanMessage(HELLO)], [HumanMessage("Hi")]], n=2)
    assert [len(g) for g in result.generations] == [2, 2]
    assert len(result.llm_output["distiller_loss"]) == 2
    total = sum(g.message.response_metadata["completion_tokens"] for gens in result.generations for g in gens)
    assert result.llm_output["token_usage"]["completion_tokens"] == total


def test_chat_template_is_applied(chat, embedded):
    messages = [SystemMessage("Be brief."), HumanMessage(HELLO)]
    prompt = chat.render_prompt(messages)
    expected = embedded.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": HELLO}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == expected
    assert prompt.endswith("<|im_start|>assistant\n")
    assert chat.get_num_tokens_from_messages(messages) == len(embedded.tokenizer.encode(prompt))


def test_invoke_returns_the_first_reply(chat):
    first = chat.generate([[HumanMessage(HELLO)]], n=3).generations[0][0].text
    reply = chat.invoke(HELLO, n=3)
    assert isinstance(reply, AIMessage)
    assert reply.content == first
    assert reply.usage_metadata["output_tokens"] > 0


def test_batch_and_async(chat):
    expected = [chat.invoke(HELLO).content, chat.invoke("Hi").content]
    assert [m.content for m in chat.batch([HELLO, "Hi"])] == expected

    async def run() -> tuple[AIMessage, list[AIMessage]]:
        return await chat.ainvoke(HELLO), await chat.abatch([HELLO, "Hi"])

    one, many = asyncio.run(run())
    assert one.content == expected[0]
    assert [m.content for m in many] == expected


def test_stream_concatenation_equals_invoke_and_fires_callbacks(chat):
    expected = chat.invoke(HELLO, max_tokens=12).content
    recorder = TokenRecorder()
    chunks = list(chat.stream(HELLO, max_tokens=12, config={"callbacks": [recorder]}))
    assert len(chunks) > 2
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == expected
    assert "".join(recorder.tokens) == expected
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert last.response_metadata["finish_reason"] in ("stop", "length")
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == expected
    assert full.usage_metadata["output_tokens"] > 0 and full.usage_metadata["input_tokens"] > 0
    assert full.response_metadata["model_name"] == "embedded"


def test_astream_concatenation_equals_invoke_and_fires_callbacks(chat):
    expected = chat.invoke(HELLO, max_tokens=12).content
    recorder = TokenRecorder()

    async def run() -> list[AIMessageChunk]:
        return [c async for c in chat.astream(HELLO, max_tokens=12, config={"callbacks": [recorder]})]

    chunks = asyncio.run(run())
    assert len(chunks) > 2
    assert "".join(c.content for c in chunks) == expected
    assert "".join(recorder.tokens) == expected
    assert chunks[-1].chunk_position == "last"


def test_astream_stopped_early_releases_the_model(chat):
    async def first_chunk() -> str:
        async for chunk in chat.astream(HELLO, max_tokens=24):
            return str(chunk.content)
        return ""

    assert asyncio.run(first_chunk())
    # The abandoned stream must not keep the model's lock: a new call completes.
    assert chat.invoke(HELLO, max_tokens=4).content


def test_streaming_field_routes_invoke_through_stream(embedded):
    chat = ChatESamp(loaded_model=embedded, max_tokens=8, seed=5, streaming=True)
    recorder = TokenRecorder()
    reply = chat.invoke(HELLO, config={"callbacks": [recorder]})
    assert len(recorder.tokens) > 1
    assert "".join(recorder.tokens) == reply.content
    with pytest.raises(ValueError, match="n=2"):
        list(chat.stream(HELLO, n=2))


def test_stop_strings_cut_the_reply(chat):
    plain = chat.invoke(COUNT, temperature=0, max_tokens=16).content
    assert "4" in plain
    cut = chat.invoke(COUNT, temperature=0, max_tokens=16, stop=["4"])
    assert cut.content == plain[: plain.index("4")]
    assert cut.response_metadata["finish_reason"] == "stop"
    assert cut.response_metadata["stop_sequence"] == "4"
    streamed = "".join(c.content for c in chat.stream(COUNT, temperature=0, max_tokens=16, stop=["4"]))
    assert streamed == cut.content


def test_seed_reproducibility(chat):
    first = [g.text for g in chat.generate([[HumanMessage(HELLO)]], n=3, seed=21).generations[0]]
    again = [g.text for g in chat.generate([[HumanMessage(HELLO)]], n=3, seed=21).generations[0]]
    other = [g.text for g in chat.generate([[HumanMessage(HELLO)]], n=3, seed=22).generations[0]]
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n": 0}, "n=0"),
        ({"temperature": -1}, "temperature=-1"),
        ({"top_p": 0}, "top_p=0"),
        ({"beta": -1}, "beta=-1"),
        ({"min_p": 1.5}, "min_p=1.5"),
        ({"seed": -3}, "seed=-3"),
    ],
)
def test_bad_params_fail_before_decoding(chat, no_decoding, kwargs, named):
    with pytest.raises(ValueError, match=named):
        ChatESamp(model="embedded", **kwargs)
    with pytest.raises(ValueError, match=named):
        chat.invoke(HELLO, **kwargs)


def test_bad_messages_fail_before_decoding(chat, no_decoding):
    with pytest.raises(ValueError, match="messages=\\[\\]"):
        chat.invoke([])
    image = HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}])
    with pytest.raises(ValueError, match="image_url"):
        chat.invoke([image])
    with pytest.raises(ValueError, match="colour"):
        chat.invoke(HELLO, colour="red")


def test_render_prompt_reads_roles_like_the_shared_converter(chat, embedded):
    blocks = AIMessage(content=[{"type": "reasoning", "reasoning": "hmm"}, {"type": "text", "text": "ok"}])
    developer = ChatMessage(role="developer", content="Be brief.")
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    rendered = chat.render_prompt([developer, HumanMessage("hi", name="someone"), blocks])
    assert rendered == embedded.apply_chat_template(expected)
    with pytest.raises(ValueError, match="role 'critic' is not supported"):
        chat.render_prompt([ChatMessage(role="critic", content="x")])


def test_per_call_n_with_streaming_is_refused_like_the_constructor(embedded, no_decoding):
    message = "n=4 with streaming=True; allowed: n=1 when streaming"
    with pytest.raises(ValueError, match=message):
        ChatESamp(loaded_model=embedded, streaming=True, n=4)
    streaming = ChatESamp(loaded_model=embedded, streaming=True)
    recorder = Recorder()
    with pytest.raises(ValueError, match=message):
        streaming.invoke(HELLO, n=4, config={"callbacks": [recorder]})
    with pytest.raises(ValueError, match=message):
        streaming.generate([[HumanMessage(HELLO)]], n=4)
    with pytest.raises(ValueError, match=message):
        asyncio.run(streaming.ainvoke(HELLO, n=4))
    with pytest.raises(ValueError, match=message):
        ChatESamp(loaded_model=embedded).invoke(HELLO, n=4, stream=True)
    assert recorder.starts == 0  # refused before the run began


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts = 0

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1


class LengthObserverReward:
    """A decode-time reward: each candidate's number of live decode steps."""

    layers = (-1,)

    def __init__(self, name: str = "steps", fail: str | None = None) -> None:
        self.name, self.fail = name, fail

    def make_observer(self, loaded: Any) -> Any:
        if self.fail == "make":
            raise RuntimeError("no observer today")
        return self

    def on_start(self, num_prompts: int, samples_per_prompt: int, hidden_size: int) -> None:
        self.counts = [0.0] * (num_prompts * samples_per_prompt)
        self.n = samples_per_prompt

    def on_step(self, step: int, hidden: Any, token_ids: Any, live: Any) -> None:
        for i, alive in enumerate(live.tolist()):
            self.counts[i] += float(alive)

    def on_finish(self) -> None:
        pass

    def rewards(self) -> list[list[float]]:
        if self.fail == "rows":
            return [[1.0]]
        return [self.counts[p : p + self.n] for p in range(0, len(self.counts), self.n)]


def test_per_call_rewards_land_in_each_reply(chat):
    recorder = Recorder()
    result = chat.generate([[HumanMessage(HELLO)]], n=3, rewards=[LengthObserverReward()], callbacks=[recorder])
    for g in result.generations[0]:
        meta = g.message.response_metadata
        # every live step is one token, plus the step whose token ended the reply (not counted in the text)
        assert meta["rewards"]["steps"] == float(meta["completion_tokens"] + (meta["finish_reason"] == "stop"))
        assert "reward_errors" not in meta
    streamed = list(chat.stream(HELLO, rewards=[LengthObserverReward()]))
    assert streamed[-1].response_metadata["rewards"]["steps"] >= 1
    assert "rewards" not in chat.invoke(HELLO).response_metadata


def test_per_call_reward_failures_raise_or_are_recorded(chat, no_decoding):
    with pytest.raises(RewardError, match="reward 'steps' failed: RuntimeError: no observer today"):
        chat.invoke(HELLO, rewards=[LengthObserverReward(fail="make")])
    with pytest.raises(ValueError, match=r"rewards=.* is not a sequence"):
        chat.invoke(HELLO, rewards=LengthObserverReward())
    with pytest.raises(ValueError, match=r"rewards\[0\] \('x'\) has no make_observer"):
        chat.invoke(HELLO, rewards=[type("Posthoc", (), {"name": "x", "score": lambda *a: []})()])
    with pytest.raises(ValueError, match="reward name 'steps' appears twice"):
        chat.invoke(HELLO, rewards=[LengthObserverReward(), LengthObserverReward()])
    with pytest.raises(ValueError, match="on_reward_error='ignore' is unknown; allowed: 'raise', 'skip'"):
        chat.invoke(HELLO, rewards=[LengthObserverReward()], on_reward_error="ignore")
    cached = ChatESamp(loaded_model=chat.loaded_model, cache=InMemoryCache())
    with pytest.raises(ValueError, match=r"rewards with cache=.*allowed: cache=False when passing rewards"):
        cached.invoke(HELLO, rewards=[LengthObserverReward()])


def test_per_call_reward_failures_can_be_skipped(chat):
    rewards = [LengthObserverReward("rows", fail="rows"), LengthObserverReward("make", fail="make")]
    reply = chat.generate([[HumanMessage(HELLO)]], n=2, rewards=rewards, on_reward_error="skip").generations[0][0]
    meta = reply.message.response_metadata
    assert meta["rewards"] == {}
    assert meta["reward_errors"] == {
        "rows": "reward 'rows' returned 1 scores for 2 candidates",
        "make": "reward 'make' failed: RuntimeError: no observer today",
    }
    with pytest.raises(RewardError, match="reward 'rows' returned 1 scores for 2 candidates"):
        chat.generate([[HumanMessage(HELLO)]], n=2, rewards=rewards[:1])


def test_logprobs_in_openai_shape(chat):
    reply = chat.invoke(HELLO, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.response_metadata["logprobs"]["content"]
    assert len(content) == reply.response_metadata["completion_tokens"]
    for item in content:
        assert set(item) == {"token", "bytes", "logprob", "top_logprobs"}
        assert item["top_logprobs"][0]["token"] == item["token"]  # greedy: the top choice
        assert len(item["top_logprobs"]) == 3
    assert "".join(item["token"] for item in content) == reply.content


def test_get_token_ids_uses_the_local_tokenizer(chat, embedded):
    text = "Exploratory sampling, héllo!"
    assert chat.get_token_ids(text) == embedded.tokenizer.encode(text, add_special_tokens=False)


def test_concurrent_threads_share_one_batch(chat, embedded):
    """Calls from threads (and from another instance on the same model) decode in one batch, and
    each still gets the reply it gets alone."""
    seeds = [1, 2, 3]
    expected = [chat.invoke(HELLO, seed=s).content for s in seeds]
    other = ChatESamp(loaded_model=embedded, model="embedded", max_tokens=8, temperature=0.8, seed=1)
    stats = ESampEngine.shared(embedded).scheduler.stats
    before = stats.shared_jobs
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda s: chat.invoke(HELLO, seed=s).content, seeds))
        assert pool.submit(other.invoke, HELLO).result().content == expected[0]
    assert got == expected
    assert stats.shared_jobs - before >= 2


def test_abatch_shares_one_batch(chat, embedded):
    stats = ESampEngine.shared(embedded).scheduler.stats
    before = stats.shared_jobs
    replies = asyncio.run(chat.abatch([HELLO, "Hi", COUNT], max_tokens=12))
    assert len(replies) == 3 and all(r.content for r in replies)
    assert stats.shared_jobs - before >= 2


def test_no_cache_by_default(chat, embedded):
    previous = get_llm_cache()
    cache = InMemoryCache()
    set_llm_cache(cache)
    try:
        assert chat.cache is False
        chat.invoke(HELLO, max_tokens=4)
        assert cache._cache == {}
        ChatESamp(loaded_model=embedded, max_tokens=4, cache=True).invoke(HELLO)
        assert len(cache._cache) == 1
    finally:
        set_llm_cache(previous)


def test_tracing_params_and_tools(chat):
    params = chat._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "esamp"
    assert params["ls_model_type"] == "chat"
    assert params["ls_model_name"] == "embedded"
    assert params["ls_max_tokens"] == 8
    assert chat._get_ls_params(model="other")["ls_model_name"] == "other"
    with pytest.raises(ValueError, match="no tools are bound"):
        chat.bind_tools([], tool_choice="any")  # tool calling works (tests/model/langchain/test_tools.py)


def test_from_model_shares_the_loaded_weights(embedded):
    chat = ChatESamp.from_model(embedded)
    assert chat.loaded_model is embedded and chat.model_name == embedded.name
    assert ChatESamp.from_model_id("embedded", device="cpu").loaded_model is embedded
    lazy = ChatESamp(model="embedded", device="cpu")
    assert lazy.loaded_model is None  # nothing loaded at construction
    assert lazy._resolve_model("embedded") is embedded  # the shared registry copy
