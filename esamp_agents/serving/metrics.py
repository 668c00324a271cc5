"""The server's Prometheus metrics (``GET /metrics``, text exposition format 0.0.4), no dependencies.

Requests by endpoint and status, rows (prompts x n) being decoded, requests waiting in the
queue, generated tokens, the decode rate over the last minute and the time to the first
streamed token (a histogram, over streamed requests: a whole response has no first token to
time). The front end records requests and first tokens; the backend's worker records the
rest.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the time-to-first-token histogram's buckets (``+Inf`` is added)."""
RATE_WINDOW_S = 60.0
"""Seconds of recent requests that ``esamp_generated_tokens_per_second`` averages over."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and gauges of one server; :meth:`render` writes them in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        # (rows in flight, requests waiting), read when rendering (the backend sets it)
        self.gauges: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.generated_tokens = 0
        self._recent: deque[tuple[float, int, float]] = deque()  # (finished at, tokens, decode seconds)
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, int(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def generated(self, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += tokens
            self._recent.append((now, tokens, seconds))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self._ttft_sum += seconds

    def tokens_per_second(self) -> float:
        """Completion tokens per second of wall-clock time, over requests finished in the last minute
        (from the earliest of their starts to now: concurrent requests decode together, so their
        decode times overlap and must not be summed). 0 if none."""
        now = time.monotonic()
        with self._lock:
            recent = [(at, tokens, seconds) for at, tokens, seconds in self._recent if at >= now - RATE_WINDOW_S]
        if not recent:
            return 0.0
        span = now - min(at - seconds for at, _, seconds in recent)
        return sum(tokens for _, tokens, _ in recent) / span if span > 0 else 0.0

    def render(self) -> str:
        rate = self.tokens_per_second()
        rows, waiting = self.gauges()
        with self._lock:
            lines = [
                "# HELP esamp_requests_total HTTP requests answered, by endpoint and status.",
                "# TYPE esamp_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'esamp_requests_total{{endpoint="{_escape(endpoint)}",status="{status}"}} {count}')
            lines += [
                "# HELP esamp_rows_in_flight Rows (prompts x n) being decoded now.",
                "# TYPE esamp_rows_in_flight gauge",
                f"esamp_rows_in_flight {rows}",
                "# HELP esamp_queue_depth Requests waiting for a worker or for room in the batch.",
                "# TYPE esamp_queue_depth gauge",
                f"esamp_queue_depth {waiting}",
                "# HELP esamp_generated_tokens_total Completion tokens generated.",
                "# TYPE esamp_generated_tokens_total counter",
                f"esamp_generated_tokens_total {self.generated_tokens}",
                "# HELP esamp_generated_tokens_per_second Tokens per second of decoding over the last minute.",
                "# TYPE esamp_generated_tokens_per_second gauge",
                f"esamp_generated_tokens_per_second {rate:.6g}",
                "# HELP esamp_time_to_first_token_seconds Time from a streamed request's arrival to its first token.",
                "# TYPE esamp_time_to_first_token_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip((*TTFT_BUCKETS, float("inf")), self._ttft_counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'esamp_time_to_first_token_seconds_bucket{{le="{le}"}} {cumulative}')
            lines.append(f"esamp_time_to_first_token_seconds_sum {self._ttft_sum:.6g}")
            lines.append(f"esamp_time_to_first_token_seconds_count {cumulative}")
        return "\n".join(lines) + "\n"


__all__ = ["RATE_WINDOW_S", "TTFT_BUCKETS", "Metrics"]
