"""A fence around a user's functions: they run in a child process the worker owns, never in the worker.

The child is started once (`python -m finetune.evaluate.sandbox`, in a session and process group of
its own, with an address-space limit) and kept warm between chunks: a user's module is imported once
there. Each call goes to it as JSON, so the function gets its own copy of the arguments and can
change nothing of the worker's (nor of the next function's); the answer comes back as JSON (a number
or an error), never as a pickle. A call that does not answer within its time limit, a child that
exits, a function that raises a BaseException that is not an Exception (SystemExit,
KeyboardInterrupt), or leaves threads or processes behind: the child's whole process group is
killed, the call has no value and a `UserCodeFailure` says why; the next call starts a fresh child.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

MAX_ANSWER_BYTES = 1 << 20
WATCHER = "finetune-sandbox-watch"


@dataclass(frozen=True)
class Outcome:
    """A call's value (None: none; a list of numbers or None for `call(..., many=True)`), and why it has none or
    why its child was replaced (None: all went well)."""

    value: Any
    problem: str | None = None


@dataclass(frozen=True)
class UserCodeFailure:
    """A user's function that gave no value at a call (or whose process had to be killed), and why."""

    source: str  # the config key that names it: eval_conf.custom[1], grpo_args.reward_functions[0]
    name: str
    function: str
    problem: str


