"""Helpers for tests written as a user's command line: run a script (in this
process through run_main, or as a subprocess), check its one-line error, and
check that the files it was given are byte-identical afterwards."""
import hashlib
import io
import os
import signal
import sys

import pytest

from utils.errors import run_main
import script_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_A = os.path.join(REPO, "tests", "fixtures", "tf_gpt2", "models", "tiny_a")


def snapshot(*paths):
    """{file: sha256} of every file under `paths` (files or directories)."""
    found = {}
    for path in paths:
        path = str(path)
        walked = [(path, [], [""])] if os.path.isfile(path) else os.walk(path)
        for root, _, names in walked:
            for name in names:
                full = os.path.join(root, name) if name else root
                with open(full, "rb") as f:
                    found[full] = hashlib.sha256(f.read()).hexdigest()
    return found


def run_in_process(main, argv, monkeypatch, capsys, stdin=""):
    """(exit code, stdout, stderr) of `main(argv)` run as the script's __main__."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def signals_as_from_a_terminal():
    """preexec_fn for a command a test interrupts: Ctrl-C and SIGTERM at their
    defaults in the child, as a shell at a terminal starts a command (an
    ignored signal is inherited through exec, and a program rightly keeps
    ignoring it), whatever the test process's own dispositions."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def run_script(script, argv, **kwargs):
    return script_server.run([sys.executable, os.path.join(REPO, script),
                           *[str(a) for a in argv]], capture_output=True, cwd=REPO,
                          timeout=kwargs.pop("timeout", 120), **kwargs)


def assert_one_line_error(code, err, *needles):
    """Exit 2, one 'error:' line on stderr holding every needle, no traceback."""
    if isinstance(err, bytes):
        err = err.decode("utf-8", "replace")
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def tiny_models(directory):
    """(our .ckpt, a Hugging Face directory) of the TF fixture tiny_a, written
    into `directory` by convert_checkpoint.py."""
    import convert_checkpoint
    ckpt, hf = os.path.join(directory, "tiny.ckpt"), os.path.join(directory, "tiny_hf")
    for dst, fmt in ((ckpt, "ckpt"), (hf, "hf")):
        with pytest.raises(SystemExit) as done:
            run_main(convert_checkpoint.main, [TINY_A, dst, "--format", fmt])
        assert done.value.code == 0
    return ckpt, hf
