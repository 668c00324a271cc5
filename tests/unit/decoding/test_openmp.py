"""Handing a thread's OpenMP pool back: the pool's worker threads end, kernels still work."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from esamp_agents.decoding import openmp
from esamp_agents.decoding.openmp import release_thread_pool


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp pools are Linux's")
def test_release_ends_the_calling_threads_workers_and_kernels_still_agree() -> None:
    if openmp._libgomp_pause() is None:
        pytest.skip("this torch build does not run on GNU OpenMP")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        expected = a @ b  # a parallel region: this thread now has a pool with one worker
        with_pool = thread_count()
        assert release_thread_pool() is True
        assert thread_count() == with_pool - 1
        assert release_thread_pool() is True  # no pool now: still fine
        torch.testing.assert_close(a @ b, expected)  # a new pool, the same result
    finally:
        torch.set_num_threads(before)


def test_without_libgomp_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openmp, "_LOOKED_UP", True)
    monkeypatch.setattr(openmp, "_PAUSE", None)
    assert release_thread_pool() is False
