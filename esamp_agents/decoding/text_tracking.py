"""Incremental detokenisation per row: stop strings and safe streaming deltas.

Only rows that need it pay for it: nothing here runs when a request has no
stop strings and nobody listens for text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from esamp_agents.decoding.state import DecodeState, TextCallback, TokenCallback

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


def host_text_step(
    state: DecodeState,
    tokens: torch.Tensor,
    host_done: list[bool] | None,
    on_text: TextCallback | None,
    n: int,
    on_token: TokenCallback | None = None,
) -> torch.Tensor | None:
    """Host-side text work, only for requests with stop strings or a listener.

    End tokens are recognised on the host (the tokens are here anyway), so the only
    device traffic is the token read and, on a step where a stop string completes,
    one write of the rows it ended (returned as a ``[rows]`` mask; None otherwise).
    """
    host_tokens = tokens.tolist()
    host_live, tracker, eos = state.host_live, state.tracker, state.eos_ids
    assert host_live is not None
    lps, top_ids, top_lps = None, None, None
    if on_token is not None:  # this step's logprobs to the host too (they are tiny)
        lps = state.record.logprobs[-1].tolist()
        if state.record.top:
            top_ids, top_lps = (t.tolist() for t in state.record.top[-1])
    stopped: list[int] = []
    for row, is_live in enumerate(host_live):
        if not is_live:
            continue
        token = host_tokens[row]
        if on_token is not None:
            assert lps is not None
            top = list(zip(top_ids[row], top_lps[row], strict=True)) if top_ids is not None else None
            on_token(row // n, row % n, token, lps[row], top)
        ended = token in eos or (host_done is not None and host_done[row])
        if tracker.push(row, token) and not ended:
            stopped.append(row)
            host_live[row] = False
        elif ended:
            host_live[row] = False
        elif on_text is not None:
            delta = tracker.delta(row)
            if delta:
                on_text(row // n, row % n, delta)
    if not stopped:
        return None
    mask = torch.zeros(state.rows, dtype=torch.bool)
    mask[stopped] = True
    mask = mask.to(state.live.device)
    state.stopped_by_string |= mask
    return mask


__all__ = ["TextTracker", "cut_at_stop", "host_text_step"]
