"""The program that runs inside every sandboxed process (spec §3.5: code is executed as evalplus
does, but never in the harness's process). Standard library only.

Run as a script (`python -s -P -B _sandbox_child.py`), it reads one length-prefixed pickled
request from stdin, locks itself down and then runs in one of four modes:

- "calls" (`run_function`): run the program, call its entry point on each listed input;
- "candidate" (the untrusted half of `run_tests`): run the program, then answer call requests
  that the harness relays from the checker, one at a time;
- "checker" (the trusted half of `run_tests`): run the harness's own test code, in which the
  entry point is a proxy whose calls go to the candidate process and come back as plain values;
  no untrusted code ever runs in this process, so its "passed" event can be trusted;
- "server" (`SandboxServer`): trusted setup once, then each request in a forked worker.

Lock-down order, all before any untrusted byte runs: resource limits (CPU, address space, file
size, processes, open files, no core dumps); chdir into the fresh working directory; stdin/stdout
pointed at /dev/null (stderr stays, captured and capped by the harness); no_new_privs; a Landlock
domain and a seccomp filter (`_sandbox_kernel`); the few process-control functions that raise no
audit event removed; an audit hook (PEP 578) that refuses process creation, signals, sockets,
ctypes, rlimit changes, writes outside the working directory and reads of other processes' /proc
entries and of the paths the harness lists. The audit hook only gives clear error messages and a
last line where the kernel offers nothing; the kernel mechanisms are the boundary.

Started with `--as-sandbox-user WORKDIR [--namespaces]` by a harness running as root, it first
drops to an unprivileged uid (`_sandbox_kernel.drop_privileges`); for the namespaces mode it then
re-executes itself through `unshare`.

Protocol: events are JSON lines on a private duplicate of the original stdout (`{"event": "call",
"index": i, "value": <encoded>}`, `{"event": "exec_error", ...}`, ...). Untrusted code can write
to that descriptor too, so the harness trusts no verdict from a process that ran untrusted code:
see `t2jax.tasks.sandbox` for what it checks itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import _sandbox_kernel as kernel
from _sandbox_codec import decode_value, encode_value, read_message

del sys.path[0]

# ---------------------------------------------------------------------------------------------
# Lock-down.

# ---------------------------------------------------------------------------------------------
# Lock-down.

_BLOCKED_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.startfile",
        "subprocess.Popen",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "ctypes.dlsym",
        "ctypes.dlsym/handle",
        "ctypes.call_function",
        "ctypes.cdata",
        "resource.setrlimit",
        "resource.prlimit",
        "socket.__new__",
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "webbrowser.open",
        "pty.spawn",
        "os.setuid",
        "os.setgid",
        "os.chroot",
        "syslog.openlog",
    }
)
# Events whose first argument(s) are paths that must stay inside the working directory.
_WRITE_PATH_EVENTS = {
    "os.remove": 1,
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.rename": 2,
    "os.link": 2,
    "os.symlink": 2,
    "os.chmod": 1,
    "os.chown": 1,
    "os.utime": 1,
    "os.truncate": 1,
    "os.chflags": 1,
    "os.lchflags": 1,
    "os.setxattr": 1,
    "os.removexattr": 1,
    "shutil.rmtree": 1,
    "shutil.copyfile": 2,
    "shutil.copymode": 2,
    "shutil.copystat": 2,
    "shutil.move": 2,
    "os.mkfifo": 1,
    "os.mknod": 1,
}
# Entry points that raise no audit event: removed from their (shared) module objects.
_ATTRIBUTES_REMOVED = {
    "os": ("pidfd_open", "setsid", "setpgid", "setpgrp"),
    "posix": ("pidfd_open", "setsid", "setpgid", "setpgrp"),
    "signal": ("pidfd_send_signal", "pthread_kill"),
    "subprocess": ("_fork_exec",),  # before _posixsubprocess: its import binds fork_exec
    "_posixsubprocess": ("fork_exec",),
}
# Audit hooks are per interpreter: a subinterpreter would run without this one.
_SUBINTERPRETER_MODULES = frozenset(
    {"_xxsubinterpreters", "_xxinterpchannels", "_xxinterpqueues", "_interpreters"}
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class SandboxViolation(PermissionError):
    """Raised inside the sandbox when the program attempts a forbidden operation."""


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _resolved(path) -> str | None:
    if isinstance(path, int):
        return None
    try:
        return os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return "<invalid path>"


def _open_is_write(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(letter in mode for letter in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _make_audit_hook(workdir: str, deny_read_roots: tuple[str, ...]):
    own_pid = os.readlink("/proc/self")  # the pid as /proc numbers it, also inside a pid namespace
    is_within = _is_within

    def deny(event: str, detail: str = ""):
        raise SandboxViolation(f"sandbox: {event} is not allowed{': ' + detail if detail else ''}")

    def check_read(path: str, event: str):
        parts = path.split("/")
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own_pid:
            deny(event, f"reading {path}")
        for root in deny_read_roots:
            if is_within(path, root):
                deny(event, f"reading {path}")

    def hook(event, args):
        if event in _BLOCKED_EVENTS:
            deny(event)
        if event == "import" and args and args[0] in _SUBINTERPRETER_MODULES:
            deny(event, f"{args[0]} (subinterpreters run without this hook)")
        if event == "open":
            path = _resolved(args[0])
            if path is None:
                return
            if _open_is_write(args[1], args[2]) and not (
                is_within(path, workdir) or path == "/dev/null"
            ):
                deny(event, f"writing {path} outside the working directory")
            check_read(path, event)
        elif event in _WRITE_PATH_EVENTS:
            for raw in args[: _WRITE_PATH_EVENTS[event]]:
                path = _resolved(raw)
                if path is not None and not is_within(path, workdir):
                    deny(event, f"{path} is outside the working directory")
        elif event in ("os.listdir", "os.scandir") and args and args[0] is not None:
            path = _resolved(args[0])
            if path is not None:
                check_read(path, event)

    return hook


def _set_limits(limits: dict):
    import resource  # imported before the hook blocks setrlimit

    def cap(name: str, value: int):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(getattr(resource, name), (value, value))

    cpu = int(limits["cpu_seconds"])
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError):
        cap("RLIMIT_CPU", cpu)
    cap("RLIMIT_AS", int(limits["memory_bytes"]))
    cap("RLIMIT_FSIZE", int(limits["file_size_bytes"]))
    cap("RLIMIT_NPROC", int(limits["max_processes"]))
    cap("RLIMIT_NOFILE", int(limits["max_open_files"]))
    cap("RLIMIT_CORE", 0)


def _lock_down(request: dict) -> int:
    """Applies every restriction; returns the private fd for events. Modes that receive more
    messages keep stdin; a server installs the audit hook in each forked worker instead."""
    _set_limits(request["limits"])
    os.chdir(request["workdir"])
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    if request["mode"] == "calls":
        os.dup2(devnull, 0)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    sys.set_int_max_str_digits(0)
    kernel.set_no_new_privs()
    if request["landlock_abi"]:
        kernel.restrict_filesystem(request["workdir"], request["landlock_abi"])
    if request["seccomp"]:  # a server forks one worker per request, each filtered on its own
        kernel.deny_syscalls(processes=request["mode"] == "server")
    for module_name, attributes in _ATTRIBUTES_REMOVED.items():
        module = __import__(module_name)  # imported first so later imports of it still work
        for attribute in attributes:
            if hasattr(module, attribute):
                delattr(module, attribute)
    if request["mode"] != "server" and request.get("audit_hook", True):
        sys.addaudithook(_make_audit_hook(request["workdir"], tuple(request["deny_read_roots"])))
    return result_fd


# ---------------------------------------------------------------------------------------------
# Modes.


class _CallTimeout(BaseException):
    """Raised by SIGALRM when one call exceeds its time limit."""


def _on_alarm(signum, frame):
    raise _CallTimeout


def _describe(error: BaseException) -> str:
    if isinstance(error, _CallTimeout):
        return "TimeoutError: call exceeded its time limit"
    try:
        message = str(error)
    except BaseException:
        message = "<unprintable>"
    return f"{type(error).__name__}: {message[:500]}"


def _call(function, arguments: list, keywords: dict, time_limit: float, deepcopy: bool) -> dict:
    """One call under its own time limit, as an event without its index."""
    if deepcopy:
        arguments, keywords = copy.deepcopy((arguments, keywords))
    start = time.perf_counter()
    try:
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        value = function(*arguments, **keywords)
        signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as error:  # everything the program raises is a result
        signal.setitimer(signal.ITIMER_REAL, 0)
        return {"event": "call", "error": _describe(error)}
    seconds = time.perf_counter() - start
    return {"event": "call", "value": encode_value(value), "seconds": seconds}


def _load_program(request: dict, emit):
    """Executes the program; returns its entry point, or None after emitting exec_error."""
    namespace: dict = {}
    try:
        exec(compile(request["code"], "<sandboxed program>", "exec"), namespace)
        return namespace[request["entry_point"]] if request.get("entry_point") else namespace
    except BaseException as error:
        emit({"event": "exec_error", "error": _describe(error)})
        return None


def _run_calls(request: dict, emit, stdin):
    """Mode "calls": every listed input, in order."""
    function = _load_program(request, emit)
    if function is None:
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    for index, arguments in enumerate(request["inputs"]):
        limit = request["time_limits"][index]
        event = _call(function, arguments, {}, limit, request["deepcopy_inputs"])
        emit({**event, "index": index})


def _run_candidate(request: dict, emit, stdin):
    """Mode "candidate": load the program, then answer relayed call requests until stdin ends."""
    function = _load_program(request, emit)
    if function is None:
        return
    emit({"event": "ready"})
    signal.signal(signal.SIGALRM, _on_alarm)
    index = 0
    while (message := read_message(stdin)) is not None:
        arguments, keywords = message["args"], message["kwargs"]
        emit({**_call(function, arguments, keywords, request["time_limit"], False), "index": index})
        index += 1


class CandidateError(Exception):
    """Raised in the checker when a call of the candidate raised (or its process ended)."""


def _run_checker(request: dict, emit, stdin):
    """Mode "checker": trusted test code against a proxy of the candidate's entry point."""

    def candidate(*arguments, **keywords):
        emit(
            {
                "event": "call_request",
                "args": encode_value(list(arguments)),
                "kwargs": encode_value(keywords),
            }
        )
        answer = read_message(stdin)
        if answer is None or answer.get("error") is not None:
            raise CandidateError(answer["error"] if answer else "no answer")
        return decode_value(answer["value"])

    namespace: dict = {}
    try:
        exec(compile(request["setup"], "<test setup>", "exec"), namespace)
        namespace[request["entry_point"]] = candidate
        exec(compile(request["tests"], "<tests>", "exec"), namespace)
    except BaseException as error:
        emit({"event": "failed", "error": _describe(error)})
        return
    emit({"event": "passed"})


