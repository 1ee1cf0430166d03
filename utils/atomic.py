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


@contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs):
    """`with atomic_write(p, "w", encoding="utf-8") as f: f.write(...)`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                    suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
