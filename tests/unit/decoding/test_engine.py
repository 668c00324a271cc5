"""The decode loop on the real embedded model."""

from __future__ import annotations

import pytest

from esamp_agents import ESampParams, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n=0"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "0 < top_p <= 1"),
        ({"min_p": 1.0}, "0 <= min_p < 1"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ],
)
def test_bad_sampling_params_fail_before_decoding(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SamplingParams(**kwargs)


def test_bad_beta_fails() -> None:
    with pytest.raises(ValueError, match=r"beta=-0.1.*0 <= beta"):
        ESampParams(beta=-0.1)
