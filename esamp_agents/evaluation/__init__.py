"""Measuring sampling and choosing: graded ``tasks``, diversity/pass@k ``metrics``, Best-of-N
``selectors`` with honest baselines, and the ``harness`` behind ``esamp-agents eval``."""
