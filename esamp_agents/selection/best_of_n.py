"""``BestOfN``: sample N candidates from any LangChain model, score them, return the best.

``prompt | BestOfN(model, n=8, rewards=[...]) | parser`` takes what ``model`` takes and returns
what it returns (``str`` for LLMs, ``AIMessage`` for chat models), chosen among N samples.

How the N candidates are sampled:

- ``ESampLLM`` / ``ChatESamp``: ONE ``generate`` call with ``n=N`` (one batched decode).
  Decode-time rewards (objects with ``make_observer(loaded_model)``) go to the model's public
  per-call ``rewards=[...]``: they observe that same decode, cost no second pass, and come
  back in each candidate's metadata (``"rewards": {name: score}``). With a fixed
  ``seed``, round ``r`` of the threshold strategy uses ``seed + r`` (else every round
  would replay the same samples).
- other LangChain models with an ``n`` field (``ChatOpenAI``...): one call with ``n=N``
  (and ``logprobs=True`` when a reward has ``needs_logprobs = True``).
- any other model or Runnable: N parallel ``invoke`` calls (threads, or tasks when async),
  at most ``max_concurrency`` at once (the smaller of the constructor's and the config's). A failed call drops that
  candidate (with a warning); if every call fails, :class:`BestOfNError` names the cause.

Scores: each reward scores the group (a child run ``reward:<name>`` in traces), scores are
fused per :mod:`esamp_agents.selection.fusion` (``zscore`` default, ``minmax``, ``worst_rank``; NaN/inf
rank worst for that reward, with a warning). A reward that raises (or returns the wrong
number of scores) fails the call when ``on_reward_error="raise"`` (default; the error names
the reward) or is left out of this group with a warning when ``"skip"``.

Strategies:

- ``"argmax"``: the best fused score; ties go to the lowest index (stable).
- ``"vote"``: reward-weighted majority vote over extracted final answers (self-consistency).
  Each candidate's weight is ``softmax(z(fused) / vote_temperature)`` where ``z``
  standardises the fused scores within the group (equal scores: plain majority; a large
  temperature tends to plain majority, a small one to argmax). Candidates without an answer
  do not vote. The answer with the largest total weight wins; ties go to the answer whose
  best candidate ranks highest. The chosen candidate is the best-ranked one with that
  answer. With no answer at all it falls back to argmax (with a warning). ``rewards`` may
  be empty for this strategy (plain majority voting).
- ``"threshold"``: sample in rounds of N (parallel within a round) until a candidate's
  score from the *first* reward (raw, not fused) is >= ``threshold`` or ``max_rounds`` is
  spent. All candidates seen are fused as one group; the choice is the best-ranked among
  those that cleared the threshold, else the best-ranked overall (never None).

Tool calls (``BestOfN(chat.bind_tools(tools), ...)``): the N replies come from the same one
batched decode. Validity comes first: a reply with ``invalid_tool_calls`` (cut off by
``max_tokens``, not parseable) ranks after every valid one whatever its scores, and does not
vote while a valid reply exists. A reply's text for rewards is its content followed by its
calls in the model's ``<tool_call>{json}</tool_call>`` syntax, and its answer for voting is
its calls (names and arguments), unless an ``answer_extractor`` is given.

Output: the chosen candidate in the model's output type. An ``AIMessage`` carries
``response_metadata["best_of_n"]`` (chosen index and answer, fused score, strategy, fusion,
rounds, ranked candidates with their scores, warnings). A plain ``str`` cannot carry
metadata: use ``include_candidates=True``, which returns a :class:`BestOfNResult` for any
model (``.output``, ``.chosen``, ``.candidates`` ranked best first, ``.metadata``).
``stream``/``astream`` yield the chosen output once, when it is known.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.language_models import BaseChatModel, BaseLanguageModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import ensure_config, get_executor_for_config, patch_config
from pydantic import ConfigDict, Field, model_validator

from esamp_agents.selection.fusion import FUSIONS, Fusion, check_weights, fuse
from esamp_agents.selection.rewards import (
    RewardError,
    ScoredCandidate,
    as_prompt_value,
    ascore_candidates,
    check_scores,
    reward_failure,
    score_candidates,
)
from esamp_agents.tool_calling import format_call

STRATEGIES: tuple[str, ...] = ("argmax", "vote", "threshold")
ON_REWARD_ERROR: tuple[str, ...] = ("raise", "skip")
DEFAULT_MAX_ROUNDS = 4


class BestOfNError(RuntimeError):
    """BestOfN could not produce a candidate (every sample failed, or every reward failed)."""


@dataclass
class BestOfNResult:
    """What ``include_candidates=True`` returns: the output plus every candidate, ranked."""

    output: Any
    chosen: ScoredCandidate
    candidates: list[ScoredCandidate]
    metadata: dict[str, Any] = field(default_factory=dict)


def default_answer_extractor() -> Callable[[str], str | None]:
    """:func:`esamp_agents.evaluation.tasks.extract_answer` (the final answer as a str, or None)."""
    from esamp_agents.evaluation.tasks import extract_answer

    return extract_answer


def _is_esamp(model: Any) -> bool:
    from esamp_agents.langchain.common import ESampLangChainMixin

    return isinstance(model, ESampLangChainMixin)


def has_n_field(model: Any) -> bool:
    """Whether one request can return N candidates (an ``n`` field, like ``ChatOpenAI``'s)."""
    return isinstance(model, BaseLanguageModel) and "n" in type(model).model_fields


def unwrap_binding(model: Any) -> tuple[Any, dict[str, Any]]:
    """``model.bind(...)`` / ``bind_tools(...)`` -> (the model, the bound kwargs); other wrappers
    stay as they are."""
    kwargs: dict[str, Any] = {}
    while isinstance(model, RunnableBinding) and not model.config and not model.config_factories:
        kwargs = {**model.kwargs, **kwargs}
        model = model.bound
    return model, kwargs


def _text_of(output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, AIMessage) and output.tool_calls:
        calls = "\n".join(format_call(c["name"], c["args"]) for c in output.tool_calls)
        return f"{output.text}\n{calls}" if output.text else calls
    if isinstance(output, BaseMessage):
        return str(output.text)
    return str(output)


def _is_valid(output: Any) -> bool:
    """False for a reply whose tool calls did not come out whole (cut off, unparseable)."""
    return not (isinstance(output, AIMessage) and output.invalid_tool_calls)


def _call_answer(output: Any) -> str | None:
    """A tool-calling reply's answer for voting: its calls, canonically (None: no calls)."""
    if not (isinstance(output, AIMessage) and output.tool_calls):
        return None
    return json.dumps([[c["name"], c["args"]] for c in output.tool_calls], sort_keys=True)


def _softmax(values: Sequence[float], temperature: float) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    z = [0.0] * len(values) if std <= 1e-12 else [(v - mean) / std for v in values]
    top = max(z)
    exps = [math.exp((v - top) / temperature) for v in z]
    total = sum(exps)
    return [e / total for e in exps]


@dataclass
class _Round:
    """One sampling round: its candidates, decode-time scores and warnings."""

    candidates: list[ScoredCandidate]
    observed: dict[str, list[float] | BaseException] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class BestOfN(RunnableSerializable[Any, Any]):
    """Sample ``n`` candidates from ``model``, score them with ``rewards``, return the best.

    See the module docstring for sampling, fusion, strategies, ties and failure handling.

    Example:
        .. code-block:: python

            from langchain_core.output_parsers import StrOutputParser
            from langchain_core.prompts import ChatPromptTemplate

            from esamp_agents.selection.best_of_n import BestOfN
            from esamp_agents.langchain.chat_model import ChatESamp
            from esamp_agents.selection.rewards import CallableReward

            shortest = CallableReward(lambda question, text: -len(text), name="short")
            chain = (
                ChatPromptTemplate.from_messages([("human", "{q}")])
                | BestOfN(ChatESamp(max_tokens=64), n=8, rewards=[shortest], strategy="vote")
                | StrOutputParser()
            )
            chain.invoke({"q": "What is 7 + 5?"})
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: Any
    """The LangChain LLM / chat model (or any Runnable) to sample from."""
    n: int = 8
    """Candidates per round."""
    rewards: list[Any] = Field(default_factory=list)
    """Reward objects (``score`` and/or ``make_observer``); ``reward=`` takes a single one."""
    weights: list[float] | None = None
    """One weight per reward (default all 1): finite, >= 0, not all 0."""
    fusion: str = "zscore"
    strategy: str = "argmax"
    answer_extractor: Any = None
    """``text -> answer | None`` (default: ``esamp_agents.evaluation.tasks.extract_answer``)."""
    threshold: float | None = None
    """Required by (and only by) ``strategy="threshold"``: the first reward's raw score to reach."""
    max_rounds: int = DEFAULT_MAX_ROUNDS
    """Most sampling rounds for ``strategy="threshold"``."""
    max_concurrency: int | None = None
    """Most model calls in flight when sampling by parallel calls (None: the config's)."""
    include_candidates: bool = False
    on_reward_error: str = "raise"
    vote_temperature: float = 1.0

    def __init__(self, model: Any = None, /, **kwargs: Any) -> None:
        if model is not None:
            if "model" in kwargs:
                raise ValueError("model given twice (positionally and as model=); allowed: one of them")
            kwargs["model"] = model
        super().__init__(**kwargs)

    @model_validator(mode="before")
    @classmethod
    def _single_reward(cls, data: Any) -> Any:
        """Accept ``reward=r`` or ``rewards=r`` for one reward."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "reward" in data:
            if data.get("rewards"):
                raise ValueError("both reward= and rewards= given; allowed: one of them")
            data["rewards"] = data.pop("reward")
        rewards = data.get("rewards")
        if rewards is None:
            data["rewards"] = []
        elif not isinstance(rewards, (list, tuple)):
            data["rewards"] = [rewards]
        else:
            data["rewards"] = list(rewards)
        return data

    @model_validator(mode="after")
    def _validate(self) -> BestOfN:
        """Every bad value fails here, before any model call, naming the value and the allowed range."""
        if not isinstance(self.model, Runnable):
            raise ValueError(f"model={self.model!r} is not a LangChain model or Runnable")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n={self.n!r} is out of range; allowed: an int n >= 1")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r} is unknown; allowed: {', '.join(map(repr, FUSIONS))}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; allowed: {', '.join(map(repr, STRATEGIES))}")
        if self.on_reward_error not in ON_REWARD_ERROR:
            raise ValueError(
                f"on_reward_error={self.on_reward_error!r} is unknown; allowed: {', '.join(map(repr, ON_REWARD_ERROR))}"
            )
        if self.strategy == "threshold":
            if self.threshold is None or not math.isfinite(self.threshold):
                raise ValueError(f"threshold={self.threshold!r} with strategy='threshold'; allowed: a finite number")
        elif self.threshold is not None:
            raise ValueError(
                f"threshold={self.threshold!r} with strategy={self.strategy!r}; allowed: threshold only with "
                "strategy='threshold'"
            )
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_rounds={self.max_rounds!r} is out of range; allowed: an int >= 1")
        if self.max_concurrency is not None and (
            isinstance(self.max_concurrency, bool)
            or not isinstance(self.max_concurrency, int)
            or self.max_concurrency < 1
        ):
            raise ValueError(f"max_concurrency={self.max_concurrency!r} is out of range; allowed: an int >= 1 or None")
        if not (math.isfinite(self.vote_temperature) and self.vote_temperature > 0):
            raise ValueError(f"vote_temperature={self.vote_temperature!r} is out of range; allowed: > 0")
        if self.answer_extractor is not None and not callable(self.answer_extractor):
            raise ValueError(f"answer_extractor={self.answer_extractor!r} is not callable; allowed: text -> answer")
        if not self.rewards and self.strategy != "vote":
            raise ValueError(f"no rewards with strategy={self.strategy!r}; allowed: at least one reward (or 'vote')")
        names: list[str] = []
        esamp = _is_esamp(unwrap_binding(self.model)[0])
        for i, reward in enumerate(self.rewards):
            name = getattr(reward, "name", None)
            if not isinstance(name, str) or not name:
                raise ValueError(f"rewards[{i}]={reward!r} has no name; allowed: an object with a non-empty str .name")
            if name in names:
                raise ValueError(f"reward name {name!r} appears twice; allowed: distinct names")
            names.append(name)
            has_score = callable(getattr(reward, "score", None))
            has_observer = callable(getattr(reward, "make_observer", None))
            if not has_score and not has_observer:
                raise ValueError(f"reward {name!r} has neither score() nor make_observer(); allowed: a Reward")
            if has_observer and not has_score and not esamp:
                raise ValueError(
                    f"reward {name!r} is decode-time only (make_observer) and works only with ESampLLM/ChatESamp, "
                    f"not {type(self.model).__name__}; give it a score() method to use it with other models"
                )
        if self.weights is not None:
            self.weights = check_weights(self.weights, names)
        return self

    # -- LangChain plumbing --------------------------------------------------------------

    @property
    def InputType(self) -> Any:
        return self.model.InputType

    @property
    def OutputType(self) -> Any:
        return BestOfNResult if self.include_candidates else self.model.OutputType

    def get_input_schema(self, config: RunnableConfig | None = None) -> Any:
        return self.model.get_input_schema(config)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, ensure_config(config), **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, ensure_config(config), **kwargs)

    # -- sampling -------------------------------------------------------------------------

    def _concurrency(self, config: RunnableConfig) -> int | None:
        limits = [v for v in (self.max_concurrency, config.get("max_concurrency")) if v is not None]
        return min(limits) if limits else None

    def _decode_time(self) -> list[Any]:
        """Rewards scored inside the ESamp decode (only with ESamp models)."""
        if not _is_esamp(unwrap_binding(self.model)[0]):
            return []
        return [r for r in self.rewards if callable(getattr(r, "make_observer", None))]

    def _native_call(self, round_index: int, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(model, call kwargs) for one-call sampling; ESamp models also get the decode-time rewards."""
        base, bound = unwrap_binding(self.model)
        call = {**bound, **kwargs, "n": self.n}
        if any(getattr(r, "needs_logprobs", False) for r in self.rewards):
            call["logprobs"] = True
            # a logprob reward reads the top alternatives too (e.g. 20 for the shipped design)
            top = max((int(getattr(r, "top_logprobs", 0) or 0) for r in self.rewards), default=0)
            if top:
                call.setdefault("top_logprobs", top)
        if _is_esamp(base):
            if isinstance(base, BaseChatModel):
                call["stream"] = False  # N replies cannot be streamed; never let streaming=True try
            seed = call.get("seed", base.seed)
            if round_index and seed is not None:
                call["seed"] = int(seed) + round_index
            decode_time = self._decode_time()
            if decode_time:
                # the model's public per-call contract; "skip" so that on_reward_error applies here
                call["rewards"] = decode_time
                call["on_reward_error"] = "skip"
        return base, call

    def _uses_native(self) -> bool:
        base = unwrap_binding(self.model)[0]
        return _is_esamp(base) or has_n_field(base)

    def _from_generations(self, generations: Sequence[Any], warnings: list[str]) -> _Round:
        candidates = []
        for i, gen in enumerate(generations):
            message = getattr(gen, "message", None)
            if message is not None:
                info = {**(gen.generation_info or {}), **message.response_metadata}
                candidates.append(ScoredCandidate(i, message, _text_of(message), info))
            else:
                candidates.append(ScoredCandidate(i, gen.text, gen.text, dict(gen.generation_info or {})))
        if len(candidates) != self.n:
            warnings.append(f"the model returned {len(candidates)} candidates for n={self.n}")
        if not candidates:
            raise BestOfNError(f"the model returned no candidates for n={self.n}")
        result = _Round(candidates, warnings=warnings)
        for reward in self._decode_time():
            name = reward.name
            errors = [c.generation_info.get("reward_errors", {}).get(name) for c in candidates]
            error = next((e for e in errors if e), None)
            if error is not None:
                result.observed[name] = RewardError(error)
                continue
            try:
                result.observed[name] = [c.generation_info["rewards"][name] for c in candidates]
            except (KeyError, TypeError):
                result.observed[name] = RewardError(f"reward {name!r}: the model returned no decode-time scores")
        return result

    def _from_outputs(self, outputs: Sequence[Any]) -> _Round:
        candidates, warnings, errors = [], [], []
        for i, out in enumerate(outputs):
            if isinstance(out, BaseException):
                errors.append(out)
                warnings.append(f"candidate {i} failed: {type(out).__name__}: {out}")
                continue
            info = dict(out.response_metadata) if isinstance(out, BaseMessage) else {}
            candidates.append(ScoredCandidate(i, out, _text_of(out), info))
        if not candidates:
            first = errors[0]
            raise BestOfNError(
                f"all {len(outputs)} candidates failed; first error: {type(first).__name__}: {first}"
            ) from first
        return _Round(candidates, warnings=warnings)

    def _sample(
        self, input: Any, round_index: int, config: RunnableConfig, run_manager: CallbackManagerForChainRun, kwargs: Any
    ) -> _Round:
        if self._uses_native():
            model, call = self._native_call(round_index, kwargs)
            try:
                result = model.generate_prompt([as_prompt_value(input)], callbacks=run_manager.get_child(), **call)
            except Exception as exc:
                raise BestOfNError(f"sampling {self.n} candidates failed: {type(exc).__name__}: {exc}") from exc
            return self._from_generations(result.generations[0], [])
        child = patch_config(config, callbacks=run_manager.get_child(), max_concurrency=self._concurrency(config))

        def one(_: int) -> Any:
            try:
                return self.model.invoke(input, child, **kwargs)
            except Exception as exc:  # one failed sample must not lose the others
                return exc

        if self.n == 1:
            return self._from_outputs([one(0)])
        with get_executor_for_config(child) as executor:
            return self._from_outputs(list(executor.map(one, range(self.n))))

    async def _asample(
        self,
        input: Any,
        round_index: int,
        config: RunnableConfig,
        run_manager: AsyncCallbackManagerForChainRun,
        kwargs: Any,
    ) -> _Round:
        if self._uses_native():
            model, call = self._native_call(round_index, kwargs)
            try:
                result = await model.agenerate_prompt(
                    [as_prompt_value(input)], callbacks=run_manager.get_child(), **call
                )
            except Exception as exc:
                raise BestOfNError(f"sampling {self.n} candidates failed: {type(exc).__name__}: {exc}") from exc
            return self._from_generations(result.generations[0], [])
        limit = self._concurrency(config)
        child = patch_config(config, callbacks=run_manager.get_child(), max_concurrency=limit)
        semaphore = asyncio.Semaphore(limit or self.n)

        async def one() -> Any:
            async with semaphore:
                try:
                    return await self.model.ainvoke(input, child, **kwargs)
                except Exception as exc:  # one failed sample must not lose the others
                    return exc

        return self._from_outputs(await asyncio.gather(*(one() for _ in range(self.n))))

    # -- scoring --------------------------------------------------------------------------

    def _posthoc(self) -> list[Any]:
        decode_time = {id(r) for r in self._decode_time()}
        return [r for r in self.rewards if id(r) not in decode_time]

    def _trace_input(self, candidates: list[ScoredCandidate]) -> dict[str, Any]:
        return {"candidates": [c.text for c in candidates]}

    def _score_round(
        self, input: Any, rnd: _Round, config: RunnableConfig, run_manager: CallbackManagerForChainRun
    ) -> None:
        results: dict[str, Any] = dict(rnd.observed)
        for reward in self._posthoc():
            child = patch_config(config, callbacks=run_manager.get_child(), run_name=f"reward:{reward.name}")

            def run(_: Any, config: RunnableConfig, reward: Any = reward) -> Any:
                return score_candidates(reward, input, rnd.candidates, config)

            try:
                results[reward.name] = self._call_with_config(run, self._trace_input(rnd.candidates), child)
            except Exception as exc:
                results[reward.name] = exc
        self._apply_scores(rnd, results)

    async def _ascore_round(
        self, input: Any, rnd: _Round, config: RunnableConfig, run_manager: AsyncCallbackManagerForChainRun
    ) -> None:
        rewards = self._posthoc()

        async def one(reward: Any) -> Any:
            child = patch_config(config, callbacks=run_manager.get_child(), run_name=f"reward:{reward.name}")

            async def run(_: Any, config: RunnableConfig) -> Any:
                return await ascore_candidates(reward, input, rnd.candidates, config)

            return await self._acall_with_config(run, self._trace_input(rnd.candidates), child)

        outcomes = await asyncio.gather(*(one(r) for r in rewards), return_exceptions=True)
        results: dict[str, Any] = dict(rnd.observed)
        results.update({r.name: out for r, out in zip(rewards, outcomes, strict=True)})
        self._apply_scores(rnd, results)

    def _apply_scores(self, rnd: _Round, results: dict[str, Any]) -> None:
        """Store each reward's scores on the candidates, applying ``on_reward_error``."""
        for reward in self.rewards:
            value = results[reward.name]
            try:
                if isinstance(value, BaseException):
                    raise value
                scores = check_scores(reward.name, value, len(rnd.candidates))
            except Exception as exc:
                error = reward_failure(reward.name, exc)
                if self.on_reward_error == "raise":
                    if error is exc:
                        raise
                    raise error from exc
                message = str(error).removeprefix(f"reward {reward.name!r} failed: ")
                rnd.warnings.append(f"reward {reward.name!r} skipped: {message}")
                continue
            for candidate, score in zip(rnd.candidates, scores, strict=True):
                candidate.scores[reward.name] = score
        if self.rewards and not any(c.scores for c in rnd.candidates):
            raise BestOfNError(f"every reward failed ({'; '.join(rnd.warnings)})")

    # -- choosing -------------------------------------------------------------------------

    def _fuse(self, candidates: list[ScoredCandidate]) -> Fusion:
        active = [r.name for r in self.rewards if any(r.name in c.scores for c in candidates)]
        if not active:
            return Fusion(fused=[0.0] * len(candidates), order=list(range(len(candidates))))
        weights = self.weights or [1.0] * len(self.rewards)
        by_name = {r.name: w for r, w in zip(self.rewards, weights, strict=True)}
        if not any(by_name[name] for name in active):
            raise BestOfNError(f"only rewards with weight 0 produced scores ({', '.join(active)}); nothing to rank by")
        columns = {name: [c.scores.get(name, math.nan) for c in candidates] for name in active}
        try:
            return fuse(columns, [by_name[name] for name in active], self.fusion)
        except ValueError as exc:
            raise BestOfNError(str(exc)) from exc

    def _vote(self, candidates: list[ScoredCandidate], fusion: Fusion, warnings: list[str]) -> tuple[int, list]:
        position = {index: pos for pos, index in enumerate(fusion.order)}
        weights = _softmax(fusion.fused, self.vote_temperature)
        totals: dict[Any, list[Any]] = {}
        for i, c in enumerate(candidates):
            if c.answer is None:
                continue
            entry = totals.setdefault(c.answer, [0.0, 0, position[i], i])
            entry[0] += weights[i]
            entry[1] += 1
            if position[i] < entry[2]:
                entry[2], entry[3] = position[i], i
        tally = [[answer, weight, count] for answer, (weight, count, _, _) in totals.items()]
        if not totals:
            warnings.append("no candidate has an extractable answer; fell back to argmax")
            return fusion.order[0], tally
        winner = min(totals.values(), key=lambda e: (-e[0], e[2]))
        return winner[3], tally

    def _choose(self, candidates: list[ScoredCandidate], fusion: Fusion, warnings: list[str]) -> tuple[int, dict]:
        extra: dict[str, Any] = {}
        if self.strategy == "vote":
            chosen, tally = self._vote(candidates, fusion, warnings)
            extra["votes"] = tally
            return chosen, extra
        if self.strategy == "threshold":
            primary = self.rewards[0].name
            assert self.threshold is not None
            cleared = [i for i in fusion.order if candidates[i].scores.get(primary, math.nan) >= self.threshold]
            extra["threshold_reached"] = bool(cleared)
            if cleared:
                return cleared[0], extra
        return fusion.order[0], extra

    def _finish(self, rounds: list[_Round], input: Any) -> Any:
        candidates: list[ScoredCandidate] = []
        warnings: list[str] = []
        for r, rnd in enumerate(rounds):
            for c in rnd.candidates:
                c.index = c.index + r * self.n
                candidates.append(c)
            warnings.extend(f"round {r}: {w}" if len(rounds) > 1 else w for w in rnd.warnings)
        extractor = self.answer_extractor or default_answer_extractor()
        for c in candidates:
            call_answer = None if self.answer_extractor else _call_answer(c.output)
            try:
                c.answer = call_answer if call_answer is not None else extractor(c.text)
            except Exception as exc:
                raise BestOfNError(
                    f"answer_extractor failed on candidate {c.index}: {type(exc).__name__}: {exc}"
                ) from exc
        fusion = self._fuse(candidates)
        warnings.extend(fusion.warnings)
        valid = [_is_valid(c.output) for c in candidates]
        if any(valid) and not all(valid):  # validity first: broken tool calls rank after every whole one
            order = [i for i in fusion.order if valid[i]] + [i for i in fusion.order if not valid[i]]
            fusion = dataclasses.replace(fusion, order=order)
            for i, ok in enumerate(valid):
                if not ok:
                    candidates[i].answer = None  # and do not vote
        for rank, pos in enumerate(fusion.order):
            candidates[pos].rank = rank
            candidates[pos].fused = fusion.fused[pos]
        chosen_pos, extra = self._choose(candidates, fusion, warnings)
        chosen = candidates[chosen_pos]
        ranked = [candidates[pos] for pos in fusion.order]
        metadata = {
            "chosen_index": chosen.index,
            "chosen_answer": chosen.answer,
            "fused": chosen.fused,
            "strategy": self.strategy,
            "fusion": self.fusion,
            "n": self.n,
            "rounds": len(rounds),
            **extra,
            "candidates": [
                {"index": c.index, "text": c.text, "scores": dict(c.scores), "fused": c.fused, "answer": c.answer}
                for c in ranked
            ],
            "warnings": warnings,
        }
        output = chosen.output
        if isinstance(output, AIMessage):
            output = output.model_copy(
                update={"response_metadata": {**output.response_metadata, "best_of_n": metadata}}
            )
            chosen.output = output
        if self.include_candidates:
            return BestOfNResult(output=output, chosen=chosen, candidates=ranked, metadata=metadata)
        return output

    def _reached(self, rnd: _Round) -> bool:
        primary = self.rewards[0].name
        assert self.threshold is not None
        return any(c.scores.get(primary, math.nan) >= self.threshold for c in rnd.candidates)

    def _num_rounds(self) -> int:
        return self.max_rounds if self.strategy == "threshold" else 1

    def _invoke(
        self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        rounds: list[_Round] = []
        for r in range(self._num_rounds()):
            rnd = self._sample(input, r, config, run_manager, kwargs)
            self._score_round(input, rnd, config, run_manager)
            rounds.append(rnd)
            if self.strategy == "threshold" and self._reached(rnd):
                break
        return self._finish(rounds, input)

    async def _ainvoke(
        self, input: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        rounds: list[_Round] = []
        for r in range(self._num_rounds()):
            rnd = await self._asample(input, r, config, run_manager, kwargs)
            await self._ascore_round(input, rnd, config, run_manager)
            rounds.append(rnd)
            if self.strategy == "threshold" and self._reached(rnd):
                break
        return self._finish(rounds, input)


__all__ = [
    "DEFAULT_MAX_ROUNDS",
    "ON_REWARD_ERROR",
    "STRATEGIES",
    "BestOfN",
    "BestOfNError",
    "BestOfNResult",
    "ScoredCandidate",
    "default_answer_extractor",
    "has_n_field",
    "unwrap_binding",
]
