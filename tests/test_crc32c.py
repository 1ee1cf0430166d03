"""utils.checkpoints.crc32c: the numpy implementation, and google-crc32c's when it is installed.

Every check runs on `numpy_crc32c` (the fallback) and on `crc32c` (what the
checkpoint reader calls: the package when installed, else the fallback), so
both paths are tested against the definition and the published check values.
"""
import sys
import types

import numpy as np
import pytest

from utils.checkpoints import crc32c as crc_module
from utils.checkpoints.crc32c import crc32c, numpy_crc32c

BOTH = pytest.mark.parametrize("crc", [numpy_crc32c, crc32c], ids=["numpy", "chosen"])


def bitwise_crc32c(data: bytes) -> int:
    """The definition: reflected Castagnoli polynomial, one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@BOTH
def test_known_vectors(crc):
    # RFC 3720 (iSCSI), appendix B.4, and the usual check value.
    assert crc(bytes(32)) == 0x8A9136AA
    assert crc(b"\xff" * 32) == 0x62A8AB43
    assert crc(bytes(range(32))) == 0x46DD794E
    assert crc(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc(b"123456789") == 0xE3069283
    assert crc(b"") == 0


@BOTH
def test_matches_bitwise_definition_on_random_slices(crc):
    rng = np.random.default_rng(3)
    buf = rng.integers(0, 256, 20000, dtype=np.uint8)
    lengths = [0, 1, 7, 8, 9, 127, 128, 129, 255, 256, 1024, 2047, 2048, 2049, 4100, 9000]
    lengths += [int(n) for n in rng.integers(0, 12000, 8)]
    for n in lengths:
        start = int(rng.integers(0, len(buf) - n + 1))
        piece = buf[start:start + n]
        assert crc(piece) == bitwise_crc32c(piece.tobytes()), (start, n)
        assert crc(piece.tobytes()) == crc(memoryview(piece.tobytes()))
        assert crc(piece.tobytes()) == crc(bytearray(piece.tobytes()))


@BOTH
def test_large_inputs_split_anywhere_agree(crc):
    # 10 MB goes through many lanes and blocks; the pieces through small ones.
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, 10_000_003, dtype=np.uint8)
    whole = crc(data)
    for cut in (1, 4099, 3_333_333, 9_999_999):
        assert crc(data[cut:], crc(data[:cut])) == whole
    # Non-byte and non-contiguous arrays hash their raw bytes, in order.
    floats = data[:8_000_000].view(np.float32)
    assert crc(floats) == crc(data[:8_000_000].tobytes())
    columns = data[:8_000_000].reshape(1000, 8000)[:, :16]
    assert crc(columns) == crc(columns.tobytes())


def test_package_equals_numpy_fallback_on_random_data():
    google_crc32c = pytest.importorskip("google_crc32c")
    assert crc_module._PACKAGE_EXTEND is google_crc32c.extend  # the package is what runs
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 3_000_001, dtype=np.uint8)
    assert google_crc32c.value(b"123456789") == numpy_crc32c(b"123456789") == 0xE3069283
    for start, stop in [(0, len(data)), (3, 1_000_000), (17, 18), (100, 100)]:
        piece = data[start:stop]
        assert crc32c(piece) == numpy_crc32c(piece) == google_crc32c.value(piece.tobytes())
        assert crc32c(piece, 0x1234) == numpy_crc32c(piece, 0x1234)


def test_without_the_package_the_numpy_version_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "google_crc32c", None)  # import fails
    assert crc_module._package_extend() is None
    # Installed without its C extension: its pure-Python loop would be far too slow.
    monkeypatch.setitem(sys.modules, "google_crc32c",
                        types.SimpleNamespace(implementation="python", extend=max))
    assert crc_module._package_extend() is None
    monkeypatch.setattr(crc_module, "_PACKAGE_EXTEND", None)
    calls = []
    monkeypatch.setattr(crc_module, "numpy_crc32c",
                        lambda data, crc=0: calls.append(crc) or 0xE3069283)
    assert crc32c(b"123456789") == 0xE3069283 and calls == [0]
