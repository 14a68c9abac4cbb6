"""Give a closed session's memory back: the cyclic GC and, on glibc, the allocator's free arenas.

aiortc's peer connections, their codecs and transports form reference cycles (event-emitter callbacks, tasks), so
a closed session is freed only when the cyclic GC runs; the decoded frames and encoder buffers it held were
allocated from glibc arenas on several threads, which keep freed pages unless asked (`malloc_trim`). Without both,
connect/disconnect cycles grow the server's RSS by tens of MB per session and keep it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Collect cycles, then return free heap pages to the OS where the C library can."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
