"""utils.errors.run_main: one line and exit code 2 for what the user can fix."""
import errno

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
        raise OSError(errno.ENOSPC, "No space left on device", "/out/model.ckpt.x.tmp")
    code, err = _exit_and_stderr(capsys, fail)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: cannot write or read /out/model.ckpt.x.tmp: "
                          "No space left on device")


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
