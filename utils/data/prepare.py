"""Preparing data: a split's text file -> `<split>.npy` records (utils/data/records.py's format).

Each non-empty line becomes <|endoftext|> + BPE(line) + <|endoftext|>, as in
the original Texar example (see utils/data/records.py); a `.tsv` split of
source<TAB>target pairs becomes conditional records (utils/data/pairs.py). The text is read with
utils/data/text_lines.py; a long line is read only as far as its first tokens need
(see `LongLineCut`). The BPE runs in a pool of processes, a few chunks of
lines at a time, so memory stays bounded whatever the file size.

Records are written into a memory-mapped temporary file beside the output
(named and cleaned up by utils/atomic.py), its disk space reserved up front,
and renamed into place once complete: an interrupted run (Ctrl-C, SIGTERM,
an error) never leaves a half-written split, and a killed run's temporary
file is removed by the next run in that directory.
"""
import errno
import os
import signal
import time
from collections import deque
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

import multiprocessing
from tqdm import tqdm
import regex

from utils.atomic import ensure_writable_dir, interrupts_held, remove_stale_temp_files
from utils.temp_files import remove_if_present, temp_name_beside
from utils.data.records import (CONTEXT_FIELD, IDS_FIELD, LENGTH_FIELD, SPLITS,
                        check_max_seq_length, record_dtype, split_data_path)
from utils.errors import UserError
from utils.data.pairs import (PairCuts, check_pair_seq_length, check_pairs_file,
                         encode_pairs, iter_pairs, pack_pair_records)
from utils.data.text_lines import check_text_file, iter_lines
from utils.processor import EOS_ID
from utils.processor import get_encoder
from utils.processor import GPT2_SPLIT_PATTERN

# Lines handed to a worker at a time: large enough to amortise the IPC,
# small enough that the progress bar moves and memory stays bounded.
CHUNK_LINES = 2000
# Below this many lines a process pool costs more than it saves.
MIN_LINES_FOR_POOL = 4 * CHUNK_LINES
# Signals that stop a run: Ctrl-C, and SIGTERM, which prepare_data.py turns
# into an exception like Ctrl-C's.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def prepare_output_dir(output_dir: str) -> None:
    """Create `output_dir` and check it is writable, before any work is done.

    Also removes temporary files a killed run (kill -9, power loss) left
    there; those of a run still going on in the same directory are kept.
    """
    ensure_writable_dir(output_dir, "--output_dir")
    outputs = [os.path.basename(split_data_path(output_dir, split)) for split in SPLITS]
    remove_stale_temp_files(output_dir, outputs, without_pid=False)


# ---------------------------------------------------------------------------
# Encoding: text -> records

def pack_records(token_lists: Sequence[List[int]], max_seq_length: int,
                 dtype: np.dtype, eos_id: int) -> Tuple[np.ndarray, int]:
    """Records for BPE token lists, and how many lists had to be cut."""
    records = np.zeros(len(token_lists), dtype=dtype)
    ids = records[IDS_FIELD]
    ids.fill(eos_id)  # the padding, and both special tokens
    room = max_seq_length - 2
    truncated = 0
    for row, tokens in enumerate(token_lists):
        if len(tokens) > room:
            tokens = tokens[:room]
            truncated += 1
        ids[row, 1:1 + len(tokens)] = tokens
        records[LENGTH_FIELD][row] = len(tokens) + 2
    return records, truncated


WORKER_STATE = {}


def _init_worker(vocab_dir: Optional[str], max_seq_length: int,
                 dtype: np.dtype) -> None:
    WORKER_STATE.update(encoder=get_encoder(vocab_dir), max_seq_length=max_seq_length,
                   dtype=dtype, eos_id=EOS_ID, stop=None)


def _init_pool_worker(stop, *init_args) -> None:
    # Ctrl-C and SIGTERM are for the parent, which winds the pool down: a
    # worker killed by one mid-message prints a traceback, and one that dies
    # loses its chunk, so the pool never finishes.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _init_worker(*init_args)
    WORKER_STATE["stop"] = stop


