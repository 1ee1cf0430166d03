"""utils.data.text_lines: lines end as with str.splitlines, whatever the read block size,
and a byte that is not UTF-8 is named by its line and its place in the line."""
import random

import pytest

from utils.data import text_lines
from utils.errors import UserError

# Every line boundary of str.splitlines.
LINE_BREAKS = ["\n", "\r\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85",
               "\u2028", "\u2029"]


def random_text(rng, alphabet, length):
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(length)))


def read_in_blocks_of(block, monkeypatch, tmp_path):
    """Files are read `block` bytes at a time; a seeded generator and a file path."""
    monkeypatch.setattr(text_lines, "READ_BLOCK", block)
    return random.Random(block), tmp_path / "t.txt"


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 20])
def test_reading_matches_str_splitlines_at_any_block_size(tmp_path, monkeypatch, block):
    # Small blocks cut lines, "\r\n" and the bytes of U+2028 across reads.
    rng, path = read_in_blocks_of(block, monkeypatch, tmp_path)
    alphabet = list("ab é中 \t") + ["\u3000", "\ufeff", "'s"] + LINE_BREAKS
    for _ in range(150):
        text = random_text(rng, alphabet, 40)
        path.write_bytes(text.encode("utf-8"))
        expected = text.splitlines()
        if expected and expected[0].startswith("\ufeff"):
            expected[0] = expected[0][1:]  # a byte-order mark is not text
        for keep in (1, 3, 100):
            got = [(text, complete) for _, text, complete in
                   text_lines.iter_lines(str(path), keep)]
            assert got == [(line.strip()[:keep], len(line.strip()) <= keep)
                           for line in expected], (text, keep)


@pytest.mark.parametrize("block", [1, 2, 5, 1 << 20])
def test_non_utf8_line_and_byte_are_right_at_any_block_size(tmp_path, monkeypatch, block):
    rng, path = read_in_blocks_of(block, monkeypatch, tmp_path)
    alphabet = list("ab é中 ") + ["\ufeff", "\u2028", "\r\n"] + LINE_BREAKS
    for _ in range(150):
        chars = [rng.choice(alphabet) for _ in range(rng.randrange(30))]
        at = rng.randrange(len(chars) + 1)
        data = "".join(chars[:at]).encode() + b"\xff" + "".join(chars[at:]).encode()
        path.write_bytes(data)
        # Where the bad byte is, found another way: decoded with it kept.
        lines = data.decode("utf-8", "surrogateescape").splitlines()
        number = next(n for n, line in enumerate(lines, 1) if "\udcff" in line)
        offset = len(lines[number - 1].split("\udcff")[0].encode()) + 1
        with pytest.raises(UserError, match=f"t.txt line {number} is not valid UTF-8 "
                                            f"\\(byte 0xff at byte {offset} of the line"):
            list(text_lines.iter_lines(str(path), keep=3))


def test_non_utf8_in_a_line_longer_than_a_block_names_line_and_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(text_lines, "READ_BLOCK", 4)
    (tmp_path / "t.txt").write_bytes(b"ok\r" + "caf\u00e9 ".encode() * 5 + b"\xff tail\n")
    with pytest.raises(UserError, match=r"t.txt line 2 is not valid UTF-8 \(byte 0xff "
                                        r"at byte 31 of the line\)"):
        list(text_lines.iter_lines(str(tmp_path / "t.txt"), keep=5))
