"""HiddenStateReward: the decode-time observer and the post-hoc text path give the same rewards."""

from __future__ import annotations

import pytest
import torch

from esamp_agents import ESampParams, SamplingParams
from esamp_agents.hidden_reward.features import hidden_spec
from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead, IncompatibleHeadError, load_head, save_head
from esamp_agents.hidden_reward.reward import HiddenStateReward, shipped_head_path

QUESTION = "What is 3 + 4?"


@pytest.fixture(scope="module")
def head_path(embedded, tmp_path_factory):
    spec = hidden_spec(embedded, (8, 30))
    head = GatedLinearHead(spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(2, spec.dim, generator=g) / spec.dim**0.5 / 20)
    return save_head(head, tmp_path_factory.mktemp("head") / "head.safetensors")


def test_streamed_and_post_hoc_text_scores_agree(engine, embedded, head_path):
    reward = HiddenStateReward(head_path, embedded)
    prompt = embedded.chat_token_ids([{"role": "user", "content": QUESTION}])
    obs = reward.make_observer(embedded)
    out = engine.generate(
        [prompt], SamplingParams(n=3, max_new_tokens=12, seed=3), ESampParams(beta=0.25), observers=[obs],
        add_special_tokens=False,
    )  # fmt: skip
    streamed = obs.rewards()[0]
    candidates = out[0].candidates
    by_tokens = reward.score_tokens([prompt] * 3, [c.token_ids for c in candidates])
    assert max(abs(a - b) for a, b in zip(streamed, by_tokens, strict=True)) <= 1e-4
    # the text path re-tokenises the text and re-adds the end-of-turn token where the candidate ended
    ended = [c.finish_reason == "stop" for c in candidates]
    by_text = reward.score_texts(QUESTION, [c.text for c in candidates], ended=ended)
    for c, a, b in zip(candidates, streamed, by_text, strict=True):
        if (
            embedded.tokenizer(c.text, add_special_tokens=False)["input_ids"]
            + (embedded.eos_token_ids[:1] if c.finish_reason == "stop" else [])
            == c.token_ids
        ):
            assert abs(a - b) <= 1e-4


def test_score_accepts_strings_and_candidate_views(embedded, head_path):
    reward = HiddenStateReward(head_path, embedded)

    class View:
        def __init__(self, text: str) -> None:
            self.text, self.generation_info = text, {"finish_reason": "stop"}

    plain = reward.score(QUESTION, ["Answer: 7", "Answer: 8"])
    views = reward.score([("human", QUESTION)], [View("Answer: 7"), View("Answer: 8")])
    assert len(plain) == 2 and plain == pytest.approx(views, abs=1e-5)
    assert plain[0] != plain[1]
    assert reward.score(QUESTION, []) == []


def test_errors(embedded, head_path):
    head = load_head(head_path)
    other = FeatureSpec(**{**head.spec.to_dict(), "layers": tuple(head.spec.layers), "base_model": "someone/else"})
    with pytest.raises(IncompatibleHeadError, match="someone/else"):
        HiddenStateReward(GatedLinearHead(other), embedded)
    lp = FeatureSpec(kind="logprobs", dim=28, base_model=embedded.name, hidden_size=576, num_layers=30, top_k=20)
    with pytest.raises(ValueError, match="kind 'hidden'"):
        HiddenStateReward(GatedLinearHead(lp), embedded)
    with pytest.raises(ValueError, match="3 responses"):
        HiddenStateReward(head, embedded).score_texts(QUESTION, ["a", "b", "c"], ended=[True])


def test_shipped_head_fits_the_embedded_model(embedded):
    path = shipped_head_path()
    assert path.stat().st_size < 500_000
    reward = HiddenStateReward.shipped(embedded)
    assert reward.head.spec.base_model == embedded.name
    summary = reward.head.training_summary
    assert summary.get("n_train_problems", 0) >= 100
    scores = reward.score_texts("What is 6 + 3?", ["6 + 3 = 9. Answer: 9", "Answer: 9"])
    assert all(isinstance(s, float) for s in scores)


# --------------------------------------------------------------------------- through the LangChain models


def _replay(engine, prompt, add_special_tokens):
    """The same decode the model ran (same seed and params; observers never change sampling)."""
    sampling = SamplingParams(n=3, max_new_tokens=12, temperature=0.8, seed=3)
    return engine.generate([prompt], sampling, ESampParams(), add_special_tokens=add_special_tokens)[0].candidates


def test_chat_model_rewards_in_metadata_equal_post_hoc_scores(engine, embedded):
    from langchain_core.messages import HumanMessage

    from esamp_agents.langchain.chat_model import ChatESamp

    reward = HiddenStateReward.shipped(embedded)
    chat = ChatESamp(loaded_model=embedded, n=3, max_tokens=12, temperature=0.8, seed=3)
    messages = [HumanMessage(QUESTION)]
    generations = chat.generate([messages], rewards=[reward]).generations[0]
    scores = [g.message.response_metadata["rewards"]["elhsr"] for g in generations]
    rendered = chat.render_prompt(messages)
    replayed = _replay(engine, rendered, add_special_tokens=False)
    assert [c.text for c in replayed] == [g.text for g in generations]
    prompt_ids = embedded.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    post_hoc = reward.score_tokens([prompt_ids] * 3, [c.token_ids for c in replayed])
    assert max(abs(a - b) for a, b in zip(scores, post_hoc, strict=True)) <= 1e-4
    assert len(set(scores)) > 1  # real, distinct scores, not a constant


def test_llm_rewards_in_metadata_equal_post_hoc_scores(engine, embedded):
    from esamp_agents.langchain.llm import ESampLLM

    reward = HiddenStateReward.shipped(embedded)
    llm = ESampLLM(loaded_model=embedded, n=3, max_tokens=12, temperature=0.8, seed=3)
    prompt = "Question: What is 3 + 4?\nAnswer:"
    generations = llm.generate([prompt], rewards=[reward]).generations[0]
    scores = [g.generation_info["rewards"]["elhsr"] for g in generations]
    replayed = _replay(engine, prompt, add_special_tokens=True)
    assert [c.text for c in replayed] == [g.text for g in generations]
    prompt_ids = engine.tokenize(prompt, add_special_tokens=True)
    post_hoc = reward.score_tokens([prompt_ids] * 3, [c.token_ids for c in replayed])
    assert max(abs(a - b) for a, b in zip(scores, post_hoc, strict=True)) <= 1e-4


def test_best_of_n_reads_the_models_public_reward_scores(embedded):
    from esamp_agents.langchain.chat_model import ChatESamp
    from esamp_agents.selection.best_of_n import BestOfN

    reward = HiddenStateReward.shipped(embedded)
    chat = ChatESamp(loaded_model=embedded, max_tokens=12, temperature=0.8, seed=3)
    result = BestOfN(chat, n=3, reward=reward, include_candidates=True).invoke(QUESTION)
    for c in result.candidates:
        assert c.scores["elhsr"] == c.generation_info["rewards"]["elhsr"]
    assert result.output.response_metadata["rewards"]["elhsr"] == max(c.scores["elhsr"] for c in result.candidates)
