"""Starting one sandboxed child process, and choosing how it is isolated (see `sandbox`).

A `Plan` says how a child starts (through `unshare` for the namespaces mode, through the
root-dropping launcher when the harness is root) and which kernel mechanisms it applies to itself;
`resolve` turns an isolation mode into a plan after probing what this machine offers. `Child`
owns the process, its fresh working directory and its event stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

from t2jax.tasks import _sandbox_child
from t2jax.tasks import _sandbox_kernel as kernel
from t2jax.tasks._sandbox_codec import frame

ISOLATION_MODES: tuple[str, ...] = ("auto", "namespaces", "process", "strict")
ISOLATION_ENV = "T2JAX_SANDBOX"
CHILD_SCRIPT = pathlib.Path(_sandbox_child.__file__).resolve()
_INTERPRETER = (sys.executable, "-s", "-P", "-B", str(CHILD_SCRIPT))
_NAMESPACE_PREFIX = (
    "unshare", "--user", "--map-current-user", "--net", "--pid", "--fork", "--kill-child", "--",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    Attributes:
        wall_seconds: wall-clock budget for the whole run, interpreter start-up included.
        cpu_seconds: RLIMIT_CPU; None means ceil(wall_seconds) + 1.
        memory_bytes: RLIMIT_AS (address space).
        file_size_bytes: RLIMIT_FSIZE (largest file the program may write).
        max_processes: RLIMIT_NPROC (counted per uid: all sandboxes share uid 65534 under root).
        max_open_files: RLIMIT_NOFILE.
        max_result_bytes: cap on the event stream (encoded return values).
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
        """The rlimits the child sets on itself."""
        cpu = self.cpu_seconds if self.cpu_seconds is not None else int(self.wall_seconds) + 2
        return {
            "cpu_seconds": max(1, int(cpu)),
            "memory_bytes": self.memory_bytes,
            "file_size_bytes": self.file_size_bytes,
            "max_processes": self.max_processes,
            "max_open_files": self.max_open_files,
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one child is started and what it applies to itself."""

    namespaces: bool
    drop_root: bool
    landlock_abi: int
    seccomp: bool

    @property
    def name(self) -> str:
        """The isolation mode this plan reports: "namespaces" or "process"."""
        return "namespaces" if self.namespaces else "process"

    def command(self, workdir: str) -> list[str]:
        """The command line that starts the child."""
        if self.drop_root:
            return [*_INTERPRETER, "--as-sandbox-user", workdir] + (
                ["--namespaces"] if self.namespaces else []
            )
        return [*(_NAMESPACE_PREFIX if self.namespaces else ()), *_INTERPRETER]


def default_isolation() -> str:
    """The process-wide default mode: `$T2JAX_SANDBOX`, else "auto"."""
    mode = os.environ.get(ISOLATION_ENV) or "auto"
    if mode not in ISOLATION_MODES:
        raise ValueError(f"{ISOLATION_ENV} must be one of {ISOLATION_MODES}, got {mode!r}")
    return mode


@functools.cache
def kernel_plan(namespaces: bool) -> Plan:
    """Every mechanism the kernel offers, with or without namespaces (probed once)."""
    abi = kernel.landlock_abi()
    return Plan(namespaces, os.geteuid() == 0, abi, kernel.seccomp_supported())


@functools.cache
def plan_works(plan: Plan) -> bool:
    """Whether a trivial function runs under `plan` (probed once per process and plan)."""
    if plan.namespaces and shutil.which("unshare") is None:
        return False
    request = {
        "mode": "calls",
        "code": "def f():\n    return 1",
        "entry_point": "f",
        "inputs": [[]],
        "time_limits": [5.0],
        "deepcopy_inputs": False,
        "deny_read_roots": [],
    }
    try:
        child = Child(plan, request, SandboxLimits())
    except OSError:
        return False
    try:
        event = child.read_event(time.monotonic() + 30.0)
    except (TimeoutError, Overflow):
        event = None
    finally:
        child.close()
    return event is not None and event.get("index") == 0 and event.get("value") == 1


def namespaces_available() -> bool:
    """Whether sandboxed programs can run in their own user, network and PID namespaces here."""
    return plan_works(kernel_plan(namespaces=True))


def missing_protections() -> list[str]:
    """What this machine cannot enforce, each with how to enable it (empty: everything)."""
    plan = kernel_plan(namespaces=False)
    missing = []
    if not plan.landlock_abi:
        missing.append(
            "Landlock (kernel file isolation): needs Linux >= 5.13 built with "
            "CONFIG_SECURITY_LANDLOCK and 'landlock' in the lsm= boot parameter"
        )
    if not plan.seccomp:
        missing.append("seccomp filters (x86_64 or aarch64 Linux with CONFIG_SECCOMP_FILTER)")
    if plan.drop_root and not plan_works(plan):
        missing.append(
            "dropping root to uid 65534: needs CAP_SETUID and, where the Python installation is "
            "under a directory other users cannot enter, CAP_SYS_ADMIN for a mount namespace; "
            "or run as an unprivileged user"
        )
    return missing


