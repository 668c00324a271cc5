"""Our filters give exactly HF generate's sampling distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from esamp_agents.decoding.sampling import filter_candidates, log_normaliser, sample_positions
from esamp_agents.decoding.state import Workspace
from esamp_agents.decoding.text_tracking import cut_at_stop


def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    procs.append(MinPLogitsWarper(min_p))
    return procs(None, logits.clone()).softmax(-1)


def our_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    cands = filter_candidates(logits, temperature, top_k, top_p, min_p)
    probs = cands.scores.softmax(-1)
    if cands.ids is None:
        return probs
    return torch.zeros_like(logits).scatter(-1, cands.ids, probs)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (0.7, 50, 1.0, 0.0),
        (1.3, 0, 0.9, 0.0),
        (0.7, 50, 0.9, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.5, 20, 0.8, 0.05),
        (1.0, 5, 0.5, 0.3),
    ],
)
def test_filters_match_hf_warpers(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3000, generator=gen) * 3.0
    ours = our_probs(logits, temperature, top_k, top_p, min_p)
    theirs = hf_probs(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(ours > 0, theirs > 0), "the surviving token sets differ"
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    scores = probs.log().expand(20000, 3)
    draws = sample_positions(scores, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


def test_same_seed_same_draws() -> None:
    scores = torch.randn(8, 100)
    a = sample_positions(scores, torch.Generator().manual_seed(5))
    b = sample_positions(scores, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_top_k_tempers_only_the_survivors_with_the_same_values() -> None:
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3)) * 4
    cands = filter_candidates(logits, 0.7, 50, 1.0, 0.0)
    values, ids = torch.topk(logits / 0.7, 50, dim=-1)
    assert torch.equal(cands.ids, ids)
    assert torch.equal(cands.scores, values)


def test_log_normaliser_is_torch_logsumexp_bit_for_bit() -> None:
    logits = torch.randn(5, 49152, generator=torch.Generator().manual_seed(0)) * 8
    logits[1, 100:] = float("-inf")  # a constrained row
    logits[2] = float("-inf")  # nothing allowed: logsumexp is -inf, not nan
    scratch = torch.empty_like(logits)
    got = log_normaliser(logits, scratch)
    assert torch.equal(got, torch.logsumexp(logits, dim=-1, keepdim=True))


def test_workspace_reuses_a_buffer_until_its_shape_changes() -> None:
    ws = Workspace()
    a = ws.get("logits", (4, 10), torch.float32, torch.device("cpu"))
    assert ws.get("logits", (4, 10), torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()
    b = ws.get("logits", (8, 10), torch.float32, torch.device("cpu"))
    assert b.shape == (8, 10) and ws.get("logits", (8, 10), torch.float32, torch.device("cpu")) is b
    assert ws.get("logits", (8, 10), torch.float64, torch.device("cpu")).dtype == torch.float64


def test_cut_at_stop_takes_the_earliest() -> None:
    assert cut_at_stop("a END b STOP", ("STOP", "END")) == ("a ", "END")
    assert cut_at_stop("no stop here", ("STOP",)) == ("no stop here", None)
