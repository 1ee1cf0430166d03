"""Writing prepared records whose count is known only at the end, and holding out a dev split.

`RecordSpool` collects records in a temporary file beside the output (packed
windows: how many there are is known only once the text is encoded);
`write_records` writes any array of records to `<split>.npy` atomically.
`--dev_fraction` takes the last windows of a packed train stream, or a seeded
sample of the line examples, as dev.npy (`dev_count`, `sampled_dev_mask`).
"""
from typing import Optional

import numpy as np

import dataclasses

from utils.temp_files import remove_if_present
from utils.temp_files import temp_name_beside
from utils.errors import UserError
from utils.data.prepare import write_error
from utils.data.prepare import create_records
from utils.data.prepare import sync_records
from utils.data.prepare import records_file
from utils.data.prepare import prepare_split

# Records copied to the output at a time: bounded memory whatever the split's size.
COPY_RECORDS = 1 << 16


class RecordSpool:
    """Records appended to a temporary file beside `out_path`; removed by `close`."""

    def __init__(self, out_path: str, dtype: np.dtype):
        self.out_path, self.dtype, self.count = out_path, dtype, 0
        try:
            self.path = temp_name_beside(out_path)
        except OSError as err:
            raise write_error(out_path, err) from None
        self._file = None  # created by the first append, once `close` can find it

    def append(self, records: np.ndarray) -> None:
        try:
            if self._file is None:
                self._file = open(self.path, "xb")
            self._file.write(records.tobytes())
        except OSError as err:
            raise write_error(self.out_path, err) from None
        self.count += len(records)

    def records(self) -> np.ndarray:
        """Everything appended, memory-mapped read-only."""
        if self.count == 0:
            return np.zeros(0, dtype=self.dtype)
        self._file.flush()
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        remove_if_present(self.path)


def write_records(out_path: str, records: np.ndarray,
                  rows: Optional[np.ndarray] = None) -> None:
    """`records` (those at `rows`, an index array, when given) as a prepared
    `.npy` at `out_path`, replacing it only once complete."""
    if rows is None:
        rows = np.arange(len(records))
    with records_file(out_path) as tmp_path:
        out = create_records(tmp_path, out_path, records.dtype, len(rows))
        for start in range(0, len(rows), COPY_RECORDS):
            out[start:start + COPY_RECORDS] = records[rows[start:start + COPY_RECORDS]]
        sync_records(out, tmp_path, out_path)
        del out  # unmapped before the rename


def check_dev_fraction(fraction: Optional[float]) -> None:
    if fraction is not None and not 0 < fraction < 1:
        raise UserError(f"--dev_fraction must be between 0 and 1, e.g. 0.05 "
                        f"(got {fraction})")


def dev_count(total: int, fraction: float, what: str, path: str) -> int:
    """Examples to hold out: the fraction rounded, at least one, and at least
    one left to train on."""
    count = max(1, round(total * fraction))
    if count >= total:
        raise UserError(f"{path} gives only {total} {what}, too few to hold out "
                        f"--dev_fraction {fraction} for dev: use more text, a smaller "
                        f"--max_seq_length, or a dev.txt of its own")
    return count


def sampled_dev_mask(total: int, count: int, seed: int) -> np.ndarray:
    """Bool [total], True for `count` examples drawn with `seed`."""
    mask = np.zeros(total, dtype=bool)
    mask[np.random.default_rng(seed).choice(total, size=count, replace=False)] = True
    return mask


def hold_out_lines(text_path: str, out_path: str, dev_path: str, fraction: float,
                   seed: int, *, counts, **prepare_kwargs) -> list:
    """Encode one line per example (utils.data.prepare.prepare_split), then write a
    seeded sample of `fraction` of the examples to `dev_path` and the rest,
    in file order, to `out_path`. The SplitSummary of each."""
    all_path = temp_name_beside(out_path)  # prepare_split creates it
    try:
        whole = prepare_split(text_path, all_path, counts=counts, **prepare_kwargs)
        records = np.load(all_path, mmap_mode="r", allow_pickle=False)
        held = dev_count(len(records), fraction, "non-empty lines", text_path)
        mask = sampled_dev_mask(len(records), held, seed)
        summaries = []
        for name, path, rows in (("dev", dev_path, np.flatnonzero(mask)),
                                 (whole.split, out_path, np.flatnonzero(~mask))):
            write_records(path, records, rows)
            lengths = np.asarray(records["length"][rows], dtype=np.int64)
            summaries.append(dataclasses.replace(
                whole, split=name, path=path, examples=len(rows),
                tokens=int(lengths.sum()), longest=int(lengths.max()),
                # cut lines are not told apart once encoded: counted in train's line
                truncated=whole.truncated if name != "dev" else 0,
                skipped=whole.skipped if name != "dev" else 0))
        return summaries[::-1]  # train first, as the splits are listed
    finally:
        remove_if_present(all_path)
