"""GPT-2's byte-level BPE tokenizer: text <-> token ids, exactly as OpenAI's.

The file name is the original texar GPT-2 example's (its `utils/processor.py`
held the tokenizer too), kept so that readers and scripts coming from that
example find it where they expect.

GPT-2 tokenizes in three steps:

1. Pre-tokenize: a regular expression cuts the text into pieces (a word with
   its leading space, a run of digits, a run of punctuation, whitespace, or
   one of the English contractions 's 't 're 've 'm 'll 'd).
2. Each piece is encoded as UTF-8 and every byte becomes one base token, so
   any text at all can be tokenized (no "unknown" token).
3. Byte-pair merges from `vocab.bpe` are applied inside each piece, lowest
   rank first, until no listed pair is left. `encoder.json` names the ids.

Step 3 is the slow part and natural text repeats its words, so the ids of each
piece are cached. The vocabulary (`encoder.json` + `vocab.bpe`, or Hugging
Face's `vocab.json` + `merges.txt`, the same formats) is the one in a model
directory when it has both files, else the copy in utils/gpt2_vocab/.

Behaviour matches OpenAI's gpt-2 `encoder.py` id for id (checked against
tiktoken and Hugging Face `tokenizers` in tests/test_processor.py), including:

- "<|endoftext|>" written in the text is ordinary text (several tokens), as in
  OpenAI's encoder. Pass `allow_special=True` to turn each occurrence into the
  single end-of-text id 50256 instead (tiktoken's `allowed_special`).
- `decode` turns ids back into bytes and reads them as UTF-8, replacing
  invalid sequences with U+FFFD, so `decode(encode(s)) == s` for every valid
  string, and any id sequence decodes to something.
- A Python string can hold lone surrogates (e.g. from
  `bytes.decode(errors="surrogateescape")`). They are not valid Unicode and
  have no UTF-8 form; OpenAI's encoder fails on them, and so does `encode`,
  with a `UserError` saying where and how to clean the text.
- Which characters count as letters, digits or spaces comes from the Unicode
  tables of the installed `regex` package, as in OpenAI's encoder. Characters
  assigned in recent Unicode versions may therefore split differently from
  tokenizers built on older tables (tiktoken's Rust regex, for one); all
  characters of Unicode 14.0 and earlier give identical ids.
"""
import heapq
import operator
import os
from itertools import chain, repeat
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import regex

from utils.errors import UserError
from utils.input_files import read_regular_file
from utils.json_file import MAX_JSON_BYTES, JSONProblem, parse_json

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256  # id of EOS_TOKEN in GPT-2's encoder.json; GPT-2's BOS/EOS/PAD
ENCODER_FILE = "encoder.json"
MERGES_FILE = "vocab.bpe"
# The vocabulary files a model directory may hold: OpenAI's, then Hugging Face's.
VOCAB_FILE_PAIRS = ((ENCODER_FILE, MERGES_FILE), ("vocab.json", "merges.txt"))
SHIPPED_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "gpt2_vocab")
SHIPPED_VOCAB_FILES = (os.path.join(SHIPPED_VOCAB_DIR, ENCODER_FILE),
                       os.path.join(SHIPPED_VOCAB_DIR, MERGES_FILE))

