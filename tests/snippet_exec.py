"""Run the docs' `afinar ...` and `python ...` commands as real processes, fast (tests/test_snippets.py).

A shell snippet calls `afinar` a dozen times; a fresh Python pays seconds of imports (torch,
transformers) each time. So a warm server process imports them once and forks a child per command:

    python tests/snippet_exec.py serve SOCKET     the server; prints "ready" once it listens

and the `afinar` / `python` / `python3` that a snippet runs are tiny clients (`client(tool)`,
started with `python -S`): they hand the server their arguments, folder, environment and their
stdin/stdout/stderr (file descriptors, over the Unix socket), forward signals to the child, and
exit with its exit code. Each command is still its own process with its own streams and exit
status; only the imports are shared. Without AFINAR_SNIPPET_SOCKET (e.g. not on Linux, where fork
after importing these libraries is not safe), a client simply execs a fresh Python.

`afinar train`, `afinar demo` and `afinar compare --train` get AFINAR_SNIPPET_SHRINK's `--set`
overrides appended (a tiny model, a step or two): what a snippet trains for minutes here takes
seconds, with the snippet's own options still parsed and applied. Keys the command sets itself
stay the command's, except those listed in AFINAR_SNIPPET_FORCE (the schedule and the model).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

SOCKET_ENV, SHRINK_ENV, FORCE_ENV = "AFINAR_SNIPPET_SOCKET", "AFINAR_SNIPPET_SHRINK", "AFINAR_SNIPPET_FORCE"


def shrink(args: list[str], env: dict) -> list[str]:
    """`afinar` arguments with the shrinking overrides appended to the commands that train."""
    trains = args[:1] in (["train"], ["demo"]) or (args[:1] == ["compare"] and "--train" in args)
    if not trains or not env.get(SHRINK_ENV):
        return args
    force = set(json.loads(env.get(FORCE_ENV, "[]")))
    given = {args[i + 1].split("=", 1)[0].strip() for i, a in enumerate(args[:-1]) if a == "--set"}
    extra = [o for o in json.loads(env[SHRINK_ENV]) if o.split("=", 1)[0] in force or o.split("=", 1)[0] not in given]
    return [*args, *(x for o in extra for x in ("--set", o))]


# ---------------------------------------------------------------- client


def client(tool: str) -> None:
    """Run `tool` ("afinar" or "python") with this process's arguments through the server."""
    args = sys.argv[1:]
    if tool == "afinar":
        args = shrink(args, os.environ)
    path = os.environ.get(SOCKET_ENV)
    if not path:
        os.execv(sys.executable, [sys.executable, *(["-m", "afinar.cli"] if tool == "afinar" else []), *args])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    payload = json.dumps({"tool": tool, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(sock, [len(payload).to_bytes(8, "big") + payload], [0, 1, 2])
    replies = sock.makefile("r")
    pid = int(replies.readline())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: os.kill(pid, number))
    code = int(replies.readline() or 1)
    sys.exit(code if code >= 0 else 128 - code)


# ---------------------------------------------------------------- server


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    size = int.from_bytes(data[:8], "big")
    data = data[8:]
    while len(data) < size:
        data += conn.recv(size - len(data))
    return json.loads(data), fds


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the command, then exit with its status."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from afinar.quiet import quiet_environment

        quiet_environment()  # what `afinar` sets before importing the libraries (here imported already)
        args = request["args"]
        if request["tool"] == "afinar":
            from afinar.cli import app

            sys.argv = ["afinar", *args]
            app(args=args, prog_name="afinar")
        else:
            import runpy

            if args[:1] == ["-c"]:
                sys.argv = ["-c", *args[2:]]
                exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
            elif args[:1] == ["-m"]:
                sys.argv = [args[1], *args[2:]]
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = args
                sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
                runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(path: str) -> None:
    """Import the heavy libraries once, then fork a child per client until killed."""
    import threading

    from afinar.quiet import quiet_libraries

    quiet_libraries()
    import afinar.cli  # noqa: F401
    import afinar.evaluate  # noqa: F401
    import afinar.inference  # noqa: F401
    import afinar.train  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from afinar.backends import torch_answer, torch_train  # noqa: F401

    children: set[int] = set()

    def stop(*_):
        for pid in list(children):  # a test that failed midway may leave a server running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request, fds = _receive(conn)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            server.close()
            conn.close()
            _child(request, fds)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        conn.sendall(f"{pid}\n".encode())

        def wait(pid=pid, conn=conn):
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:  # the client is gone (killed): nobody to tell
                pass
            conn.close()

        threading.Thread(target=wait, daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        sys.exit("usage: python tests/snippet_exec.py serve SOCKET")
