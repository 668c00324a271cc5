"""esamp-agents: sample wisely (Exploratory Sampling) and choose wisely (hidden-state rewards).

The names LangChain users reach for are importable from here; each is imported on first
use, so ``import esamp_agents`` stays light (no torch, no transformers, no LangChain).
The subpackages follow the data flow, prompt -> candidates -> scores -> choice:

- :mod:`esamp_agents.decoding`: the decode loop (ESamp engine, Distiller, filters, params);
- :mod:`esamp_agents.hidden_reward`: the linear reward head (ELHSR), its features, training, data;
- :mod:`esamp_agents.selection`: Best-of-N, reward protocol, fusion;
- :mod:`esamp_agents.langchain`: ``ChatESamp`` and ``ESampLLM``;
- :mod:`esamp_agents.serving`: the OpenAI-compatible server;
- :mod:`esamp_agents.evaluation`: tasks, metrics, selectors, the eval harness;
- :mod:`esamp_agents.cli`: the ``esamp-agents`` command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ChatESamp": "esamp_agents.langchain.chat_model",
    "ESampLLM": "esamp_agents.langchain.llm",
    "BestOfN": "esamp_agents.selection.best_of_n",
    "BestOfNError": "esamp_agents.selection.best_of_n",
    "HiddenStateReward": "esamp_agents.hidden_reward.reward",
    "ESampEngine": "esamp_agents.decoding.engine",
    "ESampParams": "esamp_agents.decoding.params",
    "SamplingParams": "esamp_agents.decoding.params",
    "esamp_preset": "esamp_agents.decoding.params",
    "Candidate": "esamp_agents.decoding.results",
    "GenerationResult": "esamp_agents.decoding.results",
    "GenerationStats": "esamp_agents.decoding.results",
    "PromptResult": "esamp_agents.decoding.results",
    "EMBEDDED": "esamp_agents.decoding.loading",
    "LoadedModel": "esamp_agents.decoding.loading",
    "ModelLoadError": "esamp_agents.decoding.loading",
    "load_model": "esamp_agents.decoding.loading",
    "Grammar": "esamp_agents.constrained.grammar",
    "GrammarError": "esamp_agents.constrained.grammar",
}

if TYPE_CHECKING:
    from esamp_agents.constrained.grammar import Grammar, GrammarError
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, ModelLoadError, load_model
    from esamp_agents.decoding.params import ESampParams, SamplingParams, esamp_preset
    from esamp_agents.decoding.results import Candidate, GenerationResult, GenerationStats, PromptResult
    from esamp_agents.hidden_reward.reward import HiddenStateReward
    from esamp_agents.langchain.chat_model import ChatESamp
    from esamp_agents.langchain.llm import ESampLLM
    from esamp_agents.selection.best_of_n import BestOfN, BestOfNError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'esamp_agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "EMBEDDED",
    "BestOfN",
    "BestOfNError",
    "Candidate",
    "ChatESamp",
    "ESampEngine",
    "ESampLLM",
    "ESampParams",
    "GenerationResult",
    "GenerationStats",
    "Grammar",
    "GrammarError",
    "HiddenStateReward",
    "LoadedModel",
    "ModelLoadError",
    "PromptResult",
    "SamplingParams",
    "__version__",
    "esamp_preset",
    "load_model",
]
