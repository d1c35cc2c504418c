"""Small matrix products on the CPU without MKL's thread team.

Attention over KV blocks (``attention._online_softmax``) issues a few small products per block:
at decode, [group, head_dim] x [head_dim, 256] per KV head, hundreds per layer. MKL runs each
on its OpenMP team, so every call wakes the team's other threads and waits for them (a futex
wake-up and a context switch per call); between calls the engine's Python runs long enough for
them to fall asleep again. On a 2-core machine that doubled a 16k-token decode step
(bench/long_context.py: 65 ms per token against 25 ms with MKL on one thread; ``perf`` put
40% of the time in the team's futex waits), and with KV read from disk the team's threads
also took the core the readers needed. ``serial_blas`` sets MKL to one thread for the calling
thread only (``MKL_Set_Num_Threads_Local``), so large products elsewhere, and other threads,
keep the team; the attention decides when a product is small (``SERIAL_BLAS_MACS``), and the
sweep runner runs a whole unit so when its largest weight times its tokens is (a decode token's
projections: with KV read from disk the second core is then left to the readers' checksums,
which the team's second thread had to share it with — 16k decode from disk, alternating in one
process, 37.4 against 38.9 ms a token; from host memory no different).

Where torch has no MKL (other builds, other CPUs) or the symbol is missing, it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

# a block's products (queries x heads x head_dim x keys) of fewer multiply-adds than this gain
# nothing from more threads: a decode token's with 8 heads of 64 over 256 keys is 131k, a
# 1024-token prefill chunk's 134M
SERIAL_BLAS_MACS = 1 << 22


def _mkl_set_local() -> Callable[[int], int] | None:
    """MKL's per-thread thread count setter (returns the previous value; 0 means 'the global one')."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        setter = ctypes.CDLL(torch._C.__file__).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        log.debug("torch has MKL but MKL_Set_Num_Threads_Local is not reachable: small products keep MKL's threads")
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    previous = setter(0)        # 0 changes nothing: the calling thread follows the global setting
    if previous != 0:
        setter(previous)
    return setter


_SET_LOCAL = _mkl_set_local()


@contextmanager
def serial_blas(enabled: bool = True) -> Iterator[None]:
    """MKL on one thread for the calling thread inside the block (nothing when not ``enabled``)."""
    if not enabled or _SET_LOCAL is None:
        yield
        return
    previous = _SET_LOCAL(1)
    try:
        yield
    finally:
        _SET_LOCAL(previous)
