"""Opening a file the user named for reading: a regular file only, read in bounded memory.

A FIFO with no writer would block `open` for ever, a device such as
/dev/zero never ends, and a directory cannot be read: each gets one line
naming the flag or file instead. The file is opened without blocking and
checked on its descriptor (no gap between the check and the read), so a path
swapped for a FIFO in between cannot hang the run either. Standard input
(`-`) is read the same bounded way; a closed one is an error, not a crash.
"""
import os
import stat
import sys
from typing import BinaryIO

from utils.errors import UserError


def open_regular_file(path: str, what: str, instead: str = "") -> BinaryIO:
    """`path` opened "rb" when it is a regular file, else a UserError naming
    `what` (e.g. "--prompt_file x.txt"), what the path is, and `instead`
    (e.g. " (or - to read standard input)") after the fix."""
    if os.path.lexists(path) and not os.path.exists(path):
        raise UserError(f"{what} is a broken symbolic link: point it at an existing file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"cannot read {what} (it does not exist): check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} is a directory, not a file: give a file") from None
    except OSError as err:
        raise UserError(f"cannot read {what} ({err.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else
                "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise UserError(f"{what} is {kind}, not a regular file: give a regular "
                        f"file{instead}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bounded(f: BinaryIO, limit: int, what: str) -> bytes:
    """All of `f`, refused with a UserError when it holds more than `limit` bytes
    (without reading more than one byte past the limit)."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{what} holds more than {limit:,} bytes, more than this file "
                        f"can be: check it is the right file")
    return data


def read_regular_file(path: str, what: str, limit: int, instead: str = "") -> bytes:
    """The bytes of the regular file `path` (see open_regular_file), at most `limit`."""
    with open_regular_file(path, what, instead) as f:
        return read_bounded(f, limit, what)


def read_stdin(what: str, limit: int) -> bytes:
    """Standard input's bytes, at most `limit`; a closed one is a UserError."""
    stream = sys.stdin
    if stream is None or getattr(stream, "closed", False):
        raise UserError(f"{what}: standard input is closed: pipe the text in "
                        f"(e.g. 'cat prompts.txt | ...'), or give a file")
    source = getattr(stream, "buffer", None)
    try:
        if source is not None:
            return read_bounded(source, limit, what)
        text = stream.read(limit + 1)
    except (OSError, ValueError) as err:  # a closed or unreadable descriptor
        raise UserError(f"{what}: cannot read standard input ({err}): pipe the text "
                        f"in, or give a file") from None
    data = text.encode("utf-8", "surrogateescape")
    if len(text) > limit:
        raise UserError(f"{what} holds more than {limit:,} bytes: check it is the "
                        f"right input")
    return data
