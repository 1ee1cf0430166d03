"""Prepared data: text lines -> fixed-size records of GPT-2 token ids, and back.

`prepare_data.py` turns each split's text file (`train.txt`, `dev.txt`,
`test.txt`: one example per line, lines ending as with `str.splitlines`) into
`<split>.npy`. Each non-empty line becomes

    <|endoftext|> + BPE(line) + <|endoftext|>

as in the original Texar example: the BPE tokens are cut to
`max_seq_length - 2` first, so every example keeps both special tokens, then
padded with <|endoftext|> to `max_seq_length`. A long line is read only as far
as those first tokens need (see `LongLineCut`), so even a line of hundreds of
megabytes takes bounded memory.

The file is a plain NumPy `.npy` holding a 1-D structured array, one record per
example:

    length    int32                        tokens in the example, specials included
    text_ids  uint16[max_seq_length]       token ids, padded (int32 for vocabularies
                                           larger than 65,536)

It loads with `allow_pickle=False` and memory-maps (`mmap_mode="r"`), so a
corpus larger than RAM trains without being read in whole. Files are written
to a temporary name in the output directory and renamed into place once
complete: an interrupted run never leaves a half-written split.

`PreparedSplit` reads such a file back and builds batches padded only to the
longest example in the batch.
"""
import codecs
import errno
import os
import re
import signal
import threading
import time
from collections import deque
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from utils.atomic import ensure_writable_dir
from utils.errors import UserError

SPLITS = ("train", "dev", "test")
LENGTH_FIELD = "length"
IDS_FIELD = "text_ids"
# Lines handed to a worker at a time: large enough to amortise the IPC,
# small enough that the progress bar moves and memory stays bounded.
CHUNK_LINES = 2000
# Below this many lines a process pool costs more than it saves.
MIN_LINES_FOR_POOL = 4 * CHUNK_LINES
# GPT-2's n_ctx is 1024; allow bigger-context configs, but not sizes whose
# records (2 bytes a token) could not be allocated.
MAX_SEQ_LENGTH = 65536
# Signals that stop a run: Ctrl-C, and SIGTERM, which prepare_data.py turns
# into an exception like Ctrl-C's.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def split_text_path(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}.txt")


def split_data_path(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}.npy")


def record_dtype(max_seq_length: int, vocab_size: int) -> np.dtype:
    """The record layout of a prepared file; ids as uint16 when they fit."""
    id_type = "<u2" if vocab_size <= 2 ** 16 else "<i4"
    return np.dtype([(LENGTH_FIELD, "<i4"),
                     (IDS_FIELD, id_type, (max_seq_length,))])


def check_max_seq_length(max_seq_length: int) -> None:
    if max_seq_length < 3:
        raise UserError(f"--max_seq_length must be at least 3 (got {max_seq_length}): "
                        f"it counts the two <|endoftext|> tokens around each line")
    if max_seq_length > MAX_SEQ_LENGTH:
        raise UserError(f"--max_seq_length {max_seq_length} is too large: use 3 to "
                        f"{MAX_SEQ_LENGTH} (GPT-2 models read at most 1024 tokens)")


# ---------------------------------------------------------------------------
# The output directory

# prepare_split writes <output_dir>/.<split>.npy.<pid>.tmp, renamed when complete.
_TMP_NAME = re.compile(r"\.(%s)\.npy\.(\d+)\.tmp" % "|".join(SPLITS))


def _tmp_path(out_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(out_path)),
                        f".{os.path.basename(out_path)}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def prepare_output_dir(output_dir: str) -> None:
    """Create `output_dir` and check it is writable, before any work is done.

    Also removes temporary files a killed run (kill -9, power loss) left
    there; those of a run still going on in the same directory are kept.
    """
    ensure_writable_dir(output_dir, "--output_dir")
    for name in os.listdir(output_dir):
        match = _TMP_NAME.fullmatch(name)
        if match and not _pid_alive(int(match.group(2))):
            try:
                os.remove(os.path.join(output_dir, name))
            except FileNotFoundError:
                pass  # another run removed it first


