"""A fork server that runs the entry scripts as separate processes without
paying for importing torch and texar at every run (about 2 s each, most of a
CLI test's time).

    python tests/script_server.py serve SOCKET [--no-compile]  # imports once, forks per run
    python -S tests/script_server.py run SOCKET SCRIPT ARGS...   # a shell's `python SCRIPT`
    python -S tests/script_server.py stop SOCKET

torchrun_command() makes a torchrun command whose ranks are served the same way.

From a test, `run([sys.executable, "gpt2_generate_main.py", ...], cwd=...,
capture_output=True, ...)` is subprocess.run for `python SCRIPT.py ARGS`: it
starts this process's server on first use and returns a CompletedProcess.
`python -m MODULE ...` too. Anything else it is handed (`python -c`, other
options, a non-Python program) goes to subprocess.run unchanged; tests about the
process itself (signals, start-up imports, concurrent writers) call
subprocess directly.

Each run is a fresh fork of the server: its own pid, working directory,
environment, stdin/stdout/stderr file descriptors and exit status, sharing
nothing with other runs but the files they write. What differs from a real
`python SCRIPT`: torch, texar and the project's modules are imported before
the run's environment is set, so a variable read at import time (none of
the project's) keeps the server's value; with --no-compile the children do
not compile the batch-1 decoding step nor load its stored kernels
(tests/test_compiled_step.py tests it).
"""
import array
import atexit
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile

_FDS = 3  # stdin, stdout, stderr
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- the server

def _recv_request(conn):
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(_FDS * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[:len(payload) - len(payload) % 4])
        if not chunk:
            break
        data += chunk
    return json.loads(data), fds


def _python_stdio(unbuffered):
    """sys.stdin/stdout/stderr on fds 0-2, buffered as python sets them up
    (stdout by blocks, stderr by lines, both unbuffered under PYTHONUNBUFFERED)."""
    sys.stdin = open(0, "r", closefd=False)
    for fd, name, errors in ((1, "stdout", "strict"), (2, "stderr", "backslashreplace")):
        raw = io.FileIO(fd, "w", closefd=False)
        binary = raw if unbuffered else io.BufferedWriter(raw)
        setattr(sys, name, io.TextIOWrapper(binary, errors=errors, write_through=unbuffered,
                                            line_buffering=fd == 2 and not unbuffered))


def _child(request, fds):
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _python_stdio(unbuffered=bool(os.environ.get("PYTHONUNBUFFERED")))
    import runpy
    import traceback
    from utils import quick_exit
    module = request.get("module")
    sys.argv = request["argv"]
    sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(sys.argv[0]))
    code = 0
    try:
        if module:  # python -m MODULE: argv[0] becomes the module's file
            sys.modules.pop(module, None)  # the server's copy; python runs a fresh one
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        code = quick_exit.exit_status(exit_)
    except BaseException:  # a traceback, as python would print it
        traceback.print_exc()
        code = 1
    quick_exit.finish(code)  # what the interpreter does on its way out


