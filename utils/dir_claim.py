"""One writer per output directory, its files staged inside it and moved into place.

convert_checkpoint.py writes a model directory (DST) this way:
- `DirectoryClaim(dst)` creates DST if needed and holds its lock
  (utils/atomic.py's OutputDirLock, as training's output directory): a second
  run on the same DST stops at once with one line naming the holder, even
  when DST did not exist before either run started.
- Under the claim, staging folders left by a killed writer are removed, with a
  note naming them: ours (`DST/.staging.<pid>`) and an earlier version's
  (`.<name>.<random>.converting` beside DST).
- `new_stage()` is a folder inside DST, so on DST's own filesystem (DST may be a
  mount point: a rename from its parent's filesystem would fail with EXDEV).
- `publish(stage, names, marker)` moves the finished files into DST, the
  marker (the file that makes DST a model for readers) last.
A run that created DST and fails leaves no DST behind.
"""
import fcntl
import os
import re
import shutil
import sys
from typing import List, Optional

from utils.atomic import LOCK_NAME, OutputDirLock, current_umask, pid_alive
from utils.errors import UserError

STAGE_PREFIX = ".staging."
_STAGE_NAME = re.compile(re.escape(STAGE_PREFIX) + r"(\d+)")
HIDDEN_NAMES = (LOCK_NAME,)  # bookkeeping of a claim, not a user's file


def is_bookkeeping(name: str) -> bool:
    """Whether a name in a claimed directory is the claim's own (lock, staging)."""
    return name in HIDDEN_NAMES or _STAGE_NAME.fullmatch(name) is not None


def check_directory_target(path: str, what: str) -> None:
    """One line for a path that cannot become a directory we write."""
    if path == "" or path.strip() == "":
        raise UserError(f"{what} is empty: give the directory to write")
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which "
                        f"does not exist: remove the link or create its target")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a directory: choose another path")


class DirectoryClaim:
    """`with DirectoryClaim(dst, "DST") as claim:` see the module docstring."""

    def __init__(self, directory: str, what: str):
        self.directory, self.what = directory, what
        self.created = False
        self.done = False
        self._lock: Optional[OutputDirLock] = None

    def __enter__(self):
        check_directory_target(self.directory, self.what)
        self.created = not os.path.exists(self.directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {self.what} {self.directory} "
                            f"({err.strerror}): choose a writable path") from None
        self._lock = OutputDirLock(self.directory, self.what)
        try:
            self._lock.acquire()
            self._remove_stale_stages()
        except BaseException:
            self._undo_creation()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        for name in os.listdir(self.directory):
            if _STAGE_NAME.fullmatch(name) and int(name[len(STAGE_PREFIX):]) == os.getpid():
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._lock.release()
        if exc_type is not None:
            self._undo_creation()
        return False

    def _undo_creation(self) -> None:
        if self.created:
            if self._lock is not None:
                self._lock.release()
            try:
                os.rmdir(self.directory)  # only when nothing is left in it
            except OSError:
                pass

    def _remove_stale_stages(self) -> None:
        """Staging folders of writers that are gone (we hold the lock, so no
        live writer of this version stages here; the pid is checked anyway)."""
        stale = []
        for name in os.listdir(self.directory):
            match = _STAGE_NAME.fullmatch(name)
            if match and int(match.group(1)) != os.getpid() \
                    and not pid_alive(int(match.group(1))):
                stale.append(os.path.join(self.directory, name))
        parent = os.path.dirname(os.path.abspath(self.directory))
        base = os.path.basename(os.path.abspath(self.directory))
        older = re.compile(re.escape(f".{base}.") + r"[A-Za-z0-9_]+\.converting")
        try:
            stale += [os.path.join(parent, n) for n in os.listdir(parent)
                      if older.fullmatch(n) and os.path.isdir(os.path.join(parent, n))]
        except OSError:
            pass
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
            print(f"note: removed {path}, the staging folder of an earlier run into "
                  f"{self.directory} that was killed", file=sys.stderr)

    def new_stage(self) -> str:
        """An empty folder inside the directory, for the files being written."""
        stage = os.path.join(self.directory, f"{STAGE_PREFIX}{os.getpid()}")
        if os.path.isdir(stage):
            shutil.rmtree(stage)
        os.mkdir(stage, 0o777 & ~current_umask())
        return stage

    def publish(self, stage: str, names: List[str], marker: str) -> None:
        """Move the staged files into the directory, `marker` last."""
        for name in sorted(names, key=lambda n: n == marker):
            os.replace(os.path.join(stage, name), os.path.join(self.directory, name))
        os.rmdir(stage)


class FileClaim:
    """`with FileClaim(path, "DST"):` one writer for an output file at a time.

    An exclusive, non-blocking flock on the folder that will hold `path`:
    a second run writing into that folder meanwhile stops at once with one
    line, so two runs never both replace the same file. The lock goes with
    the process (a killed writer leaves nothing to clean up)."""

    def __init__(self, path: str, what: str):
        self.folder = os.path.dirname(os.path.abspath(path))
        self.what = what
        self._fd: Optional[int] = None

    def __enter__(self):
        try:
            self._fd = os.open(self.folder, os.O_RDONLY)
        except OSError as err:
            raise UserError(f"cannot open the folder of {self.what}, {self.folder} "
                            f"({err.strerror}): choose a writable path") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UserError(f"another run is writing a file into {self.folder}, the "
                            f"folder of {self.what}: wait for it to finish, or write "
                            f"elsewhere") from None
        return self

    def __exit__(self, exc_type, exc, tb):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        return False
