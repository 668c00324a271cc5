"""Incremental detokenisation per row: stop strings and safe streaming deltas.

Only rows that need it pay for it: nothing here runs when a request has no
stop strings and nobody listens for text.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    """Cut ``text`` before the earliest stop string; return (text, the stop found)."""
    best, found = len(text), None
    for s in stop:
        i = text.find(s)
        if 0 <= i < best:
            best, found = i, s
    return text[:best], found


class TextTracker:
    """Follows the text of each row as tokens arrive."""

    def __init__(self, tokenizer: Any, rows: int, stop: tuple[str, ...], streaming: bool) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.streaming = streaming
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.emitted = [0] * rows
        longest = max((len(s) for s in stop), default=0)
        self.hold_back = max(longest - 1, 0)
        # A stop string of c characters spans at most c tokens; a little margin covers
        # tokens that decode to nothing on their own (partial UTF-8 bytes).
        self.window = longest + 4

    @property
    def active(self) -> bool:
        return bool(self.stop) or self.streaming

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, row: int, token: int) -> bool:
        """Record a token; True when the row's text now contains a stop string."""
        self.tokens[row].append(token)
        if not self.stop:
            return False
        tail = self.decode(self.tokens[row][-self.window :])
        return any(s in tail for s in self.stop)

    def delta(self, row: int, final_text: str | None = None) -> str:
        """New text for a streaming listener. Until the row ends, text that could still
        become part of a stop string, or an incomplete character, is held back."""
        if final_text is not None:
            safe = final_text
        else:
            text = self.decode(self.tokens[row])
            end = len(text) - self.hold_back
            while end > 0 and text[end - 1] == REPLACEMENT_CHAR:
                end -= 1
            safe = text[: max(end, 0)]
        if len(safe) <= self.emitted[row]:
            return ""
        out = safe[self.emitted[row] :]
        self.emitted[row] = len(safe)
        return out
