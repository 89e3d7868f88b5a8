"""Start the simulated fleet's processes by forking one that has already imported the model libraries.

A real fleet's devices import torch + transformers + peft each on its own CPU, at the same time: a
few seconds. The demo runs the server and every device on one machine, and there each of its nine
processes paid those imports again (~6.5 CPU-s each here), ~30 s on two cores before round 1 could
begin: a start-up only the simulation pays. The zygote is a process started with the fleet's
environment that imports the libraries once and then forks the server and every agent on request.
Each child is still its own process running the same command line (``python -m MODULE ARGS``) with
its own log, MQTT client, memory and exit code; only the imports are shared, copy-on-write.

It forks only where that is safe: on Linux, and when no CUDA device is visible (a CUDA context does
not survive a fork; a GPU fleet is started process by process). The demo falls back to plain processes
when the zygote says it is not ready, and ``--launch spawn`` asks for them.

Protocol, one JSON object per line: the zygote writes ``{"ready": bool, "why": str}`` once, then
``{"id": k, "pid": p}`` (or ``{"id": k, "error": str}``) for each request ``{"id": k, "module": str,
"args": [str], "log": path}`` it reads on stdin, and ``{"exit": pid, "code": c}`` (Popen's convention:
minus the signal number) when a child ends. On SIGTERM, or when its stdin closes, it sends SIGTERM to
its children, reports their exits and leaves (SIGKILL after ``STOP_GRACE_S``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STOP_GRACE_S = 20.0
READY_TIMEOUT_S = 300.0     # the imports on a slow SD card
PRELOAD = ("torch", "transformers", "peft", "edge_runtime.cli", "broker_server.cli")
MAINS = ("edge_runtime.cli", "broker_server.cli")     # the modules the children run


def preload(modules: tuple[str, ...] = PRELOAD) -> str | None:
    """Import ``modules`` (torch first); None when forking is safe afterwards, else why not."""
    if not sys.platform.startswith("linux"):
        return f"forking a process that has imported torch is only done on Linux (this is {sys.platform})"
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")   # asks NVML, leaving CUDA uninitialised
    for name in modules:
        __import__(name)
        if name == "torch" and sys.modules["torch"].cuda.is_available():
            return "a CUDA device is visible, and a CUDA context does not survive a fork"
    if "peft" in modules:
        from edge_runtime.agent.probe import import_model_libraries

        import_model_libraries()
    for name in MAINS:   # imported for what they import; each child runs its own as __main__, as -m does
        sys.modules.pop(name, None)
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        return "importing the libraries initialised CUDA"
    return None


def _run_child(req: dict) -> None:
    """In the forked child: the log as stdout and stderr, then ``python -m module args``; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        if "numpy" in sys.modules:   # its global generator would otherwise be the same in every child
            sys.modules["numpy"].random.seed()
        import runpy

        sys.argv = [req["module"], *req["args"]]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:   # what an uncaught exception does to a process: the traceback, exit 1
        import traceback

        traceback.print_exc()
    try:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


