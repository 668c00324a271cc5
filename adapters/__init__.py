"""Adapters to other systems (shipped as ``esamp_agents.adapters``).

- :mod:`~esamp_agents.adapters.logprob_reward`: the logit-only reward for closed APIs that return
  OpenAI-style token logprobs (``LogprobReward``), reading ChatOpenAI / ChatCompletion / dict shapes;
- :mod:`~esamp_agents.adapters.encodings`: OpenAI's tiktoken encodings, built offline;
- :mod:`~esamp_agents.adapters.sampling`: ``sample_with_logprobs``, N candidates with bounded retries.

Names load lazily, so token counting or sampling does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ENCODING_NAMES": "encodings",
    "count_message_tokens": "encodings",
    "count_tokens": "encodings",
    "encoding_name_for": "encodings",
    "get_encoding": "encodings",
    "openai_encoding": "encodings",
    "rank_file": "encodings",
    "ON_EMPTY": "logprob_reward",
    "ON_MISSING": "logprob_reward",
    "CandidateLogprobs": "logprob_reward",
    "LogprobReward": "logprob_reward",
    "LogprobScoreReport": "logprob_reward",
    "LogprobsMissingError": "logprob_reward",
    "local_features": "logprob_reward",
    "read_candidate": "logprob_reward",
    "read_candidates": "logprob_reward",
    "Attempt": "sampling",
    "LogprobsUnsupportedError": "sampling",
    "SampleResult": "sampling",
    "SamplingError": "sampling",
    "asample_with_logprobs": "sampling",
    "sample_with_logprobs": "sampling",
}

if TYPE_CHECKING:
    from esamp_agents.adapters.encodings import (
        ENCODING_NAMES,
        count_message_tokens,
        count_tokens,
        encoding_name_for,
        get_encoding,
        openai_encoding,
        rank_file,
    )
    from esamp_agents.adapters.logprob_reward import (
        ON_EMPTY,
        ON_MISSING,
        CandidateLogprobs,
        LogprobReward,
        LogprobScoreReport,
        LogprobsMissingError,
        local_features,
        read_candidate,
        read_candidates,
    )
    from esamp_agents.adapters.sampling import (
        Attempt,
        LogprobsUnsupportedError,
        SampleResult,
        SamplingError,
        asample_with_logprobs,
        sample_with_logprobs,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "ENCODING_NAMES",
    "ON_EMPTY",
    "ON_MISSING",
    "Attempt",
    "CandidateLogprobs",
    "LogprobReward",
    "LogprobScoreReport",
    "LogprobsMissingError",
    "LogprobsUnsupportedError",
    "SampleResult",
    "SamplingError",
    "asample_with_logprobs",
    "count_message_tokens",
    "count_tokens",
    "encoding_name_for",
    "get_encoding",
    "local_features",
    "openai_encoding",
    "rank_file",
    "read_candidate",
    "read_candidates",
    "sample_with_logprobs",
]