# ---------------------------------------------------------------------------
# Reading text files
#
# A line ends where Python's str.splitlines ends one: at "\n", "\r\n", "\r"
# (universal newlines), and at the other line boundaries Unicode and Python
# know: "\v", "\f", "\x1c", "\x1d", "\x1e", NEL "\x85", LINE SEPARATOR
# "\u2028" and PARAGRAPH SEPARATOR "\u2029". gpt2_train_main.py's TSV writer
# replaces the same set, so its output reads back one sample per line.
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

    Lines end as with str.splitlines (see above; a break at the very end adds
    no empty line). `text` is the line with surrounding whitespace stripped,
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
    from tqdm import tqdm
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


_WORKER = {}


def _init_worker(vocab_dir: Optional[str], max_seq_length: int,
                 dtype: np.dtype) -> None:
    from utils.processor import EOS_ID, get_encoder
    _WORKER.update(encoder=get_encoder(vocab_dir), max_seq_length=max_seq_length,
                   dtype=dtype, eos_id=EOS_ID, stop=None)


def _init_pool_worker(stop, *init_args) -> None:
    # Ctrl-C and SIGTERM are for the parent, which winds the pool down: a
    # worker killed by one mid-message prints a traceback, and one that dies
    # loses its chunk, so the pool never finishes.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _init_worker(*init_args)
    _WORKER["stop"] = stop


def _encode_chunk(lines: List[str]) -> Optional[Tuple[np.ndarray, int]]:
    w = _WORKER
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
        import regex
        from utils.processor import GPT2_SPLIT_PATTERN
        _GPT2_REGEXES = regex.compile(GPT2_SPLIT_PATTERN), regex.compile(r"\s")
    return _GPT2_REGEXES


def _chunks(path: str, long_line: LongLineCut) -> Iterator[List[str]]:
    """The non-empty lines of `path`, long ones cut, in lists of bounded size."""
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


def _encoded_chunks(path: str, long_line: LongLineCut, num_workers: int,
                    init_args: tuple) -> Iterator[Tuple[np.ndarray, int]]:
    """Encoded chunks in file order, BPE spread over `num_workers` processes.

    At most two chunks per worker are in flight, so memory stays bounded
    whatever the file size (Pool.imap would read the whole file ahead).
    """
    if num_workers <= 1:
        _init_worker(*init_args)
        for chunk in _chunks(path, long_line):
            yield _encode_chunk(chunk)
        return
    import multiprocessing
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    stop = context.Event()
    pool = None
    try:
        with _signals_held():
            pool = context.Pool(num_workers, initializer=_init_pool_worker,
                                initargs=(stop, *init_args))
        pending = deque()
        for chunk in _chunks(path, long_line):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
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


@contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM back until the block is done, then act on them.

    Around Pool(): an exception inside it can leave forked workers that
    nothing stops. Only signals whose handler is Python code are held (an
    ignored one stays ignored, a default SIGTERM still ends the process), and
    only in the main thread, where Python runs handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for signum in _STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            previous[signum] = handler
            signal.signal(signum, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(received):
        previous[signum](signum, None)  # raises, for Python's and our handlers


@dataclass
class SplitSummary:
    split: str
    path: str            # the .npy written
    examples: int
    tokens: int          # in all examples, both <|endoftext|> included
    truncated: int       # lines cut to max_seq_length
    skipped: int         # empty lines
    longest: int         # tokens in the longest example
    seconds: float


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
    from tqdm import tqdm
    from utils.processor import get_encoder

    check_max_seq_length(max_seq_length)
    start = time.time()
    split = os.path.splitext(os.path.basename(text_path))[0]
    encoder = get_encoder(vocab_dir)  # loaded here first: a bad vocabulary fails early
    dtype = record_dtype(max_seq_length, len(encoder))
    long_line = LongLineCut.for_examples(max_seq_length, encoder)
    examples, skipped = counts or check_text_file(text_path, progress)
    if num_workers is None:
        num_workers = default_num_workers()
    if examples < MIN_LINES_FOR_POOL:
        num_workers = 1

    # prepare_data.py checked the directory once (prepare_output_dir); a
    # direct caller's unwritable one fails in _create_records, as one line.
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp_path = _tmp_path(out_path)
    written = tokens = truncated = longest = 0
    try:
        records = _create_records(tmp_path, out_path, dtype, examples)
        init_args = (vocab_dir, max_seq_length, dtype)
        # closing(): a Ctrl-C between chunks stops the pool here, not at exit.
        with tqdm(total=examples, unit=" lines", desc=f"encode {split}",
                  disable=None if progress else True) as bar, \
                closing(_encoded_chunks(text_path, long_line, num_workers,
                                        init_args)) as chunks:
            for chunk, cut in chunks:
                end = written + len(chunk)
                if end > examples:
                    raise _changed_while_reading(text_path)
                records[written:end] = chunk
                lengths = chunk[LENGTH_FIELD]
                tokens += int(lengths.sum())
                longest = max(longest, int(lengths.max()))
                truncated += cut
                written = end
                bar.update(len(chunk))
        if written != examples:
            raise _changed_while_reading(text_path)
        try:
            records.flush()
            del records
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, out_path)
        except OSError as err:
            raise _write_error(out_path, err) from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return SplitSummary(split=split, path=out_path, examples=examples, tokens=tokens,
                        truncated=truncated, skipped=skipped, longest=longest,
                        seconds=time.time() - start)


