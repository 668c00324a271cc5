"""The one place user-facing numbers are checked, so every error reads the same way:
it names the bad value and the allowed range, and is raised before any work starts."""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allowed: str,
) -> float:
    """A real number within [low, high] (``*_open`` excludes that end); returns it as given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name}={value!r} is not a number; allowed: {allowed}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")
    return value


def check_int(
    name: str,
    value: Any,
    low: int,
    high: int | None = None,
    *,
    high_name: str | None = None,
    allow_none: bool = False,
) -> int | None:
    """An integer (numpy integers too, never bool) with ``low <= value <= high``; returns ``int(value)``.

    ``high_name`` names what the upper bound is (e.g. ``"n"``) in the message;
    ``allow_none`` lets ``None`` through (returned as is).
    """
    if value is None and allow_none:
        return None
    extra = " or None" if allow_none else ""
    upper = f" <= {high_name or high}" if high is not None else ""
    where = f" (here {high_name} = {high})" if high_name is not None and high is not None else ""
    allowed = f"{low} <= {name}{upper}{where}{extra}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an integer >= {low}; allowed: {allowed}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")
    return int(value)


__all__ = ["check_int", "check_range"]
