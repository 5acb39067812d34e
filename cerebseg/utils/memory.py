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


def release_freed_memory() -> bool:
    """Collect garbage and trim the C heap; True where glibc's ``malloc_trim`` ran."""
    gc.collect()
    if not sys.platform.startswith('linux'):
        return False
    try:
        return bool(ctypes.CDLL('libc.so.6').malloc_trim(0))
    except (OSError, AttributeError):
        return False
