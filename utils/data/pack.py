"""prepare_data.py --pack: a split's whole text as one token stream, cut into full windows.

The stream is one <|endoftext|> followed by GPT-2's encoding of the file's
whole text (read as Python reads text files: UTF-8, "\\r\\n" and "\\r" become
"\\n", a byte-order mark is dropped), where a literal "<|endoftext|>" is the
end-of-text id (the usual way to separate documents). Newlines and blank lines
are kept: they are text like any other.

Windows hold `max_seq_length` tokens and overlap by ONE token: window k is
stream[k*(L-1) : k*(L-1)+L]. The loss (utils/training/lm.py) predicts every token of a
record but its first, which is context only; with the overlap that first
token is the previous window's last target, so every token of the stream
after the opening <|endoftext|> is predicted exactly once, and line examples
and packed windows share one record format and one loss. The last window may
be shorter; a tail of the single overlap token adds nothing and is dropped.

Encoding in parallel chunks gives the ids of the whole text because chunks are
cut only where GPT-2's pre-tokenizer splits anyway: between a non-whitespace
character and a whitespace character. The pre-tokenizer
(utils.processor.GPT2_SPLIT_PATTERN) has no look-behind, so the pieces after
a cut do not depend on what precedes it. No piece holds both a non-space
character and a following whitespace character (the letter, number,
punctuation and contraction alternatives contain no whitespace but an optional
leading space), so a piece ends at the cut in the whole text; and the piece
ending there matches the same way in the chunk alone, where the string's end
stops its run just as the whitespace did (utils/data/prepare.py's LongLineCut
makes the same argument for a line's start). A marker holds no whitespace, so
no cut falls inside one. A chunk with no such point (one word of megabytes)
grows until it finds one.
"""
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np

import time
from tqdm import tqdm
import regex

from utils.data.records import IDS_FIELD, LENGTH_FIELD, record_dtype
from utils.errors import UserError
from utils.data.prepare import WORKER_STATE
from utils.data.prepare import ordered_pool_map
from utils.processor import EOS_ID
from utils.processor import get_encoder
from utils.data.prepare import SplitSummary
from utils.data.split_output import RecordSpool
from utils.data.split_output import dev_count
from utils.data.split_output import write_records

# Characters encoded per chunk (about a quarter as many tokens).
PACK_CHUNK_CHARS = 1 << 20
# Below this many characters a process pool costs more than it saves.
MIN_CHARS_FOR_POOL = 4 * PACK_CHUNK_CHARS

_SAFE_CUT = None  # compiled on first use


def _safe_cut_regexes():
    global _SAFE_CUT
    if _SAFE_CUT is None:
        # A non-space character followed by a space character, in the regex
        # module's (the pre-tokenizer's) sense of \s; searched backwards, forwards.
        _SAFE_CUT = regex.compile(r"(?r)\S(?=\s)"), regex.compile(r"\S(?=\s)")
    return _SAFE_CUT


def safe_cut(text: str, limit: int) -> Optional[int]:
    """A cut 0 < p < len(text) with text[p-1] not space and text[p] space:
    the largest p <= limit, else the smallest beyond it; None when there is none."""
    backwards, forwards = _safe_cut_regexes()
    found = (backwards.search(text, 0, min(limit + 1, len(text)))
             or forwards.search(text, limit))
    return found.end() if found else None


def text_chunks(path: str, chunk_chars: int = PACK_CHUNK_CHARS) -> Iterator[str]:
    """The file's text in order, in pieces of about `chunk_chars` characters
    cut only at `safe_cut` points; concatenated, they are the whole text."""
    buffer = ""
    with open(path, encoding="utf-8-sig", newline=None) as f:
        while True:
            block = f.read(chunk_chars)
            buffer += block
            while len(buffer) > chunk_chars:
                cut = safe_cut(buffer, chunk_chars)
                if cut is None:
                    break  # one long word or run of spaces: read on
                yield buffer[:cut]
                buffer = buffer[cut:]
            if not block:
                break
    if buffer:
        yield buffer


def encode_chunk(text: str) -> List[int]:
    """In a prepare.py worker: ids of `text`, "<|endoftext|>" as the end-of-text id."""
    stop = WORKER_STATE.get("stop")
    if stop is not None and stop.is_set():
        return []  # the parent has stopped: skip the chunks still queued
    return WORKER_STATE["encoder"].encode(text, allow_special=True)