# GPT-2's pre-tokenization pattern. It is case-sensitive ("'S" is not a
# contraction) and `\s+(?!\S)` leaves the last space of a run to the next word.
GPT2_SPLIT_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"""
                      r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

_SURROGATE = regex.compile(r"[\ud800-\udfff]")
_NO_MERGE = 1 << 62  # "rank" of a pair that has no merge; an int keeps min() fast
# Pieces up to this many bytes use the list-based merge loop (quadratic, but
# fastest for words); longer ones (whitespace runs, long blobs) use a heap.
_SHORT_PIECE_BYTES = 48
# Pieces longer than this many characters are not cached: they rarely repeat.
_MAX_CACHED_PIECE = 256
_CACHE_ENTRIES = 200_000  # about 40 MB at most; cleared when full


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's map from each byte value to the character that stands for it.

    The vocabulary files store tokens as text, so every byte needs a printable,
    non-space character. Bytes that already are one (ASCII '!'..'~' and
    Latin-1 '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes are
    given the characters U+0100, U+0101, ... in increasing byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    mapping = {}
    next_spare = 256
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(next_spare)
            next_spare += 1
    return mapping


class VocabularyError(ValueError):
    """The vocabulary content is inconsistent (turned into a UserError by the loader)."""


class _PieceCache(dict):
    """piece (str) -> tuple of ids; a miss runs BPE on the piece and stores it."""

    def __init__(self, encode_piece):
        super().__init__()
        self._encode_piece = encode_piece

    def __missing__(self, piece: str) -> Tuple[int, ...]:
        ids = self._encode_piece(piece)
        if len(piece) <= _MAX_CACHED_PIECE:
            if len(self) >= _CACHE_ENTRIES:
                self.clear()  # crude but bounded; hot words come back quickly
            self[piece] = ids
        return ids


def _bad_merge(rank: int, left: str, right: str, ids: Dict[str, int], made: set) -> str:
    """What is wrong with merge rule `rank` (left right), given the tokens
    `made` by bytes and the rules before it."""
    rule = f"merge rule {rank + 1} ({left} {right})"
    for part in (left, right, left + right):
        if part not in ids:
            return f"{rule} uses token {part!r}, which encoder.json does not have"
    for part in (left, right):
        if part not in made:
            return f"{rule} uses {part!r} before any earlier rule makes it"
    return (f"{rule} makes {left + right!r}, which a byte or an earlier rule "
            f"already makes")


class Encoder:
    """GPT-2 byte-level BPE tokenizer built from `encoder.json` and `vocab.bpe` contents.

    encoder: token string -> id (the parsed encoder.json).
    bpe_merges: the merge rules of vocab.bpe in file order (rank = position).
    Raises VocabularyError if the two do not form a usable vocabulary;
    `get_encoder` / `Encoder.from_files` turn that into a UserError naming the file.
    """

    def __init__(self, encoder: Dict[str, int],
                 bpe_merges: Sequence[Tuple[str, str]]):
        self.encoder = dict(encoder)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        self._check_ids()

        # Base token id of each byte value (bytes are the starting symbols).
        missing = [ch for ch in self.byte_encoder.values() if ch not in self.encoder]
        if missing:
            raise VocabularyError(
                f"encoder.json lacks {len(missing)} of the 256 byte tokens "
                f"(e.g. {missing[0]!r})")
        self._byte_ids = [self.encoder[self.byte_encoder[b]] for b in range(256)]

        # Merges as id pairs: (left id, right id) -> rank, and rank -> result id.
        self._pair_rank: Dict[Tuple[int, int], int] = {}
        self._merge_pair: List[Tuple[int, int]] = []
        self._merge_result: List[int] = []
        made = set(self.byte_encoder.values())  # tokens available so far
        ids = self.encoder
        for rank, (left, right) in enumerate(bpe_merges):
            joined = left + right
            # A BPE merge list in training order: each rule joins tokens made
            # by bytes or earlier rules, into a token no other rule makes. The
            # merge loops below rely on it to give OpenAI's results.
            if (left not in made or right not in made or joined in made
                    or joined not in ids):
                raise VocabularyError(_bad_merge(rank, left, right, ids, made))
            made.add(joined)
            pair = (ids[left], ids[right])
            self._pair_rank[pair] = rank
            self._merge_pair.append(pair)
            self._merge_result.append(ids[joined])

        # Bytes of every token, for decoding: each character of GPT-2's byte
        # alphabet stands for one byte (translated to latin-1, then encoded);
        # a latin-1 character outside the alphabet becomes one latin-1 cannot
        # encode, so that it fails like any other stranger.
        to_latin1 = {code: "\uffff" for code in range(256)}
        to_latin1.update({ord(ch): b for ch, b in self.byte_decoder.items()})
        self._id_bytes: Dict[int, bytes] = {}
        for token, i in self.encoder.items():
            try:
                self._id_bytes[i] = token.translate(to_latin1).encode("latin-1")
            except UnicodeEncodeError:
                raise VocabularyError(
                    f"encoder.json token {token!r} (id {i}) has a character "
                    f"outside GPT-2's byte alphabet") from None

        if EOS_TOKEN not in self.encoder:
            raise VocabularyError(f"encoder.json has no {EOS_TOKEN} token")
        self.eos_id = self.encoder[EOS_TOKEN]
        self._split = regex.compile(GPT2_SPLIT_PATTERN).findall
        self._cache = _PieceCache(self._encode_piece)

    def _check_ids(self) -> None:
        ids = self.encoder.values()
        if not all(type(i) is int for i in ids):
            raise VocabularyError("encoder.json values must all be integer ids")
        if len(self.decoder) != len(self.encoder) or (
                min(ids, default=0) != 0 or max(ids, default=-1) != len(ids) - 1):
            raise VocabularyError(
                "encoder.json ids must be 0, 1, ..., N-1, each used once")

    @classmethod
    def from_files(cls, encoder_path: str, merges_path: str) -> "Encoder":
        """Load and check `encoder.json` and `vocab.bpe`; any problem is a UserError."""
        fix = _fix_hint(encoder_path, merges_path)
        encoder = _read_encoder_json(encoder_path, fix)
        merges = _read_merges(merges_path, fix)
        try:
            return cls(encoder, merges)
        except VocabularyError as err:
            raise UserError(
                f"the tokenizer vocabulary {encoder_path} + {merges_path} is "
                f"unusable: {err}; {fix}") from None

    def __len__(self) -> int:
        return len(self.encoder)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, allow_special: bool = False) -> List[int]:
        """Token ids of `text`, the same as OpenAI's GPT-2 encoder gives.

        With `allow_special=True`, each "<|endoftext|>" in the text becomes the
        single id `eos_id` (useful to join documents in a training file);
        otherwise it is ordinary text, as in OpenAI's encoder.
        """
        if allow_special and EOS_TOKEN in text:
            ids: List[int] = []
            for n, part in enumerate(text.split(EOS_TOKEN)):
                if n:
                    ids.append(self.eos_id)
                ids += self._encode_ordinary(part)
            return ids
        return self._encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str],
                     allow_special: bool = False) -> List[List[int]]:
        """`encode` for each text (shares the piece cache)."""
        return [self.encode(text, allow_special) for text in texts]

    def _encode_ordinary(self, text: str) -> List[int]:
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__,
                                                self._split(text))))
        except UnicodeEncodeError:
            found = _SURROGATE.search(text)
            if found is None:
                raise
            raise UserError(
                f"the text has a lone surrogate U+{ord(found.group()):04X} at "
                f"character {found.start()}, which is not valid Unicode and "
                f"cannot be tokenized; read the input with errors='replace' "
                f"(or remove such characters) first") from None

    def _encode_piece(self, piece: str) -> Tuple[int, ...]:
        ids = list(map(self._byte_ids.__getitem__, piece.encode("utf-8")))
        if len(ids) <= _SHORT_PIECE_BYTES:
            return tuple(self._merge_short(ids))
        return tuple(self._merge_long(ids))

    def _merge_short(self, ids: List[int]) -> List[int]:
        """Apply the merges to one piece, in place: repeatedly merge the
        lowest-ranked adjacent pair, leftmost first, until no pair has a rank.

        This gives exactly OpenAI's result (it merges every occurrence of the
        lowest pair in one left-to-right pass): in a valid merge list a merge
        cannot create a pair ranked lower than itself, so the remaining
        occurrences of the same pair are simply merged next. `ranks[i]` is the
        rank of (ids[i], ids[i+1]); min() and index() run in C, so this is
        quick for word-sized pieces.
        """
        rank_of = self._pair_rank.get
        ranks = list(map(rank_of, zip(ids, ids[1:]), repeat(_NO_MERGE)))
        while ranks:
            best = min(ranks)
            if best == _NO_MERGE:
                break
            i = ranks.index(best)
            ids[i:i + 2] = [self._merge_result[best]]
            del ranks[i]
            if i < len(ranks):
                ranks[i] = rank_of((ids[i], ids[i + 1]), _NO_MERGE)
            if i:
                ranks[i - 1] = rank_of((ids[i - 1], ids[i]), _NO_MERGE)
        return ids

    def _merge_long(self, ids: List[int]) -> List[int]:
        """Same result as `_merge_short`, in O(n log n) for long pieces.

        Candidate pairs sit in a heap keyed by (rank, position), so the next
        merge is the lowest rank and, among equal ranks (the same pair), the
        leftmost: the order OpenAI's loop merges in. Symbols live in a linked
        list; heap entries made stale by an earlier merge are skipped.
        """
        rank_of = self._pair_rank.get
        n = len(ids)
        tokens: List = list(ids)  # None marks a symbol merged into its left neighbour
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = [(rank, i) for i, rank in enumerate(map(rank_of, zip(ids, ids[1:])))
                if rank is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if tokens[i] is None or j >= n or (tokens[i], tokens[j]) != self._merge_pair[rank]:
                continue  # stale: one of the two symbols changed since the push
            tokens[i] = self._merge_result[rank]
            tokens[j] = None
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                new_rank = rank_of((tokens[i], tokens[k]))
                if new_rank is not None:
                    heapq.heappush(heap, (new_rank, i))
            p = prv[i]
            if p >= 0:
                new_rank = rank_of((tokens[p], tokens[i]))
                if new_rank is not None:
                    heapq.heappush(heap, (new_rank, p))
        return [t for t in tokens if t is not None]

    # ----------------------------------------------------------------- decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes the ids stand for (a prefix may end mid-character)."""
        if hasattr(ids, "tolist"):  # numpy array, torch tensor
            if getattr(ids, "ndim", 1) != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got shape "
                                 f"{tuple(ids.shape)}")
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)  # a generator can only be read once
        table = self._id_bytes
        try:
            return b"".join(map(table.__getitem__, ids))
        except (KeyError, TypeError):
            pass  # slow path: find the bad id, or convert 0-d tensors/numpy ints
        out = []
        for i in ids:
            try:
                out.append(table[operator.index(i)])
            except (KeyError, TypeError):
                raise UserError(
                    f"token id {i!r} is outside the vocabulary of "
                    f"{len(table)} tokens (valid ids are 0..{len(table) - 1}); "
                    f"only ids made with this vocabulary can be decoded") from None
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# --------------------------------------------------------------------- loading

