"""``ESampLLM``: the ESamp sampler as a LangChain text-completion model (N candidates per prompt)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables.config import run_in_executor

from esamp_agents.constrained.grammar import Grammar
from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, load_model
from esamp_agents.langchain.common import (
    CallConfig,
    ESampLangChainMixin,
    candidate_info,
    check_prompts,
    iterate_in_thread,
    split_observers,
)
from esamp_agents.langchain.decode_rewards import CallExtras, DecodeRewards
from esamp_agents.langchain.tools import split_grammar
from esamp_agents.openai_format import renderer_for, request_usage


class ESampLLM(ESampLangChainMixin, BaseLLM):
    """Exploratory Sampling as a LangChain LLM: ``n`` diverse completions per prompt.

    Weights load lazily on first use through the shared registry, so many instances naming
    the same model share one copy (and one lock: concurrent calls are serialised safely).
    Decode-time rewards: a per-call ``rewards=[reward, ...]`` (objects with ``name`` and
    ``make_observer(loaded_model)``, e.g. ``HiddenStateReward.shipped()``) scores every
    candidate during that call's decode, at no extra forward pass: each candidate's
    ``generation_info`` then has ``"rewards": {name: score}``. A failing reward raises
    ``RewardError`` unless ``on_reward_error="skip"`` (then ``"reward_errors": {name: message}``
    says why). A per-call ``observers=[DecodeObserver, ...]`` reads hidden states the same
    way. Both work with ``generate``/``invoke``/``stream`` and require caching off (the default).
    A per-call ``grammar=`` (a :class:`~esamp_agents.constrained.Grammar`: JSON schema, regex
    or Lark; or a list, one per prompt) or ``response_format=`` (OpenAI's json_object /
    json_schema) constrains the completions; ``generation_info["constraint_satisfied"]`` says
    whether a completion is complete under its grammar (False when cut by ``max_tokens``).
    ``invoke`` returns the first candidate only, as for every LangChain model; use
    ``generate`` to get all ``n`` per prompt (with per-candidate ``generation_info``:
    finish reason, token counts, mean logprob, ESamp novelty and, when asked, logprobs in
    OpenAI shape). ``llm_output`` carries token usage and each prompt's Distiller loss curve.

    Caching is off by default (``cache=False``): a cache keyed on prompt and parameters
    would replay the very same N samples, defeating diverse sampling. Pass ``cache=True``
    (or a cache object) to opt in.

    Example:
        .. code-block:: python

            from esamp_agents.langchain.llm import ESampLLM

            llm = ESampLLM(model="embedded", n=3, max_tokens=16, beta=0.25, seed=0)
            result = llm.generate(["The capital of France is"])
            texts = [g.text for g in result.generations[0]]  # 3 candidates
            first = llm.invoke("The capital of France is")  # the first one only
    """

    @classmethod
    def from_model(
        cls, model: str | LoadedModel | Any = EMBEDDED, *, tokenizer: Any | None = None, **kwargs: Any
    ) -> ESampLLM:
        """Load ``model`` now (name, path, LoadedModel, or HF model + ``tokenizer``)."""
        loaded = load_model(model, tokenizer=tokenizer, device=kwargs.get("device"), dtype=kwargs.get("dtype", "auto"))
        if isinstance(model, str):
            kwargs.setdefault("model", model)
        return cls(loaded_model=loaded, **kwargs)

    @classmethod
    def from_model_id(cls, model_id: str = EMBEDDED, **kwargs: Any) -> ESampLLM:
        """Load the model named ``model_id`` now rather than on first use."""
        return cls.from_model(model_id, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "esamp"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("llm", stop, kwargs)

    # -- generation ------------------------------------------------------------------------

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        grammar, kwargs = split_grammar(kwargs)
        extras, kwargs = split_observers(kwargs)
        call = self._resolve_call(stop, kwargs)
        check_prompts(prompts)
        if isinstance(grammar, list) and len(grammar) != len(prompts):
            raise ValueError(f"grammar has {len(grammar)} entries for {len(prompts)} prompts; allowed: one per prompt")
        loaded = self._resolve_model(call.model_name)
        scoring = DecodeRewards(extras.rewards, loaded, extras.on_reward_error)
        on_text = None
        if run_manager is not None and self.streaming:

            def on_text(prompt_index: int, sample_index: int, delta: str) -> None:
                info = {"prompt_index": prompt_index, "candidate_index": sample_index}
                run_manager.on_llm_new_token(delta, chunk=GenerationChunk(text=delta, generation_info=info))

        result = self._engine(loaded).generate(
            list(prompts), call.sampling, call.esamp, observers=extras.observers + scoring.observers, on_text=on_text,
            grammar=grammar,
        )  # fmt: skip
        renderer = renderer_for(loaded.tokenizer) if call.logprobs else None
        eos_ids = loaded.eos_token_ids
        scores = scoring.per_candidate([len(pr.candidates) for pr in result])
        generations = [
            [
                Generation(
                    text=c.text,
                    generation_info={
                        **candidate_info(
                            c, model_name=call.model_name, logprobs=call.logprobs, renderer=renderer, eos_ids=eos_ids
                        ),
                        **extra,
                    },
                )
                for c, extra in zip(pr.candidates, prompt_scores, strict=True)
            ]
            for pr, prompt_scores in zip(result, scores, strict=True)
        ]
        llm_output = {
            "token_usage": request_usage(result),
            "model_name": call.model_name,
            "distiller_loss": [list(pr.distiller_loss) for pr in result],
        }
        return LLMResult(generations=generations, llm_output=llm_output)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        # Validate on the event loop (cheap, fails fast); decode in a worker thread.
        self._resolve_call(stop, split_observers(split_grammar(kwargs)[1])[1])
        check_prompts(prompts)
        sync_manager = run_manager.get_sync() if run_manager else None
        return await run_in_executor(None, self._generate, prompts, stop, sync_manager, **kwargs)

    # -- streaming -------------------------------------------------------------------------

    def _stream_call(
        self, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[CallConfig, CallExtras, Grammar | None]:
        grammar, kwargs = split_grammar(kwargs)
        extras, kwargs = split_observers(kwargs)
        call = self._resolve_call(stop, kwargs)
        if call.sampling.n != 1:
            raise ValueError(f"n={call.sampling.n} cannot be streamed; allowed: n=1 (use generate() for N candidates)")
        if isinstance(grammar, list):
            if len(grammar) != 1:
                raise ValueError(f"grammar has {len(grammar)} entries for 1 prompt; allowed: one")
            grammar = grammar[0]
        return call, extras, grammar

    def _events(
        self, prompt: str, call: CallConfig, extras: CallExtras | None = None, grammar: Grammar | None = None
    ) -> Iterator[GenerationChunk]:
        extras = extras or CallExtras()
        loaded = self._resolve_model(call.model_name)
        renderer = renderer_for(loaded.tokenizer) if call.logprobs else None
        eos_ids = loaded.eos_token_ids
        scoring = DecodeRewards(extras.rewards, loaded, extras.on_reward_error)
        observers = extras.observers + scoring.observers
        events = self._engine(loaded).stream(prompt, call.sampling, call.esamp, observers=observers, grammar=grammar)
        for event in events:
            if event.candidate is None:
                if event.text:
                    yield GenerationChunk(text=event.text)
                continue
            info = candidate_info(
                event.candidate, model_name=call.model_name, logprobs=call.logprobs, renderer=renderer, eos_ids=eos_ids
            )
            yield GenerationChunk(text=event.text, generation_info={**info, **scoring.per_candidate([1])[0][0]})

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        call, extras, grammar = self._stream_call(stop, kwargs)
        check_prompts([prompt])
        for chunk in self._events(prompt, call, extras, grammar):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        call, extras, grammar = self._stream_call(stop, kwargs)
        check_prompts([prompt])
        async for chunk in iterate_in_thread(lambda: self._events(prompt, call, extras, grammar)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


__all__ = ["ESampLLM"]
