"""Math-reasoning recipe: ESamp candidates on the embedded model -> extracted answers -> (weighted) vote."""

from __future__ import annotations

import math
import textwrap
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, extract_answer
from esamp_agents.hidden_reward.features import hidden_spec
from esamp_agents.hidden_reward.head import GatedLinearHead, save_head
from esamp_agents.hidden_reward.reward import shipped_head_path
from esamp_agents.recipes import math_reasoning
from esamp_agents.recipes.math_reasoning import MathResult, math_reasoning_chain
from esamp_agents.selection.best_of_n import BestOfNResult
from esamp_agents.selection.rewards import CallableReward


def head_installed() -> bool:
    try:
        shipped_head_path()
    except FileNotFoundError:
        return False
    return True


def docstring_example(obj: Any) -> str:
    """The ``.. code-block:: python`` example of a docstring, dedented."""
    doc = obj.__doc__ or ""
    lines = doc[doc.index(".. code-block:: python") :].splitlines()[1:]
    body = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) <= 8:
            break
        body.append(line)
    return textwrap.dedent("\n".join(body))


def expected_vote(candidates: list[Any]) -> set[str]:
    """The answers a reward-weighted vote can pick, recomputed independently from the candidates.

    Weight per candidate: softmax of its standardised fused score; answers from ``extract_answer``.
    Returns every answer within float noise of the top total (exact ties may go either way).
    """
    fused = [c.fused for c in candidates]
    mean = sum(fused) / len(fused)
    std = math.sqrt(sum((f - mean) ** 2 for f in fused) / len(fused))
    z = [0.0 if std <= 1e-12 else (f - mean) / std for f in fused]
    weights = [math.exp(v - max(z)) for v in z]
    totals: dict[str, float] = {}
    for c, w in zip(candidates, weights, strict=True):
        answer = extract_answer(c.text)
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + w
    if not totals:
        return set()
    best = max(totals.values())
    return {a for a, t in totals.items() if t >= best - 1e-9 * max(1.0, best)}


def check_structure(result: MathResult, n: int) -> None:
    assert isinstance(result, MathResult) and isinstance(result.best_of_n, BestOfNResult)
    assert len(result.candidates) == n
    for c in result.candidates:
        assert c.answer == extract_answer(c.text)  # each candidate's answer is the extractor's
    counts = Counter(c.answer for c in result.candidates if c.answer is not None)
    assert result.counts == dict(counts)
    if counts:
        assert result.answer in expected_vote(result.candidates)
        assert result.text in [c.text for c in result.candidates if c.answer == result.answer]
        assert math.isclose(sum(result.votes.values()), 1.0) or sum(counts.values()) < n
    else:
        assert result.answer is None


# --------------------------------------------------------------------------- the embedded model


@pytest.fixture
def shipped_or_random_head(embedded, tmp_path, monkeypatch) -> bool:
    """The shipped head when installed, else a random head for the embedded model (same mechanics)."""
    if head_installed():
        return True
    spec = hidden_spec(embedded, (8, embedded.num_layers))
    head = GatedLinearHead(spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(2, spec.dim, generator=g) / spec.dim**0.5)
    path = save_head(head, tmp_path / "head.safetensors")
    monkeypatch.setattr("esamp_agents.hidden_reward.reward.shipped_head_path", lambda: path)
    return False


def test_docstring_example_on_the_embedded_model(shipped_or_random_head):
    """The module's example: 4 ESamp candidates scored by the head during decoding, weighted vote."""
    namespace: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the head is there: no fallback warning
        exec(docstring_example(math_reasoning_chain), namespace)  # trusted: our own docstring
    result = namespace["result"]
    check_structure(result, n=4)
    assert result.question == "What is 3 + 4?" and result.reference == "7"
    assert result.correct == (result.answer == "7")
    assert result.reward == "elhsr"
    assert all(math.isfinite(c.scores["elhsr"]) for c in result.candidates)
    assert [c.scores["elhsr"] for c in result.candidates] == sorted(
        (c.scores["elhsr"] for c in result.candidates), reverse=True
    )  # one reward: ranked by it
    assert result.candidates[0].generation_info.get("finish_reason") in ("stop", "length")


# --------------------------------------------------------------------------- fast: scripted replies

REPLIES = [
    "3 + 4 = 7. Answer: 7",
    "Let me think. 3 + 4 = 8. Answer: 8",
    "Adding them up gives seven, so the answer is 7.",
    "Answer: 8. It is a long and careful reply that the length reward likes a lot more than the others.",
]


