"""Reading the small JSON and text files the project keeps beside its data and
models (hparams.json, checkpoint, encoder.json, prepared.json): bounded in
size, UTF-8 only, and a JSON object where one is expected. Problems are
ValueErrors whose message completes "<path> ..." (the caller names the file
and the fix)."""
import json
import os

MAX_SMALL_FILE = 64 << 20  # hparams.json and checkpoint are bytes; encoder.json ~1 MB


def read_small_text(path: str) -> str:
    if os.path.getsize(path) > MAX_SMALL_FILE:
        raise ValueError(f"is {os.path.getsize(path)} bytes, far too large for this file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"is not UTF-8 text (byte {err.start})") from None


def read_json_object(path: str) -> dict:
    try:
        value = json.loads(read_small_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(value, dict):
        raise ValueError("is not a JSON object")
    return value
