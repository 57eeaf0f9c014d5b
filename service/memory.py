"""Keep a worker's memory flat under mixed request sizes (glibc; a no-op elsewhere).

glibc serves blocks above its mmap threshold with mmap, and gives them back to the OS on free. But the
threshold is dynamic: after a large block is freed it rises (up to 32 MiB), so later image buffers of a
few MiB come from the heap instead, where fragmentation keeps them resident. Under a mix of request sizes
that looks like a leak (measured on the load test's mix: RSS 350 -> 600 MiB over 50 s). Setting the
threshold explicitly also switches the dynamic adjustment off: every buffer of 1 MiB or more is mmapped
and returned when its request ends (measured: 153 -> 172 MiB). An operator's MALLOC_MMAP_THRESHOLD_ wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger("bentoml.synthgen.memory")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold(nbytes: int = THRESHOLD_BYTES) -> bool:
    """True when glibc accepted a fixed mmap threshold of `nbytes`."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to pin
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = mallopt(M_MMAP_THRESHOLD, nbytes) == 1
    if not accepted:
        logger.warning("glibc refused an mmap threshold of %d bytes; RSS may grow under mixed request sizes", nbytes)
    return accepted
