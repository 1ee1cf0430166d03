"""A fork server for tests/test_docs_commands.py: the docs' `python X.py ...`
commands run as written, in bash, without paying for importing torch and
texar at every one of them.

    python tests/docs_runner.py serve SOCKET     # imports once, then forks per command
    python -S tests/docs_runner.py run SOCKET SCRIPT ARGS...   # what `python` runs

The client (stdlib only, started with -S: tens of milliseconds) sends its
argv, working directory and environment, and passes its stdin, stdout and
stderr file descriptors; the server forks, the child takes those descriptors
and runs SCRIPT as __main__, and the client exits with the child's status.
Each command gets a fresh copy of the server's process, so commands share
nothing but the files they write, as separate processes would.

The only change from a real run: the children do not compile the batch-1
decoding step (`--compile auto` in interactive sessions), which costs tens
of seconds; tests/test_compiled_step.py tests it.
"""
import array
import json
import os
import socket
import struct
import sys

_FDS = 3  # stdin, stdout, stderr


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


def _child(request, fds):
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    import runpy
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (exit_.code is not None)
    except BaseException:  # a traceback, as python would print it
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(path):
    import torch
    from utils.model import import_texar
    import utils.decoding.compiling as compiling
    import_texar()
    # What every command imports, once: the entry scripts' modules, and the
    # compiler stack torch.optim loads when the first optimizer is built.
    import convert_checkpoint, gpt2_generate_main, gpt2_train_main, prepare_data  # noqa
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    compiling.timed_compile_step = lambda model: ("not compiled in the docs test", 0.0)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request, fds = _recv_request(conn)
        if request.get("stop"):
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            server.close()
            conn.close()
            _child(request, fds)
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        conn.sendall(struct.pack("i", os.waitstatus_to_exitcode(status)))
        conn.close()


def run(path, argv):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(),
                          "env": dict(os.environ)}).encode() + b"\n"
    conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", [0, 1, 2]))])
    reply = b""
    while len(reply) < 4:
        chunk = conn.recv(4 - len(reply))
        if not chunk:
            return 1
        reply += chunk
    code = struct.unpack("i", reply)[0]
    return 128 - code if code < 0 else code  # killed by a signal: 128 + its number


def stop(path):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    conn.sendall(b'{"stop": true}\n')
    conn.close()


if __name__ == "__main__":
    command, socket_path = sys.argv[1], sys.argv[2]
    if command == "serve":
        sys.path.insert(0, os.getcwd())
        serve(socket_path)
    elif command == "stop":
        stop(socket_path)
    else:
        sys.exit(run(socket_path, sys.argv[3:]))
