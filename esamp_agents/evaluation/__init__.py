"""Measuring sampling and choosing: graded ``tasks``, diversity/pass@k ``metrics``, Best-of-N
``selectors`` with honest baselines, and behind ``esamp-agents eval``: ``samplers`` (the sampler
spellings), ``harness`` (the cached run), ``report`` (results.json and tables), ``plots``."""
