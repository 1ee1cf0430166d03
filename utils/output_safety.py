"""The rule for every file a command writes: never onto its own input, never
over an existing file unless the user said so.

`refuse_outputs_on_inputs` compares what the run will write with what it
reads by identity (st_dev, st_ino), not by name: a symbolic link, a hard link,
`./x` or `dir/../x` all name the same file. An input may be a directory (a
model directory, a data directory): every file in it counts as read. It runs
before the model is read, so a refusal costs nothing and changes nothing.

`refuse_existing_output` refuses a file that exists unless the flag that
allows replacing it (--overwrite, --force) was given. The write itself is
atomic (utils/atomic.py); without that flag it also refuses to replace a file
another run created meanwhile (atomic_write(..., replace=False)).
"""
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

from utils.errors import UserError

Labelled = Tuple[str, Optional[str]]   # ("--checkpoint", path); a None path is skipped


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, a dangling link, a NUL in the name
        return None
    return st.st_dev, st.st_ino


def input_identities(inputs: Iterable[Labelled]) -> Dict[Tuple[int, int], str]:
    """(st_dev, st_ino) -> "<flag> <path>" of every file the inputs name: the
    file itself, or a directory and each entry directly in it."""
    found: Dict[Tuple[int, int], str] = {}
    for label, path in inputs:
        if not path:
            continue
        ident = _identity(path)
        if ident is None:
            continue
        found.setdefault(ident, f"{label} {path}")
        if os.path.isdir(path):
            try:
                names = os.listdir(path)
            except OSError:
                continue
            for name in names:
                inner = _identity(os.path.join(path, name))
                if inner is not None:
                    found.setdefault(inner, f"{os.path.join(path, name)} (in {label} {path})")
    return found


def refuse_outputs_on_inputs(outputs: Sequence[Labelled], inputs: Iterable[Labelled]) -> None:
    """A UserError when an output path is (resolves to) a file or directory the
    run reads; nothing is read or written here but the paths' metadata."""
    read = input_identities(inputs)
    for label, path in outputs:
        if not path:
            continue
        ident = _identity(path)
        if ident is not None and ident in read:
            raise UserError(f"{label} {path} is {read[ident]}, which this run reads: "
                            f"writing there would destroy it; write the output to "
                            f"another path")


def refuse_existing_output(path: Optional[str], label: str, allowed: bool,
                           flag: str = "--overwrite") -> None:
    """An existing `path` (or a link there, even a dangling one) is replaced only
    when `allowed` (the user passed `flag`)."""
    if path and os.path.lexists(path) and not allowed:
        raise UserError(f"{label} {path} exists: pass {flag} to replace it, or choose "
                        f"another path")
