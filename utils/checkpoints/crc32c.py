"""CRC-32C (Castagnoli), the checksum of LevelDB tables and TF tensor bundles.

`crc32c` uses the maintained `google-crc32c` package (a runtime requirement,
see requirements.txt: hardware CRC instructions, several GB/s, so checking a
checkpoint costs no start-up time) with its compiled extension, and only
where that is missing falls back to `numpy_crc32c`, written here.

The numpy version is vectorised: thousands of independent lanes each hash
their own contiguous slice 8 bytes per step through 16-bit lookup tables, and
the lane results are merged with the GF(2) "append n zero bytes" operator.
About 0.5-0.8 GB/s on one core, so checking a multi-GB checkpoint takes
seconds, not hours.
"""
from functools import lru_cache
from typing import Callable, Optional, Tuple

import numpy as np

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _byte_table() -> np.ndarray:
    """Register after consuming one byte b from register b (the classic table)."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_T8 = _byte_table()
_T8_LIST = [int(v) for v in _T8]


def _feed_zeros(registers: np.ndarray, n: int) -> np.ndarray:
    """Registers after consuming `n` zero bytes (elementwise, small n)."""
    r = registers.astype(np.uint32)
    for _ in range(n):
        r = _T8[r & 0xFF] ^ (r >> 8)
    return r


@lru_cache(maxsize=1)
def _lane_tables() -> Tuple[np.ndarray, ...]:
    """Tables for one 8-byte step: the 16-bit piece at byte offset 2p of
    (register ^ word) ends up as table[p][piece] after the step."""
    pieces = _feed_zeros(np.arange(1 << 16, dtype=np.uint32), 2)
    return tuple(_feed_zeros(pieces, 6 - 2 * p) for p in range(4))


# A linear map on 32-bit registers is kept as the images of the 32 basis bits.
_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1  # [byte value, bit]


def _op_tables(images: np.ndarray) -> np.ndarray:
    """[4, 256] lookup tables applying the map to each byte of a register."""
    tables = np.empty((4, 256), np.uint32)
    for j in range(4):
        chosen = np.where(_BITS.astype(bool), images[8 * j:8 * j + 8][None, :], 0)
        tables[j] = np.bitwise_xor.reduce(chosen.astype(np.uint32), axis=1)
    return tables


def _op_apply(tables: np.ndarray, values: np.ndarray) -> np.ndarray:
    v = values.astype(np.uint32)
    return (tables[0][v & 0xFF] ^ tables[1][(v >> 8) & 0xFF]
            ^ tables[2][(v >> 16) & 0xFF] ^ tables[3][v >> 24])


@lru_cache(maxsize=64)
def _zeros_op_pow2(k: int) -> np.ndarray:
    """Images of the map "consume 2**k zero bytes"."""
    if k == 0:
        return _feed_zeros(np.uint32(1) << np.arange(32, dtype=np.uint32), 1)
    half = _zeros_op_pow2(k - 1)
    return _op_apply(_op_tables(half), half)


@lru_cache(maxsize=256)
def _zeros_op(n: int) -> np.ndarray:
    """Lookup tables ([4, 256]) of the map "consume n zero bytes"."""
    images = np.uint32(1) << np.arange(32, dtype=np.uint32)  # identity
    k = 0
    while n:
        if n & 1:
            images = _op_apply(_op_tables(_zeros_op_pow2(k)), images)
        n >>= 1
        k += 1
    return _op_tables(images)


_MAX_LANES = 1 << 14  # found fastest: lane state stays in cache
_BIG_STEPS = 64       # 8-byte steps per lane per block: keeps reads local


def _update_lanes(register: int, data: np.ndarray, lanes: int, steps: int) -> int:
    """Consume `data` (a multiple of 8*lanes*steps bytes) with parallel lanes.

    Within each block of 8*lanes*steps bytes lane i hashes the i-th slice.
    Between blocks every lane is advanced past the other lanes' slices, so at
    the end lane i holds its slices' contribution as if they were followed by
    the right number of bytes up to the end of the last block; lanes are then
    merged pairwise (left neighbour advanced past the right one's span).
    """
    blocks = len(data) // (8 * lanes * steps)
    words = data.view("<u8").reshape(blocks, lanes, steps)
    t_lo, t_mid_lo, t_mid_hi, t_hi = _lane_tables()
    state = np.zeros(lanes, np.uint64)
    state[0] = register
    x = np.empty(lanes, "<u8")
    pieces = x.view("<u2").reshape(lanes, 4)
    acc = np.empty(lanes, np.uint32)
    tmp = np.empty(lanes, np.uint32)
    skip_others = _zeros_op(8 * steps * (lanes - 1))
    for b in range(blocks):
        block = words[b]
        for j in range(steps):
            np.bitwise_xor(state, block[:, j], out=x)
            np.take(t_lo, pieces[:, 0], out=acc)
            np.take(t_mid_lo, pieces[:, 1], out=tmp)
            acc ^= tmp
            np.take(t_mid_hi, pieces[:, 2], out=tmp)
            acc ^= tmp
            np.take(t_hi, pieces[:, 3], out=tmp)
            acc ^= tmp
            np.copyto(state, acc, casting="unsafe")
        if b + 1 < blocks and lanes > 1:
            state = _op_apply(skip_others, state).astype(np.uint64)
    merged = state.astype(np.uint32)
    span = 8 * steps
    while len(merged) > 1:
        merged = _op_apply(_zeros_op(span), merged[0::2]) ^ merged[1::2]
        span *= 2
    return int(merged[0])


def _update_bytes(register: int, data: np.ndarray) -> int:
    """Plain table-driven loop, for the few hundred bytes at the end."""
    table = _T8_LIST
    for byte in data.tobytes():
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _as_bytes_array(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(memoryview(data).cast("B"), np.uint8)


def numpy_crc32c(data, crc: int = 0) -> int:
    """`crc32c` computed here with numpy (the fallback; also what the tests compare)."""
    buf = _as_bytes_array(data)
    register = crc ^ 0xFFFFFFFF
    pos, n = 0, len(buf)
    while n - pos >= 8 * 16:
        remaining = n - pos
        steps = _BIG_STEPS if remaining >= 8 * _MAX_LANES * _BIG_STEPS else 16
        lanes = min(_MAX_LANES, 1 << ((remaining // (8 * steps)).bit_length() - 1))
        size = remaining // (8 * lanes * steps) * (8 * lanes * steps)
        register = _update_lanes(register, buf[pos:pos + size], lanes, steps)
        pos += size
    register = _update_bytes(register, buf[pos:])
    return register ^ 0xFFFFFFFF


def _package_extend() -> Optional[Callable[[int, np.ndarray], int]]:
    """google-crc32c's `extend(crc, data)`, or None when the package or its
    compiled extension is missing (its pure-Python fallback would take hours
    on a checkpoint; ours takes seconds)."""
    try:
        import google_crc32c
    except ImportError:
        return None
    return google_crc32c.extend if google_crc32c.implementation == "c" else None


_PACKAGE_EXTEND = _package_extend()


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of `data` (bytes-like or numpy array), continuing from `crc`.

    Like zlib.crc32: crc32c(b, crc32c(a)) == crc32c(a + b).
    """
    if _PACKAGE_EXTEND is None:
        return numpy_crc32c(data, crc)
    # A contiguous uint8 array: the package reads numpy arrays without a copy
    # (but refuses memoryview and bytearray).
    return _PACKAGE_EXTEND(crc, _as_bytes_array(data))
