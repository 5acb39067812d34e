"""Giving freed memory back to the operating system.

A Nipype worker runs one node after another in the same process. glibc keeps the heap pages
that earlier nodes freed (small and mid-size blocks, below its mmap threshold) for reuse, so
the worker's resident size grows with what it ran before, not with what it runs now.
:func:`release_freed_memory` collects Python garbage and asks glibc to return every free page
(``malloc_trim(0)``); heavy nodes call it before they start.
"""
from __future__ import annotations

import ctypes
import gc
import sys


def _glibc():
    """glibc, or None (another platform or C library)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL('libc.so.6')
        return libc if hasattr(libc, 'malloc_trim') and hasattr(libc, 'mallopt') else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Collect garbage and trim the C heap; True where glibc's ``malloc_trim`` ran."""
    gc.collect()
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


#: large blocks come from their own memory maps (given back when freed) from this size on
MMAP_THRESHOLD = 4 * 2 ** 20
_ENV = 'MALLOC_MMAP_THRESHOLD_'


def bound_heap(threshold: int = MMAP_THRESHOLD) -> int:
    """Keep glibc from holding large freed blocks: a fixed mmap threshold for this process and,
    through ``MALLOC_MMAP_THRESHOLD_``, for the processes it starts (a value already in the
    environment wins). Returns the threshold in force.

    glibc's threshold is dynamic by default: each freed mapped block raises it (up to 32 MB),
    after which blocks below it come from the heap, which keeps what was freed. The cascade's
    slab buffers (tens of MB) then piled up in a worker that had run the registrations before
    (sub-ixi002, ``--models ensemble``: the worker's peak 4.1 GB, 3.5 GB with a fixed 4 MB
    threshold).
    """
    import os

    try:
        threshold = int(os.environ.get(_ENV, threshold))
    except ValueError:
        pass
    os.environ[_ENV] = str(threshold)
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, threshold)   # M_MMAP_THRESHOLD
    return threshold
