"""Field checks shared by the request protocol's parsers: every refusal is a :class:`RequestError`
in OpenAI's error shape, naming the field and what is allowed."""

from __future__ import annotations

import math
from typing import Any


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error response."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_field(body: dict[str, Any], name: str, low: int, high: int | None, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    allowed = f"an integer {low} <= {name}" + (f" <= {high}" if high is not None else "")
    if not is_int(value) or value < low or (high is not None and value > high):
        raise RequestError(f"{name}={value!r} is invalid; allowed: {allowed}", param=name, code="invalid_value")
    return int(value)


def number_field(body: dict[str, Any], name: str, default: float, allowed: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value):
        raise RequestError(f"{name}={value!r} is not a number; allowed: {allowed}", param=name, code="invalid_type")
    return float(value)


def bool_field(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name}={value!r} must be true or false", param=name, code="invalid_type")
    return value


__all__ = ["RequestError", "bool_field", "int_field", "is_int", "is_number", "number_field"]
