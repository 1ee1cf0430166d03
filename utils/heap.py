"""glibc's heap: settings that keep a process's resident memory near what
it holds.

Training: glibc raises its mmap threshold each time a large block is freed
(up to 32 MiB), so after the first steps a training step's activations and
temporaries come from the heap, between blocks that stay alive (optimizer
state, gathered weights, the next step's tensors). The holes they leave
behind cannot be given back to the system, and the process's resident
memory grows well past what it holds. With a fixed threshold, every block of
LARGE_BLOCK bytes or more is mapped on its own and unmapped when freed.
Mapping and faulting in every large block anew costs step time, so only a
run whose config asks for less memory (TrainConfig.asks_for_less_memory) sets
it. benchmarks/README.md ("774M AdamW at 1 x 1024", "The heap setting") has
the peaks and step times with and without it.

int8 decoding: the layers are packed for fbgemm on worker threads
(utils/decoding/int8_linear.py). A new thread gets a heap of its own, so the
packed layers took fresh memory while the int8 weights they were packed from
left holes in the main heap: the load's peak rose 15%. With every thread on
one heap (`threads_share_one_heap`) the packed layers fill those holes.
"""
import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter numbers in glibc's malloc.h
M_ARENA_MAX = -8
LARGE_BLOCK = 1 << 20
# glibc's own variables for the same settings: a user who sets one keeps theirs.
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"
USER_ARENA_SETTING = "MALLOC_ARENA_MAX"


def _mallopt():
    """glibc's mallopt(param, value) -> 1 on success, or None where the C
    library has none (not Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt


def map_large_blocks_separately() -> bool:
    """Fix glibc's mmap threshold at LARGE_BLOCK for this process. False
    (nothing changed) where the C library has no such setting (not glibc) or
    the user chose a threshold with MALLOC_MMAP_THRESHOLD_."""
    mallopt = _mallopt()
    if mallopt is None or USER_SETTING in os.environ:
        return False
    return mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK) == 1


def threads_share_one_heap() -> bool:
    """Have threads that need a heap from now on share the existing ones
    instead of each getting its own (glibc's M_ARENA_MAX = 1). glibc fixes
    its limit the first time a thread asks, so this holds for the rest of
    the process. False (nothing changed) where the C library has no such
    setting or the user chose one with MALLOC_ARENA_MAX."""
    mallopt = _mallopt()
    if mallopt is None or USER_ARENA_SETTING in os.environ:
        return False
    return mallopt(M_ARENA_MAX, 1) == 1