def _writer(result_fd: int):
    def emit(message: dict):
        view = memoryview((json.dumps(message) + "\n").encode())
        while view:
            view = view[os.write(result_fd, view) :]

    return emit


def _serve(request: dict, emit, stdin):
    """Mode "server": run trusted setup code once, then answer requests, each in a forked child
    that installs the audit hook before touching the (untrusted) payload."""
    namespace: dict = {}
    exec(compile(request["code"], "<sandbox server setup>", "exec"), namespace)
    handle = namespace["handle"]
    hook = _make_audit_hook(request["workdir"], tuple(request["deny_read_roots"]))
    emit({"event": "ready"})
    while (payload := read_message(stdin)) is not None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 2)
            if request["seccomp"]:
                kernel.deny_syscalls()
            sys.addaudithook(hook)
            try:
                answer = {"event": "result", "value": encode_value(handle(payload))}
            except BaseException as error:
                answer = {"event": "result", "error": _describe(error)}
            _writer(write_end)(answer)
            os._exit(0)
        os.close(write_end)
        emit(_collect_answer(read_end, pid, request["request_timeout"]))


def _collect_answer(read_end: int, pid: int, timeout: float) -> dict:
    import select

    deadline = time.monotonic() + timeout
    data = b""
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([read_end], [], [], remaining)
        chunk = os.read(read_end, 1 << 16) if ready else b""
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    try:
        return json.loads(data)
    except ValueError:
        timed_out = time.monotonic() >= deadline
        return {"event": "result", "error": "timeout" if timed_out else "no answer"}