class WindowCutter:
    """Consecutive windows of `length` tokens, overlapping by one, of a stream
    fed a piece at a time; records in the prepared format."""

    def __init__(self, length: int, dtype: np.dtype, eos_id: int):
        self.length, self.dtype, self.eos_id = length, dtype, eos_id
        self.pending: List[int] = [eos_id]  # the stream's opening <|endoftext|>

    def add(self, ids: List[int]) -> np.ndarray:
        """Records of the windows completed by `ids`."""
        self.pending.extend(ids)
        step = self.length - 1
        # Window i needs pending[i*step : i*step + length]; the last one's
        # last token stays pending as the next window's first.
        count = (len(self.pending) - 1) // step
        windows = [self.pending[i * step:i * step + self.length] for i in range(count)]
        self.pending = self.pending[count * step:]
        return self._records(windows)

    def finish(self) -> np.ndarray:
        """The last, shorter window (none when only the overlap token is left)."""
        tail = [self.pending] if len(self.pending) >= 2 else []
        self.pending = []
        return self._records(tail)

    def _records(self, windows: List[List[int]]) -> np.ndarray:
        records = np.zeros(len(windows), dtype=self.dtype)
        records[IDS_FIELD].fill(self.eos_id)  # the padding
        for row, window in enumerate(windows):
            records[IDS_FIELD][row, :len(window)] = window
            records[LENGTH_FIELD][row] = len(window)
        return records


def packed_records(path: str, max_seq_length: int, vocab_dir: Optional[str],
                   num_workers: int, chunk_chars: int = PACK_CHUNK_CHARS
                   ) -> Iterator[Tuple[np.ndarray, int]]:
    """(records, characters read) for each encoded chunk of `path`, in order."""
    dtype = record_dtype(max_seq_length, len(get_encoder(vocab_dir)))
    if os.path.getsize(path) < MIN_CHARS_FOR_POOL:
        num_workers = 1
    cutter = WindowCutter(max_seq_length, dtype, EOS_ID)
    chunks = text_chunks(path, chunk_chars)
    sizes: List[int] = []

    def remember_size(items):
        for item in items:
            sizes.append(len(item))
            yield item

    encoded = ordered_pool_map(encode_chunk, remember_size(chunks), num_workers,
                               init_args=(vocab_dir, max_seq_length, dtype))
    try:
        for done, ids in enumerate(encoded):
            yield cutter.add(ids), sizes[done]
    except UnicodeDecodeError:
        # check_text_file read the whole file as UTF-8 before.
        raise UserError(f"{path} changed while it was being read; run "
                        f"prepare_data.py again once it is complete") from None
    finally:
        encoded.close()
    yield cutter.finish(), 0


def pack_split(text_path: str, out_path: str, *, max_seq_length: int,
               vocab_dir: Optional[str], num_workers: int, progress: bool,
               dev_fraction: Optional[float] = None, dev_path: Optional[str] = None,
               chunk_chars: int = PACK_CHUNK_CHARS) -> list:
    """Pack one text file into `out_path` (and, with `dev_fraction`, its last
    windows into `dev_path`); the SplitSummary of each file written."""

    start = time.time()
    split = os.path.splitext(os.path.basename(text_path))[0]
    spool = None
    try:
        with tqdm(total=os.path.getsize(text_path), unit=" chars", unit_scale=True,
                  desc=f"pack {split}", disable=None if progress else True) as bar:
            for records, chars in packed_records(text_path, max_seq_length, vocab_dir,
                                                 num_workers, chunk_chars):
                if spool is None:
                    spool = RecordSpool(out_path, records.dtype)
                spool.append(records)
                bar.update(chars)
        records = spool.records()
        if len(records) == 0:
            raise UserError(f"{text_path} holds no text to pack: put the text there "
                            f"(or remove the file to skip the {split} split)")
        held = 0 if dev_fraction is None else dev_count(
            len(records), dev_fraction, f"windows of {max_seq_length} tokens", text_path)
        parts = [(split, out_path, records[:len(records) - held])]
        if held:
            parts.append(("dev", dev_path, records[len(records) - held:]))
        summaries = []
        for name, path, part in parts:
            write_records(path, part)
            lengths = np.asarray(part[LENGTH_FIELD], dtype=np.int64)
            summaries.append(SplitSummary(
                split=name, path=path, examples=len(part), tokens=int(lengths.sum()),
                truncated=0, skipped=0, longest=int(lengths.max()),
                seconds=time.time() - start))
        return summaries
    finally:
        if spool is not None:
            spool.close()
