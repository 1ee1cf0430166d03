"""glibc's heap during training on the CPU: large blocks mapped on their own.

glibc raises its mmap threshold each time a large block is freed (up to
32 MiB), so after the first steps a training step's activations and
temporaries come from the heap, between blocks that stay alive (optimizer
state, gathered weights, the next step's tensors). The holes they leave
behind cannot be given back to the system, and the process's resident
memory grows well past what it holds. With a fixed threshold, every block of
LARGE_BLOCK bytes or more is mapped on its own and unmapped when freed.
Mapping and faulting in every large block anew costs step time, so only a
run whose config asks for less memory (TrainConfig.asks_for_less_memory) sets
it. benchmarks/README.md ("774M AdamW at 1 x 1024", "The heap setting") has
the peaks and step times with and without it.
"""
import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
LARGE_BLOCK = 1 << 20
# glibc's own variable for the same setting: a user who sets it keeps theirs.
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"


def map_large_blocks_separately() -> bool:
    """Fix glibc's mmap threshold at LARGE_BLOCK for this process. False
    (nothing changed) where the C library has no such setting (not glibc) or
    the user chose a threshold with MALLOC_MMAP_THRESHOLD_."""
    if not sys.platform.startswith("linux") or USER_SETTING in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK) == 1
