"""The project's one JSON reader: every JSON file it reads goes through here.

Python's json module recurses once per nesting level, so `[` repeated 200000
times ends in a RecursionError traceback; a JSON file can also be any size.
`parse_json` measures the nesting first (strings removed, then brackets
counted, which takes no recursion) and refuses more than MAX_DEPTH levels;
`read_json` reads at most a size limit from a regular file (utils/input_files.py:
no FIFO, no device). Every problem is one line naming the file and the fix.
No file GPT-2 uses nests deeper than a few levels.
"""
import json
import os
import re
from typing import Any, Optional

from utils.errors import UserError
from utils.input_files import read_regular_file

MAX_DEPTH = 64
# encoder.json, the largest JSON file we read, is ~1 MB; indexes and configs are small.
MAX_JSON_BYTES = 64 << 20
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class JSONProblem(ValueError):
    """Why a text is not acceptable JSON, in a phrase ("is not valid JSON (...)")."""


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """The deepest nesting of arrays and objects in `text`, counting no
    further than `limit` + 1 (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def parse_json(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, refusing nesting deeper than `max_depth`; JSONProblem otherwise."""
    if nesting_depth(text, max_depth) > max_depth:
        raise JSONProblem(f"nests arrays or objects more than {max_depth} levels deep, "
                          f"which no file of a GPT-2 model does")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONProblem(f"is not valid JSON ({err.msg} at line {err.lineno})") from None
    except (ValueError, RecursionError) as err:  # e.g. a number of 5000 digits
        raise JSONProblem(f"is not valid JSON ({str(err)[:80]})") from None


def read_json(path: str, what: str, fix: str, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_DEPTH, expect: Optional[type] = None) -> Any:
    """The JSON value in file `path`; a UserError "<what> <path> <problem>: <fix>"
    for a missing, unreadable, oversized, non-UTF-8, invalid or too deeply
    nested file, or (with `expect`) one whose top value is not of that type."""
    name = f"{what} {path}"
    data = read_regular_file(path, name, max_bytes)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{name} is not UTF-8 text (byte 0x{data[err.start]:02x} at "
                        f"{err.start}): {fix}") from None
    try:
        value = parse_json(text, max_depth)
    except JSONProblem as err:
        raise UserError(f"{name} {err}: {fix}") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "an array"}.get(expect, expect.__name__)
        raise UserError(f"{name} must hold a JSON {kind}, not {type(value).__name__}: "
                        f"{fix}")
    return value


def read_small_text(path: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of a small file the project keeps beside its data and
    models (hparams.json, checkpoint, prepared.json); a ValueError whose
    message completes "<path> ..." when it is too large or not UTF-8 (the
    caller names the file and the fix)."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"is {size} bytes, far too large for this file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"is not UTF-8 text (byte {err.start})") from None


def read_json_object(path: str) -> dict:
    """The JSON object in a small file (read_small_text, parse_json's limits);
    a ValueError completing "<path> ..." otherwise."""
    value = parse_json(read_small_text(path))
    if not isinstance(value, dict):
        raise ValueError("is not a JSON object")
    return value