_ENCODERS: Dict[tuple, Tuple[tuple, Encoder]] = {}  # real paths -> (file stamps, encoder)


def vocab_files(model_dir: str) -> Optional[Tuple[str, str]]:
    """(encoder.json path, vocab.bpe path) of the vocabulary in `model_dir`, or
    None when it has none. Hugging Face directories hold the same two files
    as `vocab.json` and `merges.txt`; OpenAI's names win when both are there.
    A pair with one file missing is a UserError."""
    if not os.path.isdir(model_dir):
        raise UserError(f"model directory {model_dir} does not exist or is "
                        f"not a directory; check the path")
    for pair in VOCAB_FILE_PAIRS:
        has = {name: os.path.exists(os.path.join(model_dir, name)) for name in pair}
        if all(has.values()):
            return os.path.join(model_dir, pair[0]), os.path.join(model_dir, pair[1])
        if any(has.values()):
            present, missing = sorted(has, key=has.get, reverse=True)
            raise UserError(
                f"{model_dir} has {present} but not {missing}; the tokenizer needs "
                f"both: copy {missing} from the same model download, or remove "
                f"{present} to use the GPT-2 vocabulary shipped in utils/gpt2_vocab/")
    return None


def get_encoder(model_dir: Optional[str] = None) -> Encoder:
    """The GPT-2 tokenizer of `model_dir`, or the shipped one.

    If `model_dir` holds `encoder.json` and `vocab.bpe` (as OpenAI's model
    downloads do), or `vocab.json` and `merges.txt` (Hugging Face's names for
    them), they are used; if it holds neither, or `model_dir` is None, the
    copy shipped in utils/gpt2_vocab/ is. Encoders are cached per file
    (path, size and modification time), so repeated calls are cheap.
    """
    found = vocab_files(model_dir) if model_dir is not None else None
    encoder_path, merges_path = found or SHIPPED_VOCAB_FILES
    key = (os.path.realpath(encoder_path), os.path.realpath(merges_path))
    stamp = (_file_stamp(encoder_path), _file_stamp(merges_path))
    cached = _ENCODERS.get(key)
    if cached is None or cached[0] != stamp:  # new, or a file changed on disk
        cached = _ENCODERS[key] = (stamp, Encoder.from_files(encoder_path, merges_path))
    return cached[1]


