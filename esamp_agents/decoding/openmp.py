"""Keeping GNU OpenMP's spin-waits on when decoding moves between threads.

torch's CPU build runs its parallel kernels on GNU OpenMP (libgomp), and libgomp gives every
thread that starts a parallel region its own pool of worker threads. Between two parallel
regions those workers spin for a while before sleeping, which is what makes a decode step
(hundreds of small kernels) fast; but as soon as the pools of all threads together hold more
threads than there are CPUs, libgomp throttles that spin to almost nothing, and every kernel
then pays a futex wake-up. On 2 cores one extra pool is enough: decoding the embedded model on a
second thread while the thread that loaded it still had its pool measured 11-20% slower at
1 prompt x 1 sample (BENCHMARKS.md section 18).

:func:`release_thread_pool` hands the calling thread's pool back (OpenMP 5.0's
``omp_pause_resource_all``; libgomp joins that thread's idle workers and stops counting them).
The next parallel region on that thread builds a new pool (one thread start, about 0.1 ms).
With any other OpenMP runtime, or none, it does nothing: Intel's and LLVM's runtimes pause the
whole process, not one thread, so they are left alone.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

OMP_PAUSE_SOFT = 1
_PAUSE: Callable[[int], int] | None = None
_LOOKED_UP = False
_LOOKUP_LOCK = threading.Lock()


def _libgomp_pause() -> Callable[[int], int] | None:
    """``omp_pause_resource_all`` of the libgomp this process loaded (None when there is none)."""
    global _PAUSE, _LOOKED_UP
    with _LOOKUP_LOCK:
        if _LOOKED_UP:
            return _PAUSE
        _LOOKED_UP = True
        if not sys.platform.startswith("linux"):
            return None
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
        except OSError:
            return None
        for path in sorted(paths):
            try:
                library = ctypes.CDLL(path)  # already loaded: the same handle, nothing new runs
                pause = library.omp_pause_resource_all
            except (OSError, AttributeError):  # a libgomp older than OpenMP 5.0
                continue
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            _PAUSE = pause
            break
        return _PAUSE


def release_thread_pool() -> bool:
    """Hand back the calling thread's OpenMP worker pool; True when libgomp released one.

    Call it on a thread that is about to wait while another thread decodes (or that will not run
    torch kernels for a while). Harmless anywhere: a thread inside a parallel region, or one with
    no pool, is left as it is."""
    pause = _libgomp_pause()
    if pause is None:
        return False
    return pause(OMP_PAUSE_SOFT) == 0


__all__ = ["release_thread_pool"]
