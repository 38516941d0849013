"""Isolated execution of model-written Python (spec §3.5; issue 4, "Sandbox").

Every program runs in a fresh interpreter (`_sandbox_child.py`) that the harness starts in its own
session and process group, with:

- wall-clock limit (enforced here: the whole process group is SIGKILLed at the deadline) and a
  per-call limit (SIGALRM inside the child), CPU-time limit (RLIMIT_CPU), address-space limit
  (RLIMIT_AS), file-size limit (RLIMIT_FSIZE), process limit (RLIMIT_NPROC), no core dumps;
- a fresh temporary working directory, removed afterwards; HOME and TMPDIR point into it;
- a scrubbed environment (only PATH, locale, HOME/TMPDIR, thread counts and a fixed hash seed, so
  that set iteration orders match between reference and candidate runs): no inherited secrets;
- captured output, capped (`SandboxLimits.max_result_bytes`, `max_stderr_bytes`); user prints go
  to /dev/null;
- an audit hook inside the child that refuses process creation, signals, sockets, ctypes calls,
  rlimit changes, writes outside the working directory and reads of other processes' /proc files
  (see `_sandbox_child.py` for the list);
- when unprivileged user namespaces work (`unshare --user --net --pid`), new user, network and PID
  namespaces as well: no network interface but a down loopback, the harness invisible and
  unkillable from inside, and every process of the program killed with its init. Where they do
  not (for example Ubuntu 24.04's AppArmor default), the audit hook and rlimits are the defence;
  that fallback is weaker against deliberate escapes through the C level (e.g. `os.open` with
  `dir_fd`) but contains ordinary model-written code.

The harness never unpickles data from the child: results come back as tagged JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import pickle
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from t2jax.tasks import _sandbox_child
from t2jax.tasks._sandbox_child import OpaqueValue, decode_value

__all__ = [
    "CallOutcome",
    "OpaqueValue",
    "SandboxLimits",
    "SandboxResult",
    "SandboxServer",
    "namespaces_available",
    "run_function",
    "run_program",
]

CHILD_SCRIPT = pathlib.Path(_sandbox_child.__file__).resolve()
ISOLATION_MODES = ("auto", "namespaces", "process")
_NAMESPACE_PREFIX = (
    "unshare",
    "--user",
    "--map-root-user",
    "--net",
    "--pid",
    "--fork",
    "--kill-child",
    "--",
)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    Attributes:
        wall_seconds: wall-clock budget for the whole run, interpreter start-up included.
        cpu_seconds: RLIMIT_CPU; None means ceil(wall_seconds) + 1.
        memory_bytes: RLIMIT_AS (address space).
        file_size_bytes: RLIMIT_FSIZE (largest file the program may write).
        max_processes: RLIMIT_NPROC (enforced for non-root users and inside a user namespace).
        max_open_files: RLIMIT_NOFILE.
        max_result_bytes: cap on the result stream (encoded return values).
        max_stderr_bytes: how much of the program's stderr is kept for diagnostics.
    """

    wall_seconds: float = 10.0
    cpu_seconds: float | None = None
    memory_bytes: int = 2 * 1024**3
    file_size_bytes: int = 16 * 1024**2
    max_processes: int = 64
    max_open_files: int = 256
    max_result_bytes: int = 64 * 1024**2
    max_stderr_bytes: int = 64 * 1024

    def child_limits(self) -> dict[str, int]:
        cpu = self.cpu_seconds if self.cpu_seconds is not None else int(self.wall_seconds) + 2
        return {
            "cpu_seconds": max(1, int(cpu)),
            "memory_bytes": self.memory_bytes,
            "file_size_bytes": self.file_size_bytes,
            "max_processes": self.max_processes,
            "max_open_files": self.max_open_files,
        }


