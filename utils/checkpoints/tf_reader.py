"""Read TensorFlow V2 checkpoints (OpenAI's GPT-2 `model.ckpt.*`) without TensorFlow.

A V2 checkpoint ("tensor bundle") with prefix P is:

- `P.index`: a LevelDB-style sorted table. Its last 48 bytes are a footer
  (two block handles, then a magic number); data blocks hold prefix-compressed
  key/value entries followed by an array of restart offsets; every block is
  followed by a 5-byte trailer (compression type, masked crc32c). The entry
  with the empty key is a BundleHeaderProto (shard count, endianness,
  version); every other key is a tensor name whose value is a
  BundleEntryProto (dtype, shape, shard, offset, size, masked crc32c).
- `P.data-0000K-of-0000N`: the raw little-endian tensor bytes.

`TFCheckpointReader` parses the index with a small protobuf wire-format
decoder, memory-maps the data shards and returns tensors as numpy arrays
backed by the map (copy-on-write), so even the 6.2 GB 1558M model never needs
its size twice in RAM. The checks TensorFlow makes are made here too: block
checksums, the version, each tensor's size and crc32c. Any problem raises
`TFCheckpointError` naming the file and what to do about it. The crc32c
itself is `utils.checkpoints.crc32c` (the google-crc32c package when installed, numpy
otherwise).
"""
import difflib
import mmap
import os
import re
import struct
from typing import Dict, List, Tuple

import numpy as np

from utils.checkpoints.crc32c import crc32c
from utils.checkpoints.pages import inner_pages
from utils.errors import UserError

STATE_FILE = "checkpoint"      # TF's file naming a folder's latest checkpoint prefix
DEFAULT_PREFIX = "model.ckpt"  # the prefix TF's Saver (and OpenAI) used


class TFCheckpointError(UserError):
    """A TensorFlow checkpoint that is missing, corrupt or in an unsupported form."""


REDOWNLOAD = "delete it and download the model again"

# ---------------------------------------------------------------------------
# LevelDB's masked crc32c (a crc stored beside the data it covers)

_MASK_DELTA = 0xA282EAD8


def unmask_crc(masked: int) -> int:
    """Undo LevelDB's crc masking (rotate right 15 bits, plus a constant)."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Protobuf wire format (just what the bundle protos use)

def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    """Decode a base-128 varint at `pos`; return (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_message(buf: bytes) -> Dict[int, List]:
    """Field number -> list of raw values (int for varint/fixed, bytes for
    length-delimited). Unknown fields are kept and ignored by the callers."""
    fields: Dict[int, List] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated fixed64")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            value = bytes(buf[pos:pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated fixed32")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if number == 0:
            raise ValueError("field number 0")
        fields.setdefault(number, []).append(value)
    return fields


def _int(fields: Dict[int, List], number: int) -> int:
    """A scalar integer field (proto3: the last occurrence wins; absent = 0)."""
    value = fields[number][-1] if number in fields else 0
    if not isinstance(value, int):
        raise ValueError(f"field {number} should be a number")
    return value


def _message(fields: Dict[int, List], number: int) -> Dict[int, List]:
    """A singular sub-message field, parsed (absent = empty message)."""
    value = fields[number][-1] if number in fields else b""
    if not isinstance(value, bytes):
        raise ValueError(f"field {number} should be a message")
    return _parse_message(value)


def _repeated_ints(fields: Dict[int, List], number: int) -> List[int]:
    """A repeated integer field, packed or not."""
    out = []
    for value in fields.get(number, []):
        if isinstance(value, bytes):  # packed
            pos = 0
            while pos < len(value):
                item, pos = _varint(value, pos)
                out.append(item)
        else:
            out.append(value)
    return out


# ---------------------------------------------------------------------------
# The sorted-table (.index) file

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5