def _handle(conn):
    """In a process of its own: fork the run, report its pid, wait, report
    its exit status."""
    request, fds = _recv_request(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _child(request, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(struct.pack("i", pid))
    # A client that goes away (killed, even with SIGKILL) takes its run with
    # it, as a process's death would.
    ended = os.pidfd_open(pid)
    while ended not in select.select([ended, conn], [], [])[0]:
        if not conn.recv(1):
            os.kill(pid, signal.SIGKILL)
            break
    _, status = os.waitpid(pid, 0)
    try:
        conn.sendall(struct.pack("i", os.waitstatus_to_exitcode(status)))
    except OSError:
        pass
    conn.close()


def serve(path, compile_step=True):
    import torch
    from utils.model import import_texar
    import utils.decoding.loading as loading
    import_texar()
    # What every command imports, once: the entry scripts' modules, and the
    # compiler stack torch.optim loads when the first optimizer is built.
    import convert_checkpoint, gpt2_generate_main, gpt2_train_main, prepare_data  # noqa
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    if not compile_step:
        loading.timed_compile_step = lambda model, build=True: (
            "not compiled in the docs test", 0.0)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if conn.recv(1, socket.MSG_PEEK) == b"\x00":  # stop
            conn.close()
            return
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            server.close()
            try:
                _handle(conn)
            finally:
                os._exit(0)
        conn.close()


# ---------------------------------------------------------------- clients

def _send_run(path, argv, cwd, env, fds, module=None):
    """Connect, ask for a run of argv (of `python -m module` when given) with
    these stdin/stdout/stderr; return (connection, the run's pid)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = json.dumps({"argv": argv, "cwd": cwd, "env": env,
                          "module": module}).encode() + b"\n"
    conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    return conn, struct.unpack("i", _recv_exactly(conn, 4))[0]


def _recv_exactly(conn, size):
    reply = b""
    while len(reply) < size:
        chunk = conn.recv(size - len(reply))
        if not chunk:
            raise ConnectionError("the script server closed the connection")
        reply += chunk
    return reply


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                     signal.SIGUSR2)


def run_from_shell(path, argv):
    """The client a shell (or torchrun --no-python) starts in place of
    `python SCRIPT`: the run gets its signals, and the client ends as the run
    did (the same exit status, or killed by the same signal)."""
    conn, pid = _send_run(path, argv, os.getcwd(), dict(os.environ), [0, 1, 2])
    for number in FORWARDED_SIGNALS:
        signal.signal(number, lambda received, frame: os.kill(pid, received))
    try:
        code = struct.unpack("i", _recv_exactly(conn, 4))[0]
    except ConnectionError:
        return 1
    if code < 0:  # die of the same signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def client_command(socket_path):
    """The argv prefix that runs `python SCRIPT ARGS` through the server at
    socket_path: prefix + [SCRIPT, *ARGS]."""
    return [sys.executable, "-S", os.path.abspath(__file__), "run", socket_path]


def torchrun_command(nproc, script, *args):
    """`torchrun --standalone --nproc_per_node N SCRIPT ARGS` whose ranks are
    runs of this process's server (torchrun starts the client in their place,
    with --no-python); run it with run() and the launcher is served too."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "--no-python",
            *client_command(server_socket()), script, *map(str, args)]


def server_socket():
    """This process's server (started on first use)."""
    return _SERVER.socket_path()


def stop(path):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    conn.sendall(b"\x00")
    conn.close()


class Server:
    """One server for this (test) process, started on first use."""

    def __init__(self):
        self.process = None
        self.path = None

    def socket_path(self):
        if self.process is None or self.process.poll() is not None:
            folder = tempfile.mkdtemp(prefix="script_server_")
            self.path = os.path.join(folder, "s.sock")
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve", self.path],
                cwd=_REPO_ROOT, stdout=subprocess.PIPE, text=True)
            if self.process.stdout.readline().strip() != "ready":
                raise RuntimeError("the script server did not start")
            atexit.register(self.close)
        return self.path

    def close(self):
        if self.process is not None and self.process.poll() is None:
            stop(self.path)
            self.process.wait(timeout=30)


_SERVER = Server()
_RUN_OPTIONS = {"cwd", "env", "input", "stdin", "stdout", "stderr", "capture_output",
                "timeout", "text", "universal_newlines", "encoding", "errors", "check"}
_STREAMS = (None, subprocess.PIPE, subprocess.DEVNULL)


def _served(cmd, kwargs) -> bool:
    """Whether `cmd` with these subprocess.run options is `python SCRIPT.py ...`
    that the server can run."""
    return (isinstance(cmd, (list, tuple)) and len(cmd) >= 2
            and all(isinstance(a, str) for a in cmd)
            and cmd[0] == sys.executable
            and (cmd[1].endswith(".py") or (cmd[1] == "-m" and len(cmd) >= 3))
            and set(kwargs) <= _RUN_OPTIONS
            and kwargs.get("stdin") in _STREAMS
            and kwargs.get("stdout") in _STREAMS
            and kwargs.get("stderr") in _STREAMS + (subprocess.STDOUT,))


