"""esamp-agents: sample wisely (Exploratory Sampling) and choose wisely (hidden-state rewards)."""

from esamp_agents.loading import EMBEDDED, LoadedModel, ModelLoadError, load_model
from esamp_agents.params import ESampParams, SamplingParams
from esamp_agents.results import Candidate, GenerationResult, GenerationStats, PromptResult

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED",
    "Candidate",
    "ESampParams",
    "GenerationResult",
    "GenerationStats",
    "LoadedModel",
    "ModelLoadError",
    "PromptResult",
    "SamplingParams",
    "__version__",
    "load_model",
]
