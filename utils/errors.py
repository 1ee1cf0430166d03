"""One way for every script to report bad input: a single line, a non-zero exit.

Library code raises `UserError` (or a subclass) when the problem is something the
user can fix: a missing file, a bad flag value, a corrupt checkpoint. The entry
scripts wrap their `main` with `run_main`, which prints the message on one line
and exits with status 2 instead of showing a traceback. Anything else is a bug in
this project and keeps its traceback.
"""
import errno
import os
import select
import sys

from utils.temp_files import remove_own_temp_files

# Failures of the machine rather than of this code: a full disk, a read-only
# or forbidden path. They get one line like UserError, not a traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                       errno.EPERM, errno.EIO}


# The status of a program ended by SIGPIPE (128 + 13), as shells report one whose
# reader left (`| head`).
READER_GONE_STATUS = 141


class UserError(Exception):
    """A problem with the user's input; the message names it and the fix."""


def describe_environment_error(err: OSError) -> str:
    """One line for a full disk or a forbidden path, naming the file."""
    where = f" {err.filename}" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = ("no space left on device" if err.errno == errno.ENOSPC
                else "disk quota exceeded")
        return f"{what} while writing{where}: free disk space, then run again"
    return (f"cannot write or read{where}: {err.strerror}: free disk space or fix "
            f"the path's permissions, then run again")


def run_main(main, *args, **kwargs):
    """Call `main`, turning `UserError` into a one-line error and exit code 2.

    Ctrl-C exits with 130 and no traceback; `main` is responsible for saving
    anything worth keeping before the interrupt reaches here. When the reader
    of stdout left (`| head`), the run stops quietly with 141, as SIGPIPE
    would end it. A full disk or a path we may not write also ends in one
    line (files are written atomically, so nothing half-written is left; what
    a Ctrl-C in a writer's own cleanup left of this process's temporary files
    is removed on the way out).
    """
    try:
        result = main(*args, **kwargs)
    except UserError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        _drop_stdout()
        sys.exit(READER_GONE_STATUS)
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {describe_environment_error(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        remove_own_temp_files()
    sys.exit(result or 0)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an
    error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd, or a closed stream
        return False


def _drop_stdout() -> None:
    """Send what is still buffered for stdout to /dev/null, so that the exit's
    flush does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
