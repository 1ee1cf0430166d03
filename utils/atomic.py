"""Write a file so that readers only ever see the old or the complete new version.

The data goes to a temporary file beside the target (same filesystem), is
flushed to disk, and only then renamed over the target with os.replace. A crash,
a kill -9 or an exception part-way leaves the previous file untouched; the
temporary file is removed on an exception (a killed process may leave one
named `<name>.<random>.tmp`, which the trainer cleans up on its next start).
"""
import os
import tempfile
from contextlib import contextmanager

from utils.errors import UserError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: str, what: str) -> None:
    """Create directory `path` if needed and check a file can be written in it.

    Called before long work starts, so that a wrong output path fails at once
    with one line instead of after hours (or with a traceback).
    """
    if not path:
        raise UserError(f"{what} is empty: give a directory path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a directory: choose another path")
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise UserError(f"cannot write to {what} {path} ({err.strerror}): choose a "
                        f"writable directory") from None


@contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs):
    """`with atomic_write(p, "w", encoding="utf-8") as f: f.write(...)`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                    suffix=".tmp", dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the usual mode instead.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