def _read_block(index: bytes, handle: bytes, path: str, what: str) -> bytes:
    """The verified contents of the block a BlockHandle points at."""
    try:
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
    except ValueError:
        raise TFCheckpointError(f"{path} is corrupt (bad {what} block handle); {REDOWNLOAD}")
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(index) - FOOTER_SIZE:
        raise TFCheckpointError(f"{path} is corrupt ({what} block lies outside the file); "
                                f"{REDOWNLOAD}")
    contents = index[offset:end]
    compression = index[end]
    stored = unmask_crc(struct.unpack_from("<I", index, end + 1)[0])
    if crc32c(index[offset:end + 1]) != stored:
        raise TFCheckpointError(f"{path} is corrupt (checksum mismatch in a {what} block "
                                f"at byte {offset}); {REDOWNLOAD}")
    if compression != 0:
        raise TFCheckpointError(f"{path} uses block compression type {compression}, which "
                                "TensorFlow never writes for checkpoints; it is not a "
                                "checkpoint index this reader supports")
    return contents


def _block_entries(block: bytes, path: str) -> List[Tuple[bytes, bytes]]:
    """Key/value pairs of one table block (keys share prefixes with the
    previous key; the block ends with uint32 restart offsets and their count)."""
    def corrupt(why):
        return TFCheckpointError(f"{path} is corrupt ({why}); {REDOWNLOAD}")

    if len(block) < 4:
        raise corrupt("block too short")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise corrupt("bad restart count")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, limit))
    entries, key, pos = [], b"", 0
    try:
        while pos < limit:
            start = pos
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            value_len, pos = _varint(block, pos)
            if shared > len(key) or pos + unshared + value_len > limit:
                raise corrupt("bad block entry")
            if start in restarts and shared:
                raise corrupt("restart entry shares a prefix")
            key = key[:shared] + block[pos:pos + unshared]
            pos += unshared
            entries.append((key, block[pos:pos + value_len]))
            pos += value_len
    except ValueError as err:
        raise corrupt(str(err))
    return entries


def _read_table(index: bytes, path: str) -> List[Tuple[bytes, bytes]]:
    """Every key/value pair in the table, in key order."""
    if len(index) < FOOTER_SIZE or \
            struct.unpack_from("<Q", index, len(index) - 8)[0] != TABLE_MAGIC:
        raise TFCheckpointError(f"{path} is not a TensorFlow checkpoint index (bad magic "
                                "number); it may be truncated or a different file: "
                                f"{REDOWNLOAD}")
    footer = index[len(index) - FOOTER_SIZE:len(index) - 8]
    try:
        _, pos = _varint(footer, 0)
        _, pos = _varint(footer, pos)  # metaindex handle: TF writes an empty one
        index_handle = footer[pos:]
    except ValueError:
        raise TFCheckpointError(f"{path} is corrupt (bad footer); {REDOWNLOAD}")
    entries = []
    for _, handle in _block_entries(_read_block(index, index_handle, path, "index"), path):
        entries += _block_entries(_read_block(index, handle, path, "data"), path)
    keys = [k for k, _ in entries]
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise TFCheckpointError(f"{path} is corrupt (keys out of order); {REDOWNLOAD}")
    return entries


# ---------------------------------------------------------------------------
# Bundle protos

# TF DataType enum -> little-endian numpy dtype of the stored bytes.
TF_DTYPES = {
    1: ("float32", "<f4"), 2: ("float64", "<f8"), 3: ("int32", "<i4"),
    4: ("uint8", "u1"), 5: ("int16", "<i2"), 6: ("int8", "i1"),
    8: ("complex64", "<c8"), 9: ("int64", "<i8"), 10: ("bool", "?"),
    14: ("bfloat16", "<u2"), 17: ("uint16", "<u2"), 18: ("complex128", "<c16"),
    19: ("float16", "<f2"), 22: ("uint32", "<u4"), 23: ("uint64", "<u8"),
}
_DTYPE_NAMES = {7: "string", 20: "resource", 21: "variant"}
BUNDLE_VERSION = 1  # the bundle format version this reader implements


