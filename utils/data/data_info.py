"""`<output_dir>/prepared.json`: what prepare_data.py made of a data directory,
so training reads the sequence length from the data instead of a second flag.

    {"max_seq_length": 512, "pack": true, "conditional": false,
     "text_dir": "/abs/path/my_text", "splits": ["train", "dev"]}

Written atomically after every split is complete (a run stopped part-way
leaves the previous file); read back with the project's bounded JSON reading.
`text_dir` is where the text files were read from: --do_test shows a test
pair's source as the user wrote it, from there (utils/samples/test_split.py).
"""
import json
import os
from typing import List, NamedTuple, Optional

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.json_file import read_json_object

DATA_INFO = "prepared.json"


class DataInfo(NamedTuple):
    max_seq_length: int
    pack: bool
    conditional: bool
    text_dir: str
    splits: List[str]
    path: str  # the file it was read from

    def describe(self) -> str:
        kind = ("source<TAB>target pairs" if self.conditional
                else "packed windows" if self.pack else "one example per line")
        return f"{kind}, max_seq_length {self.max_seq_length}"


def data_info_path(data_dir: str) -> str:
    return os.path.join(data_dir, DATA_INFO)


def write_data_info(output_dir: str, max_seq_length: int, pack: bool,
                    conditional: bool, text_dir: str, splits: List[str]) -> str:
    path = data_info_path(output_dir)
    record = {"max_seq_length": max_seq_length, "pack": pack,
              "conditional": conditional, "text_dir": os.path.abspath(text_dir),
              "splits": list(splits)}
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return path


def read_data_info(data_dir: str) -> Optional[DataInfo]:
    """The data directory's prepared.json, or None when it has none (data
    prepared before the file existed). A damaged one is a one-line error."""
    path = data_info_path(data_dir)
    if not os.path.isfile(path):
        return None
    fix = f"run prepare_data.py again to rewrite it, or delete {path}"
    try:
        value = read_json_object(path)
    except (ValueError, OSError) as err:
        raise UserError(f"{path} {err}: {fix}") from None
    length = value.get("max_seq_length")
    splits = value.get("splits", [])
    if (not isinstance(length, int) or isinstance(length, bool) or length < 3
            or not isinstance(value.get("text_dir", ""), str)
            or not isinstance(splits, list)):
        raise UserError(f"{path} is not a prepare_data.py record (max_seq_length "
                        f"{length!r}): {fix}")
    return DataInfo(length, value.get("pack") is True, value.get("conditional") is True,
                    value.get("text_dir", ""), [str(s) for s in splits], path)
