"""Isolated execution of model-written Python (spec §3.5; issue 12, "Sandbox").

Every program runs in a fresh interpreter (`_sandbox_child.py`) in its own session and process
group, confined by the kernel:

- **Files** (Landlock, `_sandbox_kernel.restrict_filesystem`): reads only of the Python
  installation, system libraries, /dev/null and /dev/urandom; reads and writes only inside a fresh
  working directory (HOME and TMPDIR point there; removed afterwards); nothing executable. Not
  `$HOME`, the checkout, the benchmark data, `/tmp` or `/proc`.
- **Syscalls** (seccomp): no sockets, exec, ptrace, process_vm_*, namespaces, mounts, BPF, perf,
  keyrings, io_uring or handle-based opens. Landlock (ABI >= 4/6) also refuses TCP and signals or
  abstract unix sockets that would cross the sandbox's border.
- **No root inside**: a harness running as uid 0 starts the child as root only long enough to
  make the interpreter reachable (private mount namespace) and become uid 65534; no_new_privs
  is always set.
- **Namespaces** (isolation "namespaces", the default where `unshare` works): new user (the uid
  mapped to itself, no root), network (a down loopback) and PID namespaces.
- **Limits**: wall clock (the process group is SIGKILLed at the deadline), per-call SIGALRM, CPU
  time, address space, file size, processes, open files, no core dumps; output capped; a
  scrubbed environment (no inherited secrets).

Isolation modes: "namespaces", "process" (everything but the namespaces), "auto" (namespaces
where they work) and "strict" (like auto, but refuses to run where the kernel lacks Landlock or
seccomp, or root cannot be dropped; "auto" and "process" warn once instead). The default is
"auto"; `T2JAX_SANDBOX=strict` (or `t2jax eval --sandbox strict`) changes it process-wide.
`python -m t2jax.tasks.sandbox --self-test` shows what this machine enforces.

**Trust boundary.** Events from a process that ran untrusted code are data, never a verdict: the
code can write to every descriptor it holds, exit at any point and rewrite its own interpreter.

- `run_function`: the harness passes iff it observed exactly one outcome per input, in order,
  and its own `stop` callback checked each (a forged or duplicated event is a protocol violation,
  a missing one a failure). Values arrive as tagged JSON decoded into plain Python values, so no
  object with a custom `__eq__` reaches the comparison.
- `run_tests`: the harness's test code runs in a second sandboxed process ("checker") that never
  runs untrusted code; each call of the entry point in it is relayed to the candidate process and
  its result comes back as a plain value. A pass is the checker's own report that every assert ran.
- `SandboxServer` answers come from the worker that handled the untrusted payload: a payload that
  gains code execution (sympy's `parse_expr` evaluates Python) can forge its own answer. It is
  used only for MATH's symbolic equivalence (an evaluation metric, not an RL reward here).

The harness never unpickles data from a child.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from t2jax.tasks._sandbox_codec import OpaqueValue, decode_value
from t2jax.tasks._sandbox_process import (
    ISOLATION_ENV,
    ISOLATION_MODES,
    Child,
    Overflow,
    Plan,
    SandboxLimits,
    default_deny_read,
    default_isolation,
    missing_protections,
    namespaces_available,
    resolve,
)

__all__ = [
    "ISOLATION_ENV",
    "ISOLATION_MODES",
    "CallOutcome",
    "OpaqueValue",
    "SandboxLimits",
    "SandboxResult",
    "SandboxServer",
    "default_isolation",
    "missing_protections",
    "namespaces_available",
    "run_function",
    "run_tests",
]


@dataclasses.dataclass(frozen=True)
class CallOutcome:
    """What one call of the entry point produced: a value, or an error message."""

    value: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """The outcome of a sandboxed run, as the harness observed it.

    Attributes:
        completed: `run_function`: an outcome was observed for every input; `run_tests`: the
            checker ran every test. Never set from an event of the untrusted process alone.
        exec_error: the exception that escaped the program's top level, or the failed test.
        calls: one outcome per call observed (fewer than requested if stopped or killed).
        timed_out: the wall-clock limit was hit and the process group killed.
        stopped_early: the caller's `stop` callback ended the run.
        returncode: the interpreter's exit status (negative: killed by that signal).
        stderr: the program's stderr, truncated to `max_stderr_bytes`.
        isolation: "namespaces" or "process".
        note: harness-side problems (output over the cap, protocol violations).
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