class _Entry:
    """One tensor's BundleEntryProto."""
    __slots__ = ("name", "tf_dtype", "stored_dtype", "shape", "shard", "offset", "size",
                 "crc")

    def __init__(self, name: str, value: bytes, path: str):
        try:
            fields = _parse_message(value)
            shape = _message(fields, 2)
            dims = []
            for dim in shape.get(2, []):
                if not isinstance(dim, bytes):
                    raise ValueError("bad shape")
                dims.append(_signed64(_int(_parse_message(dim), 1)))
            unknown_rank = _int(shape, 3)
            dtype_code, shard = _int(fields, 1), _int(fields, 3)
            offset, size = _signed64(_int(fields, 4)), _signed64(_int(fields, 5))
            crc = _int(fields, 6)
        except ValueError as err:
            raise TFCheckpointError(f"{path} is corrupt (entry for {name!r}: {err}); "
                                    f"{REDOWNLOAD}")
        if dtype_code not in TF_DTYPES:
            kind = _DTYPE_NAMES.get(dtype_code, f"DataType {dtype_code}")
            raise TFCheckpointError(f"tensor {name!r} in {path} has dtype {kind}, which this "
                                    "reader does not support (GPT-2 checkpoints hold "
                                    "numeric tensors only)")
        if 7 in fields:
            raise TFCheckpointError(f"tensor {name!r} in {path} is partitioned into slices, "
                                    "which this reader does not support; save the "
                                    "checkpoint without partitioned variables")
        if unknown_rank or any(d < 0 for d in dims):
            raise TFCheckpointError(f"{path} is corrupt (tensor {name!r} has an unknown "
                                    f"shape); {REDOWNLOAD}")
        self.name = name
        self.tf_dtype, stored = TF_DTYPES[dtype_code]
        self.stored_dtype = np.dtype(stored)
        self.shape = tuple(dims)
        self.shard, self.offset, self.size = shard, offset, size
        self.crc = unmask_crc(crc & 0xFFFFFFFF)  # TF stores the masked crc32c
        expected = self.stored_dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
        if self.size != expected or self.offset < 0:
            raise TFCheckpointError(
                f"{path} is corrupt (tensor {name!r}: {self.size} bytes recorded for "
                f"{self.tf_dtype} {list(self.shape)}, which needs {expected}); {REDOWNLOAD}")

    @property
    def dtype(self) -> np.dtype:
        """The dtype `read` returns (bfloat16 widens to float32)."""
        return np.dtype(np.float32) if self.tf_dtype == "bfloat16" else \
            self.stored_dtype.newbyteorder("=")


def _parse_header(value: bytes, path: str) -> int:
    """Check the BundleHeaderProto; return the number of data shards."""
    try:
        fields = _parse_message(value)
        version = _message(fields, 3)
        num_shards, endianness = _int(fields, 1), _int(fields, 2)
        producer, min_consumer = _int(version, 1), _int(version, 2)
        bad_consumers = _repeated_ints(version, 3)
    except ValueError as err:
        raise TFCheckpointError(f"{path} is corrupt (header: {err}); {REDOWNLOAD}")
    if endianness != 0:
        raise TFCheckpointError(f"{path} was written on a big-endian machine, which this "
                                "reader does not support; re-save it on a little-endian one")
    if min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in bad_consumers:
        raise TFCheckpointError(f"{path} has unsupported checkpoint version (bundle format "
                                f"version {producer}, needs a reader of version "
                                f"{min_consumer}+; this reader implements version "
                                f"{BUNDLE_VERSION}); re-save it in TensorFlow's standard V2 "
                                "format (tf.compat.v1.train.Saver) or report the issue")
    if num_shards < 1:
        raise TFCheckpointError(f"{path} is corrupt (header says {num_shards} data shards); "
                                f"{REDOWNLOAD}")
    return num_shards


def _read_index(index_path: str) -> Tuple[int, Dict[str, _Entry]]:
    """(number of data shards, tensor name -> entry) of an index file, all checked."""
    try:
        with open(index_path, "rb") as f:
            index = f.read()
    except FileNotFoundError:
        raise TFCheckpointError(f"checkpoint index {index_path} not found; check the "
                                f"path, or {REDOWNLOAD}")
    except OSError as err:
        raise TFCheckpointError(f"cannot read {index_path}: {err.strerror}")
    entries = _read_table(index, index_path)
    if not entries or entries[0][0] != b"":
        raise TFCheckpointError(f"{index_path} is corrupt (no bundle header); {REDOWNLOAD}")
    num_shards = _parse_header(entries[0][1], index_path)
    tensors: Dict[str, _Entry] = {}
    for key, value in entries[1:]:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise TFCheckpointError(f"{index_path} is corrupt (tensor name is not UTF-8); "
                                    f"{REDOWNLOAD}")
        entry = _Entry(name, value, index_path)
        if not 0 <= entry.shard < num_shards:
            raise TFCheckpointError(f"{index_path} is corrupt (tensor {name!r} is in shard "
                                    f"{entry.shard} of {num_shards}); {REDOWNLOAD}")
        tensors[name] = entry
    return num_shards, tensors


