"""utils.errors.run_main: one line and exit code 2 for what the user can fix."""
import errno
import os

import pytest

from utils.errors import UserError, run_main


def _exit_and_stderr(capsys, func):
    with pytest.raises(SystemExit) as exit_info:
        run_main(func)
    return exit_info.value.code, capsys.readouterr().err


def test_user_error_is_one_line(capsys):
    def fail():
        raise UserError("bad thing\non two lines: do this")
    code, err = _exit_and_stderr(capsys, fail)
    assert code == 2 and err == "error: bad thing on two lines: do this\n"


def test_full_disk_is_one_line_naming_the_file(capsys):
    def fail():
        raise OSError(errno.ENOSPC, "No space left on device", "/out/model.ckpt")
    code, err = _exit_and_stderr(capsys, fail)
    assert code == 2 and err.count("\n") == 1
    assert err == ("error: no space left on device while writing /out/model.ckpt: "
                   "free disk space, then run again\n")


def test_forbidden_path_is_one_line_naming_the_file(capsys):
    def fail():
        raise PermissionError(errno.EACCES, "Permission denied", "/out/model.ckpt")
    code, err = _exit_and_stderr(capsys, fail)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: cannot write or read /out/model.ckpt: Permission denied")


def test_full_disk_inside_torch_save_names_the_target(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError; atomic_write turns
    it back into the disk's OSError naming the checkpoint, and leaves the old
    file whole and no temporary file behind."""
    import io

    import torch

    from utils.checkpoints.weights import save_checkpoint

    target = tmp_path / "model.ckpt"
    target.write_bytes(b"the previous checkpoint")

    import utils.atomic

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        assert mode == "xb", mode  # the temporary file, created by atomic_write
        return FullDisk(path, mode)

    monkeypatch.setattr(utils.atomic, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(OSError) as info:
        save_checkpoint(str(target), {"model": {"w": torch.zeros(1000)}})
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"the previous checkpoint"
    assert os.listdir(tmp_path) == ["model.ckpt"]


def test_other_os_errors_keep_their_traceback():
    def fail():
        raise OSError(errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError):
        run_main(fail)


def test_ctrl_c_exits_130(capsys):
    def fail():
        raise KeyboardInterrupt
    code, err = _exit_and_stderr(capsys, fail)
    assert code == 130 and err == "interrupted\n"


WRITER = """
import sys
sys.path.insert(0, {repo!r})
from utils.errors import run_main

def main():
    for n in range(10 ** 6):
        print("line", n)
    raise BrokenPipeError(32, "a pipe that is not stdout")  # only when stdout lasted

run_main(main)
"""


@pytest.mark.parametrize("reader_leaves", [True, False])
def test_a_reader_that_leaves_ends_the_run_quietly(tmp_path, reader_leaves):
    """`script | head -1`: status 141 as SIGPIPE would give, no traceback; a
    broken pipe elsewhere, with stdout still read, keeps its traceback."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(tmp_path / "err", "w+") as err:
        if reader_leaves:
            proc = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=repo)],
                                    stdout=subprocess.PIPE, stderr=err)
            assert proc.stdout.readline() == b"line 0\n"
            proc.stdout.close()
            status = proc.wait(timeout=120)
        else:
            status = subprocess.run([sys.executable, "-c", WRITER.format(repo=repo)],
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    timeout=120).returncode
        err.seek(0)
        stderr = err.read()
    if reader_leaves:
        assert (status, stderr) == (141, "")
    else:
        assert status == 1 and "BrokenPipeError: [Errno 32] a pipe that is not stdout" in stderr
