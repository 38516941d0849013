"""The program that runs inside every sandboxed process, and the value codec it shares with
the harness (spec §3.5: code is executed as evalplus does, but never in the harness's process).

Run as a script (`python -s -P -B _sandbox_child.py`), it reads one length-prefixed pickled
request from stdin, locks itself down and runs untrusted code (or, in server mode, answers a
stream of requests, each in a forked child that locks itself down first). The harness
(`t2jax.tasks.sandbox`) imports it only for the codec. It must stay standard-library only.

Lock-down order, all before any untrusted byte runs: read the request, set resource limits
(CPU, address space, file size, process count, open files, no core dumps), chdir into the fresh
working directory, point stdin/stdout at /dev/null (stderr stays, captured and capped by the
harness), remove the few process-control functions that raise no audit event, then install an
audit hook (PEP 578) that refuses: process creation (fork, exec, spawn, system, subprocess),
signals to any process, sockets, foreign calls through ctypes, rlimit changes, and file writes,
renames, deletes or metadata changes outside the working directory; reads of other processes'
/proc entries and of the paths the harness lists. Audit hooks cannot be removed from Python code.

Protocol: results are JSON lines on a private duplicate of the original stdout, one per event:
`{"event": "call", "index": i, "value": <encoded>, "seconds": t}` or `{"event": "call",
"index": i, "error": "..."}` per function call, `{"event": "exec_error", "error": "..."}` when the
program itself raises, and `{"event": "done"}` at the end. Values are encoded as tagged JSON
(`encode_value`), so the harness never unpickles anything that untrusted code produced.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import signal
import sys
import time

# ---------------------------------------------------------------------------------------------
# Value codec: plain JSON for None/bool/str/float/list/small int, tagged objects for the rest.

_TAG = "$"
_MAX_DEPTH = 100
_MAX_NODES = 2_000_000
_EXACT_INT_BOUND = 2**53


class OpaqueValue:
    """A value the codec cannot carry (a generator, a custom object, ...): equal to nothing."""

    def __init__(self, type_name: str, text: str):
        self.type_name = type_name
        self.text = text

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return f"<opaque {self.type_name}: {self.text}>"


class _Budget:
    def __init__(self):
        self.nodes = 0


def _opaque(value, note=None) -> dict:
    try:
        text = note or repr(value)[:200]
    except BaseException:  # a hostile __repr__ may raise anything
        text = "<unrepresentable>"
    return {_TAG: "opaque", "type": type(value).__qualname__, "v": text}


def _encode(value, depth: int, budget: _Budget):
    budget.nodes += 1
    if budget.nodes > _MAX_NODES or depth > _MAX_DEPTH:
        raise OverflowError
    kind = type(value)
    if value is None or isinstance(value, (bool, str, float)):
        return str(value) if isinstance(value, str) and kind is not str else value
    if isinstance(value, int):
        value = int(value)
        return value if abs(value) < _EXACT_INT_BOUND else {_TAG: "int", "v": hex(value)}
    if isinstance(value, complex):
        return {_TAG: "complex", "v": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "v": bytes(value).hex()}
    if isinstance(value, list):
        return [_encode(item, depth + 1, budget) for item in value]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "v": [_encode(item, depth + 1, budget) for item in value]}
    if isinstance(value, (set, frozenset)):
        tag = "frozenset" if isinstance(value, frozenset) else "set"
        return {_TAG: tag, "v": [_encode(item, depth + 1, budget) for item in value]}
    if isinstance(value, dict):
        pairs = [
            [_encode(key, depth + 1, budget), _encode(item, depth + 1, budget)]
            for key, item in value.items()
        ]
        return {_TAG: "dict", "v": pairs}
    if kind.__module__ == "numpy" and hasattr(value, "tolist"):
        payload = _encode(value.tolist(), depth + 1, budget)
        if hasattr(value, "shape") and value.shape != ():
            return {_TAG: "ndarray", "v": payload, "dtype": str(value.dtype)}
        return payload
    return _opaque(value)


def encode_value(value):
    """Encodes a Python value as JSON-compatible data that `decode_value` turns back into an
    equal plain value (tuples, sets, dicts with any hashable keys, complex, big ints, numpy)."""
    try:
        return _encode(value, 0, _Budget())
    except (OverflowError, RecursionError):
        return _opaque(value, "<too large or too deep to encode>")
    except BaseException as error:  # hostile containers may raise anything
        return _opaque(value, f"<encoding failed: {type(error).__name__}>")


def _decode_tagged(data: dict):
    tag = data.get(_TAG)
    payload = data.get("v")
    if tag == "int":
        return int(payload, 16)
    if tag == "complex":
        return complex(payload[0], payload[1])
    if tag == "bytes":
        return bytes.fromhex(payload)
    if tag == "tuple":
        return tuple(decode_value(item) for item in payload)
    if tag == "set":
        return {decode_value(item) for item in payload}
    if tag == "frozenset":
        return frozenset(decode_value(item) for item in payload)
    if tag == "dict":
        return {decode_value(key): decode_value(item) for key, item in payload}
    if tag == "ndarray":
        import numpy  # only the harness decodes arrays

        return numpy.array(decode_value(payload), dtype=data.get("dtype"))
    return OpaqueValue(str(data.get("type")), str(payload))


def decode_value(data):
    """Inverse of `encode_value`; unknown or malformed tags become an `OpaqueValue`."""
    if isinstance(data, list):
        return [decode_value(item) for item in data]
    if isinstance(data, dict):
        try:
            return _decode_tagged(data)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            return OpaqueValue("malformed", str(data)[:200])
    return data


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


def _lock_down(request: dict, install_hook: bool) -> int:
    """Applies every restriction; returns the private fd for results. A server keeps stdin (its
    request stream) and installs the audit hook in each forked worker instead."""
    _set_limits(request["limits"])
    os.chdir(request["workdir"])
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    if install_hook:
        os.dup2(devnull, 0)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    sys.set_int_max_str_digits(0)
    for module_name, attributes in _ATTRIBUTES_REMOVED.items():
        module = __import__(module_name)  # imported first so later imports of it still work
        for attribute in attributes:
            if hasattr(module, attribute):
                delattr(module, attribute)
    if install_hook:
        sys.addaudithook(_make_audit_hook(request["workdir"], tuple(request["deny_read_roots"])))
    return result_fd


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


def _run(request: dict, emit):
    namespace: dict = {}
    try:
        exec(compile(request["code"], "<sandboxed program>", "exec"), namespace)
        function = namespace[request["entry_point"]] if request["mode"] == "calls" else None
    except BaseException as error:  # everything the program raises is a result
        emit({"event": "exec_error", "error": _describe(error)})
        return
    if function is not None:
        signal.signal(signal.SIGALRM, _on_alarm)
        for index, arguments in enumerate(request["inputs"]):
            if request["deepcopy_inputs"]:
                arguments = copy.deepcopy(arguments)
            start = time.perf_counter()
            try:
                signal.setitimer(signal.ITIMER_REAL, request["time_limits"][index])
                value = function(*arguments)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except BaseException as error:
                signal.setitimer(signal.ITIMER_REAL, 0)
                emit({"event": "call", "index": index, "error": _describe(error)})
                continue
            seconds = time.perf_counter() - start
            emit(
                {"event": "call", "index": index, "value": encode_value(value), "seconds": seconds}
            )
    emit({"event": "done"})


def read_message(stream) -> dict | None:
    """Reads one length-prefixed pickle written by the harness (None at end of stream)."""
    header = stream.read(8)
    if len(header) < 8:
        return None
    return pickle.loads(stream.read(int.from_bytes(header, "big")))


def _writer(result_fd: int):
    def emit(message: dict):
        view = memoryview((json.dumps(message) + "\n").encode())
        while view:
            view = view[os.write(result_fd, view) :]

    return emit


def _serve(request: dict, emit, stdin):
    """Server mode: run trusted setup code once, then answer requests, each in a forked child
    that locks itself down before touching the (untrusted) payload."""
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


def main():
    stdin = sys.stdin.buffer
    request = read_message(stdin)  # the harness is the only writer
    serving = request["mode"] == "server"
    result_fd = _lock_down(request, install_hook=not serving)
    emit = _writer(result_fd)
    try:
        if serving:
            _serve(request, emit, stdin)
        else:
            _run(request, emit)
    except BaseException as error:  # e.g. a SystemExit escaping a call
        emit({"event": "exec_error", "error": _describe(error)})
    os._exit(0)


if __name__ == "__main__":
    main()
