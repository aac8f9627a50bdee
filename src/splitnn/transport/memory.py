"""Handing freed memory back to the system: glibc's ``malloc_trim``.

Tensors of a few MiB and the receive buffers of connections come from the C heap; freed, they
stay in the process for its next allocations (glibc raises its mmap threshold after the first
big block is freed, so later ones come from the heap too), so a long-running worker's resident
memory would keep the peak of its busiest session or of a flood of connections. Trimming after
they are freed gives the memory back. The worker trims when a session's tensors are freed
(:mod:`splitnn.server.sessions`) and after data-plane connections close
(:mod:`splitnn.server.tcp_plane`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


#: Hand the memory freed on the C heap back to the system now (``malloc_trim(0)``; a no-op without glibc).
release_memory = _malloc_trim()
