"""Keep freed CPU activation memory for reuse instead of handing it back to the kernel.

A CPU forward pass allocates and frees the same few-MiB activations again and again. glibc's malloc serves
blocks above its mmap threshold (128 KiB at first, raised by itself to at most 32 MiB) with fresh ``mmap``
pages and trims the heap whenever more than twice that threshold lies free at its top, so the next pass
takes a page fault for every 4 KiB page it touches again. On a 2-core machine those faults can cost a
fifth of RWKV-UNet-T's inference time and more than half of a large Bi-WKV call's, and whether they
happen depends on what else the process allocated before: latency swings by 30% between otherwise equal
runs. Raising both thresholds once makes the heap keep and reuse those pages, the way a caching allocator
(PyTorch's on CUDA, jemalloc, tcmalloc) does.

A process-wide setting, so it is made by whoever owns the process, never by a forward pass: the
``rwkvunet`` command, ``training/finetune.py``, ``training/evaluate.py`` and the benchmark call
:func:`keep_freed_cpu_memory` at start; a program using the library calls ``rwkvunet.keep_freed_cpu_memory()``
once, before its CPU inference. glibc only (a no-op elsewhere). ``RWKVUNET_CPU_ALLOCATOR=system`` leaves
malloc as it is. The cost: up to
``TRIM_THRESHOLD`` bytes of freed memory stay with the process rather than going back to the OS, which is
what a second forward pass would ask for again anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

from ..errors import UserError

__all__ = ["ENV_VAR", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_cpu_memory", "cpu_allocator_state"]

ENV_VAR = "RWKVUNET_CPU_ALLOCATOR"
MMAP_THRESHOLD = 64 << 20  # blocks up to this size come from the heap (and are reused); larger ones from mmap
TRIM_THRESHOLD = 512 << 20  # free memory the heap keeps at its top before returning any to the OS

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

_state: Optional[str] = None


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (musl does not)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_cpu_memory() -> str:
    """Keep freed CPU memory for reuse: raise glibc's mmap and trim thresholds, once per process (later calls
    return at once). Returns the state: ``"tuned"``, ``"system"`` (left alone by
    ``RWKVUNET_CPU_ALLOCATOR=system``) or ``"unsupported"`` (not glibc). Raises :class:`~rwkvunet.errors.UserError`
    (a ``ValueError``) for any other value of ``RWKVUNET_CPU_ALLOCATOR``."""
    global _state
    if _state is not None:
        return _state
    setting = os.environ.get(ENV_VAR, "tuned").strip().lower()
    if setting not in ("tuned", "system"):
        raise UserError(f"{ENV_VAR}={setting!r} is not understood; use 'tuned' (the default) or 'system'")
    if setting == "system":
        _state = "system"
        return _state
    libc = _glibc()
    if libc is None:
        _state = "unsupported"
        return _state
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _state = "tuned" if (mmap_ok and trim_ok) else "unsupported"
    return _state


def cpu_allocator_state() -> str:
    """What :func:`keep_freed_cpu_memory` did in this process so far (``"untouched"`` before it ran)."""
    return _state or "untouched"
