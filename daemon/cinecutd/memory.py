"""Give freed heap back to the kernel after bursts of large transient allocations.

Moving a work dir decodes and re-encodes its ~1 MB cache: thousands of short-lived objects that CPython
frees but glibc keeps in its arenas, so a long-running daemon's RSS ratchets up with every burst of
renames although nothing is retained. ``malloc_trim(0)`` returns those pages; it is rate-limited because
it walks the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

_MIN_GAP_S = 5.0
_last = 0.0
_trim = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
    _trim.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc: nothing to trim
    _trim = None


def trim_heap(force: bool = False) -> bool:
    """Release free heap memory to the kernel (at most every few seconds unless ``force``)."""
    global _last
    now = time.monotonic()
    if _trim is None or (not force and now - _last < _MIN_GAP_S):
        return False
    _last = now
    _trim(0)
    return True
