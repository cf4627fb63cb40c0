"""Process-wide memory-allocator settings for the calibration loops (no tensors, no files).

Calibration allocates and frees the same large activations (attention probabilities, MLP activations: tens of MB)
thousands of times. glibc's ``malloc`` serves blocks above its mmap threshold with fresh ``mmap`` pages and returns
them to the kernel on ``free``, so every such tensor is paid again in page faults before any arithmetic.
:func:`keep_freed_memory` asks ``malloc`` to serve them from its heap and keep freed memory for reuse.
:func:`mha2mla.convert` calls it when it calibrates. Not for data-free conversions: a heap that is never trimmed
fragments on their few very large blocks, and their peak memory grows (``benchmarks/convert_scale.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory", "release_freed_memory", "bound_heap", "HEAP_MMAP_THRESHOLD"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# Healing serves host blocks of this many bytes and more with their own pages (bound_heap).
HEAP_MMAP_THRESHOLD = 4 * 2**20
_applied: bool | None = None
_libc = None  # glibc, once keep_freed_memory has loaded it


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (no ``mmap`` per large block, no trimming of the heap).

    The process's resident memory then stays at its peak instead of shrinking after a step, and the peak can grow
    where the heap fragments (see the module docstring). Idempotent; does nothing (and returns False) outside
    Linux/glibc.

    Returns:
        whether the settings are in effect.
    """
    global _applied, _libc
    if _applied is not None:
        return _applied
    _applied = False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    # every block from the heap (mmap disabled), and the heap is never trimmed back
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if _applied:
        _libc = libc
        if hasattr(libc, "mallinfo2"):
            libc.mallinfo2.restype = _MallInfo2
    return _applied


def bound_heap(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Have glibc serve host blocks of ``threshold`` bytes and more with their own pages, returned when freed.

    glibc raises its mmap threshold to the size of any large block that is freed; after that, blocks of tens of MB
    (layer activations, loss chunks: allocated and freed every micro-batch) come from the heap, where they fragment
    and keep the resident memory far above what is live. A fixed threshold stops that (healing calls it). Does
    nothing outside Linux/glibc, or once :func:`keep_freed_memory` (calibration) has taken mmap away.

    Returns:
        whether the setting is in effect.
    """
    libc = None if _applied else _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))  # (also ends the dynamic threshold)


def release_freed_memory(*, above: int = 2**28) -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``) where :func:`keep_freed_memory` is in
    effect and more than ``above`` bytes of the heap are free: called between the stages of a layer (and the batches
    of its statistics), so that memory one stage freed in pieces the next cannot reuse does not add to the next one's
    peak. Small models never free that much, and keep reusing their pages. A no-op elsewhere."""
    if not _applied:
        return
    if hasattr(_libc, "mallinfo2") and _libc.mallinfo2().fordblks <= above:
        return
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _glibc():
    """glibc with ``mallopt`` typed, or None outside Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (``fordblks``: free bytes in the heap)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