@dataclasses.dataclass(frozen=True)
class CallOutcome:
    """What one call of the entry point produced: a value, or an error message."""

    value: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """The outcome of a sandboxed run.

    Attributes:
        completed: the program (and every requested call) ran to its end.
        exec_error: the exception that escaped the program's top level, if any.
        calls: one outcome per call made so far (fewer than requested if stopped or killed).
        timed_out: the wall-clock limit was hit and the process group killed.
        stopped_early: the caller's `stop` callback ended the run.
        returncode: the interpreter's exit status (negative: killed by that signal).
        stderr: the program's stderr, truncated to `max_stderr_bytes`.
        isolation: "namespaces" or "process".
        note: harness-side problems (output over the cap, malformed protocol lines).
    """

    completed: bool
    exec_error: str | None
    calls: tuple[CallOutcome, ...]
    timed_out: bool
    stopped_early: bool
    returncode: int | None
    stderr: str
    isolation: str
    note: str | None = None

    @property
    def reason(self) -> str:
        """A one-line explanation of how the run ended."""
        if self.timed_out:
            return "timed out (wall-clock limit)"
        if self.note:
            return self.note
        if self.exec_error:
            return f"program raised {self.exec_error}"
        if self.completed:
            return "completed"
        if self.stopped_early:
            return "stopped by the caller"
        if self.returncode is not None and self.returncode < 0:
            name = signal.Signals(-self.returncode).name
            detail = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (CPU or memory limit)"}
            return f"killed by {name}{detail.get(name, '')}"
        tail = self.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"exited with status {self.returncode} before finishing: {tail[0][:200]}"


@functools.cache
def namespaces_available() -> bool:
    """Whether `unshare` can create user, network and PID namespaces here (probed once)."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(
            [*_NAMESPACE_PREFIX, "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _isolation_prefix(isolation: str) -> tuple[list[str], str]:
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    if isolation == "process" or (isolation == "auto" and not namespaces_available()):
        return [], "process"
    if not namespaces_available():
        raise RuntimeError(
            "isolation='namespaces' requested but `unshare --user --net --pid` fails"
        )
    return list(_NAMESPACE_PREFIX), "namespaces"


def _scrubbed_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _default_deny_read() -> list[str]:
    data_dir = os.environ.get("T2JAX_DATA")
    return [os.path.realpath(data_dir)] if data_dir else []


def _message(request: dict) -> bytes:
    payload = pickle.dumps(request)
    return len(payload).to_bytes(8, "big") + payload


def _feed(stream, payload: bytes, close: bool = True):
    try:
        stream.write(payload)
        stream.flush()
        if close:
            stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _remove_tree(path: str):
    def make_writable_and_retry(function, failed_path, _):
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


class _Collector:
    """Parses the child's JSON-lines result stream as it arrives."""

    def __init__(self, stop: Callable[[int, CallOutcome], bool] | None, limits: SandboxLimits):
        self.stop = stop
        self.limits = limits
        self.pending = b""
        self.result_bytes = 0
        self.calls: list[CallOutcome] = []
        self.exec_error: str | None = None
        self.completed = False
        self.stopped = False
        self.note: str | None = None

    def feed(self, chunk: bytes) -> bool:
        """Consumes output; returns False when reading should end."""
        self.result_bytes += len(chunk)
        if self.result_bytes > self.limits.max_result_bytes:
            self.note = f"output over the {self.limits.max_result_bytes}-byte cap"
            return False
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        return all(self._handle(line) for line in lines if line.strip())

    def _handle(self, line: bytes) -> bool:
        try:
            message = json.loads(line)
            event = message["event"]
        except (ValueError, KeyError, TypeError):
            self.note = "malformed result line from the sandbox"
            return False
        if event == "done":
            self.completed = True
        elif event == "exec_error":
            self.exec_error = str(message.get("error"))
        elif event == "call":
            outcome = CallOutcome(
                value=decode_value(message.get("value")),
                error=None if message.get("error") is None else str(message["error"]),
                seconds=float(message.get("seconds") or 0.0),
            )
            self.calls.append(outcome)
            if self.stop is not None and self.stop(len(self.calls) - 1, outcome):
                self.stopped = True
                return False
        return True


