"""Merging decode jobs' KV caches: right-aligned blocks, masks, and what cannot be merged."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, StaticCache

from esamp_agents.decoding.batch_cache import Block, merge, mergeable, merged_mask

CONFIG = LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, vocab_size=16)


def filled(rows: int, width: int, capacity: int, base: float) -> StaticCache:
    """A static cache whose first ``width`` columns hold ``base + row + column / 100``."""
    cache = StaticCache(config=CONFIG, max_cache_len=capacity)
    values = base + torch.arange(rows).view(rows, 1, 1, 1) + torch.arange(width).view(1, 1, width, 1) / 100
    states = values.expand(rows, 1, width, 4).contiguous()
    for i, layer in enumerate(cache.layers):
        layer.update(states + i, -(states + i))
    return cache


def test_blocks_are_right_aligned_one_after_another() -> None:
    a, b = filled(2, 3, 10, 10.0), filled(1, 5, 6, 20.0)
    merged, width = merge(CONFIG, [Block(a, 0, 2, 3, 3), Block(b, 0, 1, 5, 5)], capacity=9)
    assert width == 5 and merged.layers[0].keys.shape == (3, 1, 9, 4) and int(merged.get_seq_length()) == 5
    for i, layer in enumerate(merged.layers):
        assert torch.equal(layer.keys[0:2, :, 2:5], a.layers[i].keys[:, :, 0:3])  # 2 columns of left padding
        assert torch.equal(layer.values[2:3, :, 0:5], b.layers[i].values[:, :, 0:5])
        assert not layer.keys[0:2, :, 0:2].any() and not layer.keys[:, :, 5:].any()


def test_a_block_can_come_from_a_merged_cache() -> None:
    """Rebuilding reads a job's rows from the previous batch cache: rows from ``row``, columns ending at ``end``."""
    a = filled(4, 6, 8, 1.0)
    merged, width = merge(CONFIG, [Block(a, 2, 2, 6, 4)], capacity=7)
    assert width == 4
    assert torch.equal(merged.layers[1].keys[:, :, :4], a.layers[1].keys[2:4, :, 2:6])


def test_capacity_below_the_widest_block_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity=2"):
        merge(CONFIG, [Block(filled(1, 3, 4, 0.0), 0, 1, 3, 3)], capacity=2)


def test_the_merged_mask_pads_left_and_attends_every_new_column() -> None:
    one = torch.tensor([[0, 1, 1, 1, 1]])  # a left-padded prompt of 2 columns + 3 generated (all 1)
    two = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    mask = merged_mask([(one, 2), (two, 4)], width=4, capacity=6)
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]


def test_only_plain_static_caches_merge() -> None:
    assert mergeable(StaticCache(config=CONFIG, max_cache_len=4))
    assert not mergeable(DynamicCache())
    assert not mergeable(None)
    sliding = LlamaConfig(**{**CONFIG.to_dict(), "layer_types": ["sliding_attention", "full_attention"]})
    sliding.sliding_window = 2
    assert not mergeable(StaticCache(config=sliding, max_cache_len=4))
