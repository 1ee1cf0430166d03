"""Reading a UTF-8 text file line by line, in bounded memory however long a line is.

prepare_data.py's input: one example per line. A line ends where Python's
str.splitlines ends one: at "\\n", "\\r\\n", "\\r" (universal newlines), and at
the other line boundaries Unicode and Python know: "\\v", "\\f", "\\x1c",
"\\x1d", "\\x1e", NEL "\\x85", LINE SEPARATOR "\\u2028" and PARAGRAPH
SEPARATOR "\\u2029". gpt2_train_main.py's TSV writer replaces the same set, so
its output reads back one sample per line.

The file is read and decoded a block at a time; of a line longer than the
caller wants only its first characters are kept, so even a line of hundreds
of megabytes takes bounded memory. Bytes that are not UTF-8 are a UserError
naming the file, the line and the byte.
"""
import codecs
import os
from typing import Iterator, List, Optional, Tuple

from tqdm import tqdm

from utils.errors import UserError

# The line ends of str.splitlines (listed above).
_LINE_ENDS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
# Bytes read and decoded at a time; a longer line is read a block at a time,
# so memory stays bounded whatever the line length.
READ_BLOCK = 1 << 20


def _open_text(path: str):
    try:
        return open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror})") from None


class _LongLine:
    """A line that spans blocks: its parts, of which at most `keep` characters
    are kept (from its first non-space character on)."""

    def __init__(self, number: int, keep: int):
        self.number = number
        self.room = keep
        self.kept: List[str] = []
        self.bytes = 0         # UTF-8 bytes of the line so far
        self.at_start = True   # nothing added yet
        self.started = False   # a non-space character was seen
        self.more = False      # non-space text after the kept characters

    def add(self, text: str, ends: bool) -> None:
        if not ends:  # counted to place a bad byte further on in the line
            self.bytes += len(text.encode("utf-8"))
        if self.number == 1 and self.at_start and text.startswith("\ufeff"):
            text = text[1:]  # a byte-order mark is not part of the text
        self.at_start = False
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if self.room > 0:
            self.kept.append(text[:self.room])
            self.room -= len(self.kept[-1])
            text = text[len(self.kept[-1]):]
        if text and not self.more and not text.isspace():
            self.more = True

    def result(self) -> Tuple[int, str, bool]:
        text = "".join(self.kept)
        return (self.number, text, False) if self.more else \
            (self.number, text.rstrip(), True)


def _not_utf8(path: str, data: bytes, start: int, finished: int,
              spanning: Optional[_LongLine]) -> UserError:
    """The error for the bad byte data[start], after `finished` whole lines."""
    before = data[:start].decode("utf-8")  # valid: decoding stopped at `start`
    parts = before.splitlines(keepends=True)
    tail = parts.pop() if parts and parts[-1][-1] not in _LINE_ENDS else ""
    offset = len(tail.encode("utf-8"))
    if not parts and spanning is not None:
        offset += spanning.bytes  # the line began in an earlier block
    return UserError(
        f"{path} line {finished + 1 + len(parts)} is not valid UTF-8 (byte "
        f"0x{data[start]:02x} at byte {offset + 1} of the line): convert the file "
        f"to UTF-8, e.g. 'iconv -f latin1 -t utf-8 in.txt > out.txt'")


def iter_lines(path: str, keep: int, on_read=None) -> Iterator[Tuple[int, str, bool]]:
    """(line number, text, complete) for every line of a UTF-8 text file.

    Lines end as with str.splitlines (see the module's docstring; a break at
    the very end adds no empty line). `text` is the line with surrounding whitespace stripped,
    as the original example did; a line whose stripped text is longer than
    `keep` characters gives only its first `keep` (complete False), and is
    read in bounded memory however long it is. A byte-order mark at the start
    of the file is dropped. A byte sequence that is not UTF-8 is a UserError
    naming the file and the line. `on_read(n)` is told the size of each block.
    """
    finished = 0      # lines yielded
    spanning = None   # a _LongLine while a line goes on past a block
    held = b""        # bytes left for the next block: a cut character, a "\r"
    with _open_text(path) as f:
        while True:
            block = f.read(READ_BLOCK)
            if on_read is not None:
                on_read(len(block))
            data = held + block if held else block
            # A "\r" at the end may be the start of "\r\n": decide with the next block.
            end = len(data) - 1 if block and data.endswith(b"\r") else len(data)
            try:
                # final=False keeps a character cut by the block's end for the next.
                text, used = codecs.utf_8_decode(memoryview(data)[:end], "strict",
                                                 not block)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, data, err.start, finished, spanning) from None
            held = data[used:]
            lines = text.splitlines()
            unfinished = lines.pop() if text and text[-1] not in _LINE_ENDS else None
            first = 0
            if spanning is not None and lines:
                spanning.add(lines[0], ends=True)
                yield spanning.result()
                spanning, finished, first = None, finished + 1, 1
            for i in range(first, len(lines)):
                finished += 1
                line = lines[i]
                if finished == 1 and line.startswith("\ufeff"):
                    line = line[1:]  # a byte-order mark is not part of the text
                line = line.strip()
                yield (finished, line, True) if len(line) <= keep else \
                    (finished, line[:keep], False)
            if unfinished is not None:
                if spanning is None:
                    spanning = _LongLine(finished + 1, keep)
                spanning.add(unfinished, ends=not block)
            if not block:  # end of file
                if spanning is not None:
                    yield spanning.result()
                return


def scan_text_file(path: str, progress: bool = True) -> Tuple[int, int]:
    """Check a text file is UTF-8 and count its (non-empty, empty) lines.

    A first, cheap pass: knowing the count up front lets the output be
    allocated once and the progress bar show a total.
    """
    examples = empty = 0
    size = os.path.getsize(path)
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"check {os.path.basename(path)}",
              disable=True if not progress or size < (64 << 20) else None,
              leave=False) as bar:
        # One character tells an empty line from an example.
        for _, text, _ in iter_lines(path, keep=1, on_read=bar.update):
            if text:
                examples += 1
            else:
                empty += 1
    return examples, empty


def check_text_file(path: str, progress: bool = True) -> Tuple[int, int]:
    """`scan_text_file`, and a UserError for a file without examples."""
    examples, empty = scan_text_file(path, progress)
    if examples == 0:
        split = os.path.splitext(os.path.basename(path))[0]
        raise UserError(f"{path} has no non-empty lines: put one example "
                        f"per line (or remove the file to skip the {split} split)")
    return examples, empty
