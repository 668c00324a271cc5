"""Adapters to other systems (shipped as ``esamp_agents.adapters``).

- :mod:`esamp_agents.adapters.openai_logprobs`: the logit-only reward for closed APIs that
  return OpenAI-style token logprobs (``LogprobReward``), offline tiktoken encodings, and
  ``sample_with_logprobs`` with bounded retries.
"""