class _Server:
    """The zygote's loop: requests from stdin, children reaped, exits reported (single-threaded: it forks)."""

    def __init__(self) -> None:
        self.children: set[int] = set()
        self.stopping: float | None = None   # when the stop began

    def emit(self, obj: dict) -> None:
        try:
            os.write(1, (json.dumps(obj) + "\n").encode())
        except BrokenPipeError:   # the launcher has gone: its stdin's end stops the children
            pass

    def spawn(self, req: dict) -> None:
        try:
            rid, module, args, log = req["id"], str(req["module"]), [str(a) for a in req["args"]], str(req["log"])
        except (KeyError, TypeError) as exc:
            self.emit({"id": req.get("id") if isinstance(req, dict) else None, "error": f"bad request: {exc!r}"})
            return
        if self.stopping is not None:
            self.emit({"id": rid, "error": "the zygote is stopping"})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child({"module": module, "args": args, "log": log})
        self.children.add(pid)
        self.emit({"id": rid, "pid": pid})

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.emit({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def stop(self) -> None:
        if self.stopping is None:
            self.stopping = time.monotonic()
            self.signal_children(signal.SIGTERM)

    def signal_children(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the children themselves
        buf, eof = b"", False
        while not (self.stopping is not None and not self.children):
            if not eof and self.stopping is None:
                ready, _, _ = select.select([0], [], [], 0.2)
                if ready:
                    data = os.read(0, 65536)
                    eof = not data
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        try:
                            self.spawn(json.loads(line))
                        except ValueError as exc:
                            self.emit({"id": None, "error": f"not JSON: {exc}"})
                    if eof:
                        self.stop()
            else:
                time.sleep(0.1)
                if self.stopping is not None and time.monotonic() - self.stopping > STOP_GRACE_S:
                    self.signal_children(signal.SIGKILL)
            self.reap()


def main() -> None:
    try:
        why = preload(tuple(sys.argv[1:]) or PRELOAD)
    except Exception as exc:   # a library that fails to import: the fleet starts as plain processes
        why = f"{type(exc).__name__}: {exc}"
    server = _Server()
    server.emit({"ready": why is None, "why": why or ""})
    if why is None:
        server.serve()


class ForkedProcess:
    """A child of the zygote, seen from the process that asked for it: the part of ``subprocess.Popen``
    the demo uses (``pid``, ``returncode``, ``poll``, ``wait``, ``terminate``, ``kill``)."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]) -> None:
        self.zygote, self.pid, self.args = zygote, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.zygote.wait_for_news(0.2)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """Start one (``python -m broker_server.zygote`` with ``env``, importing ``modules``) and ask it for
    children. ``ready`` says
    whether it can fork; when not, ``why`` says why, and the zygote has already exited."""

    def __init__(self, env: dict[str, str], log_path: Path, modules: tuple[str, ...] = PRELOAD) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "broker_server.zygote", *modules],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
        self._news = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._exits: dict[int, int] = {}
        self._gone = False      # the zygote's stdout closed: no more news
        self._next = 0
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()
        hello = self._wait(lambda: self._replies.pop(-1, None), READY_TIMEOUT_S)
        self.ready = bool(hello and hello.get("ready"))
        self.why = (hello or {}).get("why") or ("" if self.ready else "the zygote did not answer")
        if not self.ready:   # it has left already, or is stuck importing: reaped either way
            self.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._news:
                if "ready" in msg:
                    self._replies[-1] = msg
                elif "exit" in msg:
                    self._exits[int(msg["exit"])] = int(msg["code"])
                elif isinstance(msg.get("id"), int):
                    self._replies[msg["id"]] = msg
                self._news.notify_all()
        with self._news:
            self._gone = True
            self._news.notify_all()

    def _wait(self, take, timeout: float):
        deadline = time.monotonic() + timeout
        with self._news:
            while (got := take()) is None and not self._gone and time.monotonic() < deadline:
                self._news.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            return got

    def wait_for_news(self, timeout: float) -> None:
        with self._news:
            if not self._gone:
                self._news.wait(timeout)

    def exit_code(self, pid: int) -> int | None:
        """The child's exit code once it has ended, else None (after the zygote died: asked of the OS)."""
        with self._news:
            if pid in self._exits:
                return self._exits[pid]
            if not self._gone:
                return None
        try:   # the zygote died: its children went to init, which reaps them
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return -signal.SIGKILL
        except PermissionError:   # the pid now belongs to someone else: ours has ended
            return -signal.SIGKILL

    def spawn(self, module: str, args: list[str], log_path: Path) -> ForkedProcess:
        """``python -m module args`` as a fork of the zygote, stdout and stderr appended to ``log_path``."""
        with self._news:
            rid, self._next = self._next, self._next + 1
        self.proc.stdin.write((json.dumps({"id": rid, "module": module, "args": args, "log": str(log_path)})
                               + "\n").encode())
        self.proc.stdin.flush()
        reply = self._wait(lambda: self._replies.pop(rid, None), 30.0)
        if not reply or "pid" not in reply:
            raise ChildProcessError(f"the zygote did not start {module}: "
                                    f"{(reply or {}).get('error', 'no answer')}")
        return ForkedProcess(self, int(reply["pid"]), [module, *args])

    def close(self) -> None:
        """Stop asking: the zygote stops its children (SIGTERM) and leaves."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()