# ---------------------------------------------------------------------------
# The reader

def shard_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


class TFCheckpointReader:
    """The tensors of a TF V2 checkpoint, read without TensorFlow.

    `prefix` is what TF calls the checkpoint path, e.g. DIR/model.ckpt (see
    `resolve_checkpoint_prefix` for friendlier forms). The index is parsed
    and checked on open, and every data shard is checked to exist and be long
    enough. `read` checks each tensor's crc32c unless `verify=False`.
    Arrays from `read` are backed by a copy-on-write map of the data file:
    pages are loaded when touched and writing to the array never changes the
    file. They stay valid after `close`.
    """

    def __init__(self, prefix: str, verify: bool = True):
        self.prefix = prefix
        self.verify = verify
        self.index_path = prefix + ".index"
        self.num_shards, self._entries = _read_index(self.index_path)
        self._maps: List = [None] * self.num_shards
        self._check_shards()

    def _check_shards(self) -> None:
        """Every shard exists and holds every byte the index points into."""
        sizes = []
        for shard in range(self.num_shards):
            path = shard_path(self.prefix, shard, self.num_shards)
            try:
                sizes.append(os.path.getsize(path))
            except OSError:
                raise TFCheckpointError(f"checkpoint data file {path} is missing; "
                                        f"{REDOWNLOAD}")
        for entry in self._entries.values():
            if entry.offset + entry.size > sizes[entry.shard]:
                path = shard_path(self.prefix, entry.shard, self.num_shards)
                raise TFCheckpointError(
                    f"checkpoint data file {path} is truncated ({sizes[entry.shard]} bytes, "
                    f"but tensor {entry.name!r} ends at byte {entry.offset + entry.size}); "
                    f"the download was probably interrupted: {REDOWNLOAD}")

    def _map(self, shard: int):
        if self._maps[shard] is None:
            path = shard_path(self.prefix, shard, self.num_shards)
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    self._maps[shard] = bytearray()
                else:  # copy-on-write: arrays are writable, the file never changes
                    self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[shard]

    def variables(self) -> Dict[str, Tuple[np.dtype, Tuple[int, ...]]]:
        """Tensor name -> (dtype `read` returns, shape), in name order."""
        return {name: (e.dtype, e.shape) for name, e in self._entries.items()}

    def tf_dtype(self, name: str) -> str:
        """TensorFlow's name of the stored dtype, e.g. "float32" or "bfloat16"."""
        return self._entry(name).tf_dtype

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; it holds {len(self._entries)} variables"
            raise TFCheckpointError(f"no variable {name!r} in checkpoint {self.prefix}{hint}")

    def read(self, name: str) -> np.ndarray:
        """The tensor `name`, in its stored shape (e.g. (1, 768, 2304) for c_attn/w)."""
        entry = self._entry(name)
        if self._maps is None:
            raise TFCheckpointError(f"checkpoint {self.prefix} was closed; open it again")
        buf = self._map(entry.shard)
        count = entry.size // entry.stored_dtype.itemsize
        raw = np.frombuffer(buf, dtype=entry.stored_dtype, count=count, offset=entry.offset)
        if self.verify and crc32c(raw) != entry.crc:
            path = shard_path(self.prefix, entry.shard, self.num_shards)
            raise TFCheckpointError(f"checksum mismatch for tensor {name!r} in {path}: the file "
                                    f"is corrupt; {REDOWNLOAD}")
        if entry.tf_dtype == "bfloat16":  # the high half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)
        if raw.dtype != entry.dtype:  # only on big-endian hosts
            raw = raw.astype(entry.dtype)
        return raw.reshape(entry.shape)

    def release(self, name: str) -> None:
        """Give back the resident pages of tensor `name`'s bytes once it has
        been copied out: a streamed load then holds one tensor of the file at
        a time. The map is private and never written, so reading the tensor
        again reads the file again."""
        entry = self._entry(name)
        buf = self._maps[entry.shard] if self._maps is not None else None
        if not isinstance(buf, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        span = inner_pages(entry.offset, entry.size)  # offsets: the map starts on a page
        if span is not None:
            buf.madvise(mmap.MADV_DONTNEED, *span)

    def close(self) -> None:
        """Release the maps; arrays already returned keep theirs alive."""
        for m in self._maps or []:
            if isinstance(m, mmap.mmap):
                try:
                    m.close()
                except BufferError:  # still exported to an array: freed with it
                    pass
        self._maps = None

    def __enter__(self) -> "TFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self._entries


# ---------------------------------------------------------------------------
# Finding the checkpoint

_CKPT_PATH_LINE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', re.M)


def _prefix_from_checkpoint_file(directory: str) -> str:
    """The prefix named by DIR/checkpoint (TF's CheckpointState text proto)."""
    state_path = os.path.join(directory, STATE_FILE)
    try:
        with open(state_path, encoding="utf-8") as f:
            match = _CKPT_PATH_LINE.search(f.read())
    except (OSError, UnicodeDecodeError) as err:
        raise TFCheckpointError(f"cannot read {state_path} ({err}); "
                                f"{REDOWNLOAD}") from None
    if not match:
        raise TFCheckpointError(f"{state_path} has no model_checkpoint_path line; "
                                f"{REDOWNLOAD}")
    named = re.sub(r"\\(.)", r"\1", match.group(1))
    prefix = named if os.path.isabs(named) else os.path.join(directory, named)
    if not os.path.exists(prefix + ".index"):
        # An absolute path recorded before the directory was moved.
        moved = os.path.join(directory, os.path.basename(named))
        if os.path.exists(moved + ".index"):
            return moved
        raise TFCheckpointError(f"{state_path} names checkpoint {named!r} but {prefix}.index "
                                f"does not exist; {REDOWNLOAD}")
    return prefix


def resolve_checkpoint_prefix(path: str) -> str:
    """The checkpoint prefix (P, with P.index existing) meant by `path`.

    Accepts the prefix itself (DIR/model.ckpt), its index file
    (DIR/model.ckpt.index), or a directory holding a TF `checkpoint` file
    that names the prefix (OpenAI's model directories have one) or, failing
    that, a model.ckpt.index.
    """
    if path.endswith(".index") and os.path.isfile(path):
        return path[:-len(".index")]
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return _prefix_from_checkpoint_file(path)
        default = os.path.join(path, DEFAULT_PREFIX)
        if os.path.exists(default + ".index"):
            return default
        raise TFCheckpointError(f"no TensorFlow checkpoint in directory {path}: it has "
                                "neither a 'checkpoint' file nor model.ckpt.index; point to "
                                "a GPT-2 model directory or download the model")
    if os.path.exists(path + ".index"):
        return path
    if os.path.isfile(path):
        raise TFCheckpointError(f"{path} is a file but {path}.index does not exist: pass the "
                                "checkpoint prefix (e.g. DIR/model.ckpt) or its directory; "
                                "old V1 checkpoints (a single model.ckpt file) are not "
                                "supported")
    raise TFCheckpointError(f"no TensorFlow checkpoint at {path}: neither {path}.index nor a "
                            "directory of that name exists; check the path or download the "
                            "model")


# ---------------------------------------------------------------------------
# Checking an index on its own (the downloader, before the data file exists)

def data_shard_sizes(index_path: str) -> Tuple[int, Dict[int, int]]:
    """(number of data shards, shard -> bytes it must hold), from an index file alone.

    Parses and checks `index_path` (any file name, e.g. a download's
    `.partial`) as TFCheckpointReader does: footer, block checksums, header,
    every tensor entry. The data files need not exist. A shard must hold
    exactly the end of its last tensor: TF writes a shard's tensors back to
    back, so a longer or shorter data file is not the one this index
    describes. Shards holding no tensor are absent from the dict.
    TFCheckpointError if the index is unreadable or corrupt.
    """
    num_shards, entries = _read_index(index_path)
    ends: Dict[int, int] = {}
    for entry in entries.values():
        ends[entry.shard] = max(ends.get(entry.shard, 0), entry.offset + entry.size)
    return num_shards, ends
