"""The server process's allocator, tuned for large messages (glibc only).

A large request or response passes through a few buffers of its size: gRPC's receive slice,
the bytes the handler reads, the response it returns. glibc serves an allocation above its
mmap threshold (128 KiB at first, raised as such blocks are freed) with fresh pages from the
kernel, and gives a freed heap top back to the kernel above its trim threshold (twice the mmap
threshold); either way the next buffer of that size starts on untouched pages and pays a page
fault per 4 KiB page. Measured on a 1 MiB ModelInfer (``bench/bench_server_cost.py``): 1,500
minor faults and 3 ms of the event loop's CPU per call; with the thresholds pinned as below, 1
fault and 1 ms. ``mallopt(3)`` documents both knobs.

The price is memory kept: freed buffers stay in the process (up to twice the threshold at the
top of each heap) instead of going back to the kernel, i.e. a server's resident size stays near
its peak. ``Settings.heap_buffer_bytes`` = 0 leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses a larger mmap threshold on 64-bit platforms (HEAP_MAX_SIZE / 2).
MAX_HEAP_BUFFER_BYTES = 32 * 1024 * 1024

_applied: int | None = None


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt's knobs are glibc's), else None."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):  # not glibc (musl, macOS): nothing to tune
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_heap_buffers(largest: int) -> bool:
    """Serve allocations up to ``largest`` bytes (at most ``MAX_HEAP_BUFFER_BYTES``) from the
    heap, and keep up to twice that free at a heap's top for reuse. Process-wide and
    idempotent; False (nothing changed) when ``largest`` is 0 or the C library is not glibc."""
    global _applied
    threshold = min(largest, MAX_HEAP_BUFFER_BYTES)
    if threshold <= 0:
        return False
    if _applied == threshold:
        return True
    libc = glibc()
    if libc is None:
        log.info("allocator not tuned for large messages: the C library is not glibc")
        return False
    # Trim first: a trim threshold below the mmap threshold would give buffers back at once.
    if not (libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
            and libc.mallopt(_M_MMAP_THRESHOLD, threshold)):
        log.warning("mallopt refused an mmap threshold of %d bytes; allocator left as is",
                    threshold)
        return False
    _applied = threshold
    return True