def _start(isolation: str, workdir: str, stderr) -> tuple[subprocess.Popen, str]:
    prefix, isolation_used = _isolation_prefix(isolation)
    process = subprocess.Popen(
        [*prefix, sys.executable, "-s", "-P", "-B", str(CHILD_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=_scrubbed_env(workdir),
        cwd=workdir,
        start_new_session=True,
        close_fds=True,
    )
    return process, isolation_used


def _execute(
    request: dict,
    limits: SandboxLimits,
    isolation: str,
    stop: Callable[[int, CallOutcome], bool] | None,
) -> SandboxResult:
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="t2jax-sandbox-"))
    request = {**request, "workdir": workdir, "limits": limits.child_limits()}
    collector = _Collector(stop, limits)
    stderr = bytearray()
    timed_out = False
    try:
        process, isolation_used = _start(isolation, workdir, subprocess.PIPE)
        feeder = threading.Thread(
            target=_feed, args=(process.stdin, _message(request)), daemon=True
        )
        feeder.start()
        deadline = time.monotonic() + limits.wall_seconds
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, "result")
            selector.register(process.stderr, selectors.EVENT_READ, "stderr")
            reading = True
            while reading and selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fileobj.fileno(), 1 << 16)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    elif key.data == "stderr":
                        stderr += chunk[: max(0, limits.max_stderr_bytes - len(stderr))]
                    elif not collector.feed(chunk):
                        reading = False
                        break
        _kill_group(process)
        returncode = process.wait()
        feeder.join(timeout=1)
        for stream in (process.stdout, process.stderr):
            stream.close()
    finally:
        _remove_tree(workdir)
    return SandboxResult(
        completed=collector.completed and not timed_out,
        exec_error=collector.exec_error,
        calls=tuple(collector.calls),
        timed_out=timed_out,
        stopped_early=collector.stopped,
        returncode=returncode,
        stderr=stderr.decode("utf-8", "replace"),
        isolation=isolation_used,
        note=collector.note,
    )


def _kill_group(process: subprocess.Popen):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def run_program(
    code: str,
    *,
    limits: SandboxLimits = SandboxLimits(),
    isolation: str = "auto",
    deny_read: Sequence[str] | None = None,
) -> SandboxResult:
    """Runs a whole program (e.g. a solution followed by its asserts) in the sandbox.

    Args:
        code: Python source, executed with `exec` in a fresh namespace (`__name__` is not
            "__main__", as in human-eval and evalplus).
        limits: resource limits.
        isolation: "auto" (namespaces when available), "namespaces" or "process".
        deny_read: directories the program may not read (default: the `T2JAX_DATA` directory,
            so a program cannot look up reference solutions).

    Returns:
        A `SandboxResult`; the program passed iff `result.completed` and no `exec_error`.
    """
    request = {
        "mode": "program",
        "code": code,
        "deny_read_roots": list(_default_deny_read() if deny_read is None else deny_read),
    }
    return _execute(request, limits, isolation, stop=None)


def run_function(
    code: str,
    entry_point: str,
    inputs: Sequence[Sequence[Any]],
    time_limits: Sequence[float],
    *,
    limits: SandboxLimits = SandboxLimits(),
    deepcopy_inputs: bool = False,
    stop: Callable[[int, CallOutcome], bool] | None = None,
    isolation: str = "auto",
    deny_read: Sequence[str] | None = None,
) -> SandboxResult:
    """Executes `code`, then calls `entry_point(*args)` for each argument list in the sandbox.

    Each call has its own time limit (SIGALRM in the child); its return value comes back decoded
    to a plain Python value (`OpaqueValue` for what cannot be carried).

    Args:
        code: the program defining `entry_point`.
        entry_point: the function to call.
        inputs: argument lists; pickled into the child (they come from the harness).
        time_limits: seconds allowed per call, same length as `inputs`.
        limits: whole-run resource limits; `limits.wall_seconds` bounds everything.
        deepcopy_inputs: deep-copy each argument list before the call (as evalplus does when it
            computes reference outputs).
        stop: called with (index, outcome) as each call finishes; returning True kills the run
            (used to stop at the first wrong answer).
        isolation: see `run_program`.
        deny_read: see `run_program`.
    """
    if len(inputs) != len(time_limits):
        raise ValueError(f"{len(inputs)} inputs but {len(time_limits)} time limits")
    request = {
        "mode": "calls",
        "code": code,
        "entry_point": entry_point,
        "inputs": [list(arguments) for arguments in inputs],
        "time_limits": [float(limit) for limit in time_limits],
        "deepcopy_inputs": deepcopy_inputs,
        "deny_read_roots": list(_default_deny_read() if deny_read is None else deny_read),
    }
    return _execute(request, limits, isolation, stop)