def _encode_chunk(lines: list) -> Optional[Tuple[np.ndarray, object]]:
    w = WORKER_STATE
    if CONTEXT_FIELD in w["dtype"].names:  # (line number, source, target) triples
        if w["stop"] is not None and w["stop"].is_set():
            return None
        return pack_pair_records(encode_pairs(lines, w["encoder"].encode),
                                 w["max_seq_length"], w["dtype"], w["eos_id"])
    token_lists = []
    for line in lines:
        if w["stop"] is not None and w["stop"].is_set():
            return None  # the parent has stopped: skip what is left
        token_lists.append(w["encoder"].encode(line))
    return pack_records(token_lists, w["max_seq_length"], w["dtype"], w["eos_id"])


# A long line is read up to its first max_seq_length * (longest token) bytes,
# plus this many characters: room for the word (piece) that straddles that
# point, so the cut can fall between two pieces. See LongLineCut.
LONG_PIECE_CHARS = 1 << 16
# Characters handed to a worker at a time, at most (besides CHUNK_LINES).
CHUNK_CHARS = 1 << 22


@dataclass(frozen=True)
class LongLineCut:
    """What of a long line to encode: a start with the same first tokens.

    An example keeps only its first max_seq_length - 2 tokens, so a long line
    need not be read whole (a 300 MB line in one str would exhaust memory).
    `iter_lines` keeps the first `keep_chars` characters; `cut` shortens them
    to a start whose BPE tokens are certainly the first tokens of the whole
    line, at least `tokens` of them.

    Why that is possible: GPT-2 first splits text into pieces with a regular
    expression (utils.processor.GPT2_SPLIT_PATTERN), then runs BPE inside each
    piece. A piece of the kept text that ends 3 or more characters before its
    end was matched without looking past it (contractions read at most 3
    characters, the other alternatives one past their match), so it is also
    a piece of the whole line, as is every piece before it. The cut is at the
    end of such a piece whose last character is not whitespace: there the
    text's end stops every alternative just as the next character did (only
    whitespace pieces look ahead, and none spans the cut), so encoding the
    text up to the cut gives exactly the whole line's first tokens. Enough
    of them is certain once there are `tokens` pieces (each piece is at
    least one token), or `tokens * token_bytes` bytes (no token is longer
    than `token_bytes`).

    The one approximation: when a single piece (a run of letters, digits,
    punctuation or spaces without a break) straddles that point and runs past
    the kept characters, the kept text is encoded as it is, so the BPE of that
    piece starts from its first characters only (the whole line would need
    the whole piece in memory).
    """
    tokens: int        # tokens needed: one more than fit, so a cut line counts as truncated
    token_bytes: int   # the vocabulary's longest token, in bytes

    @classmethod
    def for_examples(cls, max_seq_length: int, encoder) -> "LongLineCut":
        # Tokens are stored as one character per byte (GPT-2's byte alphabet).
        return cls(tokens=max_seq_length - 1,
                   token_bytes=max(len(token) for token in encoder.encoder))

    @property
    def keep_chars(self) -> int:
        return self.tokens * self.token_bytes + LONG_PIECE_CHARS

    def cut(self, kept: str) -> str:
        settled = len(kept) - 3  # pieces ending later may go on past the kept text
        pieces = size = 0
        split, space = _gpt2_regexes()
        for piece in split.finditer(kept):
            end = piece.end()
            if end > settled:
                break
            pieces += 1
            size += len(piece.group().encode("utf-8"))
            if ((pieces >= self.tokens or size >= self.tokens * self.token_bytes)
                    and not space.match(kept, end - 1)):
                return kept[:end]
        return kept  # one piece runs past the kept text: the approximation


_GPT2_REGEXES = None  # compiled on first use


def _gpt2_regexes():
    """GPT-2's pre-tokenizer, and its idea of a whitespace character."""
    global _GPT2_REGEXES
    if _GPT2_REGEXES is None:
        _GPT2_REGEXES = regex.compile(GPT2_SPLIT_PATTERN), regex.compile(r"\s")
    return _GPT2_REGEXES