def _file_stamp(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None  # reported properly when the file is read
    return (st.st_size, st.st_mtime_ns)


def _fix_hint(encoder_path: str, merges_path: str) -> str:
    """The fix for a bad tokenizer file, naming the two files as this
    directory names them (encoder.json/vocab.bpe, or vocab.json/merges.txt)."""
    vocab_dir = os.path.dirname(encoder_path)
    if os.path.realpath(vocab_dir) == os.path.realpath(SHIPPED_VOCAB_DIR):
        return ("restore the shipped files with "
                "`git checkout -- utils/gpt2_vocab`")
    names = f"{os.path.basename(encoder_path)} and {os.path.basename(merges_path)}"
    return (f"re-download {names} with the model, or delete both from {vocab_dir} "
            f"to use the GPT-2 vocabulary shipped in utils/gpt2_vocab/")


def _read_text(path: str, fix: str) -> str:
    if not os.path.lexists(path):
        raise UserError(f"tokenizer file {path} is missing; {fix}")
    try:
        data = read_regular_file(path, f"tokenizer file {path}", MAX_JSON_BYTES)
    except UserError as err:
        raise UserError(f"{err}; {fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"tokenizer file {path} is not UTF-8 text ({err.reason} "
                        f"at byte {err.start}); {fix}") from None


def _read_encoder_json(path: str, fix: str) -> Dict[str, int]:
    text = _read_text(path, fix)
    try:
        encoder = parse_json(text)
    except JSONProblem as err:
        raise UserError(f"tokenizer file {path} is corrupt: it {err}; {fix}") from None
    if not isinstance(encoder, dict) or not encoder:
        raise UserError(f"tokenizer file {path} is corrupt: expected a JSON "
                        f"object mapping tokens to ids; {fix}")
    return encoder


def _read_merges(path: str, fix: str) -> List[Tuple[str, str]]:
    lines = _read_text(path, fix).split("\n")
    if not lines[0].startswith("#version"):
        raise UserError(f"tokenizer file {path} is corrupt: the first line should "
                        f"be a '#version' header, found {lines[0][:40]!r}; {fix}")
    merges = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue  # the trailing newline (and any blank line)
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"tokenizer file {path} is corrupt: line {number} "
                            f"should be two tokens separated by a space, found "
                            f"{line[:40]!r}; {fix}")
        merges.append((parts[0], parts[1]))
    return merges