def _changed_while_reading(path: str) -> UserError:
    return UserError(f"{path} changed while it was being read; run "
                     f"prepare_data.py again once it is complete")


def _create_records(tmp_path: str, out_path: str, dtype: np.dtype,
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
        raise _write_error(out_path, err, examples * dtype.itemsize) from None
    return records


def _write_error(out_path: str, err: OSError, size: Optional[int] = None) -> UserError:
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f" (it needs {size / 1e6:,.1f} MB)" if size else ""
        return UserError(f"no space left in {out_dir} to write "
                         f"{os.path.basename(out_path)}{needed}: free some disk "
                         f"space or give another --output_dir")
    return UserError(f"cannot write {out_path} ({err.strerror}): check that "
                     f"--output_dir is a directory you can write to")


# ---------------------------------------------------------------------------
# Reading prepared files back

class PreparedSplit:
    """A prepared `.npy` split, memory-mapped; builds padded batches.

    `lengths` (int64, one per example) is read into memory; the token ids stay
    on disk until a batch asks for them.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise UserError(f"prepared data not found: {path}; run "
                            f"'python prepare_data.py --data_dir <dir with "
                            f"{os.path.basename(path)[:-4]}.txt>' first (or fix data_dir "
                            f"in the training config)")
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"{path} is not a prepared data file ({err}); run "
                            f"prepare_data.py again") from None
        names = data.dtype.names or ()
        if (data.ndim != 1 or names != (LENGTH_FIELD, IDS_FIELD)
                or data.dtype[IDS_FIELD].ndim != 1 or len(data) == 0):
            raise UserError(f"{path} is not a prepared data file (expected records "
                            f"of '{LENGTH_FIELD}' and '{IDS_FIELD}'); run "
                            f"prepare_data.py again")
        self._data = data
        self.max_seq_length = int(data.dtype[IDS_FIELD].shape[0])
        self.lengths = np.asarray(data[LENGTH_FIELD], dtype=np.int64)
        if self.lengths.min() < 2 or self.lengths.max() > self.max_seq_length:
            raise UserError(f"{path} holds example lengths outside 2..{self.max_seq_length}: "
                            f"it is damaged; run prepare_data.py again")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_targets(self) -> int:
        """Tokens the LM predicts: every token but each example's first."""
        return int((self.lengths - 1).sum())

    def example(self, index: int) -> List[int]:
        """The token ids of one example, padding removed."""
        return self._data[IDS_FIELD][index, :self.lengths[index]].tolist()

    def batch(self, indices: Sequence[int], pad_id: int):
        """(ids int64 [B, T], lengths int64 [B]) with T the longest in the batch."""
        import torch
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        longest = int(lengths.max())
        ids = np.asarray(self._data[IDS_FIELD][indices, :longest], dtype=np.int64)
        # Records are padded with EOS already; pad_id only matters if it differs.
        ids[np.arange(longest)[None, :] >= lengths[:, None]] = pad_id
        return torch.from_numpy(ids), torch.from_numpy(lengths)

    def batches_by_length(self, batch_size: int) -> List[np.ndarray]:
        """Index batches covering every example once, similar lengths together.

        For evaluation and generation, where order does not matter: sorting
        keeps padding, and so wasted compute, to a minimum.
        """
        order = np.argsort(self.lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
