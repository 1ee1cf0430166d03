"""utils/heap.py: with large blocks mapped on their own, memory that
training frees goes back to the system even when blocks still alive sit
after it (the pattern that made a training step's resident memory grow)."""
import ctypes
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 64 times: a 4 MiB temporary, then a 16 KiB block kept (after it in the heap),
# then the temporary freed. Prints the growth of resident memory in MiB, and
# how many more bytes glibc maps on their own for one more 4 MiB tensor.
PATTERN = """
import ctypes, sys
sys.path.insert(0, {repo!r})
import torch
from utils.heap import map_large_blocks_separately
if sys.argv[1] == "on":
    assert map_large_blocks_separately()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20
before = resident_mib()
kept = []
for _ in range(64):
    temporary = torch.ones(1 << 20)
    kept.append(torch.ones(1 << 12))
    del temporary
grown = resident_mib() - before
mapped = mallinfo2().hblkhd
alive = torch.ones(1 << 20)
print(grown, mallinfo2().hblkhd - mapped)
"""


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


def run_pattern(setting):
    """(resident growth in MiB, bytes newly mapped for one 4 MiB tensor) of PATTERN."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PATTERN.format(repo=REPO), setting],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    grown, mapped = out.stdout.split()
    return float(grown), int(mapped)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(),
                    reason="a glibc setting (mallinfo2: glibc 2.33+), read from Linux's /proc")
def test_freed_temporaries_go_back_to_the_system():
    # Kept: 64 x 16 KiB = 1 MiB; freed: 64 x 4 MiB = 256 MiB. By default glibc
    # serves 4 MiB from its heap once one has been freed (how much of the
    # freed memory then stays resident depends on the address layout: 10 to
    # 250 MiB here); with the setting every such block is mapped on its own.
    grown, mapped = run_pattern("on")
    assert grown < 16 and mapped >= 4 << 20
    _, mapped_by_default = run_pattern("off")
    assert mapped_by_default == 0


def test_a_users_own_threshold_is_kept(monkeypatch):
    from utils.heap import map_large_blocks_separately
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert map_large_blocks_separately() is False


# Four threads allocate once each; glibc's malloc_stats (on stderr) lists
# every heap ("Arena N:").
ARENAS = """
import ctypes, sys, threading
sys.path.insert(0, {repo!r})
from utils.heap import threads_share_one_heap
if sys.argv[1] == "on":
    assert threads_share_one_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
threads = [threading.Thread(target=libc.malloc, args=(4096,)) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.malloc_stats()
"""


def heaps_used(setting, env=None):
    result = subprocess.run([sys.executable, "-c", ARENAS.format(repo=REPO), setting],
                            capture_output=True, text=True, check=True, env=env)
    return sum(line.startswith("Arena ") for line in result.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(),
                    reason="a glibc setting")
def test_threads_started_after_the_setting_share_one_heap():
    assert heaps_used("off") > 1
    assert heaps_used("on") == 1


def test_a_users_own_heap_count_is_kept(monkeypatch):
    from utils.heap import threads_share_one_heap
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert threads_share_one_heap() is False