def _pair_chunks(path: str) -> Iterator[List[Tuple[int, str, str]]]:
    """The (line number, source, target) of a .tsv split, in lists of bounded size."""
    chunk: List[Tuple[int, str, str]] = []
    chars = 0
    for pair in iter_pairs(path):
        chunk.append(pair)
        chars += len(pair[1]) + len(pair[2])
        if len(chunk) == CHUNK_LINES or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _chunks(path: str, long_line: LongLineCut) -> Iterator[list]:
    """The non-empty lines of `path`, long ones cut, in lists of bounded size."""
    if path.endswith(".tsv"):
        yield from _pair_chunks(path)
        return
    chunk: List[str] = []
    chars = 0
    for _, text, complete in iter_lines(path, long_line.keep_chars):
        if text:
            if not complete:
                text = long_line.cut(text)
            chunk.append(text)
            chars += len(text)
            if len(chunk) == CHUNK_LINES or chars >= CHUNK_CHARS:
                yield chunk
                chunk = []
                chars = 0
    if chunk:
        yield chunk


def _encoded_chunks(path: str, long_line: LongLineCut, num_workers: int, *,
                    init_args: tuple) -> Iterator[Tuple[np.ndarray, int]]:
    """Encoded chunks of lines in file order (see `ordered_pool_map`)."""
    return ordered_pool_map(_encode_chunk, _chunks(path, long_line), num_workers,
                            init_args=init_args)


