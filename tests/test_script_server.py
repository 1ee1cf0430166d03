"""tests/script_server.py runs `python SCRIPT.py` as a real process would:
the same exit status, output, working directory, environment and stdin as
subprocess.run gives, for the cases the CLI tests rely on."""
import os
import select
import signal
import subprocess
import sys

import pytest

import script_server

SCRIPT = r'''
import os, sys
print("argv", sys.argv[1:])
print("cwd", os.path.basename(os.getcwd()))
print("env", os.environ.get("SCRIPT_SERVER_TEST"))
print("path0", os.path.basename(sys.path[0]))
print("main", __name__)
print("stdin", repr(sys.stdin.read()))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "code":
    sys.exit(3)
if how == "message":
    sys.exit("error: bad thing")
if how == "raise":
    raise ValueError("boom")
if how == "atexit":
    import atexit
    atexit.register(lambda: print("at exit"))
if how == "sleep":
    import time
    time.sleep(60)
'''


@pytest.fixture
def script(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    path = folder / "probe.py"
    path.write_text(SCRIPT, encoding="utf-8")
    return str(path)


def both(script, how, tmp_path, **kwargs):
    cmd = [sys.executable, script, how, "ü x"]
    env = dict(os.environ, SCRIPT_SERVER_TEST="yes")
    options = dict(cwd=str(tmp_path), env=env, capture_output=True, timeout=60, **kwargs)
    assert script_server._served(cmd, options)
    return subprocess.run(cmd, **options), script_server.run(cmd, **options)


@pytest.mark.parametrize("how", ["ok", "code", "message", "atexit"])
@pytest.mark.parametrize("text", [True, False])
def test_same_status_output_and_environment_as_a_real_process(script, tmp_path, how, text):
    real, served = both(script, how, tmp_path, text=text, input="typed in" if text else b"b")
    assert (served.returncode, served.stdout, served.stderr) == (
        real.returncode, real.stdout, real.stderr)


def test_a_traceback_and_exit_1_like_python(script, tmp_path):
    real, served = both(script, "raise", tmp_path, text=True)
    assert served.returncode == real.returncode == 1
    assert served.stdout == real.stdout
    assert served.stderr.splitlines()[-1] == real.stderr.splitlines()[-1] == "ValueError: boom"


def test_stderr_into_stdout_and_devnull(script, tmp_path):
    cmd = [sys.executable, script, "ok", "x"]
    for options in ({"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT},
                    {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE,
                     "stdin": subprocess.DEVNULL}):
        real = subprocess.run(cmd, cwd=str(tmp_path), text=True, **options)
        served = script_server.run(cmd, cwd=str(tmp_path), text=True, **options)
        assert (served.returncode, served.stdout, served.stderr) == (
            real.returncode, real.stdout, real.stderr)


def test_timeout_kills_the_run(script, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        script_server.run([sys.executable, script, "sleep", "x"], cwd=str(tmp_path),
                          capture_output=True, timeout=1)


def test_what_it_cannot_serve_goes_to_subprocess():
    cmd = [sys.executable, "-c", "print('plain')"]
    assert not script_server._served(cmd, {"capture_output": True})
    assert script_server.run(cmd, capture_output=True, text=True).stdout == "plain\n"


def test_a_module_runs_like_python_dash_m(tmp_path):
    (tmp_path / "probe_module.py").write_text(
        "import sys\nprint(sys.argv, __name__)\nsys.exit(4)\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "probe_module", "a", "b"]
    real = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True)
    served = script_server.run(cmd, cwd=str(tmp_path), capture_output=True, text=True)
    assert (served.returncode, served.stdout, served.stderr) == (
        real.returncode, real.stdout, real.stderr) == (4, str([str(tmp_path / "probe_module.py"), "a", "b"]) + " __main__\n", "")


def served_by_the_client(script, how, tmp_path):
    """`python SCRIPT how x` started as a shell would, through the client."""
    return subprocess.Popen(script_server.client_command(script_server.server_socket())
                            + [script, how, "x"], cwd=str(tmp_path),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)


def process_handle(pid):
    """A pidfd for the running process `pid` (None if it is already gone): it
    stays that process's, even once the number is given to another."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def ends_within(handle, seconds):
    """Whether the process behind `handle` exits within `seconds` (a pidfd
    turns readable when it does, reaped or not)."""
    if handle is None:
        return True
    try:
        return bool(select.select([handle], [], [], seconds)[0])
    finally:
        os.close(handle)


def test_the_client_forwards_signals_and_dies_of_them(script, tmp_path):
    (tmp_path / "scripts" / "pid.py").write_text(
        "import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(60)\n")
    client = served_by_the_client(str(tmp_path / "scripts" / "pid.py"), "sleep", tmp_path)
    line = client.stdout.readline().split()
    assert line[0] == "pid" and int(line[1]) != client.pid  # the run is another process
    run = process_handle(int(line[1]))
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == -signal.SIGTERM
    assert ends_within(run, 10)


def test_a_killed_client_takes_its_run_with_it(tmp_path):
    (tmp_path / "pid.py").write_text(
        "import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(60)\n")
    client = served_by_the_client(str(tmp_path / "pid.py"), "sleep", tmp_path)
    run = process_handle(int(client.stdout.readline().split()[1]))
    client.kill()
    client.wait(timeout=30)
    assert ends_within(run, 10)
