"""Logprob reward features: the API path and the local-logits path agree; API quirks never crash."""

from __future__ import annotations

import math

import pytest
import torch

from esamp_agents.hidden_reward.logprob_features import (
    LOGPROB_FLOOR,
    LogprobsMissingError,
    features_from_logits,
    features_from_openai,
    logprob_feature_dim,
    token_features,
)


def _openai_from_logits(logits: torch.Tensor, ids: list[int], k: int) -> dict:
    """What an OpenAI-compatible server returns for these tokens (top-k alternatives as floats)."""
    lp = torch.log_softmax(logits.double(), -1)
    content = []
    for t, tok in enumerate(ids):
        values, alt_ids = lp[t].topk(k)
        content.append(
            {
                "token": f"t{tok}",
                "bytes": None,
                "logprob": float(lp[t, tok]),
                "top_logprobs": [
                    {"token": f"t{int(a)}", "bytes": None, "logprob": float(v)}
                    for v, a in zip(values, alt_ids, strict=True)
                ],
            }
        )
    return {"content": content, "refusal": None}


def test_api_path_equals_local_logits_path():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 300, generator=gen) * 3
    ids = [int(i) for i in torch.randint(0, 300, (12,), generator=gen)]
    ids[0] = int(logits[0].argmax())  # a top-1 choice
    local = features_from_logits(logits, ids, 20)
    remote = features_from_openai(_openai_from_logits(logits, ids, 20), 20)
    assert local.shape == (12, logprob_feature_dim(20)) == remote.shape
    assert torch.allclose(local, remote, atol=1e-5)
    assert local[0, 20] == pytest.approx(float(torch.log_softmax(logits[0], -1).max()), abs=1e-5)
    assert local[0, 21] == 0.0  # rank of the most likely token


def test_rank_and_outside_flag():
    top = torch.tensor([[-0.1, -2.0, -3.0], [-0.1, -2.0, -3.0], [-0.1, -2.0, -3.0]])
    chosen = torch.tensor([-0.1, -3.0, -7.0])
    f = token_features(chosen, top, 3)
    rank, outside = f[:, 4], f[:, 5]
    assert rank.tolist() == pytest.approx([0.0, 2 / 3, 1.0])
    assert outside.tolist() == [0.0, 0.0, 1.0]
    mass = f[:, 6]
    assert mass[0].item() == pytest.approx(math.exp(-0.1) + math.exp(-2.0) + math.exp(-3.0), rel=1e-5)


def test_quirks_fewer_alternatives_placeholders_null_fields():
    logprobs = {
        "content": [
            {"token": "a", "bytes": None, "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5}]},
            {"token": "b", "bytes": [98], "logprob": -9999.0, "top_logprobs": None},
            {
                "token": "c",
                "logprob": -1.0,
                "top_logprobs": [{"token": "x", "logprob": -9999.0}, {"token": "c", "logprob": -1.0, "bytes": None}],
            },
        ]
    }
    f = features_from_openai(logprobs, 5)
    assert f.shape == (3, 13)
    assert torch.isfinite(f).all()
    assert f[0, :5].tolist() == pytest.approx([-0.5] + [LOGPROB_FLOOR] * 4)
    assert f[1, 5] == LOGPROB_FLOOR  # the -9999 placeholder is clamped
    assert f[2, 0] == pytest.approx(-1.0) and f[2, 1] == LOGPROB_FLOOR


def test_empty_reply_and_refusal_give_no_tokens():
    assert features_from_openai({"content": []}, 20).shape == (0, 28)
    assert features_from_openai({"content": None, "refusal": "I can't help"}, 20).shape == (0, 28)


def test_missing_logprobs_error_says_what_to_request():
    with pytest.raises(LogprobsMissingError, match="logprobs=True"):
        features_from_openai(None, 20)
    with pytest.raises(LogprobsMissingError, match="content"):
        features_from_openai({"refusal": None}, 20)


def test_openai_objects_are_read_like_dicts():
    pytest.importorskip("openai")
    from openai.types.chat.chat_completion import ChoiceLogprobs
    from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob

    item = ChatCompletionTokenLogprob(
        token="hi", bytes=None, logprob=-0.2, top_logprobs=[TopLogprob(token="hi", bytes=None, logprob=-0.2)]
    )
    f = features_from_openai(ChoiceLogprobs(content=[item]), 4)
    assert f.shape == (1, 12) and f[0, 0] == pytest.approx(-0.2)


@pytest.mark.parametrize("k", [0, 21, True, 2.0])
def test_bad_top_k(k):
    with pytest.raises(ValueError, match="1 <= top_k <= 20"):
        logprob_feature_dim(k)
