"""Process-wide runtime settings applied once at the start of the command-line tools.

glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (at most 32 MB with its
dynamic threshold) with a fresh ``mmap`` and unmaps it at ``free``. A full-softmax step
allocates several such blocks (one chunk of logits is 2,048 x 33,280 floats = 272 MB), so
every step the kernel maps, page-faults and zeroes them again: about a third of a CPU
training process's time went to the kernel (issue 13, ``BENCHMARKS.md``). The output layer
now keeps its chunk of logits in one reused block (``lm.losses.block``), which removes most of
that; :func:`tune_allocator` keeps the remaining large temporaries (gradient buffers, LSTM
workspaces) on the heap and freed memory in the process, so the next step reuses the same,
already-faulted pages (+2% tokens/s on top of the blocks).
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# mallopt takes a C int, so 2 GiB - 1 is the largest value it can set. Every block below
# it comes from the heap; freed top-of-heap memory up to it stays in the process; the heap
# grows 1 GiB beyond each request, so a growing run extends it rarely (untouched pages
# cost no RSS).
SETTINGS: dict[str, int] = {
    "M_MMAP_THRESHOLD": 2**31 - 1,
    "M_TRIM_THRESHOLD": 2**31 - 1,
    "M_TOP_PAD": 1 << 30,
}
_PARAMS = {"M_MMAP_THRESHOLD": _M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD}
ENV_SWITCH = "RNNLM_MALLOC_TUNING"
# what glibc itself reads at start-up: a user who set any of these has chosen already
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (``mallopt`` and these parameters are glibc's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # absent on musl
            return None
        return ctypes.CDLL("libc.so.6")
    except (ValueError, OSError, AttributeError):
        return None


def tune_allocator(enabled: bool | None = None) -> dict[str, int]:
    """Keep large temporaries on the heap and freed memory in the process (Linux/glibc).

    Call it once, first thing in a command's ``main()``: it affects allocations made after
    it. Elsewhere (macOS, Windows, musl) it does nothing. Setting ``M_MMAP_THRESHOLD``
    explicitly also turns off glibc's dynamic threshold, so the settings hold for the
    whole run. Freed blocks stay on the heap; before the output layer reused its block,
    blocks of varying size fragmented it and peak RSS grew by 51–113% in
    ``bench/train_memory.py``; with the reused blocks the tuned and untuned peaks are equal
    (780 / 783 MB there; BENCHMARKS.md, issue 13).

    Args:
        enabled: ``None`` reads the environment: ``RNNLM_MALLOC_TUNING=0`` turns it off,
            and so does any of glibc's own ``MALLOC_*_`` / ``GLIBC_TUNABLES`` variables
            (the user's choice wins). ``True`` / ``False`` decide regardless.

    Returns:
        The settings applied, ``{name: value}``; empty if none were.
    """
    if enabled is None:
        enabled = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off") and not any(
            v in os.environ for v in _GLIBC_ENV
        )
    libc = _glibc() if enabled else None
    if libc is None:
        return {}
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; a parameter this glibc refuses is simply left as it was
    return {name: value for name, value in SETTINGS.items() if libc.mallopt(_PARAMS[name], value) == 1}


def release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim(0)``); elsewhere a no-op.

    With :func:`tune_allocator` freed blocks stay resident, and a phase whose block sizes
    differ from the previous phase's (evaluation after training, training after
    evaluation) cannot reuse all the holes, so the heap grows. Called at such a boundary,
    it keeps the peak near that of the larger phase, at the price of faulting the next
    step's blocks in once.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