def ordered_pool_map(func, items: Iterator, num_workers: int, *, init_args: tuple):
    """func(item) for each item, in order, spread over `num_workers` processes
    whose WORKER_STATE holds the encoder (`_init_worker(*init_args)`).

    At most two items per worker are in flight, so memory stays bounded
    whatever the file size (Pool.imap would read the whole file ahead).
    """
    if num_workers <= 1:
        _init_worker(*init_args)
        for item in items:
            yield func(item)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    stop = context.Event()
    pool = None
    try:
        # an exception inside Pool() can leave forked workers that nothing stops
        with interrupts_held():
            pool = context.Pool(num_workers, initializer=_init_pool_worker,
                                initargs=(stop, *init_args))
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(func, (item,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        # Done, failed or interrupted alike. Not pool.terminate(): it hangs if
        # its feeder thread is blocked sending a chunk to the workers it kills.
        # The workers skip the chunks still queued, so this is quick.
        if pool is not None:
            stop.set()
            pool.close()
            pool.join()


@dataclass
class SplitSummary:
    split: str
    path: str            # the .npy written
    examples: int
    tokens: int          # in all examples, both <|endoftext|> included
    truncated: int       # lines (pairs) cut to max_seq_length
    skipped: int         # empty lines
    longest: int         # tokens in the longest example
    seconds: float
    # Conditional (.tsv) splits only: how the pairs were cut (utils/data/pairs.py).
    pair_cuts: Optional[PairCuts] = None


def default_num_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def prepare_split(text_path: str, out_path: str, *, max_seq_length: int,
                  vocab_dir: Optional[str], num_workers: Optional[int] = None,
                  progress: bool = True,
                  counts: Optional[Tuple[int, int]] = None) -> SplitSummary:
    """Encode one text file into a prepared `.npy`, atomically.

    `counts` is `check_text_file(text_path)`, when the caller has it already.
    """

    check_max_seq_length(max_seq_length)
    conditional = text_path.endswith(".tsv")
    if conditional:
        check_pair_seq_length(max_seq_length)
    start = time.time()
    split = os.path.splitext(os.path.basename(text_path))[0]
    encoder = get_encoder(vocab_dir)  # loaded here first: a bad vocabulary fails early
    dtype = record_dtype(max_seq_length, len(encoder), conditional)
    long_line = LongLineCut.for_examples(max_seq_length, encoder)
    examples, skipped = counts or (check_pairs_file(text_path) if conditional
                                   else check_text_file(text_path, progress))
    if num_workers is None:
        num_workers = default_num_workers()
    if examples < MIN_LINES_FOR_POOL:
        num_workers = 1
    chunks = _encoded_chunks(text_path, long_line, num_workers,
                             init_args=(vocab_dir, max_seq_length, dtype))
    # prepare_data.py checked the directory once (prepare_output_dir); a
    # direct caller's unwritable one fails here, as one line.
    with records_file(out_path) as tmp_path:
        totals = _write_records(tmp_path, out_path, text_path, dtype, examples,
                                chunks, desc=f"encode {split}", progress=progress)
    return SplitSummary(split=split, path=out_path, examples=examples,
                        tokens=totals.tokens, truncated=totals.truncated,
                        skipped=skipped, longest=totals.longest,
                        seconds=time.time() - start,
                        pair_cuts=totals.pair_cuts if conditional else None)


@dataclass
class _Totals:
    """What the summary says of the records written so far."""
    written: int = 0     # records
    tokens: int = 0
    truncated: int = 0
    longest: int = 0
    pair_cuts: PairCuts = field(default_factory=PairCuts)

    def add(self, chunk: np.ndarray, cut) -> None:
        """`cut`: lines cut (an int), or a PairCuts for pairs."""
        lengths = chunk[LENGTH_FIELD]
        self.written += len(chunk)
        self.tokens += int(lengths.sum())
        self.longest = max(self.longest, int(lengths.max()))
        if isinstance(cut, PairCuts):
            self.pair_cuts.add(cut)
            cut = cut.sources + cut.targets
        self.truncated += cut


def _write_records(tmp_path: str, out_path: str, text_path: str, dtype: np.dtype,
                   examples: int, chunks: Iterator[Tuple[np.ndarray, object]], *,
                   desc: str, progress: bool) -> _Totals:
    """Write the encoded `chunks` (`examples` records in all) into `tmp_path`,
    and flush them to disk."""
    records = create_records(tmp_path, out_path, dtype, examples)
    totals = _Totals()
    # closing(): a Ctrl-C between chunks stops the pool here, not at exit.
    with tqdm(total=examples, unit=" lines", desc=desc,
              disable=None if progress else True) as bar, closing(chunks):
        for chunk, cut in chunks:
            end = totals.written + len(chunk)
            if end > examples:
                raise _changed_while_reading(text_path)
            records[totals.written:end] = chunk
            totals.add(chunk, cut)
            bar.update(len(chunk))
    if totals.written != examples:
        raise _changed_while_reading(text_path)
    sync_records(records, tmp_path, out_path)
    return totals


def sync_records(records: np.memmap, tmp_path: str, out_path: str) -> None:
    """Write a memory-mapped split's pages out and fsync its file, so the
    rename that follows publishes complete data. Disk errors: one line."""
    try:
        records.flush()
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as err:
        raise write_error(out_path, err) from None


def _changed_while_reading(path: str) -> UserError:
    return UserError(f"{path} changed while it was being read; run "
                     f"prepare_data.py again once it is complete")


def create_records(tmp_path: str, out_path: str, dtype: np.dtype,
                    examples: int) -> np.ndarray:
    """The memory-mapped output file, its disk space reserved up front.

    Writing to a memory map the disk has no room for kills the process with
    SIGBUS; reserving the space turns a full disk into ENOSPC here instead.
    """
    try:
        records = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=dtype,
                                            shape=(examples,))
        if hasattr(os, "posix_fallocate"):
            with open(tmp_path, "rb+") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise  # not a file system without the call: a real failure
    except OSError as err:
        raise write_error(out_path, err, examples * dtype.itemsize) from None
    return records


@contextmanager
def records_file(out_path: str):
    """A new temporary path beside `out_path` for a split being written; renamed
    onto `out_path` when the block completes, removed when it fails. Disk
    problems are one line naming `out_path`."""
    try:
        tmp_path = temp_name_beside(out_path)  # may make the directory
    except OSError as err:
        raise write_error(out_path, err) from None
    try:
        try:
            with open(tmp_path, "xb"):
                pass
        except OSError as err:
            raise write_error(out_path, err) from None
        yield tmp_path
        try:
            os.replace(tmp_path, out_path)
        except OSError as err:
            raise write_error(out_path, err) from None
    finally:
        remove_if_present(tmp_path)


def write_error(out_path: str, err: OSError, size: Optional[int] = None) -> UserError:
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f" (it needs {size / 1e6:,.1f} MB)" if size else ""
        return UserError(f"no space left in {out_dir} to write "
                         f"{os.path.basename(out_path)}{needed}: free some disk "
                         f"space or give another --output_dir")
    return UserError(f"cannot write {out_path} ({err.strerror}): check that "
                     f"--output_dir is a directory you can write to")