def _output_file(choice, capture, opened, stdout_fd=None):
    """(fd to hand the run or None to inherit ours, temporary file to read
    afterwards or None); fds opened here are added to `opened`."""
    if choice == subprocess.STDOUT:  # where stdout goes: ours (1) when inherited
        return (1 if stdout_fd is None else stdout_fd), None
    if choice == subprocess.PIPE or (choice is None and capture):
        f = tempfile.TemporaryFile()
        return f.fileno(), f
    if choice == subprocess.DEVNULL:
        opened.append(os.open(os.devnull, os.O_WRONLY))
        return opened[-1], None
    return None, None


def _is_open(fd) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _read(f, text):
    if f is None:
        return None
    f.seek(0)
    data = f.read()
    f.close()
    if text is None:
        return data
    encoding, errors = text
    return io.TextIOWrapper(io.BytesIO(data), encoding=encoding, errors=errors).read()


def run(cmd, **kwargs):
    """subprocess.run(cmd, **kwargs), through the server when cmd is
    `python SCRIPT.py ...`."""
    if not _served(cmd, kwargs):
        return subprocess.run(cmd, **kwargs)
    capture = kwargs.get("capture_output", False)
    decode = (kwargs.get("text") or kwargs.get("universal_newlines")
              or kwargs.get("encoding") or kwargs.get("errors"))
    text = None
    if decode:
        import locale
        text = (kwargs.get("encoding") or locale.getpreferredencoding(False),
                kwargs.get("errors") or "strict")
    stdin_file, opened = None, []  # fds to close once the server holds copies
    if kwargs.get("input") is not None:
        data = kwargs["input"]
        stdin_file = tempfile.TemporaryFile()
        stdin_file.write(data.encode(text[0], text[1]) if isinstance(data, str) else data)
        stdin_file.seek(0)
        stdin_fd = stdin_file.fileno()
    elif kwargs.get("stdin") == subprocess.DEVNULL:
        stdin_fd = os.open(os.devnull, os.O_RDONLY)
        opened.append(stdin_fd)
    else:  # inherit ours, or nothing to read when we have none
        stdin_fd = 0 if _is_open(0) else os.open(os.devnull, os.O_RDONLY)
        if stdin_fd != 0:
            opened.append(stdin_fd)
    out = _output_file(kwargs.get("stdout"), capture, opened)
    err = _output_file(kwargs.get("stderr"), capture, opened, out[0])
    fds = [stdin_fd, 1 if out[0] is None else out[0], 2 if err[0] is None else err[0]]
    cwd = os.path.abspath(kwargs.get("cwd") or os.getcwd())
    env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
    try:
        if cmd[1] == "-m":  # argv[0] is set by runpy
            conn, pid = _send_run(_SERVER.socket_path(), ["-m", *cmd[3:]], cwd, env, fds,
                                  module=cmd[2])
        else:
            conn, pid = _send_run(_SERVER.socket_path(), list(cmd[1:]), cwd, env, fds)
    finally:
        for fd in opened:
            os.close(fd)
    timeout = kwargs.get("timeout")
    conn.settimeout(timeout)
    timed_out = False
    try:
        code = struct.unpack("i", _recv_exactly(conn, 4))[0]
    except socket.timeout:
        timed_out = True
        os.kill(pid, signal.SIGKILL)
        conn.settimeout(None)
        code = struct.unpack("i", _recv_exactly(conn, 4))[0]
    finally:
        conn.close()
        if stdin_file is not None:
            stdin_file.close()
    stdout, stderr = _read(out[1], text), _read(err[1], text)
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    result = subprocess.CompletedProcess(cmd, code, stdout, stderr)
    if kwargs.get("check"):
        result.check_returncode()
    return result


if __name__ == "__main__":
    command, socket_path = sys.argv[1], sys.argv[2]
    if command == "serve":
        sys.path.insert(0, os.getcwd())
        serve(socket_path, compile_step="--no-compile" not in sys.argv[3:])
    elif command == "stop":
        stop(socket_path)
    else:
        sys.exit(run_from_shell(socket_path, sys.argv[3:]))
