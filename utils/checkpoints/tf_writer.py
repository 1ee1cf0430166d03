"""Write TensorFlow V2 checkpoints (a "tensor bundle") without TensorFlow.

The inverse of utils/checkpoints/tf_reader.py, whose docstring describes the format.
For a prefix P, `write_tf_checkpoint` writes

- `P.data-00000-of-00001`: the tensors' raw little-endian bytes, back to back,
  in the order they arrive. Tensors are taken one at a time from an iterable,
  so a caller that produces them lazily never holds more than one in memory;
- `P.index`: a LevelDB-style sorted table built as TensorFlow's
  `table::TableBuilder` builds it (256 KiB data blocks, a restart point every
  16 entries, an empty metaindex block, an index block whose keys are TF's
  shortest separators, the 48-byte footer with the table magic), holding the
  BundleHeaderProto under the empty key and a BundleEntryProto (dtype, shape,
  shard 0, offset, size, masked crc32c of the bytes) per tensor name. For the
  same tensors written in the same order the index is byte for byte the one
  TensorFlow writes (checked against the fixtures in tests/fixtures/tf_gpt2).

Both files go to temporary files first and are renamed into place together
once complete (data, then index: the index is what readers open first).

`write_tf_checkpoint_dir` adds what an OpenAI model directory has around the
bundle: `model.ckpt.meta` (see `meta_graph_def`) and the `checkpoint` state
file naming the prefix, written last.

Which TensorFlow readers need `model.ckpt.meta`: none of `tf.train.load_checkpoint`,
`tf.train.list_variables`, `tf.train.NewCheckpointReader` or
`tf.compat.v1.train.Saver(...).restore` into a graph the caller built (as
OpenAI's gpt-2 `src/` code and transformers' `load_tf_weights_in_gpt2` do);
only `tf.compat.v1.train.import_meta_graph`, which rebuilds the graph from it.
The one written here is enough for that: VariableV2 nodes of the tensors'
dtypes and shapes, and a V2 saver's save and restore ops.
"""
import os
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from utils.atomic import atomic_write, interrupts_held
from utils.temp_files import remove_if_present, temp_name_beside
from utils.checkpoints.crc32c import crc32c
from utils.checkpoints.tf_reader import (BLOCK_TRAILER_SIZE, BUNDLE_VERSION, DEFAULT_PREFIX,
                                         STATE_FILE, TF_DTYPES,
                                 FOOTER_SIZE, TABLE_MAGIC, mask_crc, shard_path)

# TensorFlow's DataType code and little-endian stored numpy dtype, by TF's name.
_CODE_OF = {name: code for code, (name, _) in TF_DTYPES.items()}
_STORED_OF = {name: np.dtype(stored) for name, stored in TF_DTYPES.values()}
# table::Options defaults that TensorFlow's BundleWriter keeps.
_BLOCK_SIZE = 262144
_RESTART_INTERVAL = 16
_BLOCK_HANDLE_MAX = 20  # two varint64s: each handle's room in the footer

Tensor = Union[np.ndarray, torch.Tensor]
# (name, tensor) or (name, tensor, TF dtype name), e.g. ("x", array, "bfloat16").
TensorItem = Union[Tuple[str, Tensor], Tuple[str, Tensor, str]]
# What was written, per name: (TF dtype name, shape).
Written = Dict[str, Tuple[str, Tuple[int, ...]]]


# ---------------------------------------------------------------------------
# Protobuf wire format, encoding side (utils.checkpoints.tf_reader decodes)

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s take ten bytes, as protobuf writes them
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    """A varint field; proto3 leaves out zeros."""
    return _varint(number << 3) + _varint(value) if value else b""


