"""The suite's CLI runs without paying Python's start-up each time: a fork server.

One server process per pytest worker imports torch (and torch._dynamo, which every optimizer step imports), Hydra and
Accelerate once — ~4 s per process, paid by several hundred CLI runs before. For each `python -m xlab.<module>` a test
runs, it forks a fresh child that runs the module the way `python -m` does (`runpy._run_module_as_main`: the same
`__main__`, `sys.argv` and `sys.path[0]`), with the test's environment, working directory and its own stdout/stderr
files, then exits with the module's status after running its atexit handlers. XLab itself is imported afresh in every
child (the server never imports it), so each run starts from XLab's own import-time state. Tests that need a process's
very first imports (the lazy-import checks) start a plain interpreter themselves.

    python tests/forkserver.py SOCKET     # started by conftest.run_cli; one request per connection
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

PRELOAD = ("torch", "torch._dynamo", "hydra", "omegaconf", "accelerate", "safetensors.torch", "tokenizers", "einops")


def send_msg(sock: socket.socket, obj: object, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.sendall(payload)


def _recv_exactly(sock: socket.socket, size: int, data: bytes = b"") -> bytes:
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("fork server closed the connection")
        data += chunk
    return data


def recv_msg(sock: socket.socket, nfds: int = 0) -> tuple[object, list[int]]:
    """One message of send_msg, and the nfds file descriptors that came with it."""
    head, fds = socket.recv_fds(sock, 4, nfds)[:2] if nfds else (b"", [])
    (size,) = struct.unpack("!I", _recv_exactly(sock, 4, head))
    return json.loads(_recv_exactly(sock, size)), fds


def run_child(request: dict, out_fd: int, err_fd: int) -> None:
    """In the forked child: become `python -m <module> <args>` and exit with its status."""
    import atexit
    import runpy
    import threading

    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd in (out_fd, err_fd, null):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = [request["cwd"], *request["env"].get("PYTHONPATH", "").split(os.pathsep), *BASE_PATH]
    sys.path[:] = [p for p in sys.path if p]
    if "OMP_NUM_THREADS" in request["env"]:
        import torch

        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    sys.argv = ["-m", *request["args"]]  # _run_module_as_main puts the module's file in argv[0], as `python -m` does
    code: int = 0
    try:
        runpy._run_module_as_main(request["module"], alter_argv=True)
    except SystemExit as exc:  # what the interpreter does with it
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()  # the interpreter's exit: wait for non-daemon threads, then the atexit handlers
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    sys.stdout.flush()
    sys.stderr.flush()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                request, fds = recv_msg(conn, 2)
            except (ConnectionError, OSError, ValueError):
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                run_child(request, *fds)
            for fd in fds:
                os.close(fd)
            send_msg(conn, {"pid": pid})
            _, status = os.waitpid(pid, 0)
            try:
                send_msg(conn, {"returncode": os.waitstatus_to_exitcode(status)})
            except OSError:  # the test gave up (timeout) and closed its end
                pass


if __name__ == "__main__":
    # the interpreter's own path without this script's folder (a `python -m` child gets its cwd there instead)
    BASE_PATH = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    serve(sys.argv[1])
