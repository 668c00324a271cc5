"""LogprobReward with an identity-keeping token head: scoring OpenAI-shaped responses, the
model check, checkpoints. No model, no network."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from esamp_agents.adapters.logprob_reward import LogprobReward
from esamp_agents.hidden_reward.head import IncompatibleHeadError, save_head
from esamp_agents.hidden_reward.logprob_features import logprob_feature_dim, token_rows_from_openai
from esamp_agents.hidden_reward.token_head import TokenTableHead, token_spec
from esamp_agents.hidden_reward.token_index import TokenIndex

K = 3
MODEL = "my-api-model"


def token_head(index: TokenIndex | None = None, seed: int = 0) -> TokenTableHead:
    index = index or TokenIndex("vocab", tokens=[b"Answer", b":", b" 5", b" 7", b"\xff"])
    head = TokenTableHead(token_spec(MODEL, K, index), index)
    gen = torch.Generator().manual_seed(seed)
    head.init_weights(gen)
    with torch.no_grad():
        head.chosen_table.copy_(torch.randn(index.size, 2, generator=gen))
        head.alt_table.copy_(torch.randn(index.size, 2, generator=gen))
    return head


def item(token: str, logprob: float, alts: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alts],
    }


def logprobs_of(answer: str, shift: float) -> dict[str, Any]:
    return {
        "content": [
            item("Answer", -0.1 - shift, [("Answer", -0.1 - shift), ("The", -2.5), ("So", -3.0)]),
            item(":", -0.01, [(":", -0.01), (" is", -5.0), ("=", -6.0)]),
            item(answer, -0.7, [(" 5", -0.7), (" 7", -0.9), (" 6", -3.3)]),
        ],
        "refusal": None,
    }


def completion(model: str = MODEL) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": f"Answer:{ans}", "refusal": None},
            "logprobs": logprobs_of(ans, 0.1 * i),
            "finish_reason": "stop",
        }
        for i, ans in enumerate([" 5", " 7"])
    ]
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": choices,
            "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}  # fmt: skip


def expected_scores(head: TokenTableHead, response: dict[str, Any]) -> list[float]:
    out = []
    for choice in response["choices"]:
        rows = token_rows_from_openai(choice["logprobs"], K, head.index).unsqueeze(0)
        with torch.no_grad():
            out.append(float(head(rows, torch.ones(rows.shape[:2], dtype=torch.bool))))
    return out


def test_token_head_scores_two_choices():
    head = token_head()
    reward = LogprobReward(head)
    assert reward.top_logprobs == K
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # K alternatives everywhere: no "fewer top_logprobs" warning
        report = reward.score_with_report(completion())
    assert report.tokens == [3, 3]
    assert report.scores == pytest.approx(expected_scores(head, completion()), abs=1e-6)
    assert report.scores[0] != report.scores[1]  # the answer token's identity counts
    assert report.usage == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_token_identity_changes_the_score():
    # identical statistics, only the chosen answer token differs: a statistics head cannot tell
    head = token_head()
    a, b = logprobs_of(" 5", 0.0), logprobs_of(" 7", 0.0)
    fa = token_rows_from_openai(a, K, head.index)
    fb = token_rows_from_openai(b, K, head.index)
    s = logprob_feature_dim(K)
    assert torch.equal(fa[:, :s], fb[:, :s])
    reward = LogprobReward(head)
    sa, sb = reward.score_features([fa, fb])
    assert sa != sb
    assert head.index.row(b" 5") != head.index.row(b" 7")


def test_model_check_names_both_models():
    reward = LogprobReward(token_head())
    with pytest.raises(IncompatibleHeadError) as info:
        reward.score_response(completion(model="gpt-4o"))
    message = str(info.value)
    assert repr(MODEL) in message and "'gpt-4o'" in message and "check_model=False" in message
    with pytest.raises(IncompatibleHeadError, match="gpt-4o-mini"):
        reward.score_with_report(completion(), model_name="gpt-4o-mini")


def test_check_model_false_scores_another_models_response():
    head = token_head()
    reward = LogprobReward(head, check_model=False)
    scores = reward.score_response(completion(model="gpt-4o"))
    assert scores == pytest.approx(expected_scores(head, completion()), abs=1e-6)
    with pytest.raises(ValueError, match="check_model"):
        LogprobReward(head, check_model="no")  # type: ignore[arg-type]


def test_response_without_model_name_is_scored():
    head = token_head()
    response = completion()
    del response["model"]
    scores = LogprobReward(head).score_response(response)
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_token_head_from_checkpoint(tmp_path: Path):
    head = token_head(seed=3)
    path = save_head(head, tmp_path / "tok.safetensors")
    reward = LogprobReward(path)
    assert isinstance(reward.head, TokenTableHead)
    assert reward.head.index.tokens == head.index.tokens
    assert reward.score_response(completion()) == pytest.approx(expected_scores(head, completion()), abs=1e-6)
    hashed = token_head(TokenIndex.hashed(17), seed=4)
    reward = LogprobReward(save_head(hashed, tmp_path / "hash.safetensors"))
    assert reward.score_response(completion()) == pytest.approx(expected_scores(hashed, completion()), abs=1e-6)


def test_refusal_and_missing_with_token_head():
    reward = LogprobReward(token_head(), on_missing="nan", on_empty="zero")
    response = completion()
    response["choices"][1]["logprobs"] = None
    response["choices"][1]["message"]["content"] = "text without logprobs"
    report = reward.score_with_report(response)
    assert report.missing == [1] and math.isnan(report.scores[1]) and math.isfinite(report.scores[0])
    refusal = completion()
    refusal["choices"][0]["logprobs"] = {"content": None, "refusal": "no"}
    refusal["choices"][0]["message"] = {"role": "assistant", "content": None, "refusal": "no"}
    report = reward.score_with_report(refusal)
    assert report.empty == [0] and report.scores[0] == 0.0


def test_score_local_refuses_a_token_head():
    reward = LogprobReward(token_head())
    with pytest.raises(ValueError, match="score_local reads statistics only"):
        reward.score_local(None, [1, 2], [[3]])


def test_the_shipped_logprob_head_is_a_token_head_for_the_served_embedded_model():
    from esamp_agents.adapters.logprob_reward import shipped_logprob_head_path

    reward = LogprobReward.shipped()
    spec = reward.head.spec
    assert shipped_logprob_head_path().stat().st_size < 512 * 1024  # small enough for the wheel
    assert (spec.kind, spec.base_model, spec.top_k, spec.token_index) == ("logprob_tokens", "embedded", 20, "vocab")
    assert reward.top_logprobs == 20 and reward.head.index.size == spec.index_size
    summary = reward.head.training_summary
    assert summary["api_model"] == "embedded" and summary["n_train_problems"] > 0
