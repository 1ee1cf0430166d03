"""--device for gpt2_generate_main.py and gpt2_train_main.py.

auto (CUDA when present, else Apple's MPS, else CPU), cpu, cuda (the current
GPU), cuda:N or mps. A device this machine lacks is a one-line error before
any model loads. prepare_data.py has no --device: it only tokenizes text,
which runs on the CPU.
"""
import functools
import re

import torch

from utils.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
_CUDA_INDEXED = re.compile(r"cuda:(\d+)")


@functools.lru_cache(maxsize=None)
def _cpuinfo_field(name: str) -> str:
    """The first value of `name` in /proc/cpuinfo, or "" where the file is
    missing or has no such field."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor id as Linux reports it ("GenuineIntel", "AuthenticAMD",
    ...), or "" where /proc/cpuinfo is missing or names none."""
    return _cpuinfo_field("vendor_id")


def cpu_identity() -> str:
    """The CPU's vendor, model and instruction-set flags: code compiled for
    one CPU may need instructions another lacks."""
    return " | ".join(_cpuinfo_field(name) for name in ("vendor_id", "model name", "flags"))


def add_device_arg(group) -> None:
    group.add_argument("--device", default="auto",
                       help=f"Where the model runs: {DEVICE_CHOICES} (default auto: "
                            f"CUDA when present, then MPS, else CPU).")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch.device `name` stands for, or a one-line UserError when it is
    not a device name or this machine has no such device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise UserError("--device mps: this machine has no Apple MPS device (or "
                            "this PyTorch lacks MPS support): use --device cpu or auto")
        return torch.device("mps")
    match = _CUDA_INDEXED.fullmatch(name)
    if name == "cuda" or match:
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available (or this "
                            f"PyTorch was built without CUDA): use --device cpu or auto")
        index = int(match.group(1)) if match else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise UserError(f"--device {name}: this machine has {count} GPU(s), "
                            f"numbered 0 to {count - 1}: pick one of those")
        return torch.device("cuda", index)
    raise UserError(f"--device {name!r} is not a device: use one of {DEVICE_CHOICES}")
