"""Where gpt2_generate_main.py's samples go: the screen's format, JSONL or TSV.

`--output_file x.jsonl` writes one object a sample, {"prompt", "sample",
"text"}; `x.tsv` writes prompt<TAB>text with utils/samples/test_split.py's escaping
(line breaks and tabs inside a field become spaces); any other name gets what
the screen shows. A file is written atomically (utils/atomic.py): a failed or
interrupted run leaves the previous file, or none.
"""
import contextlib
import json
import sys

import os

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.samples.interactive import PROMPT
from utils.samples.test_split import tsv_field

BANNER_WIDTH = 40


def output_format(path) -> str:
    """"jsonl", "tsv" or "screen" for an --output_file name (None: the screen)."""
    lower = (path or "").lower()
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith(".tsv"):
        return "tsv"
    return "screen"


def banner(number: int) -> str:
    """The line above sample `number`."""
    bar = "=" * BANNER_WIDTH
    return f"{bar} SAMPLE {number} {bar}"


def closing_rule() -> str:
    """The line below a prompt's last sample."""
    return "=" * (2 * BANNER_WIDTH)


class SampleSink:
    """Formats samples for one output; `rule()` closes a prompt's samples."""

    def __init__(self, out, fmt: str):
        self.out, self.fmt = out, fmt

    def sample(self, prompt: str, number: int, text: str) -> None:
        if self.fmt == "jsonl":
            self.out.write(json.dumps({"prompt": prompt, "sample": number, "text": text},
                                      ensure_ascii=False) + "\n")
        elif self.fmt == "tsv":
            self.out.write(f"{tsv_field(prompt)}\t{tsv_field(text)}\n")
        else:
            if number == 1 and prompt:  # none for samples from scratch
                self.out.write(f"{PROMPT}{prompt}\n")
            self.out.write(f"{banner(number)}\n{text}\n")

    def end_of_prompt(self) -> None:
        if self.fmt == "screen":
            self.out.write(closing_rule() + "\n")


@contextlib.contextmanager
def open_output(path, overwrite: bool = False):
    """A SampleSink on stdout (path None) or on an atomically written file
    (an existing one replaced only with `overwrite`)."""
    fmt = output_format(path)
    if path is None:
        yield SampleSink(sys.stdout, fmt)
        sys.stdout.flush()
        return
    with atomic_write(path, "w", replace=overwrite, encoding="utf-8", newline="\n") as f:
        yield SampleSink(f, fmt)


def check_output_path(path) -> None:
    """Refuse an --output_file that cannot be written, before a model loads."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UserError(f"--output_file {path} is a directory: give a file name "
                        f"ending in .jsonl, .tsv or .txt")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"--output_file {path}: the directory {directory} does not "
                        f"exist; create it or give another path")
    if not os.access(directory, os.W_OK):
        raise UserError(f"--output_file {path}: the directory {directory} is not "
                        f"writable; give another path")