def _outcome(event: dict) -> CallOutcome:
    error = event.get("error")
    return CallOutcome(
        value=None if error is not None else decode_value(event.get("value")),
        error=None if error is None else str(error)[:1000],
        seconds=float(event.get("seconds") or 0.0)
        if isinstance(event.get("seconds"), (int, float))
        else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# Entry points.


def run_function(
    code: str,
    entry_point: str,
    inputs: Sequence[Sequence[Any]],
    time_limits: Sequence[float],
    *,
    limits: SandboxLimits = SandboxLimits(),
    deepcopy_inputs: bool = False,
    stop: Callable[[int, CallOutcome], bool] | None = None,
    isolation: str | None = None,
    deny_read: Sequence[str] | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Executes `code`, then calls `entry_point(*args)` for each argument list in the sandbox.

    Each call has its own time limit (SIGALRM in the child); its return value comes back decoded
    to a plain Python value (`OpaqueValue` for what cannot be carried). The run is `completed`
    only when the harness observed one outcome per input, in order; a caller that needs a
    verdict checks each outcome itself (in `stop` or afterwards).

    Args:
        code: the program defining `entry_point` (`__name__` is not "__main__").
        entry_point: the function to call.
        inputs: argument lists; pickled into the child (they come from the harness).
        time_limits: seconds allowed per call, same length as `inputs`.
        limits: whole-run resource limits; `limits.wall_seconds` bounds everything.
        deepcopy_inputs: deep-copy each argument list before the call (as evalplus does when it
            computes reference outputs).
        stop: called with (index, outcome) as each call finishes; returning True kills the run
            (used to stop at the first wrong answer).
        isolation: one of `ISOLATION_MODES`; None: `default_isolation()`.
        deny_read: extra directories the audit hook refuses to read (default: `$T2JAX_DATA`;
            Landlock already refuses everything outside the interpreter and the work directory).
        audit_hook: False leaves out the in-process audit hook, so that only the kernel's
            mechanisms contain the program (for checking them; never for scoring).
    """
    if len(inputs) != len(time_limits):
        raise ValueError(f"{len(inputs)} inputs but {len(time_limits)} time limits")
    plan = resolve(isolation)
    request = {
        "mode": "calls",
        "code": code,
        "entry_point": entry_point,
        "inputs": [list(arguments) for arguments in inputs],
        "time_limits": [float(limit) for limit in time_limits],
        "deepcopy_inputs": deepcopy_inputs,
        "deny_read_roots": _deny_roots(deny_read),
        "audit_hook": audit_hook,
    }
    run = _Run(plan, limits)
    child = Child(plan, request, limits)
    try:
        while len(run.calls) < len(inputs):
            event = run.next_event(child)
            if event is None or not run.take_call(event):
                break
            if stop is not None and stop(len(run.calls) - 1, run.calls[-1]):
                run.stopped = True
                break
    finally:
        run.returncode = child.close()
    run.stderr = child.stderr_text()
    return run.result(completed=len(run.calls) == len(inputs))


def run_tests(
    program: str,
    tests: str,
    entry_point: str,
    *,
    setup: str = "",
    call_seconds: float = 5.0,
    limits: SandboxLimits = SandboxLimits(),
    isolation: str | None = None,
    deny_read: Sequence[str] | None = None,
) -> SandboxResult:
    """Runs the harness's own test code against an untrusted program's `entry_point`.

    The tests run in a checker process that executes only `setup` and `tests` (trusted), with
    `entry_point` bound to a proxy: each call is relayed to the program's process, and its
    return value comes back as a plain value (or its exception as `CandidateError`). The run is
    `completed` (passed) only when the checker reports that `tests` ran to their end.

    Args:
        program: the untrusted program defining `entry_point`.
        tests: test code calling `entry_point` by name (e.g. asserts, or a `check(...)` call).
        entry_point: the function under test.
        setup: trusted code run in the checker first (e.g. a problem's prompt with helpers).
        call_seconds: time limit of each call in the program's process.
        limits: limits of each of the two processes; `wall_seconds` bounds the whole run.
        isolation, deny_read: see `run_function`.
    """
    plan = resolve(isolation)
    deny = _deny_roots(deny_read)
    candidate_request = {
        "mode": "candidate",
        "code": program,
        "entry_point": entry_point,
        "time_limit": float(call_seconds),
        "deny_read_roots": deny,
    }
    checker_request = {
        "mode": "checker",
        "setup": setup,
        "tests": tests,
        "entry_point": entry_point,
        "deny_read_roots": deny,
    }
    run = _Run(plan, limits)
    candidate = Child(plan, candidate_request, limits)
    checker = None
    passed = False
    try:
        checker = Child(plan, checker_request, limits, prefix="t2jax-checker-")
        if run.candidate_ready(run.next_event(candidate)):
            passed = run.relay(checker, candidate)
    finally:
        run.returncode = candidate.close()
        if checker is not None:
            checker.close()
    run.stderr = candidate.stderr_text()
    return run.result(completed=passed)


def _deny_roots(deny_read: Sequence[str] | None) -> list[str]:
    return list(default_deny_read() if deny_read is None else deny_read)


class _Run:
    """What the harness has observed of one run so far, and the rules it checks events by."""

    def __init__(self, plan: Plan, limits: SandboxLimits):
        self.plan = plan
        self.limits = limits
        self.deadline = time.monotonic() + limits.wall_seconds
        self.calls: list[CallOutcome] = []
        self.exec_error: str | None = None
        self.note: str | None = None
        self.timed_out = False
        self.stopped = False
        self.returncode: int | None = None
        self.stderr = ""

    def next_event(self, child: Child) -> dict | None:
        """The child's next event; None at its end, on timeout or over the output cap."""
        try:
            return child.read_event(self.deadline)
        except TimeoutError:
            self.timed_out = True
        except Overflow:
            self.note = f"output over the {self.limits.max_result_bytes}-byte cap"
        return None

    def violation(self, event: dict):
        self.note = f"protocol violation: unexpected {str(event.get('event'))[:40]!r} event"

    def take_call(self, event: dict) -> bool:
        """Records a call outcome if it is the next one expected; False ends the run."""
        kind = event.get("event")
        if kind == "exec_error":
            self.exec_error = str(event.get("error"))[:1000]
            return False
        if kind == "call" and event.get("index") == len(self.calls):
            self.calls.append(_outcome(event))
            return True
        self.violation(event)
        return False

    def candidate_ready(self, event: dict | None) -> bool:
        if event is None:
            return False
        if event.get("event") == "ready":
            return True
        if event.get("event") == "exec_error":
            self.exec_error = str(event.get("error"))[:1000]
        else:
            self.violation(event)
        return False

    def relay(self, checker: Child, candidate: Child) -> bool:
        """Runs the checker, relaying its calls to the candidate; True iff the tests passed."""
        while (event := self.next_event(checker)) is not None:
            kind = event.get("event")
            if kind == "passed":
                return True
            if kind == "failed":
                self.exec_error = str(event.get("error"))[:1000]
                return False
            if kind != "call_request":
                self.note = f"the test checker broke the protocol ({str(kind)[:40]!r})"
                return False
            arguments = decode_value(event.get("args"))
            keywords = decode_value(event.get("kwargs"))
            candidate.send({"args": arguments, "kwargs": keywords})
            answer = self.next_event(candidate)
            if answer is None:
                if self.timed_out or self.note:
                    return False
                checker.send({"error": "the program's process ended"})
            elif not self.take_call(answer):
                return False
            else:
                outcome = self.calls[-1]
                reply = (
                    {"error": outcome.error}
                    if outcome.error is not None
                    else {"value": answer.get("value")}
                )
                checker.send(reply)
        if not self.timed_out and self.note is None:
            self.note = "the test checker ended without a verdict: " + checker.stderr_text()[-300:]
        return False

    def result(self, completed: bool) -> SandboxResult:
        return SandboxResult(
            completed=completed and not self.timed_out and self.note is None,
            exec_error=self.exec_error,
            calls=tuple(self.calls),
            timed_out=self.timed_out,
            stopped_early=self.stopped,
            returncode=self.returncode,
            stderr=self.stderr,
            isolation=self.plan.name,
            note=self.note,
        )


class SandboxServer:
    """A long-lived sandboxed interpreter that answers many small requests cheaply.

    Trusted `setup_code` (which must define `handle(payload) -> value`) runs once; each request is
    then handled in a child forked from the server that installs the audit hook before it touches
    the payload, so untrusted input never runs in the server and never leaks state into later
    requests. The server process itself is confined like every sandbox (Landlock, seccomp, uid,
    namespaces). See the module docstring for what its answers can be trusted for.

    Thread-safe; restarts itself after a crash or an unanswered request. Call `close()` when done.
    """

    def __init__(
        self,
        setup_code: str,
        *,
        request_timeout: float = 5.0,
        startup_timeout: float = 60.0,
        limits: SandboxLimits = SandboxLimits(cpu_seconds=24 * 3600),
        isolation: str | None = None,
        deny_read: Sequence[str] | None = None,
    ):
        self.setup_code = setup_code
        self.request_timeout = request_timeout
        self.startup_timeout = startup_timeout
        self.limits = limits
        self.plan = resolve(isolation)
        self.deny_read = _deny_roots(deny_read)
        self._lock = threading.Lock()
        self._child: Child | None = None

    def call(self, payload: dict) -> CallOutcome:
        """Handles one request; errors (including "timeout") come back in `CallOutcome.error`."""
        with self._lock:
            try:
                child = self._child or self._spawn()
                child.send(payload)
                answer = self._read(self.request_timeout + 5.0)
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

    def _spawn(self) -> Child:
        request = {
            "mode": "server",
            "code": self.setup_code,
            "deny_read_roots": self.deny_read,
            "request_timeout": self.request_timeout,
        }
        self._child = Child(
            self.plan, request, self.limits, keep_stderr=False, prefix="t2jax-sandbox-server-"
        )
        ready = self._read(self.startup_timeout)
        if ready.get("event") != "ready":
            raise RuntimeError(f"setup failed: {ready.get('error', ready)}")
        return self._child

    def _read(self, timeout: float) -> dict:
        try:
            event = self._child.read_event(time.monotonic() + timeout)
        except (TimeoutError, Overflow):
            event = None
        if event is None:
            raise RuntimeError("no answer (timeout or crash)")
        return event

    def _shutdown(self):
        if self._child is not None:
            self._child.close()
            self._child = None
