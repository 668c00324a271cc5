"""Hidden-state features and rewards: during decoding and post hoc, on the real embedded model."""

from __future__ import annotations

import pytest
import torch

from esamp_agents import ESampParams, SamplingParams
from esamp_agents.hidden_reward.features import (
    RewardObserver,
    TokenFeatureRecorder,
    hidden_spec,
    posthoc_features,
    posthoc_rewards,
)
from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead, IncompatibleHeadError

LAYERS = (3, 15, -1)
# stop at "." cuts some candidates by a stop string; others end with EOS or at the length limit
SAMPLING = SamplingParams(n=3, max_new_tokens=14, temperature=0.7, seed=1, stop=(".",))
QUESTIONS = ["What is 3 + 4? Answer briefly.", "Name a colour. Reply with one word only."]


@pytest.fixture(scope="module")
def prompts(embedded) -> list[list[int]]:
    """Two chat prompts of different lengths, so the engine left-pads one of them."""
    return [embedded.chat_token_ids([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def spec(embedded) -> FeatureSpec:
    return hidden_spec(embedded, LAYERS)


def random_head(spec: FeatureSpec, mean: torch.Tensor, std: torch.Tensor, gate: bool, seed: int) -> GatedLinearHead:
    """Random weights over standardised features, so token rewards are O(1)."""
    head = GatedLinearHead(spec, gate=gate)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(2, spec.dim, generator=g) / spec.dim**0.5)
        head.linear.bias.copy_(torch.randn(2, generator=g))
    head.set_standardisation(mean, std)
    return head


@pytest.fixture(scope="module")
def heads(embedded, prompts, spec) -> tuple[GatedLinearHead, GatedLinearHead]:
    """A gated and an ungated head, standardised with statistics of the prompts' own states."""
    reference = [p[: len(p) // 2] for p in prompts]
    feats = torch.cat(
        posthoc_features(embedded, reference, [p[len(p) // 2 :] for p in prompts], spec, dtype=torch.float32)
    )
    mean, std = feats.mean(0), feats.std(0)
    return random_head(spec, mean, std, True, 0), random_head(spec, mean, std, False, 1)


@pytest.fixture(scope="module", params=[0.0, 0.25], ids=["plain", "esamp"])
def decoded(request, engine, prompts, spec, heads):
    """One decode with a float32 recorder and two reward observers attached."""
    recorder = TokenFeatureRecorder(spec, dtype=torch.float32)
    gated, plain = RewardObserver(heads[0]), RewardObserver(heads[1])
    out = engine.generate(
        prompts, SAMPLING, ESampParams(beta=request.param), observers=[recorder, gated, plain], add_special_tokens=False
    )
    return out, recorder, gated, plain


def pairs(out) -> tuple[list[list[int]], list[list[int]]]:
    cands = [(pr.prompt_token_ids, c.token_ids) for pr in out for c in pr.candidates]
    return [p for p, _ in cands], [r for _, r in cands]


# --------------------------------------------------------------------------- hidden_spec


def test_hidden_spec_all_and_negative_layers(embedded) -> None:
    full = hidden_spec(embedded)
    assert full.layers == tuple(range(embedded.num_layers + 1))
    assert full.dim == (embedded.num_layers + 1) * embedded.hidden_size
    spec = hidden_spec(embedded, [-1, 0, 4])
    assert spec.layers == (0, 4, embedded.num_layers) and spec.kind == "hidden"
    assert spec.base_model == embedded.name and spec.dim == 3 * embedded.hidden_size


@pytest.mark.parametrize(
    ("layers", "match"),
    [([31], r"-31 <= layer < 31"), ([-32], r"-31 <= layer < 31"), ([], "empty"), ([30, -1], "twice"), ("some", "all")],
)
def test_hidden_spec_rejects_bad_layers(embedded, layers, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hidden_spec(embedded, layers)


# --------------------------------------------------------------------------- decode vs post hoc


def test_recorder_keeps_one_row_per_token_and_equals_posthoc(embedded, decoded, spec) -> None:
    out, recorder, _, _ = decoded
    feats = recorder.features()
    cands = [c for pr in out for c in pr.candidates]
    kinds = {"eos" if c.finish_reason == "stop" and c.stop_sequence is None else c.finish_reason for c in cands}
    assert {"eos", "stop"} <= kinds, kinds  # EOS-ended and stop-string-cut candidates are both covered
    assert any(c.stop_sequence == "." for c in cands)
    for p, pr in enumerate(out):
        for s, c in enumerate(pr.candidates):
            assert feats[p][s].shape == (len(c.token_ids), spec.dim)
            assert feats[p][s].dtype == torch.float32
    post = posthoc_features(embedded, *pairs(out), spec, dtype=torch.float32, batch_size=4)
    recorded = [f for row in feats for f in row]
    worst = max((a - b).abs().max().item() for a, b in zip(recorded, post, strict=True))
    # The decode computes few-row products in another summation order than the post-hoc
    # prefill (esamp_agents.decoding.cpu_matmul): float32 rounding through 30 layers, measured
    # at most 7.7e-4 absolute / 1.4e-5 relative (1.4e-4 before that change).
    for a, b in zip(recorded, post, strict=True):
        torch.testing.assert_close(a, b, rtol=3e-5, atol=1e-4)
    assert worst < 2e-3


def test_reward_observer_equals_posthoc_rewards(embedded, decoded, heads) -> None:
    out, _, gated, plain = decoded
    prompt_ids, response_ids = pairs(out)
    for obs, head in ((gated, heads[0]), (plain, heads[1])):
        live = [r for row in obs.rewards() for r in row]
        post = posthoc_rewards(head, embedded, prompt_ids, response_ids, batch_size=4)
        assert max(abs(r) for r in live) > 0.1  # rewards are O(1), so 1e-4 is a real test
        assert max(abs(a - b) for a, b in zip(live, post, strict=True)) <= 1e-4  # measured ~2e-6


def test_recorder_default_dtype_is_float16(engine, prompts, spec) -> None:
    recorder = TokenFeatureRecorder(spec)
    out = engine.generate(
        prompts[:1], SamplingParams(n=2, max_new_tokens=4, seed=0), observers=[recorder], add_special_tokens=False
    )
    feats = recorder.features()
    assert all(f.dtype == torch.float16 for row in feats for f in row)
    assert [f.shape[0] for f in feats[0]] == [len(c.token_ids) for c in out[0].candidates]


# --------------------------------------------------------------------------- streaming semantics


def test_finished_rows_never_accumulate_and_memory_is_constant(spec) -> None:
    head = GatedLinearHead(spec)
    obs = RewardObserver(head)
    rows, g = 4, torch.Generator().manual_seed(3)
    obs.on_start(2, 2, spec.hidden_size)
    seen: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    frozen = None
    for step in range(40):
        hidden = {layer: torch.randn(rows, spec.hidden_size, generator=g) * 5 for layer in spec.layers}
        live = torch.tensor([True, step < 3, step < 20, True])
        obs.on_step(step, hidden, torch.zeros(rows, dtype=torch.long), live)
        x = torch.cat([hidden[layer] for layer in spec.layers], -1)
        for r in range(rows):
            if live[r]:
                seen[r].append(x[r])
        if step == 3:
            frozen = obs.rewards()[0][1]
        if step > 3:
            assert obs.rewards()[0][1] == frozen  # row 1 finished at step 3: unchanged since
    obs.on_finish()
    # only per-row running sums are held, whatever the number of steps
    tensors = [v for v in vars(obs.sums).values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.shape == (rows,) for t in tensors)
    assert not any(isinstance(v, (list, dict)) for v in vars(obs).values())
    with torch.no_grad():
        for r in range(rows):
            expected = head(torch.stack(seen[r]).unsqueeze(0), torch.ones(1, len(seen[r]))).item()
            assert obs.rewards()[r // 2][r % 2] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("flush_every", [1, 2, 16])
def test_recorder_orders_tokens_per_row_and_drops_dead_steps(spec, flush_every: int) -> None:
    rec = TokenFeatureRecorder(spec, dtype=torch.float32)
    rec.FLUSH_EVERY = flush_every  # staged steps move in batches; the result must not depend on it
    rec.on_start(1, 3, spec.hidden_size)
    lives = [[True, True, True], [True, False, True], [True, False, False]]
    for step, live in enumerate(lives):
        hidden = {layer: torch.full((3, spec.hidden_size), 100.0 * step + layer) for layer in spec.layers}
        hidden[spec.layers[0]] = hidden[spec.layers[0]] + torch.arange(3.0).unsqueeze(-1)  # row id
        rec.on_step(step, hidden, torch.zeros(3, dtype=torch.long), torch.tensor(live))
    feats = rec.features()[0]
    assert [f.shape[0] for f in feats] == [3, 1, 2]
    assert feats[2][:, 0].tolist() == [spec.layers[0] + 2.0, 100.0 + spec.layers[0] + 2.0]
    assert feats[0][:, spec.hidden_size].tolist() == [100.0 * s + spec.layers[1] for s in range(3)]


# --------------------------------------------------------------------------- post hoc


def test_posthoc_rows_do_not_depend_on_batch_mates(embedded, spec) -> None:
    a = embedded.chat_token_ids([{"role": "user", "content": "Hi"}])
    b = embedded.chat_token_ids([{"role": "user", "content": "Tell me a long story about a cat and a dog."}])
    prompts, responses = [a, b, a], [[28, 29, 30, 31, 32, 33, 34], [40, 41], [50]]
    together = posthoc_features(embedded, prompts, responses, spec, dtype=torch.float32, batch_size=3)
    alone = [
        posthoc_features(embedded, [p], [r], spec, dtype=torch.float32)[0]
        for p, r in zip(prompts, responses, strict=True)
    ]
    for x, y, r in zip(together, alone, responses, strict=True):
        assert x.shape == (len(r), spec.dim)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)
    # the first response token's feature is the prompt's last position
    last = posthoc_features(embedded, [a[:-1]], [[a[-1], 5]], spec, dtype=torch.float32)[0]
    torch.testing.assert_close(together[0][0], last[1], rtol=1e-5, atol=1e-4)
    assert posthoc_features(embedded, [a], [[]], spec)[0].shape == (0, spec.dim)


def test_posthoc_validation(embedded, spec) -> None:
    prompt = [1, 2, 3]
    with pytest.raises(ValueError, match="pair up"):
        posthoc_features(embedded, [prompt], [], spec)
    with pytest.raises(ValueError, match="no tokens"):
        posthoc_features(embedded, [[]], [[1]], spec)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        posthoc_features(embedded, [prompt], [[embedded.vocab_size]], spec)
    with pytest.raises(ValueError, match="batch_size=0"):
        posthoc_features(embedded, [prompt], [[1]], spec, batch_size=0)
    other = FeatureSpec("hidden", spec.dim, "some/other-model", spec.hidden_size, spec.num_layers, spec.layers)
    with pytest.raises(IncompatibleHeadError, match="other-model"):
        posthoc_rewards(GatedLinearHead(other), embedded, [prompt], [[1]])
    logprob_spec = FeatureSpec("logprobs", 13, embedded.name, spec.hidden_size, spec.num_layers, top_k=5)
    with pytest.raises(ValueError, match="kind='hidden'"):
        TokenFeatureRecorder(logprob_spec)
    with pytest.raises(RuntimeError, match="no decode"):
        RewardObserver(GatedLinearHead(spec)).rewards()
