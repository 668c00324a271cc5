"""Math reasoning: ESamp candidates -> answer extraction -> reward-weighted vote -> final answer.

:func:`math_reasoning_chain` builds one LCEL runnable. It puts the question and an
answer-format instruction to the model, samples ``n`` candidates (by default ``ChatESamp`` on
the embedded SmolLM2-135M-Instruct: one batched ESamp decode), reads each candidate's final
answer with :func:`esamp_agents.evaluation.tasks.extract_answer`, and picks the answer with the largest
total vote weight, each candidate weighing ``softmax(z(reward) / vote_temperature)``
(:class:`~esamp_agents.selection.best_of_n.BestOfN` with ``strategy="vote"``: self-consistency where
better-scored reasoning counts more).

The default reward, ``reward="shipped"``, is the ELHSR hidden-state reward head shipped for
the embedded model (:meth:`~esamp_agents.hidden_reward.reward.HiddenStateReward.shipped`): it reads
the model's hidden states during the same decode, so scoring costs no second pass. If the
installation lacks the head file, the chain warns (``RuntimeWarning``) and falls back to
plain majority vote; ``reward=None`` asks for majority vote without the warning. The shipped
head only fits the embedded model: with another model pass your own reward or ``None``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from esamp_agents.decoding.loading import EMBEDDED
from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, answers_match, extract_answer
from esamp_agents.selection.best_of_n import BestOfN, BestOfNResult
from esamp_agents.selection.rewards import ScoredCandidate

SHIPPED = "shipped"
DEFAULT_N = 8
DEFAULT_BETA = 0.25
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 96


@dataclass
class MathResult:
    """What the math-reasoning chain returns for one question."""

    question: str
    answer: str | None
    """The voted final answer (None when no candidate stated one)."""
    text: str
    """The chosen candidate's full reply (the best-ranked one with the voted answer)."""
    votes: dict[str, float]
    """Answer -> total vote weight (each candidate's weight is its softmax share over all N;
    candidates without an answer do not vote, so the totals may sum to less than 1)."""
    counts: dict[str, int]
    """Answer -> number of candidates that gave it."""
    reward: str | None
    """The reward that weighted the vote; None for plain majority vote."""
    candidates: list[ScoredCandidate]
    """Every candidate, ranked best first (``.text``, ``.answer``, ``.scores``, ``.fused``)."""
    best_of_n: BestOfNResult
    reference: str | None = None
    """The reference answer, when the input gave one."""
    correct: bool | None = None
    """Whether ``answer`` matches ``reference`` (None without a reference)."""
    warnings: list[str] = field(default_factory=list)


def _is_embedded(model: Any) -> bool:
    from esamp_agents.langchain.common import ESampLangChainMixin

    if not isinstance(model, ESampLangChainMixin):
        return False
    name = model.loaded_model.name if model.loaded_model is not None else model.model_name
    return name == EMBEDDED or str(name).startswith(f"{EMBEDDED}:")


