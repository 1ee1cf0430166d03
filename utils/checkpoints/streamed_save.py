"""A .ckpt whose tensors are made one at a time: torch.save's own file, written
without ever holding all of its tensors (a sharded run gathers each from the
ranks just before it is written, and drops it after).

torch.save writes a state as a zip archive: the pickled structure first
(`data.pkl`, tensors as references to numbered storages), then one record of
raw bytes per storage, numbered in the order pickling meets them. Under
torch.serialization.skip_data, torch.save writes all of it but the bytes:
each record's room is reserved. So `save_streamed` saves a copy of the state
whose tensors are FakeTensors (a shape and a dtype, no memory), then asks for
each real tensor in that same order (depth-first, dicts in insertion order),
writes its bytes into its record, and writes the record's CRC-32 where zip
keeps it (the data descriptor after the bytes and the central directory), so
that the archive checks as an ordinary zip too. torch.load reads the result as
the torch.save of the full state, with or without mmap. The file is written
atomically (utils/atomic.py).
"""
import os
import struct
import zipfile
import zlib
from typing import Any, Callable, Dict, List

import torch

from utils.atomic import atomic_write

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")   # 30 bytes, names and extra follow
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_CENTRAL_SIZE = 46


def tensors_in_order(state: Any) -> List[torch.Tensor]:
    """The distinct tensors of `state` in the order torch.save numbers their
    storages: depth-first, dicts in insertion order, each object once."""
    seen, order = set(), []

    def visit(obj):
        if torch.is_tensor(obj):
            if id(obj) not in seen:
                seen.add(id(obj))
                order.append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(state)
    return order


def _skeleton(state: Any, fakes: Dict[int, torch.Tensor]) -> Any:
    """`state` with every tensor replaced by its FakeTensor in `fakes`."""
    if torch.is_tensor(state):
        return fakes[id(state)]
    if isinstance(state, dict):
        return type(state)((key, _skeleton(value, fakes)) for key, value in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(_skeleton(value, fakes) for value in state)
    return state


def save_streamed(path: str, state: Dict[str, Any],
                  materialize: Callable[[torch.Tensor], torch.Tensor],
                  write: bool = True) -> None:
    """torch.save `state` to `path`, each tensor replaced by
    `materialize(tensor)` (a CPU tensor of the same shape and dtype) just
    before its bytes are written; only one materialized tensor is alive at a
    time. Without `write` nothing is written, but `materialize` is still called
    for every tensor in the same order: in a sharded run every rank calls this
    (it gathers), and rank 0 alone writes."""
    tensors = tensors_in_order(state)
    if not write:
        for tensor in tensors:
            materialize(tensor)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode  # the partner of skip_data
    with FakeTensorMode():
        fakes = {id(t): torch.empty(tuple(t.shape), dtype=t.dtype) for t in tensors}
    skeleton = _skeleton(state, fakes)
    with atomic_write(path, "w+b") as f:
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, f)
        f.flush()
        records = _data_records(f, [fakes[id(t)] for t in tensors])
        fd = f.fileno()
        crcs = {}
        for tensor, (name, offset, size, crc_at) in zip(tensors, records):
            full = materialize(tensor)
            if tuple(full.shape) != tuple(tensor.shape) or full.dtype != tensor.dtype:
                raise ValueError(f"materialize gave {full.dtype} {tuple(full.shape)} for a "
                                 f"{tensor.dtype} {tuple(tensor.shape)} tensor")
            crcs[name] = _write_at(fd, offset, full, size, crc_at)
            del full
        _write_crcs(fd, f, crcs)


def _data_records(f, fakes: List[torch.Tensor]):
    """(name, byte offset, size, where its CRC-32 goes) of each tensor's
    record, in numbering order, checked against the tensors' sizes."""
    with zipfile.ZipFile(f) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    prefix = next(name for name in infos if name.endswith("/data.pkl"))[:-len("data.pkl")]
    records = []
    for key, fake in enumerate(fakes):
        info = infos.get(f"{prefix}data/{key}")
        size = fake.numel() * fake.element_size()
        if info is None or info.file_size != size:
            raise RuntimeError(f"torch.save numbered the tensors otherwise than "
                               f"save_streamed expects (record {key})")
        header = _LOCAL_HEADER.unpack(os.pread(f.fileno(), _LOCAL_HEADER.size,
                                                info.header_offset))
        flags, name_len, extra_len = header[2], header[-2], header[-1]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        # Bit 3: the CRC follows the bytes (a data descriptor); else it is
        # the local header's.
        crc_at = start + size if flags & 8 else info.header_offset + 14
        records.append((info.filename, start, size, crc_at))
    if sum(name.startswith(f"{prefix}data/") for name in infos) != len(records):
        raise RuntimeError("torch.save wrote more tensors than save_streamed expects")
    return records


def _write_at(fd: int, offset: int, tensor: torch.Tensor, size: int, crc_at: int) -> int:
    """Write the tensor's bytes at `offset` and their CRC-32 at `crc_at` (a
    data descriptor's may start with a signature); the CRC-32."""
    data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    crc = zlib.crc32(data)
    done = 0
    while done < size:
        done += os.pwrite(fd, data[done:], offset + done)
    if os.pread(fd, 4, crc_at) == _DESCRIPTOR_SIGNATURE:
        crc_at += 4
    os.pwrite(fd, struct.pack("<I", crc), crc_at)
    return crc


def _write_crcs(fd: int, f, crcs: Dict[str, int]) -> None:
    """The central directory's CRC-32 of each record in `crcs`."""
    with zipfile.ZipFile(f) as archive:
        # start_dir: where zipfile found the central directory (set on opening).
        position, count = archive.start_dir, len(archive.infolist())
    for _ in range(count):
        entry = os.pread(fd, _CENTRAL_SIZE, position)
        if entry[:4] != _CENTRAL_SIGNATURE:
            raise RuntimeError("unexpected zip layout from torch.save")
        name_len, extra_len, comment_len = struct.unpack("<HHH", entry[28:34])
        name = os.pread(fd, name_len, position + _CENTRAL_SIZE).decode("utf-8")
        if name in crcs:
            os.pwrite(fd, struct.pack("<I", crcs[name]), position + 16)
        position += _CENTRAL_SIZE + name_len + extra_len + comment_len
