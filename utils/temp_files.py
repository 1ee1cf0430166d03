"""Names for temporary files, and removing what is left of this process's own.

A writer asks `temp_name_beside` for a name, then creates the file itself
inside the try/finally that removes it: the name is known before the file
exists, so no Ctrl-C can fall between the two. Every name handed out is
remembered, so that `remove_own_temp_files` (called by run_main on the way
out) can remove a file whose writer's cleanup was itself interrupted.
"""
import os
import secrets
from typing import Optional

# (pid, path) of every temporary file name this process handed out; what is
# left of them on the way out is removed by remove_own_temp_files.
_named_temp_files = set()


def temp_name_beside(path: str) -> str:
    """A fresh name for a temporary file beside `path`, `<name>.<pid>.<random>.tmp`
    (the pid tells remove_stale_temp_files whose it is). Nothing is created:
    the caller creates the file exclusively (open mode "x") inside the
    try/finally that removes it, so a Ctrl-C can never fall between the file's
    creation and the cleanup's knowing its name. The directory is made if missing."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.join(directory, f"{os.path.basename(path)}.{os.getpid()}."
                                   f"{secrets.token_hex(6)}.tmp")
    _named_temp_files.add((os.getpid(), name))
    return name


def remove_own_temp_files() -> None:
    """Remove what is left of this process's temporary files: a Ctrl-C that lands
    in a writer's own cleanup can leave one. run_main calls it on the way out.
    A forked child inherits its parent's names and leaves them alone."""
    for pid, name in list(_named_temp_files):
        if pid == os.getpid():
            remove_if_present(name)
            _named_temp_files.discard((pid, name))


def remove_if_present(path: Optional[str]) -> None:
    if path is None:
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
