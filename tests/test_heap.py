"""utils/training/heap.py: with large blocks mapped on their own, memory that
training frees goes back to the system even when blocks still alive sit
after it (the pattern that made a training step's resident memory grow)."""
import ctypes
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 64 times: a 4 MiB temporary, then a 16 KiB block kept (after it in the heap),
# then the temporary freed. Prints the growth of resident memory in MiB.
PATTERN = """
import sys
sys.path.insert(0, {repo!r})
import torch
from utils.training.heap import map_large_blocks_separately
if sys.argv[1] == "on":
    assert map_large_blocks_separately()
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20
before = resident_mib()
kept = []
for _ in range(64):
    temporary = torch.ones(1 << 20)
    kept.append(torch.ones(1 << 12))
    del temporary
print(resident_mib() - before)
"""


def glibc() -> bool:
    try:
        return ctypes.CDLL(None).gnu_get_libc_version() is not None
    except (OSError, AttributeError):
        return False


def grown_mib(setting):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PATTERN.format(repo=REPO), setting],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(),
                    reason="a glibc setting, read from Linux's /proc")
def test_freed_temporaries_go_back_to_the_system():
    # Kept: 64 x 16 KiB = 1 MiB. Freed: 64 x 4 MiB = 256 MiB.
    assert grown_mib("on") < 16
    assert grown_mib("off") > 64  # glibc's default keeps the holes: the test bites


def test_a_users_own_threshold_is_kept(monkeypatch):
    from utils.training.heap import map_large_blocks_separately
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert map_large_blocks_separately() is False
