"""Ending a finished command without tearing the interpreter down.

Python's normal exit, after the atexit handlers, frees every module and object
one by one and runs the C++ destructors of the libraries it loaded: after
`import torch` that alone takes 0.6-0.75 s on a 2-core machine
(benchmarks/README.md, "Whole commands"), while the kernel frees a process's
memory at once. `finish` does what an exit must (other threads joined, atexit
handlers run, stdout and stderr flushed) and ends the process with os._exit.

For an entry script's `if __name__ == "__main__":` block only, as
`with ending_without_teardown(): run_main(main)`: it ends the process. A
traceback (an uncaught exception other than SystemExit) is left to Python's
own exit.
"""
import atexit
import os
import sys
import threading
from contextlib import contextmanager


def exit_status(exit_: SystemExit) -> int:
    """The status Python gives a SystemExit (a message goes to stderr, 1)."""
    if exit_.code is None:
        return 0
    if isinstance(exit_.code, int):
        return exit_.code
    print(exit_.code, file=sys.stderr)
    return 1


def finish(status: int) -> None:
    """End the process with `status` after what a normal exit does that
    matters: join the other threads, run the atexit handlers, flush stdout
    and stderr."""
    threading._shutdown()  # what Python's exit does first: join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing to save
            pass
    os._exit(status)


@contextmanager
def ending_without_teardown():
    """Run the block, then end the process through `finish` with the status
    its SystemExit carries (0 when it returns)."""
    try:
        yield
    except SystemExit as exit_:
        finish(exit_status(exit_))
    finish(0)
