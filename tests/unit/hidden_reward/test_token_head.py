"""The identity-keeping logprob head: TokenIndex, packed token rows, TokenTableHead, its
checkpoints and training it with fit(head=...). No model, no network."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from esamp_agents.hidden_reward.head import FeatureSpec, RewardHeadError, load_head, save_head
from esamp_agents.hidden_reward.logprob_features import (
    LOGPROB_FLOOR,
    LogprobsMissingError,
    features_from_openai,
    logprob_feature_dim,
    token_bytes,
    token_row_dim,
    token_rows_from_openai,
)
from esamp_agents.hidden_reward.token_head import TokenTableHead, token_spec
from esamp_agents.hidden_reward.token_index import MAX_BUCKETS, TokenIndex
from esamp_agents.hidden_reward.training import Example, fit, score_examples

K = 3
MODEL = "test-model"


def entry(token: str, logprob: float, alts: list[tuple[str, float]], raw: Any = "utf8") -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()) if raw == "utf8" else raw,
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alts],
    }


# --------------------------------------------------------------------------- TokenIndex


def test_vocab_index_rows_and_unseen_row():
    index = TokenIndex("vocab", tokens=[b"a", b"bc", b""])
    assert index.size == 4
    assert index.unseen_row == 3
    assert index.rows([b"a", b"bc", b"", b"zz"]) == [0, 1, 2, 3]
    assert index.name == "vocab"
    with pytest.raises(ValueError, match="distinct"):
        TokenIndex("vocab", tokens=[b"a", b"a"])


def test_from_counts_orders_by_frequency_then_bytes_and_drops_rare():
    counts = Counter({b"x": 1, b"b": 3, b"a": 3, b"c": 5})
    index = TokenIndex.from_counts(counts)
    assert index.tokens == (b"c", b"a", b"b", b"x")
    kept = TokenIndex.from_counts(counts, min_count=3)
    assert kept.tokens == (b"c", b"a", b"b")
    assert kept.row(b"x") == kept.unseen_row == 3
    with pytest.raises(ValueError, match="min_count"):
        TokenIndex.from_counts(counts, min_count=0)


def test_hash_index_is_deterministic_and_in_range():
    index = TokenIndex.hashed(7)
    assert index.size == 7 and index.unseen_row is None and index.kind == "hash"
    raws = [bytes([i]) * (i % 5) for i in range(200)]
    rows = index.rows(raws)
    assert all(0 <= r < 7 for r in rows)
    assert rows == TokenIndex.hashed(7).rows(raws)
    assert len(set(rows)) > 1
    assert index.to_tensors() == {}


@pytest.mark.parametrize("buckets", [0, 1, MAX_BUCKETS + 1])
def test_hash_buckets_out_of_range(buckets: int):
    with pytest.raises(ValueError, match=rf"allowed: 2 <= buckets <= {MAX_BUCKETS}"):
        TokenIndex.hashed(buckets)


def test_bad_kind_names_allowed_kinds():
    with pytest.raises(ValueError, match="allowed: vocab, hash"):
        TokenIndex("words")
    with pytest.raises(ValueError, match="allowed: vocab, hash"):
        TokenIndex.from_tensors("words", 3, {})
    with pytest.raises(ValueError, match="stores no tokens"):
        TokenIndex("hash", tokens=[b"a"], buckets=4)


def test_tensors_round_trip_with_empty_and_non_utf8_tokens():
    tokens = [b"hello", b"", b"\xff\xfe", b"\xe4\xbd", b" 7"]
    index = TokenIndex("vocab", tokens=tokens)
    tensors = index.to_tensors()
    assert tensors["token_bytes"].dtype == torch.uint8
    assert tensors["token_offsets"].dtype == torch.int64
    assert tensors["token_offsets"].tolist() == [0, 5, 5, 7, 9, 11]
    back = TokenIndex.from_tensors("vocab", index.size, tensors)
    assert back.tokens == tuple(tokens)
    assert back.rows([*tokens, b"new"]) == index.rows([*tokens, b"new"])


def test_tensors_round_trip_all_empty_tokens():
    index = TokenIndex("vocab", tokens=[b""])
    tensors = index.to_tensors()
    assert tensors["token_bytes"].numel() == 0
    assert TokenIndex.from_tensors("vocab", 2, tensors).tokens == (b"",)
    empty = TokenIndex("vocab", tokens=[])
    assert empty.size == 1 and empty.row(b"a") == 0
    assert TokenIndex.from_tensors("vocab", 1, empty.to_tensors()).tokens == ()


def _good() -> dict[str, torch.Tensor]:
    return TokenIndex("vocab", tokens=[b"ab", b"c"]).to_tensors()


@pytest.mark.parametrize(
    ("tensors", "size", "match"),
    [
        ({"token_bytes": _good()["token_bytes"]}, 3, "needs the tensors token_bytes and token_offsets"),
        ({**_good(), "token_bytes": _good()["token_bytes"].float()}, 3, "1-D uint8"),
        ({**_good(), "token_offsets": _good()["token_offsets"].int()}, 3, "int64"),
        ({**_good(), "token_offsets": _good()["token_offsets"].view(1, 3)}, 3, "1-D"),
        (_good(), 4, "a vocab index of 4 rows needs 4"),
        ({**_good(), "token_offsets": torch.tensor([1, 2, 3])}, 3, "token_offsets"),
        ({**_good(), "token_offsets": torch.tensor([0, 2, 4])}, 3, "token_offsets"),
        ({**_good(), "token_offsets": torch.tensor([0, 3, 2, 3])}, 4, "must not decrease"),
    ],
)
def test_from_tensors_rejects_bad_tensors(tensors: dict[str, torch.Tensor], size: int, match: str):
    with pytest.raises(ValueError, match=match):
        TokenIndex.from_tensors("vocab", size, tensors)


# --------------------------------------------------------------------------- packed token rows


def sample_logprobs() -> dict[str, Any]:
    return {
        "content": [
            entry("7", -0.2, [("7", -0.2), ("8", -1.9), ("x", -3.0), ("y", -4.0)]),  # more than K
            entry(",", -0.5, [(",", -0.5), (";", -9999.0)]),  # a placeholder: one usable alternative
            entry("é", -1.0, [("é", -1.0), ("e", -1.2)], raw=None),  # null bytes: the UTF-8
            entry("\ufffd", -2.0, [("z", -0.1)], raw=[0xFF]),  # raw non-UTF-8 bytes; chosen not in top
            {"token": "q", "logprob": -0.3, "bytes": None, "top_logprobs": None},  # no alternatives
        ],
        "refusal": None,
    }


def test_token_bytes_prefers_bytes_then_utf8():
    assert token_bytes({"token": "é", "bytes": [0xFF, 0x00]}) == b"\xff\x00"
    assert token_bytes({"token": "é", "bytes": None}) == "é".encode()
    assert token_bytes({"token": None}) == b""
    assert token_bytes({"token": "ab", "bytes": ["x"]}) == b"ab"  # unusable bytes -> the token's UTF-8


def test_token_rows_layout_rows_and_weights():
    lp = sample_logprobs()
    index = TokenIndex("vocab", tokens=[b"7", b"8", b",", "é".encode(), b"e", b"\xff", b"z"])
    rows = token_rows_from_openai(lp, K, index)
    s = logprob_feature_dim(K)
    assert rows.shape == (5, token_row_dim(K)) == (5, s + 1 + 2 * K)
    assert token_row_dim(K) == K + 8 + 1 + 2 * K
    # the statistics columns are exactly features_from_openai's
    assert torch.equal(rows[:, :s], features_from_openai(lp, K))
    chosen = rows[:, s].long().tolist()
    assert chosen == index.rows([b"7", b",", "é".encode(), b"\xff", b"q"])
    assert chosen[-1] == index.unseen_row
    alts = rows[:, s + 1 : s + 1 + K].long()
    weights = rows[:, s + 1 + K :]
    # token 0: the first K alternatives, top-k renormalised probabilities
    assert alts[0].tolist() == index.rows([b"7", b"8", b"x"])
    p = torch.tensor([-0.2, -1.9, -3.0]).exp()
    assert torch.allclose(weights[0], p / p.sum(), atol=1e-6)
    # token 1: the -9999 placeholder is dropped; one alternative of weight 1
    assert alts[1, 0].item() == index.row(b",")
    assert weights[1].tolist() == pytest.approx([1.0, 0.0, 0.0])
    # token 2: two alternatives
    assert alts[2, :2].tolist() == index.rows(["é".encode(), b"e"])
    q = torch.tensor([-1.0, -1.2]).exp()
    assert torch.allclose(weights[2, :2], q / q.sum(), atol=1e-6) and weights[2, 2] == 0
    # token 3: one alternative; token 4: none at all
    assert alts[3, 0].item() == index.row(b"z") and weights[3].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert weights[4].tolist() == [0.0, 0.0, 0.0]
    for i, given in enumerate([3, 1, 2, 1]):
        assert weights[i].sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (weights[i, given:] == 0).all()
    assert torch.isfinite(rows).all()


def test_token_rows_with_hash_index_match_index_rows():
    lp = sample_logprobs()
    index = TokenIndex.hashed(11)
    rows = token_rows_from_openai(lp, K, index)
    s = logprob_feature_dim(K)
    assert rows[:, s].long().tolist() == index.rows([b"7", b",", "é".encode(), b"\xff", b"q"])
    assert rows[0, s + 1 : s + 1 + K].long().tolist() == index.rows([b"7", b"8", b"x"])


def test_token_rows_refusal_empty_and_missing_like_features_from_openai():
    index = TokenIndex("vocab", tokens=[b"a"])
    refusal = {"content": None, "refusal": "no"}
    assert token_rows_from_openai(refusal, K, index).shape == (0, token_row_dim(K))
    assert features_from_openai(refusal, K).shape == (0, logprob_feature_dim(K))
    assert token_rows_from_openai({"content": []}, K, index).shape == (0, token_row_dim(K))
    with pytest.raises(LogprobsMissingError, match="logprobs=True"):
        token_rows_from_openai(None, K, index)
    with pytest.raises(LogprobsMissingError, match="content"):
        token_rows_from_openai({"content": None}, K, index)
    with pytest.raises(ValueError, match="top_k"):
        token_rows_from_openai({"content": []}, 0, index)


def test_token_rows_all_placeholders_give_zero_weights():
    lp = {"content": [entry("a", -9999.0, [("a", -9999.0), ("b", LOGPROB_FLOOR - 5)])]}
    rows = token_rows_from_openai(lp, K, TokenIndex("vocab", tokens=[b"a"]))
    s = logprob_feature_dim(K)
    assert torch.isfinite(rows).all()
    assert rows[0, s + 1 + K :].tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- TokenTableHead


def vocab_index() -> TokenIndex:
    return TokenIndex("vocab", tokens=[b"0", b"1", b"2", b"3", b"\xff", b""])


def random_rows(index: TokenIndex, b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    s = logprob_feature_dim(K)
    stats = torch.randn(b, t, s, generator=gen)
    chosen = torch.randint(0, index.size, (b, t, 1), generator=gen).float()
    alts = torch.randint(0, index.size, (b, t, K), generator=gen).float()
    weights = torch.rand(b, t, K, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.cat([stats, chosen, alts, weights], dim=-1)


def random_head(index: TokenIndex, *, gate: bool = True, seed: int = 0) -> TokenTableHead:
    gen = torch.Generator().manual_seed(seed)
    head = TokenTableHead(token_spec(MODEL, K, index), index, gate=gate)
    head.init_weights(gen)
    s = logprob_feature_dim(K)
    head.set_standardisation(torch.randn(s, generator=gen), torch.rand(s, generator=gen) + 0.5)
    with torch.no_grad():
        head.chosen_table.copy_(torch.randn(index.size, 2, generator=gen))
        head.alt_table.copy_(torch.randn(index.size, 2, generator=gen))
    return head


def test_token_spec_and_head_shapes():
    index = vocab_index()
    spec = token_spec(MODEL, K, index)
    assert (spec.kind, spec.dim, spec.token_index, spec.index_size) == ("logprob_tokens", token_row_dim(K), "vocab", 7)
    head = TokenTableHead(spec, index)
    assert head.num_parameters == 2 * logprob_feature_dim(K) + 2 + 2 * 7 * 2
    other = TokenIndex("vocab", tokens=[b"0"])
    with pytest.raises(ValueError, match="does not match the spec"):
        TokenTableHead(spec, other)
    with pytest.raises(ValueError, match="kind 'logprob_tokens'"):
        TokenTableHead(FeatureSpec("logprobs", K + 8, MODEL, 1, 1, top_k=K), index)


def test_tables_start_at_zero_and_token_outputs_add_table_entries():
    index = vocab_index()
    head = random_head(index)
    gen = torch.Generator().manual_seed(1)
    x = random_rows(index, 2, 4, gen)
    gate, reward = head.token_outputs(x)
    s = logprob_feature_dim(K)
    stats = (x[..., :s] - head.feature_mean) / head.feature_std
    lin = head.linear(stats)
    chosen = x[..., s].long()
    alts = x[..., s + 1 : s + 1 + K].long()
    w = x[..., s + 1 + K :]
    want = lin + head.chosen_table[chosen] + (w.unsqueeze(-1) * head.alt_table[alts]).sum(-2)
    assert torch.allclose(gate, want[..., 0], atol=1e-5)
    assert torch.allclose(reward, want[..., 1], atol=1e-5)
    head.init_weights(torch.Generator().manual_seed(0))
    assert (head.chosen_table == 0).all() and (head.alt_table == 0).all()
    with pytest.raises(ValueError, match="last dimension"):
        head.token_outputs(x[..., :-1])


def test_set_standardisation_accepts_stats_or_packed_width():
    index = vocab_index()
    head = TokenTableHead(token_spec(MODEL, K, index), index)
    s, d = logprob_feature_dim(K), token_row_dim(K)
    mean = torch.arange(d, dtype=torch.float32)
    head.set_standardisation(mean, torch.full((d,), 2.0))
    assert head.feature_mean.tolist() == mean[:s].tolist()
    assert (head.feature_std == 2.0).all()
    head.set_standardisation(torch.zeros(s), torch.zeros(s))
    assert (head.feature_std > 0).all()  # clamped
    with pytest.raises(ValueError, match=rf"must have shape \({s},\)"):
        head.set_standardisation(torch.zeros(s + 1), torch.ones(s + 1))
    with pytest.raises(ValueError, match="finite"):
        head.set_standardisation(torch.full((s,), math.nan), torch.ones(s))


def test_materialise_keeps_outputs():
    index = vocab_index()
    head = random_head(index, seed=3)
    gen = torch.Generator().manual_seed(4)
    embedding = torch.randn(index.size, 5, generator=gen)
    head.tie_to_embedding(embedding)
    assert head.embedding is not None and head.chosen_table is None
    with torch.no_grad():
        head.chosen_proj.copy_(torch.randn(5, 2, generator=gen))
        head.alt_proj.copy_(torch.randn(5, 2, generator=gen))
    x = random_rows(index, 3, 6, gen)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        before = head(x, mask)
        tied_tables = [t.clone() for t in head.tables()]
    assert torch.allclose(tied_tables[0], embedding @ head.chosen_proj)
    head.materialise()
    assert head.embedding is None and not hasattr(head, "chosen_proj")
    assert {n for n, _ in head.named_parameters()} == {"linear.weight", "linear.bias", "chosen_table", "alt_table"}
    with torch.no_grad():
        after = head(x, mask)
    assert torch.allclose(before, after, atol=1e-6)
    assert before.abs().max() > 0.1  # the tables matter: not a trivial zero comparison
    for a, b in zip(tied_tables, head.tables(), strict=True):
        assert torch.allclose(a, b)
    head.materialise()  # a no-op now
    with torch.no_grad():
        assert torch.allclose(head(x, mask), after)


def test_tie_to_embedding_validates():
    index = vocab_index()
    head = TokenTableHead(token_spec(MODEL, K, index), index)
    with pytest.raises(ValueError, match=r"must be \[7, d\]"):
        head.tie_to_embedding(torch.zeros(6, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        head.tie_to_embedding(torch.full((7, 3), math.inf))


def test_save_refuses_a_tied_head(tmp_path: Path):
    index = vocab_index()
    head = random_head(index)
    head.tie_to_embedding(torch.randn(index.size, 4))
    with pytest.raises(ValueError, match="materialise"):
        save_head(head, tmp_path / "h.safetensors")
    assert not (tmp_path / "h.safetensors").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


@pytest.mark.parametrize("kind", ["vocab", "hash"])
@pytest.mark.parametrize("gate", [True, False])
def test_save_load_round_trip(tmp_path: Path, kind: str, gate: bool):
    index = vocab_index() if kind == "vocab" else TokenIndex.hashed(13)
    head = random_head(index, gate=gate, seed=5)
    head.training_summary = {"note": "x"}
    path = save_head(head, tmp_path / "h.safetensors")
    loaded = load_head(path, base_model=MODEL)
    assert isinstance(loaded, TokenTableHead)
    assert loaded.spec == head.spec and loaded.gate == gate
    assert loaded.training_summary == {"note": "x"}
    assert loaded.index.kind == kind and loaded.index.size == index.size
    probe = [b"0", b"3", b"\xff", b"", b"unseen", "é".encode()]
    assert loaded.index.rows(probe) == index.rows(probe)
    if kind == "vocab":
        assert loaded.index.tokens == index.tokens
    gen = torch.Generator().manual_seed(6)
    x = random_rows(index, 2, 5, gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(head(x, mask), loaded(x, mask))
    # scoring real API logprobs through the loaded index gives the same numbers
    lp = sample_logprobs()
    a = token_rows_from_openai(lp, K, head.index).unsqueeze(0)
    b = token_rows_from_openai(lp, K, loaded.index).unsqueeze(0)
    assert torch.equal(a, b)
    m = torch.ones(1, a.shape[1], dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(head(a, m), loaded(b, m))


def test_vocab_checkpoint_stores_index_tensors(tmp_path: Path):
    from safetensors import safe_open

    index = vocab_index()
    path = save_head(random_head(index), tmp_path / "h.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("token_bytes").dtype == torch.uint8
        assert f.get_tensor("token_offsets").dtype == torch.int64
        assert f.get_tensor("token_offsets").tolist() == index.to_tensors()["token_offsets"].tolist()
    assert {"token_bytes", "token_offsets", "chosen_table", "alt_table"} <= keys
    hashed = save_head(random_head(TokenIndex.hashed(5)), tmp_path / "g.safetensors")
    with safe_open(str(hashed), framework="pt") as f:
        assert "token_bytes" not in set(f.keys())


def _rewrite(path: Path, out: Path, change: dict[str, torch.Tensor | None]) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for k, v in change.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    save_file(tensors, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize(
    ("offsets", "match"),
    [
        (torch.tensor([0, 1, 2, 3, 5, 4, 5], dtype=torch.int64), "must not decrease"),
        (torch.tensor([0, 1, 2, 3, 4, 5, 9], dtype=torch.int64), "token_offsets"),
        (torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int64), "needs 7"),
        (torch.tensor([0, 1, 2, 3, 4, 5, 5], dtype=torch.int32), "int64"),
    ],
)
def test_load_rejects_damaged_token_offsets(tmp_path: Path, offsets: torch.Tensor, match: str):
    index = vocab_index()
    good = save_head(random_head(index), tmp_path / "good.safetensors")
    assert index.to_tensors()["token_offsets"].tolist() == [0, 1, 2, 3, 4, 5, 5]
    bad = _rewrite(good, tmp_path / "bad.safetensors", {"token_offsets": offsets})
    with pytest.raises(RewardHeadError, match="token index is damaged") as info:
        load_head(bad)
    assert info.match(match)


def test_load_rejects_missing_index_tensor(tmp_path: Path):
    good = save_head(random_head(vocab_index()), tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "bad.safetensors", {"token_bytes": None})
    with pytest.raises(RewardHeadError, match="token_bytes"):
        load_head(bad)


def test_load_rejects_wrong_table_shape(tmp_path: Path):
    good = save_head(random_head(vocab_index()), tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "bad.safetensors", {"chosen_table": torch.zeros(6, 2)})
    with pytest.raises(RewardHeadError, match=r"chosen_table has shape \(6, 2\)"):
        load_head(bad)


def test_load_rejects_index_size_mismatch_in_metadata(tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = save_head(random_head(vocab_index()), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    spec = json.loads(metadata["spec"])
    spec["token_index"] = "words"
    metadata["spec"] = json.dumps(spec)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(RewardHeadError, match="token_index='words' is unknown"):
        load_head(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------- FeatureSpec


def spec_args(**kw: Any) -> dict[str, Any]:
    base = {
        "kind": "logprob_tokens", "dim": token_row_dim(K), "base_model": MODEL, "hidden_size": 1,
        "num_layers": 1, "top_k": K, "token_index": "vocab", "index_size": 5,
    }  # fmt: skip
    return {**base, **kw}


def test_feature_spec_logprob_tokens_valid_and_round_trips():
    spec = FeatureSpec(**spec_args())
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    assert FeatureSpec(**spec_args(token_index="hash", index_size=2)).index_size == 2
    assert FeatureSpec(**spec_args(index_size=1)).index_size == 1  # a vocab index of no tokens


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dim": token_row_dim(K) + 1}, rf"dim={token_row_dim(K) + 1} does not match the packed token row"),
        ({"dim": K + 8}, rf"= {token_row_dim(K)}"),
        ({"token_index": "words"}, "token_index='words' is unknown; allowed: vocab, hash"),
        ({"token_index": ""}, "allowed: vocab, hash"),
        ({"index_size": 0}, "index_size=0 is out of range; allowed: 1 <= index_size"),
        ({"token_index": "hash", "index_size": 1}, "allowed: 2 <= index_size"),
        ({"index_size": MAX_BUCKETS + 1}, rf"index_size <= {MAX_BUCKETS}"),
        ({"top_k": 0}, "top_k"),
        ({"layers": (1,)}, "must be empty"),
    ],
)
def test_feature_spec_logprob_tokens_invalid(kw: dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        FeatureSpec(**spec_args(**kw))


@pytest.mark.parametrize("kw", [{"token_index": "vocab"}, {"index_size": 4}])
def test_token_fields_refused_on_other_kinds(kw: dict[str, Any]):
    with pytest.raises(ValueError, match="only for kind='logprob_tokens'"):
        FeatureSpec("hidden", 8, MODEL, 8, 2, layers=(1,), **kw)
    with pytest.raises(ValueError, match="only for kind='logprob_tokens'"):
        FeatureSpec("logprobs", K + 8, MODEL, 1, 1, top_k=K, **kw)


# --------------------------------------------------------------------------- training


def synthetic(index: TokenIndex, groups: int, seed: int, prefix: str) -> list[Example]:
    """Candidates whose statistics are noise; a correct one chose token b"7" at one position."""
    gen = torch.Generator().manual_seed(seed)
    marker = index.row(b"7")
    others = [index.row(t) for t in (b"1", b"2", b"3")]
    out = []
    for g in range(groups):
        for c in range(4):
            correct = c % 2 == 0
            t = 4 + int(torch.randint(0, 4, (1,), generator=gen))
            x = random_rows(index, 1, t, gen)[0]
            s = logprob_feature_dim(K)
            x[:, s] = torch.tensor(others)[torch.randint(0, 3, (t,), generator=gen)].float()
            x[:, s + 1 : s + 1 + K] = x[:, s : s + 1]  # alternatives: the same (uninformative) tokens
            if correct:
                x[int(torch.randint(0, t, (1,), generator=gen)), s] = float(marker)
            out.append(Example(x, correct, f"{prefix}{g}"))
    return out


def test_fit_trains_a_token_head_that_finds_the_marker_token():
    index = TokenIndex("vocab", tokens=[b"1", b"2", b"3", b"7"])
    spec = token_spec(MODEL, K, index)
    head = TokenTableHead(spec, index)
    train = synthetic(index, 24, seed=0, prefix="p")
    result = fit(train, spec, head=head, epochs=60, lr=0.05, groups_per_step=4, val_fraction=0.2, patience=60)
    assert result.head is head
    held_out = synthetic(index, 10, seed=1, prefix="q")
    scores = score_examples(head, [e.features for e in held_out])
    for g in range(10):
        group = scores[4 * g : 4 * g + 4]
        assert min(group[0].item(), group[2].item()) > max(group[1].item(), group[3].item())
    chosen, _ = head.tables()
    marker = index.row(b"7")
    assert chosen[marker, 1] > chosen[[index.row(b"1"), index.row(b"2"), index.row(b"3")], 1].max()


def test_fit_rejects_a_head_of_another_spec_or_gate():
    index = TokenIndex("vocab", tokens=[b"1", b"2", b"3", b"7"])
    spec = token_spec(MODEL, K, index)
    data = synthetic(index, 4, seed=0, prefix="p")
    other = TokenIndex.hashed(5)
    with pytest.raises(ValueError, match="fit was asked for"):
        fit(data, spec, head=TokenTableHead(token_spec(MODEL, K, other), other), epochs=1)
    with pytest.raises(ValueError, match="gate=False"):
        fit(data, spec, head=TokenTableHead(spec, index, gate=False), epochs=1)


def test_fit_a_tied_head_then_materialise_and_save(tmp_path: Path):
    index = TokenIndex("vocab", tokens=[b"1", b"2", b"3", b"7"])
    spec = token_spec(MODEL, K, index)
    head = TokenTableHead(spec, index)
    gen = torch.Generator().manual_seed(7)
    head.tie_to_embedding(torch.randn(index.size, 4, generator=gen))
    train = synthetic(index, 16, seed=2, prefix="p")
    fit(train, spec, head=head, epochs=30, lr=0.05, groups_per_step=4, val_fraction=0.25, patience=30)
    assert head.chosen_proj.abs().sum() > 0  # the projection was trained
    held_out = [e.features for e in synthetic(index, 4, seed=3, prefix="q")]
    tied = score_examples(head, held_out)
    head.materialise()
    assert torch.allclose(score_examples(head, held_out), tied, atol=1e-5)
    loaded = load_head(save_head(head, tmp_path / "h.safetensors"))
    assert torch.allclose(score_examples(loaded, held_out), tied, atol=1e-5)


# --------------------------------------------------------------------------- documented defects


def test_bad_offset_bounds_message_names_the_problem():
    tensors = {**_good(), "token_offsets": torch.tensor([1, 2, 3])}
    with pytest.raises(ValueError) as info:
        TokenIndex.from_tensors("vocab", 3, tensors)
    # the entry count (3) is right; the bounds are wrong: the message should say so
    assert "has 3 entries; a vocab index of 3 rows needs 3" not in str(info.value)


def test_alt_rows_are_the_top_k_alternatives_when_unsorted():
    # more alternatives than top_k, not sorted: the statistics use the best K, the rows the first K
    lp = {"content": [entry("a", -0.1, [("z", -5.0), ("a", -0.1), ("b", -0.2), ("c", -0.3)])]}
    index = TokenIndex("vocab", tokens=[b"a", b"b", b"c", b"z"])
    rows = token_rows_from_openai(lp, K, index)
    s = logprob_feature_dim(K)
    assert sorted(rows[0, s + 1 : s + 1 + K].long().tolist()) == sorted(index.rows([b"a", b"b", b"c"]))