class SandboxServer:
    """A long-lived sandboxed interpreter that answers many small requests cheaply.

    Trusted `setup_code` (which must define `handle(payload) -> value`) runs once; each request is
    then handled in a child forked from the server that locks itself down (audit hook, as for
    `run_program`) before it touches the payload, so untrusted input never runs in the server and
    never leaks state into later requests. Used for sympy equivalence checks of model answers
    (spec §3.5, MATH), which `parse_expr` evaluates as Python.

    Thread-safe; restarts itself after a crash or an unanswered request. Call `close()` when done.
    """

    def __init__(
        self,
        setup_code: str,
        *,
        request_timeout: float = 5.0,
        startup_timeout: float = 60.0,
        limits: SandboxLimits = SandboxLimits(cpu_seconds=24 * 3600),
        isolation: str = "auto",
        deny_read: Sequence[str] | None = None,
    ):
        self.setup_code = setup_code
        self.request_timeout = request_timeout
        self.startup_timeout = startup_timeout
        self.limits = limits
        self.isolation = isolation
        self.deny_read = list(_default_deny_read() if deny_read is None else deny_read)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._workdir: str | None = None
        self._pending = b""

    def call(self, payload: dict) -> CallOutcome:
        """Handles one request; errors (including "timeout") come back in `CallOutcome.error`."""
        with self._lock:
            try:
                process = self._process or self._spawn()
                _feed(process.stdin, _message(payload), close=False)
                answer = self._read_line(self.request_timeout + 5.0)
            except (OSError, RuntimeError, ValueError) as error:
                self._shutdown()
                return CallOutcome(error=f"sandbox server failed: {error}")
            if answer.get("error") is not None:
                return CallOutcome(error=str(answer["error"]))
            return CallOutcome(value=decode_value(answer.get("value")))

    def close(self):
        """Stops the server process and removes its working directory."""
        with self._lock:
            self._shutdown()

    def _spawn(self) -> subprocess.Popen:
        self._workdir = os.path.realpath(tempfile.mkdtemp(prefix="t2jax-sandbox-server-"))
        self._process, _ = _start(self.isolation, self._workdir, subprocess.DEVNULL)
        request = {
            "mode": "server",
            "code": self.setup_code,
            "workdir": self._workdir,
            "limits": self.limits.child_limits(),
            "deny_read_roots": self.deny_read,
            "request_timeout": self.request_timeout,
        }
        _feed(self._process.stdin, _message(request), close=False)
        ready = self._read_line(self.startup_timeout)
        if ready.get("event") != "ready":
            raise RuntimeError(f"setup failed: {ready.get('error', ready)}")
        return self._process

    def _read_line(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        stream = self._process.stdout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            ready = remaining > 0 and selectors_ready(stream, remaining)
            chunk = os.read(stream.fileno(), 1 << 16) if ready else b""
            if not chunk:
                raise RuntimeError("no answer (timeout or crash)")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def _shutdown(self):
        if self._process is not None:
            _kill_group(self._process)
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                stream.close()
            self._process = None
        if self._workdir is not None:
            _remove_tree(self._workdir)
            self._workdir = None
        self._pending = b""


def selectors_ready(stream, timeout: float) -> bool:
    """Whether `stream` has data (or EOF) within `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        return bool(selector.select(timeout))