def _resolve_reward(reward: Any, model: Any) -> Any:
    """``"shipped"`` -> the shipped ELHSR head, or None (with a warning) when it is not installed."""
    if reward is None:
        return None
    if isinstance(reward, str):
        if reward != SHIPPED:
            raise ValueError(f"reward={reward!r} is unknown; allowed: {SHIPPED!r}, a Reward object, or None")
        if not _is_embedded(model):
            raise ValueError(
                f"reward='shipped' fits only the embedded model, not {type(model).__name__}; "
                "allowed: reward=None (majority vote) or a Reward for your model"
            )
        from esamp_agents.hidden_reward.reward import HiddenStateReward

        loaded = model.loaded_model if model.loaded_model is not None else EMBEDDED
        try:
            return HiddenStateReward.shipped(loaded)
        except FileNotFoundError as exc:
            warnings.warn(
                f"{exc}; the math-reasoning chain falls back to plain majority vote (pass reward=None to silence this)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
    has_score = callable(getattr(reward, "score", None))
    has_observer = callable(getattr(reward, "make_observer", None))
    if not isinstance(getattr(reward, "name", None), str) or not (has_score or has_observer):
        raise ValueError(f"reward={reward!r} is not a Reward; allowed: {SHIPPED!r}, a Reward object, or None")
    return reward


def _question_of(value: Any) -> tuple[str, str | None]:
    """(question, reference answer or None) from a str, a ``{"question": ...}`` dict or a ``Problem``."""
    if isinstance(value, str):
        question, reference = value, None
    elif isinstance(value, dict):
        if "question" not in value:
            raise ValueError(f"input dict has keys {sorted(value)}; allowed: a 'question' key (and 'answer')")
        question, reference = value["question"], value.get("answer")
    elif hasattr(value, "question") and hasattr(value, "answer"):
        question, reference = value.question, value.answer
    else:
        raise ValueError(
            f"input of type {type(value).__name__} is not a question; allowed: str, {{'question': ...}}, a Problem"
        )
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question={question!r} is empty or not a str; allowed: a non-empty string")
    return question, None if reference is None else str(reference)


def math_reasoning_chain(
    model: Any = None,
    *,
    n: int = DEFAULT_N,
    reward: Any = SHIPPED,
    beta: float = DEFAULT_BETA,
    temperature: float = DEFAULT_TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    suffix: str = DEFAULT_SUFFIX,
    seed: int | None = None,
    vote_temperature: float = 1.0,
    answer_extractor: Callable[[str], Any] | None = None,
) -> Runnable:
    """A runnable: question -> :class:`MathResult` (voted answer, tally, ranked candidates).

    ``model``: None for ``ChatESamp`` on the embedded model, a model name or path for
    ``ChatESamp`` on that model, or any LangChain model / Runnable (used as it is: configure
    its sampling yourself; ``beta``/``temperature``/``max_tokens``/``seed`` then must keep
    their defaults). ``reward``: ``"shipped"`` (default, see the module docstring), any
    BestOfN reward, or None for plain majority vote. ``suffix`` is appended to the question
    (the answer-format instruction the extractor relies on). The input is a question string,
    a ``{"question": ..., "answer": ...}`` dict or a :class:`~esamp_agents.evaluation.tasks.Problem`;
    with a reference answer the result says whether the vote got it right.

    Example:
        .. code-block:: python

            from esamp_agents.recipes.math_reasoning import math_reasoning_chain

            chain = math_reasoning_chain(n=4, max_tokens=48, seed=0)  # the shipped ELHSR head weighs the vote
            result = chain.invoke({"question": "What is 3 + 4?", "answer": "7"})
            print(result.answer, result.correct, result.votes)  # e.g. 7 True {'7': 0.83, '8': 0.17}
            for c in result.candidates:  # ranked by reward, best first
                print(c.answer, c.scores, c.text[:60])
    """
    if not isinstance(suffix, str):
        raise ValueError(f"suffix={suffix!r} is not a str; allowed: a string ('' for none)")
    if model is None or isinstance(model, str):
        from esamp_agents.langchain.chat_model import ChatESamp

        model = ChatESamp(model=model or EMBEDDED, beta=beta, temperature=temperature, max_tokens=max_tokens, seed=seed)
    else:
        given = {
            "beta": (beta, DEFAULT_BETA),
            "temperature": (temperature, DEFAULT_TEMPERATURE),
            "max_tokens": (max_tokens, DEFAULT_MAX_TOKENS),
            "seed": (seed, None),
        }
        changed = [k for k, (v, default) in given.items() if v != default]
        if changed:
            raise ValueError(
                f"{', '.join(f'{k}={given[k][0]!r}' for k in changed)} given with a model object; allowed: these "
                "only configure the ChatESamp the chain builds (model=None or a name): configure your model instead"
            )
    resolved = _resolve_reward(reward, model)
    voter = BestOfN(
        model,
        n=n,
        rewards=[resolved] if resolved is not None else [],
        strategy="vote",
        vote_temperature=vote_temperature,
        answer_extractor=answer_extractor or extract_answer,
        include_candidates=True,
    )
    reward_name = resolved.name if resolved is not None else None

    def prepare(value: Any) -> dict[str, Any]:
        question, reference = _question_of(value)
        prompt = f"{question} {suffix}" if suffix else question
        return {"question": question, "reference": reference, "prompt": prompt}

    def finish(state: dict[str, Any]) -> MathResult:
        result: BestOfNResult = state["result"]
        tally = result.metadata.get("votes") or []
        votes = {str(answer): float(weight) for answer, weight, _ in tally}
        counts = {str(answer): int(count) for answer, _, count in tally}
        answer = None if result.chosen.answer is None else str(result.chosen.answer)
        reference = state["reference"]
        correct = None if reference is None else answers_match(answer, reference)
        return MathResult(
            question=state["question"],
            answer=answer,
            text=result.chosen.text,
            votes=votes,
            counts=counts,
            reward=reward_name,
            candidates=result.candidates,
            best_of_n=result,
            reference=reference,
            correct=correct,
            warnings=list(result.metadata.get("warnings") or []),
        )

    chain = (
        RunnableLambda(prepare, name="prepare")
        | RunnablePassthrough.assign(result=(lambda s: s["prompt"]) | voter)
        | RunnableLambda(finish, name="vote_result")
    )
    return chain.with_config(run_name="math_reasoning")


__all__ = ["DEFAULT_SUFFIX", "SHIPPED", "MathResult", "math_reasoning_chain"]