_MODES = {
    "calls": _run_calls,
    "candidate": _run_candidate,
    "checker": _run_checker,
    "server": _serve,
}
_NAMESPACES_COMMAND = ("unshare", "--user", "--map-current-user", "--net", "--pid", "--fork",
                       "--kill-child", "--")  # fmt: skip
_INTERPRETER_FLAGS = ("-s", "-P", "-B")


def _become_sandbox_user(argv: list[str]):
    """Launcher stage (root only): drop to the sandbox uid; for the namespaces mode, re-execute
    this script through `unshare` (the process mode carries on in this interpreter)."""
    workdir, namespaces = argv[0], "--namespaces" in argv[1:]
    script = os.path.realpath(__file__)
    kernel.drop_privileges([*kernel.interpreter_roots(), os.path.dirname(script), workdir])
    if namespaces:
        command = [*_NAMESPACES_COMMAND, sys.executable, *_INTERPRETER_FLAGS, script]
        os.execvp(command[0], command)


def main():
    if sys.argv[1:2] == ["--as-sandbox-user"]:
        _become_sandbox_user(sys.argv[2:])
    stdin = sys.stdin.buffer
    request = read_message(stdin)  # the harness is the only writer
    emit = _writer(_lock_down(request))
    try:
        _MODES[request["mode"]](request, emit, stdin)
    except BaseException as error:  # e.g. a SystemExit escaping a call
        emit({"event": "exec_error", "error": _describe(error)})
    os._exit(0)


if __name__ == "__main__":
    main()
