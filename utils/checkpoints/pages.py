"""Giving back the pages of a mapped weights file once a tensor is copied out.

A tensor read through a memory map (torch.load(mmap=True), TF bundles) puts
its file pages into the process's resident set when touched, and they stay
there while the map is open: without this a streamed load would still peak
at the model plus the whole file. `release_pages` tells the kernel the range
is not needed (madvise MADV_DONTNEED). The maps are private and never written,
so a page touched again is simply read from the file again: nothing is lost.
Linux only; elsewhere it does nothing.
"""
import ctypes
import ctypes.util
import mmap
import sys
from typing import Optional

import torch

_PAGE = mmap.PAGESIZE


def _libc_madvise():
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()


def inner_pages(start: int, length: int) -> Optional[tuple]:
    """(first page address, bytes) of the whole pages inside [start, start+length)."""
    first = -(-start // _PAGE) * _PAGE
    end = (start + length) // _PAGE * _PAGE
    return (first, end - first) if end > first else None


def _file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one private map of a file (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= start < high:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return (end <= high and fields[1].endswith("p")
                            and path.startswith("/") and fields[4] != "0")
    except (OSError, ValueError, IndexError):
        pass
    return False


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages under a CPU tensor that a private map of a
    file backs (whole pages inside it only: a neighbour's bytes may share its
    first and last page). Any other tensor is left alone: on anonymous memory
    this would zero the values."""
    if _MADVISE is None or tensor.device.type != "cpu":
        return
    span = inner_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    if span is not None and _file_mapping(span[0], span[0] + span[1]):
        _MADVISE(span[0], span[1], mmap.MADV_DONTNEED)
