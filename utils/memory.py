"""Refuse work that cannot fit in memory before it starts.

A model, a batch or a beam too large for the machine would otherwise end in an
allocation failure (a traceback, or the kernel's OOM killer) after minutes of
loading. Callers estimate what they need and call `require_memory`, which
compares it with what the device has free and raises a one-line UserError
naming the estimate and the fix.
"""
from typing import Optional

import torch

from utils.errors import UserError


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'; for messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"  # unreachable; keeps type checkers quiet


def available_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """Memory free for new allocations on `device` (CPU by default).

    CPU: MemAvailable from /proc/meminfo (what Linux can hand out without
    swapping). CUDA: the driver's free memory. None when it cannot be told
    (another OS, MPS), in which case callers skip the check.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def require_memory(need_bytes: float, what: str, fix: str,
                   device: Optional[torch.device] = None) -> None:
    """Raise UserError when `what` needs more than `device` has free.

    `what` names the thing ("the 1558M model's weights"), `fix` says what to
    change ("use a smaller --batch_size").
    """
    free = available_bytes(device)
    if free is not None and need_bytes > free:
        where = "GPU" if device is not None and torch.device(device).type == "cuda" else "RAM"
        raise UserError(f"{what} needs about {format_bytes(need_bytes)} but only "
                        f"{format_bytes(free)} of {where} is free: {fix}")
