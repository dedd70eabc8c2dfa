"""CPU memory: large tensors as their own mmaps, so freed activations go back to the OS (docs/learner.md)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 128 * 1024  # glibc's initial default, pinned


def _large_tensors_via_mmap():
    """Pin glibc's mmap threshold so every large CPU tensor is its own mapping, returned to the OS when freed.

    By default glibc raises the threshold to the size of each mmapped block it frees (up to 32 MiB on 64-bit;
    mallopt(3), M_MMAP_THRESHOLD), so after the first micro-batch its activation buffers are carved from
    the heap arenas instead, which fragment and never shrink: measured on the debug learner (135M, 2048-token
    micro-batches) this held ~1.5 GB of freed activations (peak RSS 5.2 GB -> 3.6 GB with the pin, RSS after
    a step 4.4 GB -> 1.2 GB; BENCHMARKS.md). Setting it explicitly also turns the dynamic adjustment off.
    No-op off glibc. Returns `malloc_trim` (called after each CPU optimizer step: the small blocks a step
    frees in the middle of the heap go back too), or None."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 * MMAP_THRESHOLD)  # M_TRIM_THRESHOLD: give back heap tops beyond 256 KiB
        return libc.malloc_trim
    except (OSError, AttributeError):
        log.debug("not glibc: mmap threshold left as it is")
        return None