def test_weighted_vote_with_a_reward_on_scripted_replies():
    lengthy = CallableReward(lambda _, text: float(len(text)), name="length")
    chain = math_reasoning_chain(FakeListChatModel(responses=REPLIES), n=4, reward=lengthy)
    result = chain.invoke({"question": "What is 3 + 4?", "answer": "7"}, {"max_concurrency": 1})
    check_structure(result, n=4)
    assert result.counts == {"7": 2, "8": 2} and result.reward == "length"
    assert result.answer == "8" and result.correct is False  # the two long replies outweigh the short ones
    assert result.votes["8"] > result.votes["7"]
    majority = math_reasoning_chain(FakeListChatModel(responses=REPLIES), n=4, reward=None)
    plain = majority.invoke("What is 3 + 4?", {"max_concurrency": 1})
    assert plain.answer == "7" and plain.reward is None  # a 2-2 tie goes to the answer given first
    assert plain.correct is None and plain.reference is None


def test_prompt_carries_the_answer_format_suffix():
    seen: list[str] = []

    class Recording(FakeListChatModel):
        def _call(self, messages: Any, *args: Any, **kwargs: Any) -> str:
            seen.append(messages[-1].content)
            return super()._call(messages, *args, **kwargs)

    math_reasoning_chain(Recording(responses=["Answer: 1"]), n=1, reward=None).invoke("What is 0 + 1?")
    assert seen == [f"What is 0 + 1? {DEFAULT_SUFFIX}"]
    math_reasoning_chain(Recording(responses=["Answer: 1"]), n=1, reward=None, suffix="").invoke("Q?")
    assert seen[-1] == "Q?"


def test_missing_shipped_head_falls_back_to_majority_with_a_warning(monkeypatch):
    from esamp_agents.langchain.chat_model import ChatESamp

    def missing() -> Any:
        raise FileNotFoundError("the shipped reward head is missing from the installation: /nowhere")

    monkeypatch.setattr("esamp_agents.hidden_reward.reward.shipped_head_path", missing)
    with pytest.warns(RuntimeWarning, match="falls back to plain majority vote"):
        math_reasoning_chain(n=4)  # ChatESamp loads lazily: no model load, no decode here
    with pytest.warns(RuntimeWarning, match="falls back to plain majority vote"):
        assert math_reasoning._resolve_reward("shipped", ChatESamp()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        math_reasoning_chain(n=4, reward=None)  # reward=None: no warning


@pytest.mark.skipif(not head_installed(), reason="the shipped reward head is not installed yet")
def test_shipped_head_is_used_when_installed():
    from esamp_agents.langchain.chat_model import ChatESamp

    assert math_reasoning._resolve_reward("shipped", ChatESamp()).name == "elhsr"


def test_bad_arguments_fail_at_construction_or_before_sampling():
    fake = FakeListChatModel(responses=["Answer: 1"])
    with pytest.raises(ValueError, match=r"reward='best' is unknown; allowed: 'shipped'"):
        math_reasoning_chain(fake, reward="best")
    with pytest.raises(ValueError, match=r"reward='shipped' fits only the embedded model, not FakeListChatModel"):
        math_reasoning_chain(fake)
    with pytest.raises(ValueError, match=r"beta=0.5 given with a model object"):
        math_reasoning_chain(fake, reward=None, beta=0.5)
    with pytest.raises(ValueError, match=r"reward=42 is not a Reward"):
        math_reasoning_chain(fake, reward=42)
    with pytest.raises(ValueError, match=r"n=0 is out of range"):
        math_reasoning_chain(fake, n=0, reward=None)
    with pytest.raises(ValueError, match=r"beta=-1"):
        math_reasoning_chain(beta=-1, reward=None)
    chain = math_reasoning_chain(fake, n=1, reward=None)
    with pytest.raises(ValueError, match=r"input of type int is not a question"):
        chain.invoke(3)
    with pytest.raises(ValueError, match=r"allowed: a 'question' key"):
        chain.invoke({"q": "What?"})
    with pytest.raises(ValueError, match=r"question='  ' is empty"):
        chain.invoke("  ")


def test_problems_from_the_task_generators_are_inputs():
    from esamp_agents.evaluation.tasks import generate_problems

    problem = generate_problems("single_digit", 1, seed=0)[0]
    fake = FakeListChatModel(responses=[f"Answer: {problem.answer}"])
    result = math_reasoning_chain(fake, n=2, reward=None).invoke(problem)
    assert result.correct is True and result.reference == problem.answer
    assert math_reasoning.SHIPPED == "shipped"