def _bytes_field(number: int, data: bytes) -> bytes:
    """A length-delimited field (bytes, string or sub-message), always written."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fixed32_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<I", value)


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _packed_ints(number: int, values: Sequence[int]) -> bytes:
    return _bytes_field(number, b"".join(_varint(v) for v in values)) if values else b""


def _shape_proto(shape: Sequence[int]) -> bytes:
    """TensorShapeProto: one Dim {size} per axis."""
    return b"".join(_bytes_field(2, _int_field(1, size)) for size in shape)


def _bundle_entry(code: int, shape: Sequence[int], offset: int, size: int,
                  crc: int) -> bytes:
    """BundleEntryProto of a tensor in shard 0."""
    return (_int_field(1, code) + _bytes_field(2, _shape_proto(shape)) +
            _int_field(4, offset) + _int_field(5, size) + _fixed32_field(6, mask_crc(crc)))


def _bundle_header() -> bytes:
    """BundleHeaderProto: one shard, little-endian (0), version {producer: 1}."""
    return _int_field(1, 1) + _bytes_field(3, _int_field(1, BUNDLE_VERSION))


# ---------------------------------------------------------------------------
# The sorted table (.index)

class _BlockBuilder:
    """One table block: prefix-compressed entries, then the restart offsets."""

    def __init__(self, restart_interval: int):
        self.restart_interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.count = 0  # entries since the last restart point
        self.last_key = b""
        self.empty = True

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < self.restart_interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.count = 0
        self.buffer += (_varint(shared) + _varint(len(key) - shared) + _varint(len(value)) +
                        key[shared:] + value)
        self.last_key, self.count, self.empty = key, self.count + 1, False

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buffer) + struct.pack(f"<{len(self.restarts) + 1}I",
                                                *self.restarts, len(self.restarts))


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (TF's FindShortestSeparator)."""
    common = 0
    while common < min(len(start), len(limit)) and start[common] == limit[common]:
        common += 1
    if common < min(len(start), len(limit)):
        byte = start[common]
        if byte < 0xFF and byte + 1 < limit[common]:
            return start[:common] + bytes([byte + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    """A short key >= key (TF's FindShortSuccessor)."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def build_table(entries: List[Tuple[bytes, bytes]], block_size: int = _BLOCK_SIZE) -> bytes:
    """The bytes of a sorted table holding `entries` (keys strictly increasing)."""
    out = bytearray()
    index = _BlockBuilder(restart_interval=1)

    def write_block(block: _BlockBuilder) -> bytes:
        """Append the block and its trailer; return its BlockHandle."""
        contents = block.finish() + b"\x00"  # + compression type: none
        handle = _varint(len(out)) + _varint(len(contents) - 1)
        out.extend(contents + struct.pack("<I", mask_crc(crc32c(contents))))
        return handle

    data = _BlockBuilder(_RESTART_INTERVAL)
    pending = None  # handle of the last data block, indexed once the next key is known
    data_last_key = b""
    for key, value in entries:
        if pending is not None:
            index.add(_shortest_separator(data_last_key, key), pending)
            pending = None
        data.add(key, value)
        data_last_key = key
        if data.size_estimate() >= block_size:
            pending, data = write_block(data), _BlockBuilder(_RESTART_INTERVAL)
    if not data.empty:
        pending = write_block(data)
    metaindex = write_block(_BlockBuilder(_RESTART_INTERVAL))
    if pending is not None:
        index.add(_short_successor(data_last_key), pending)
    index_handle = write_block(index)
    footer = (metaindex + index_handle).ljust(2 * _BLOCK_HANDLE_MAX, b"\x00")
    out += footer + struct.pack("<Q", TABLE_MAGIC)
    assert len(footer) + 8 == FOOTER_SIZE and BLOCK_TRAILER_SIZE == 5
    return bytes(out)


# ---------------------------------------------------------------------------
# Tensors to stored bytes

def _stored_array(name: str, tensor: Tensor, tf_dtype: Optional[str]) -> Tuple[str, np.ndarray]:
    """(TF dtype name, C-contiguous little-endian array of the bytes TF stores).

    A torch bfloat16 tensor is stored as bfloat16; a float array with
    tf_dtype "bfloat16" is rounded to it (exact for what our reader returns,
    which widened stored bfloat16 values).
    """
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            if tf_dtype not in (None, "bfloat16"):
                tensor = tensor.float()
            else:
                return "bfloat16", tensor.contiguous().view(torch.int16).numpy().view("<u2")
        array = tensor.numpy()
    else:
        array = np.asarray(tensor)
    if tf_dtype == "bfloat16" and array.dtype != np.uint16:
        bits = torch.from_numpy(_c_array(array, np.dtype(np.float32))).to(torch.bfloat16)
        return "bfloat16", bits.view(torch.int16).numpy().view("<u2")
    name_of_dtype = tf_dtype or array.dtype.name
    if name_of_dtype not in _STORED_OF:
        raise ValueError(f"tensor {name!r} has dtype {name_of_dtype}, which a TensorFlow "
                         f"checkpoint cannot hold here (supported: {', '.join(_STORED_OF)})")
    return name_of_dtype, _c_array(array, _STORED_OF[name_of_dtype])


def _c_array(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` as C-contiguous `dtype` (np.ascontiguousarray would make a scalar 1-d)."""
    out = np.asarray(array, dtype=dtype)
    return out if out.flags.c_contiguous else out.copy(order="C")


def _split_item(item: TensorItem) -> Tuple[str, Tensor, Optional[str]]:
    if len(item) == 2:
        return item[0], item[1], None
    return item[0], item[1], item[2]


# ---------------------------------------------------------------------------
# Writing

def _replace_all(temps: List[Tuple[str, str]]) -> None:
    """All renamed into place, or (on an error) none after the failing one: never
    a new data file beside the old index because a Ctrl-C fell in between."""
    with interrupts_held():
        for tmp, path in temps:
            os.replace(tmp, path)


def write_tf_checkpoint(prefix: str, tensors: Iterable[TensorItem],
                        block_size: int = _BLOCK_SIZE) -> Written:
    """Write the V2 bundle `prefix`.index + `prefix`.data-00000-of-00001.

    `tensors` yields (name, array or torch tensor[, TF dtype name]) in any
    order; names must be unique and non-empty. Each tensor's bytes are
    written and checksummed as it arrives and not kept. Returns name ->
    (TF dtype name, shape), sorted by name. Nothing is left at `prefix` if
    anything fails (the previous files, if any, stay).
    """
    data_path, index_path = shard_path(prefix, 0, 1), prefix + ".index"
    data_tmp = temp_name_beside(data_path)
    index_tmp = None
    try:
        entries: Dict[bytes, bytes] = {}
        written: Written = {}
        with open(data_tmp, "xb") as f:
            for item in tensors:
                name, tensor, tf_dtype = _split_item(item)
                key = name.encode("utf-8") if isinstance(name, str) else b""
                if not key or key in entries:
                    raise ValueError(f"tensor name {name!r} is empty, not a string, or "
                                     "given twice")
                stored_name, array = _stored_array(name, tensor, tf_dtype)
                offset = f.tell()
                f.write(array.data if array.size else b"")
                entries[key] = _bundle_entry(_CODE_OF[stored_name], array.shape, offset,
                                             array.nbytes, crc32c(array))
                written[name] = (stored_name, tuple(array.shape))
            f.flush()
            os.fsync(f.fileno())
        table = build_table([(b"", _bundle_header())] + sorted(entries.items()), block_size)
        index_tmp = temp_name_beside(index_path)
        with open(index_tmp, "xb") as f:
            f.write(table)
            f.flush()
            os.fsync(f.fileno())
        _replace_all([(data_tmp, data_path), (index_tmp, index_path)])
    except BaseException:
        for tmp in (data_tmp, index_tmp):
            remove_if_present(tmp)
        raise
    return dict(sorted(written.items()))


def write_checkpoint_state(directory: str, prefix_name: str = DEFAULT_PREFIX) -> None:
    """The `checkpoint` text file naming `prefix_name` (relative, as OpenAI's)."""
    quoted = prefix_name.replace("\\", "\\\\").replace('"', '\\"')
    with atomic_write(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as f:
        f.write(f'model_checkpoint_path: "{quoted}"\n'
                f'all_model_checkpoint_paths: "{quoted}"\n')


def write_tf_checkpoint_dir(directory: str, tensors: Iterable[TensorItem],
                            prefix_name: str = DEFAULT_PREFIX, meta: bool = True) -> Written:
    """A checkpoint as OpenAI's model directories hold it: DIR/model.ckpt.{data,index}
    (+ .meta unless `meta` is False), and DIR/checkpoint, written last."""
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, prefix_name)
    written = write_tf_checkpoint(prefix, tensors)
    if meta:
        with atomic_write(prefix + ".meta") as f:
            f.write(meta_graph_def(written))
    write_checkpoint_state(directory, prefix_name)
    return written


# ---------------------------------------------------------------------------
# model.ckpt.meta: a MetaGraphDef that import_meta_graph can restore from

_STRING = 7  # DataType DT_STRING
_GRAPH_PRODUCER = 27  # GraphDef version of TF 1.12, which OpenAI's GPT-2 used


def _attr(key: str, value: bytes) -> bytes:
    """One entry of NodeDef's attr map (field 5): {key, AttrValue}."""
    return _bytes_field(5, _bytes_field(1, key.encode()) + _bytes_field(2, value))


def _node(name: str, op: str, inputs: Sequence[str] = (), **attrs: bytes) -> bytes:
    """NodeDef {name, op, input..., attr...} (attrs in key order, as TF sorts them)."""
    body = _bytes_field(1, name.encode()) + _bytes_field(2, op.encode())
    body += b"".join(_bytes_field(3, i.encode()) for i in inputs)
    body += b"".join(_attr(k, attrs[k]) for k in sorted(attrs))
    return _bytes_field(1, body)  # GraphDef.node


def _type_attr(code: int) -> bytes:
    return _int_field(6, code)


def _shape_attr(shape: Sequence[int]) -> bytes:
    return _bytes_field(7, _shape_proto(shape))


def _string_tensor_attr(values: Sequence[str], shape: Sequence[int]) -> bytes:
    """AttrValue.tensor: a DT_STRING TensorProto {dtype, tensor_shape, string_val...}."""
    proto = _int_field(1, _STRING) + _bytes_field(2, _shape_proto(shape))
    proto += b"".join(_bytes_field(8, v.encode()) for v in values)
    return _bytes_field(8, proto)


def _saver_nodes(names: List[str], codes: List[int]) -> bytes:
    """The save/ scope of tf.compat.v1.train.Saver (V2 format) over `names`."""
    n = len(names)
    dtypes = _bytes_field(1, _packed_ints(6, codes))  # AttrValue.list.type
    nodes = _node("save/filename/input", "Const", dtype=_type_attr(_STRING),
                  value=_string_tensor_attr(["model"], []))
    nodes += _node("save/Const", "PlaceholderWithDefault", ["save/filename/input"],
                   dtype=_type_attr(_STRING), shape=_shape_attr([]))
    for op in ("SaveV2", "RestoreV2"):
        nodes += _node(f"save/{op}/tensor_names", "Const", dtype=_type_attr(_STRING),
                       value=_string_tensor_attr(names, [n]))
        nodes += _node(f"save/{op}/shape_and_slices", "Const", dtype=_type_attr(_STRING),
                       value=_string_tensor_attr([""] * n, [n]))
    scope_inputs = ["save/Const", "save/{op}/tensor_names", "save/{op}/shape_and_slices"]
    nodes += _node("save/SaveV2", "SaveV2",
                   [i.format(op="SaveV2") for i in scope_inputs] + names, dtypes=dtypes)
    nodes += _node("save/control_dependency", "Identity", ["save/Const", "^save/SaveV2"],
                   T=_type_attr(_STRING))
    nodes += _node("save/RestoreV2", "RestoreV2",
                   [i.format(op="RestoreV2") for i in scope_inputs], dtypes=dtypes)
    assigns = []
    for i, (name, code) in enumerate(zip(names, codes)):
        assigns.append(f"save/Assign_{i}")
        nodes += _node(assigns[-1], "Assign", [name, f"save/RestoreV2:{i}"],
                       T=_type_attr(code), use_locking=_int_field(5, 1),
                       validate_shape=_int_field(5, 1))
    nodes += _node("save/restore_all", "NoOp", ["^" + a for a in assigns])
    return nodes


def meta_graph_def(written: Written) -> bytes:
    """A serialized MetaGraphDef: a VariableV2 per tensor (name, dtype, shape)
    and a V2 saver (filename save/Const:0, save save/control_dependency:0,
    restore save/restore_all). `tf.compat.v1.train.import_meta_graph` rebuilds
    it and its Saver restores the bundle; no variable collections are written,
    so the variables are reached by name (graph.get_tensor_by_name("model/wte:0")).
    """
    names = sorted(written)
    codes = [_CODE_OF[written[name][0]] for name in names]
    nodes = b"".join(_node(name, "VariableV2", dtype=_type_attr(code),
                           shape=_shape_attr(written[name][1]), container=_bytes_field(2, b""),
                           shared_name=_bytes_field(2, b""))
                     for name, code in zip(names, codes))
    graph = nodes + _saver_nodes(names, codes) + _bytes_field(4, _int_field(1, _GRAPH_PRODUCER))
    saver = (_bytes_field(1, b"save/Const:0") + _bytes_field(2, b"save/control_dependency:0") +
             _bytes_field(3, b"save/restore_all") + _int_field(4, 5) +
             _float_field(6, 10000.0) + _int_field(7, 2))  # max_to_keep 5, version V2
    meta_info = _bytes_field(1, b"")  # meta_graph_version
    return _bytes_field(1, meta_info) + _bytes_field(2, graph) + _bytes_field(3, saver)
