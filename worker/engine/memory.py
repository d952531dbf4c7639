"""Memory freed at load handed back to the OS, so the worker's RSS is what it holds.

glibc keeps large freed blocks in its heap once its mmap threshold has grown past them, so a
load that made and dropped big temporary arrays (float32 weights before quantization, the output
layer dequantized for a readout) would otherwise show in RSS for the process's life.
"""

from __future__ import annotations

import ctypes
import gc


def release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
