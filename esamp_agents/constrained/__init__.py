"""Grammar-constrained decoding: what a row may emit (:class:`Grammar`) and the loop's stage (:mod:`.matcher`)."""

from esamp_agents.constrained.grammar import Grammar, GrammarError

__all__ = ["Grammar", "GrammarError"]