@functools.cache
def warn_once(missing: tuple[str, ...]):
    """One RuntimeWarning per process and set of missing protections."""
    warnings.warn(
        "The code sandbox runs with weaker isolation on this machine; missing: "
        + "; ".join(missing)
        + f". Set {ISOLATION_ENV}=strict to refuse to run instead.",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve(isolation: str | None) -> Plan:
    """The plan for an isolation mode (None: `default_isolation()`); raises RuntimeError where
    the mode cannot be honoured ("namespaces" without namespaces, "strict" with gaps)."""
    isolation = default_isolation() if isolation is None else isolation
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    if isolation == "namespaces" and not namespaces_available():
        raise RuntimeError(
            "isolation='namespaces' requested but `unshare --user --net --pid` fails"
        )
    missing = missing_protections()
    if missing and isolation == "strict":
        raise RuntimeError("isolation='strict' refuses to run; missing: " + "; ".join(missing))
    if missing:
        warn_once(tuple(missing))
    use_namespaces = isolation == "namespaces" or (
        isolation in ("auto", "strict") and namespaces_available()
    )
    plan = kernel_plan(use_namespaces)
    if plan.drop_root and not plan_works(kernel_plan(False)):
        plan = dataclasses.replace(plan, drop_root=False)  # warned above: still root inside
    return plan


# ---------------------------------------------------------------------------------------------
# One sandboxed child process.


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


def default_deny_read() -> list[str]:
    data_dir = os.environ.get("T2JAX_DATA")
    return [os.path.realpath(data_dir)] if data_dir else []


def remove_tree(path: str):
    def make_writable_and_retry(function, failed_path, _):
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


class Overflow(Exception):
    """The child's event stream exceeded its byte cap."""


class Child:
    """A sandboxed interpreter in a fresh working directory: send requests, read JSON events."""

    def __init__(
        self,
        plan: Plan,
        request: dict,
        limits: SandboxLimits,
        keep_stderr: bool = True,
        prefix: str = "t2jax-sandbox-",
    ):
        self.plan = plan
        self.limits = limits
        self.workdir = os.path.realpath(tempfile.mkdtemp(prefix=prefix))
        if plan.drop_root:
            os.chown(self.workdir, kernel.SANDBOX_UID, kernel.SANDBOX_GID)
        self.stderr = bytearray()
        self._pending = b""
        self._received = 0
        self._writer: threading.Thread | None = None
        try:
            self.process = subprocess.Popen(
                plan.command(self.workdir),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if keep_stderr else subprocess.DEVNULL,
                env=_scrubbed_env(self.workdir),
                cwd=self.workdir,
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            remove_tree(self.workdir)
            raise
        os.set_blocking(self.process.stdin.fileno(), False)
        self._closing = threading.Event()
        self._drain = None
        if keep_stderr:
            self._drain = threading.Thread(target=self._read_stderr, daemon=True)
            self._drain.start()
        full_request = {
            **request,
            "workdir": self.workdir,
            "limits": limits.child_limits(),
            "landlock_abi": plan.landlock_abi,
            "seccomp": plan.seccomp,
        }
        self.send(full_request)

    def _read_stderr(self):
        descriptor = self.process.stderr.fileno()
        while not self._closing.is_set():
            if not _ready(descriptor, selectors.EVENT_READ, 0.1):
                continue
            chunk = os.read(descriptor, 1 << 16)
            if not chunk:
                return
            self.stderr += chunk[: max(0, self.limits.max_stderr_bytes - len(self.stderr))]

    def send(self, message: dict):
        """Writes one framed message to the child's stdin, in a thread (the child may not read):
        messages go out in order; `close` ends a write the child never takes."""
        previous = self._writer
        descriptor = self.process.stdin.fileno()

        def write():
            if previous is not None:
                previous.join()
            view = memoryview(frame(message))
            while view and not self._closing.is_set():
                if _ready(descriptor, selectors.EVENT_WRITE, 0.1):
                    try:
                        view = view[os.write(descriptor, view) :]
                    except BlockingIOError:
                        continue
                    except OSError:
                        return

        self._writer = threading.Thread(target=write, daemon=True)
        self._writer.start()

    def read_event(self, deadline: float) -> dict | None:
        """The next event line; None at end of stream. Raises TimeoutError at `deadline`,
        `Overflow` past the byte cap; a malformed line reads as {"event": "malformed"}."""
        stream = self.process.stdout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _ready(stream.fileno(), selectors.EVENT_READ, remaining):
                raise TimeoutError
            chunk = os.read(stream.fileno(), 1 << 16)
            if not chunk:
                return None
            self._received += len(chunk)
            if self._received > self.limits.max_result_bytes:
                raise Overflow
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            return {"event": "malformed"}
        return event if isinstance(event, dict) else {"event": "malformed"}

    def close(self) -> int:
        """Kills the process group, reaps the child, removes the working directory."""
        self._closing.set()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        returncode = self.process.wait()
        for thread in (self._drain, self._writer):
            if thread is not None:
                thread.join()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        remove_tree(self.workdir)
        return returncode

    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


def _ready(descriptor: int, event: int, timeout: float) -> bool:
    """Whether `descriptor` is readable / writable (`event`) within `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, event)
        return bool(selector.select(timeout))
