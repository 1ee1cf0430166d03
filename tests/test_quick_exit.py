"""utils/quick_exit.py: a finished command ends without the interpreter's
teardown, but with everything a normal exit does that a user could see:
the exit status, buffered output, atexit handlers, other threads' work."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import atexit, sys, threading, time
sys.path.insert(0, {repo!r})
from utils.quick_exit import ending_without_teardown

def late_write():
    time.sleep(0.3)
    with open({thread_file!r}, "w") as f:
        f.write("thread done")

atexit.register(lambda: open({atexit_file!r}, "w").write("atexit ran"))
threading.Thread(target=late_write).start()
sys.stdout.write("buffered, no newline")  # still in the buffer when the block ends
with ending_without_teardown():
    {ending}
print("never reached")
"""


@pytest.mark.parametrize("ending, status, stderr", [("pass", 0, ""),
                                                    ("sys.exit(3)", 3, ""),
                                                    ("sys.exit('error: bad input')", 1,
                                                     "error: bad input\n")])
def test_a_quick_exit_keeps_status_output_atexit_and_threads(tmp_path, ending, status,
                                                             stderr):
    thread_file, atexit_file = tmp_path / "thread", tmp_path / "atexit"
    script = SCRIPT.format(repo=REPO, thread_file=str(thread_file),
                           atexit_file=str(atexit_file), ending=ending)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == status
    assert result.stdout == "buffered, no newline"
    assert result.stderr == stderr
    assert thread_file.read_text() == "thread done"
    assert atexit_file.read_text() == "atexit ran"


def test_a_traceback_is_left_to_pythons_own_exit():
    script = ("import sys\n"
              f"sys.path.insert(0, {REPO!r})\n"
              "from utils.quick_exit import ending_without_teardown\n"
              "with ending_without_teardown():\n"
              "    raise RuntimeError('a bug')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr
