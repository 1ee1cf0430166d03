"""Write a file so that readers only ever see the old or the complete new version,
and keep one writer per output directory.

The data goes to a temporary file beside the target (same filesystem), is
flushed to disk, and only then renamed over the target with os.replace. A crash,
a kill -9 or an exception part-way leaves the previous file untouched; the
temporary file is removed on an exception. A killed process may leave one
named `<name>.<pid>.<random>.tmp`: `remove_stale_temp_files` clears those whose
writer is gone. This is the project's one temporary-file scheme: a writer that
needs a path instead of a file object (a NumPy memory map) gets a name from
`utils.temp_files.temp_name_beside`, chosen before the file is created, inside
the block that removes it. `interrupts_held` keeps a Ctrl-C out of steps that
must happen together (renaming a pair of files into place).

`OutputDirLock` is a `fcntl.flock` on `<dir>/.lock` (which holds the owner's
pid) that a run holds while it writes into the directory, so a second run on
the same directory stops at once instead of replacing the first one's files.
"""
import errno
import fcntl
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Optional

from utils.errors import UserError
from utils.temp_files import remove_if_present, temp_name_beside

LOCK_NAME = ".lock"
# Failures of the disk rather than of the code: reported with the target's path.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


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


def _disk_error(err: BaseException) -> Optional[OSError]:
    """The OSError of a full or failing disk behind `err`, if any.

    torch.save reports a failed write as a RuntimeError whose context is the
    OSError, so the chain is followed.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def interrupts_held():
    """Ctrl-C and SIGTERM arrive when the block ends instead of inside it: for
    steps that must happen together (renaming a pair of files into place).
    Signals reach Python handlers only in the main thread; elsewhere this is a
    no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda num, frame: held.append(num))
        yield
    finally:
        # SIGINT back last: a Ctrl-C from then on raises at once, after every
        # handler is restored
        for signum, handler in reversed(list(previous.items())):
            signal.signal(signum, handler)
        for signum in held:
            signal.raise_signal(signum)  # now to the handler it was meant for


def _publish_new(tmp_path: str, path: str) -> None:
    """Move the finished temporary file to `path` only if nothing is there: a
    hard link fails when `path` exists, so a file another run created while
    this one wrote is never replaced."""
    try:
        os.link(tmp_path, path)
    except FileExistsError:
        raise UserError(f"{path} was created by another run while this one wrote it: "
                        f"kept that file; run again with another path, or pass the "
                        f"flag that allows replacing it") from None
    except OSError:  # a filesystem without hard links: check, then rename
        if os.path.lexists(path):
            raise UserError(f"{path} was created by another run while this one wrote "
                            f"it: kept that file; run again with another path") from None
        os.replace(tmp_path, path)
        return
    os.remove(tmp_path)


@contextmanager
def atomic_write(path: str, mode: str = "wb", replace: bool = True, **open_kwargs):
    """`with atomic_write(p, "w", encoding="utf-8") as f: f.write(...)`.

    A full disk (or another disk failure) while writing is raised as an
    OSError naming `path`, whatever layer reported it. With `replace=False` an
    existing `path` is never replaced, even one created while writing
    (a UserError; the new data is discarded).
    """
    tmp_path = temp_name_beside(path)
    try:
        with open(tmp_path, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp_path, path)
        else:
            _publish_new(tmp_path, path)
    except BaseException as err:
        remove_if_present(tmp_path)
        disk = _disk_error(err)
        if disk is not None and disk.filename is None:
            raise OSError(disk.errno, disk.strerror, path) from err
        raise


_TEMP_NAME = re.compile(r"(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp")


def remove_stale_temp_files(directory: str, names: Iterable[str], *,
                            without_pid: bool = True) -> None:
    """Remove the temporary files of atomic_write (or temp_name_beside) for `names`
    left by dead writers.

    Call it while holding the directory's OutputDirLock: every live writer of
    these files holds that lock, so a temporary file found then was left by a
    process that was killed. The pid in the name is checked as well, for a
    writer that does not take the lock; names without a pid (atomic_write's
    older versions) are removed too, unless `without_pid` is False.
    """
    names = set(names)
    for entry in os.listdir(directory):
        match = _TEMP_NAME.fullmatch(entry)
        if not match or match.group("name") not in names:
            continue
        pid = match.group("pid")
        if pid is None and not without_pid:
            continue
        if pid is not None and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(directory, entry))
        except FileNotFoundError:
            pass


class OutputDirLock:
    """`with OutputDirLock(dir, "--output_dir"):` one writer per directory.

    Holds an exclusive, non-blocking flock on `<dir>/.lock` and writes its pid
    there. A second process gets a UserError naming the holder's pid. The lock
    file is removed on exit; a process that locked a file which was removed
    meanwhile (its path now names another file, or none) tries again, so two
    processes never both think they hold the lock. The kernel releases the
    lock when its holder dies, however it dies.
    """

    def __init__(self, directory: str, what: str = "--output_dir", enabled: bool = True):
        self.path = os.path.join(directory, LOCK_NAME)
        self.directory, self.what, self.enabled = directory, what, enabled
        self._fd: Optional[int] = None

    def __enter__(self):
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder_pid(fd)
                os.close(fd)
                raise UserError(
                    f"another run ({holder}) is writing to {self.what} {self.directory} "
                    f"(it holds {self.path}): wait for it to finish or stop it, or "
                    f"choose another {self.what}") from None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return  # a filesystem without locks: run unlocked, as before
                raise
            if self._still_at_path(fd):
                break
            os.close(fd)  # locked a lock file its owner had just removed
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still locked: nobody else holds this file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder_pid(fd: int) -> str:
        """'pid N' from the lock file; the holder writes it just after locking."""
        for _ in range(20):
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if text.isdigit():
                return f"pid {text}"
            time.sleep(0.05)
        return "pid unknown"