class UserCodeSandbox:
    """One warm child process running user functions `package.module:function` by keyword arguments."""

    def __init__(self, memory_bytes: int | None = None) -> None:
        self.memory_bytes = memory_bytes
        self.process: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._receive: Connection | None = None

    # ------------------------------------------------------------ the parent's side

    def call(self, function: str, timeout_s: float, many: bool = False, namespaces: tuple[str, ...] = (),
             **arguments: Any) -> Outcome:
        """`function(**arguments)` in the child, as a finite number (`many`: a list of finite numbers or None).
        `namespaces`: arguments (dicts) the function reads as objects (`trainer_state.global_step`)."""
        try:
            request = json.dumps({"function": function, "arguments": arguments, "many": many,
                                  "namespaces": list(namespaces)}).encode()
        except (TypeError, ValueError) as error:
            return Outcome(None, f"its arguments cannot be sent: {error}")
        try:
            self._ensure_started()
        except OSError as error:
            return Outcome(None, f"its process cannot start: {error}")
        assert self._send is not None and self._receive is not None and self.process is not None
        try:
            self._send.send_bytes(request)
            ready = self._receive.poll(timeout_s)
            answer = self._receive.recv_bytes(MAX_ANSWER_BYTES) if ready else None
        except (EOFError, OSError):  # the child is gone: it exited, or the user's code killed it
            return Outcome(None, self._kill(f"its process exited ({self._exit_code()})"))
        if answer is None:
            return Outcome(None, self._kill(f"it did not return within {timeout_s:g} s; killed"))
        try:
            reply = json.loads(answer)
            value = reply.get("value")
            error, fatal, threads = reply.get("error"), bool(reply.get("fatal")), list(reply.get("threads") or [])
        except (ValueError, AttributeError, TypeError):
            return Outcome(None, self._kill("its process answered something that is not the sandbox's"))
        problems = [error] if error else []
        if fatal:
            problems.append("its process was killed")
        strays = self._strays()
        if strays:
            problems.append(f"it left {len(strays)} process(es) running (pid {', '.join(map(str, strays))}); killed")
        if threads:
            problems.append(f"it left {len(threads)} thread(s) running ({', '.join(map(str, threads))}); killed")
        if fatal or strays or threads:
            self._kill("")
        if error:
            return Outcome(None, "; ".join(problems))
        if many:
            if not isinstance(value, list) or not all(item is None or _finite(item) for item in value):
                return Outcome(None, "its process answered something that is not a list of numbers")
            return Outcome([None if item is None else float(item) for item in value], "; ".join(problems) or None)
        if not _finite(value):
            return Outcome(None, f"its process answered {value!r}, not a finite number")
        return Outcome(float(value), "; ".join(problems) or None)

    def close(self) -> None:
        """End the child (and anything it started); a later call starts another."""
        if self.process is not None:
            self._kill("")

    def _ensure_started(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if self.process is not None:
            self._kill("")
        from_parent, to_child = os.pipe()
        from_child, to_parent = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = [sys.executable, "-m", "finetune.evaluate.sandbox", str(from_parent), str(to_parent),
                   str(self.memory_bytes or 0), str(os.getpid())]
        try:
            output = sys.stderr.fileno()  # what the user's code prints goes to the worker's stderr, never its stdout
        except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (a test's capture, say)
            output = 2
        try:
            self.process = subprocess.Popen(command, pass_fds=(from_parent, to_parent), start_new_session=True,
                                            stdin=subprocess.DEVNULL, stdout=output, env=env, close_fds=True)
        finally:
            os.close(from_parent)
            os.close(to_parent)
        self._send = Connection(to_child, readable=False)
        self._receive = Connection(from_child, writable=False)
        self._send.send_bytes(json.dumps({"sys_path": sys.path}).encode())

    def _exit_code(self) -> str:
        assert self.process is not None
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        return f"signal {-code}" if code < 0 else f"exit code {code}"

    def _strays(self) -> list[int]:
        """Processes of the child's process group other than the child (zombies aside): what the user's code started."""
        assert self.process is not None
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.process.pid:
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == self.process.pid:
                found.append(int(entry.name))
        return found

    def _kill(self, why: str) -> str:
        """Kill the child's process group (the child, and whatever it started in it); `why`, for the caller."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for connection in (self._send, self._receive):
            if connection is not None:
                connection.close()
        self.process, self._send, self._receive = None, None, None
        return why


# ---------------------------------------------------------------- the child's side


class SandboxUser:
    """What holds a sandbox (a run's custom metrics, this process's reward fence): the failures of its calls
    since the worker last took them, and the sandbox's end."""

    sandbox: UserCodeSandbox | None
    failures: list[UserCodeFailure]

    def take_failures(self) -> list[UserCodeFailure]:
        failures, self.failures = self.failures, []
        return failures

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _serve(receive: Connection, send: Connection) -> None:
    import importlib
    import threading
    from types import SimpleNamespace

    functions: dict[str, Any] = {}
    while True:
        try:
            request = json.loads(receive.recv_bytes())
        except EOFError:
            return
        path = request["function"]
        reply: dict[str, Any]
        fatal = False
        try:
            if path not in functions:
                module_name, _, attribute = path.partition(":")
                functions[path] = getattr(importlib.import_module(module_name), attribute)
            arguments = request["arguments"]
            for name in request.get("namespaces", []):
                if isinstance(arguments.get(name), dict):
                    arguments[name] = SimpleNamespace(**arguments[name])
            value = functions[path](**arguments)
            reply = {"value": numbers_of(value) if request.get("many") else number_of(value)}
        except Exception as error:
            reply = {"error": _described(error)}
        except BaseException as error:  # SystemExit, KeyboardInterrupt, GeneratorExit: said, then this process ends
            reply, fatal = {"error": _described(error)}, True
        reply["fatal"] = fatal
        reply["threads"] = [thread.name for thread in threading.enumerate()
                            if thread is not threading.main_thread() and thread.name != WATCHER and thread.is_alive()]
        try:
            send.send_bytes(json.dumps(reply, default=str).encode())
        except (OSError, ValueError):
            return


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def number_of(value: Any) -> float:
    """A user function's result as a finite float; anything else raises, naming what it was."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_") or not (
            isinstance(value, (int, float)) or hasattr(value, "__float__")):  # numpy's bool is no bool
        raise TypeError(f"returned {type(value).__name__}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"returned {number}, not a finite number")
    return number


def numbers_of(values: Any) -> list[float | None]:
    """A user function's list of results: each a finite float, or None (no value for that item)."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise TypeError(f"returned {type(values).__name__}, not a list of numbers")
    return [None if value is None else number_of(value) for value in values]


def _watch_parent(parent: int) -> None:
    """End this process group once the worker that owns it is gone (even killed with SIGKILL)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name=WATCHER, daemon=True).start()


def main(argv: list[str]) -> None:
    receive_fd, send_fd, memory, parent = (int(value) for value in argv)
    if memory:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this process ends
    _watch_parent(parent)
    receive, send = Connection(receive_fd, writable=False), Connection(send_fd, readable=False)
    sys.path[:] = json.loads(receive.recv_bytes())["sys_path"]  # the worker's, to import what it would
    _serve(receive, send)
    os._exit(0)  # not waiting for threads the user's code left


if __name__ == "__main__":
    main(sys.argv[1:])
