"""A hostile corpus for the code sandbox (issue 12, item 5).

Every entry is a program an attacker could submit as a completion for a small problem (f(x) = x + 1
on the inputs [1] and [2], or the first MBPP+ problem), run once in each isolation mode. Each test
asserts the verdict of a scorer-like check (fail, or a harmless pass) and the aftermath:

- no file created or changed outside the run's working directory: entries named with the test's
  marker in /, /tmp, /var/tmp, /dev/shm, $HOME and the checkout (non-recursive listings; other
  processes' files are ignored), a world-writable canary tree in /tmp (compared recursively, with
  content), a canary file in $HOME, and the folder the sandbox's work directories live in (left
  empty);
- the canaries' secrets, the harness's secret environment variable, and snippets of the checkout
  and of the benchmark data absent from every field of the result (values, errors, stderr, note);
- nothing received by loopback canary listeners: TCP on 127.0.0.1 and ::1, UDP on 127.0.0.1, a
  unix socket in the canary tree and an abstract unix socket;
- the harness alive: no signal received, its process group unchanged, a uid-65534 "victim"
  process outside the sandbox still running, no sandbox process left over, no unreaped child, and
  the run back within its wall-clock limit.

Most attacks run twice: first as written (the child's audit hook answers), then again after the
program disarms that hook from Python (`disarm` in PRELUDE rebinds the closure cell of its `deny`
function, found through gc), so that the kernel mechanisms (Landlock, seccomp, the uid, the
namespaces, rlimits) are what is tested. `test_detectors_detect` makes each detector fire on an
escape done by the harness itself, so that none of these checks is vacuous. Entries marked
xfail(strict=True) are escapes or harness bugs that the sandbox does not handle yet (their reasons
say what happens); a fix turns them into XPASS failures: then drop the mark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import platform
import re
import secrets
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from t2jax.tasks import get_task
from t2jax.tasks.sandbox import (
    SandboxLimits,
    SandboxResult,
    missing_protections,
    namespaces_available,
    run_function,
    run_tests,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA_DIR = pathlib.Path(os.environ.get("T2JAX_DATA") or REPO_ROOT.parent / "shared" / "data")
DATA_FILE = DATA_DIR / "mbppplus" / "MbppPlus.jsonl"
HOME = pathlib.Path(os.path.expanduser("~"))
SANDBOX_UID = 65534

LIMITS = SandboxLimits(
    wall_seconds=3.0,
    memory_bytes=512 * 1024**2,
    max_result_bytes=8 * 1024**2,
    max_stderr_bytes=64 * 1024,
)
# Runs that must pass get more time: on a loaded machine start-up alone can take seconds.
PASS_LIMITS = dataclasses.replace(LIMITS, wall_seconds=10.0)
# How long after its wall-clock limit a run may come back (kill, reap, remove the work directory).
RETURN_SLACK_SECONDS = 5.0
INPUTS = [[1], [2]]
EXPECTED = [2, 3]
TESTS = "assert f(1) == 2\nassert f(2) == 3\n"

_NAMESPACES = namespaces_available()
_MISSING = missing_protections()
MODES = [
    "process",
    pytest.param(
        "namespaces",
        marks=pytest.mark.skipif(not _NAMESPACES, reason="`unshare --user --net --pid` fails"),
    ),
]
needs_kernel = pytest.mark.skipif(
    bool(_MISSING), reason="the kernel cannot confine programs here: " + "; ".join(_MISSING)
)

_SYSCALLS = {  # raw syscall numbers used by the ctypes entries
    "x86_64": {"openat": 257, "socket": 41, "kill": 62},
    "aarch64": {"openat": 56, "socket": 198, "kill": 129},
}.get(platform.machine().lower(), {"openat": -1, "socket": -1, "kill": -1})


# ---------------------------------------------------------------------------------------------
# Canary listeners.


class Listener:
    """A loopback socket in a background thread that records every connection or datagram."""

    def __init__(self, name: str, family: int, address: Any, kind: int = socket.SOCK_STREAM):
        self.name = name
        self.kind = kind
        self.sock = socket.socket(family, kind)
        self.sock.bind(address)
        if kind == socket.SOCK_STREAM:
            self.sock.listen(64)
        self.sock.settimeout(0.02)
        self.address = self.sock.getsockname()
        self.events: list[str] = []
        self.cycles = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"canary-{name}", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stopping:
            try:
                if self.kind == socket.SOCK_STREAM:
                    connection, peer = self.sock.accept()
                    data = b""
                    with connection:
                        connection.settimeout(0.3)
                        with contextlib.suppress(OSError):
                            while chunk := connection.recv(65536):
                                data += chunk
                    self.events.append(f"{self.name}: connection from {peer!r}, {data[:80]!r}")
                else:
                    data, peer = self.sock.recvfrom(65536)
                    self.events.append(f"{self.name}: datagram from {peer!r}, {data[:80]!r}")
            except TimeoutError:
                pass
            except OSError:
                if self._stopping:
                    break
            with self._condition:
                self.cycles += 1
                self._condition.notify_all()

    def mark(self) -> int:
        """The cycle count by which a whole accept/receive cycle will have begun after now."""
        with self._condition:
            return self.cycles + 2

    def settle(self, target: int):
        """Returns once `target` (from `mark`) is reached: anything queued before `mark` by a
        finished run has then been recorded."""
        with self._condition:
            self._condition.wait_for(lambda: self.cycles >= target, timeout=2.0)

    def close(self):
        self._stopping = True
        self._thread.join(timeout=2.0)
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# The arena: everything a hostile program might touch, and the checks of the aftermath.


def _listing(path: str) -> dict[str, tuple]:
    entries = {}
    with contextlib.suppress(OSError), os.scandir(path) as scan:
        for entry in scan:
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                entries[entry.name] = (info.st_mtime_ns, info.st_size, info.st_mode)
    return entries


def _tree(root: pathlib.Path) -> dict[str, tuple]:
    """Recursive snapshot with file contents (the canary tree is ours alone)."""
    snapshot = {}
    for directory, subdirectories, files in os.walk(root):
        for name in sorted(subdirectories + files):
            path = pathlib.Path(directory, name)
            info = path.lstat()
            content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
            relative = str(path.relative_to(root))
            snapshot[relative] = (
                info.st_mtime_ns, info.st_size, info.st_mode, info.st_nlink, content, _xattrs(path)
            )  # fmt: skip
    return snapshot


def _xattrs(path: pathlib.Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return {name: os.getxattr(path, name, follow_symlinks=False) for name in names}
    except OSError:
        return {}


def _environ(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _parent_pid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> list[str]:
    return [name for name in os.listdir("/proc") if name.isdigit()]


@dataclasses.dataclass
class Before:
    """What the arena looked like before one run."""

    marker: str
    watched: dict[str, dict[str, tuple]]
    canary_tree: dict[str, tuple]
    home_canary: tuple
    listener_events: dict[str, int]
    signals: int
    pgrp: int


class Arena:
    """Canaries, listeners, a victim process and a signal recorder shared by the module's tests."""

    def __init__(self):
        self.secret = "canary-" + secrets.token_hex(16)
        self.home_secret = "home-canary-" + secrets.token_hex(16)
        self.env_secret = "env-secret-" + secrets.token_hex(16)
        self.env_name = "T2JAX_HOSTILE_SECRET"
        # World-writable and world-readable: only the sandbox (not file permissions) keeps the
        # unprivileged uid out.
        self.canary_dir = pathlib.Path(tempfile.mkdtemp(prefix="t2jax-hostile-canary-"))
        self.canary_dir.chmod(0o777)
        self.canary = self.canary_dir / "secret.txt"
        self.canary.write_text(self.secret + "\n")
        self.canary.chmod(0o666)
        (self.canary_dir / "sub").mkdir()
        (self.canary_dir / "sub").chmod(0o777)
        (self.canary_dir / "sub" / "nested.txt").write_text(self.secret)
        (self.canary_dir / "sub" / "nested.txt").chmod(0o666)
        self.home_canary = HOME / f".t2jax-hostile-canary-{secrets.token_hex(4)}"
        self.home_canary.write_text(self.home_secret + "\n")
        # The sandbox's work directories are created here (tempfile.tempdir), so that its
        # processes can be told apart from other sandboxes on the machine (HOME in /proc/*/environ).
        self.workroot = pathlib.Path(tempfile.mkdtemp(prefix="t2jax-hostile-work-"))
        self.workroot.chmod(0o755)
        candidates = ("/", "/tmp", "/var/tmp", "/dev/shm", str(HOME), str(REPO_ROOT))
        self.watched_dirs = sorted({path for path in candidates if os.path.isdir(path)})
        self.snippets = {"the checkout": _snippet(REPO_ROOT / "README.md", 100)}
        if DATA_FILE.is_file():
            first_line = DATA_FILE.read_text().split("\n", 1)[0]
            start = max(0, first_line.find('"canonical_solution"'))
            self.snippets["the benchmark data"] = first_line[start : start + 60]
        self.listeners: dict[str, Listener] = {}
        self.ipv6_note = ""
        self.unix_path = str(self.canary_dir / "canary.sock")
        self.abstract_name = "t2jax-hostile-" + secrets.token_hex(6)
        self._open_listeners()
        self.signals: list[int] = []
        self._previous_handlers = {}
        for number in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[number] = signal.signal(number, self._record_signal)
        self.victim = self.start_victim()
        self.pgrp = os.getpgrp()

    def _open_listeners(self):
        self.listeners["tcp4"] = Listener("tcp4", socket.AF_INET, ("127.0.0.1", 0))
        self.listeners["udp4"] = Listener(
            "udp4", socket.AF_INET, ("127.0.0.1", 0), socket.SOCK_DGRAM
        )
        try:
            self.listeners["tcp6"] = Listener("tcp6", socket.AF_INET6, ("::1", 0))
        except OSError as error:  # no IPv6 on this machine: only that listener is skipped
            self.ipv6_note = f"no IPv6 listener: {error}"
        self.listeners["unix"] = Listener("unix", socket.AF_UNIX, self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.listeners["abstract"] = Listener("abstract", socket.AF_UNIX, "\0" + self.abstract_name)

    def _record_signal(self, number, frame):
        self.signals.append(number)

    @staticmethod
    def start_victim() -> subprocess.Popen:
        """A process of the sandbox's uid (65534 under root) outside any sandbox: kill(-1) or a
        signal that crossed the sandbox's border would end it."""
        as_sandbox_user = (
            {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}
            if os.geteuid() == 0
            else {}
        )
        return subprocess.Popen(
            ["sleep", "3600"],
            **as_sandbox_user,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def tokens(self, marker: str) -> dict[str, str]:
        port6 = self.listeners["tcp6"].address[1] if "tcp6" in self.listeners else 9
        return {
            "@MARK@": marker,
            "@CANARY@": str(self.canary),
            "@CANARY_DIR@": str(self.canary_dir),
            "@HOME_CANARY@": str(self.home_canary),
            "@HOME@": str(HOME),
            "@REPO@": str(REPO_ROOT),
            "@DATA@": str(DATA_DIR),
            "@DATA_FILE@": str(DATA_FILE),
            "@TCP4@": str(self.listeners["tcp4"].address[1]),
            "@UDP4@": str(self.listeners["udp4"].address[1]),
            "@TCP6@": str(port6),
            "@UNIX@": self.unix_path,
            "@ABSTRACT@": self.abstract_name,
            "@HARNESS@": str(os.getpid()),
            "@PGID@": str(os.getpgrp()),
            "@VICTIM@": str(self.victim.pid),
            "@SYS_OPENAT@": str(_SYSCALLS["openat"]),
            "@SYS_SOCKET@": str(_SYSCALLS["socket"]),
            "@SYS_KILL@": str(_SYSCALLS["kill"]),
            "@BLOCK@": str(_BLOCK),
        }

    def render(self, code: str, marker: str) -> str:
        for token, value in self.tokens(marker).items():
            code = code.replace(token, value)
        unknown = re.findall(r"@[A-Z][A-Z0-9_]*@", code)
        assert not unknown, f"unknown tokens {unknown}"
        return code

    # -- before and after ---------------------------------------------------------------------

    def before(self) -> Before:
        marker = "hx" + secrets.token_hex(6)
        return Before(
            marker=marker,
            watched={path: _listing(path) for path in self.watched_dirs},
            canary_tree=_tree(self.canary_dir),
            home_canary=self._home_canary_state(),
            listener_events={name: len(lis.events) for name, lis in self.listeners.items()},
            signals=len(self.signals),
            pgrp=os.getpgrp(),
        )

    def _home_canary_state(self) -> tuple:
        info = self.home_canary.lstat()
        content = self.home_canary.read_bytes()
        return (info.st_mtime_ns, info.st_size, info.st_mode, content, _xattrs(self.home_canary))

    def problems(self, before: Before, texts: list[str], survivor_grace: float = 3.0) -> list[str]:
        """Everything wrong with the aftermath of a run (empty: contained)."""
        found = []
        for path in self.watched_dirs:
            old = {k: v for k, v in before.watched[path].items() if before.marker in k}
            new = {k: v for k, v in _listing(path).items() if before.marker in k}
            if old != new:
                found.append(f"files named with the marker changed in {path}: {sorted(new)}")
        tree = _tree(self.canary_dir)
        if tree != before.canary_tree:
            changed = sorted(
                key
                for key in set(tree) | set(before.canary_tree)
                if tree.get(key) != before.canary_tree.get(key)
            )
            found.append(f"the canary tree changed: {changed}")
        if self._home_canary_state() != before.home_canary:
            found.append(f"the canary in $HOME changed: {self.home_canary}")
        if tree != before.canary_tree or self._home_canary_state() != before.home_canary:
            self._restore_canaries()  # so that one escape does not fail the following tests
        leftovers = sorted(os.listdir(self.workroot))
        if leftovers:
            found.append(f"work directories left behind: {leftovers}")
        for text in texts:
            for label, secret in self.secrets().items():
                if secret and secret in text:
                    found.append(f"{label} leaked into the result: ...{_around(text, secret)}...")
        targets = {name: lis.mark() for name, lis in self.listeners.items()}
        for name, lis in self.listeners.items():
            lis.settle(targets[name])
            new_events = lis.events[before.listener_events[name] :]
            if new_events:
                found.append(f"canary listener {name} was reached: {new_events}")
        if len(self.signals) != before.signals:
            found.append(f"the harness received signals {self.signals[before.signals :]}")
        if os.getpgrp() != before.pgrp:
            found.append(f"the harness's process group changed: {before.pgrp} -> {os.getpgrp()}")
        if self.victim.poll() is not None:
            found.append(f"the victim process outside the sandbox died: {self.victim.returncode}")
            self.victim = self.start_victim()
        survivors = self.survivors(survivor_grace)
        if survivors:
            found.append(f"sandbox processes survived the run: {survivors}")
            self.kill_survivors()
        children = self.unreaped_children()
        if children:
            found.append(f"the harness has children left: {children}")
        return found

    def secrets(self) -> dict[str, str]:
        return {
            "the /tmp canary's secret": self.secret,
            "the $HOME canary's secret": self.home_secret,
            "the harness's secret environment variable": self.env_secret,
            **{f"a snippet of {where}": text for where, text in self.snippets.items()},
        }

    def survivors(self, grace: float) -> list[str]:
        """Processes whose environment names our work root (the sandbox's HOME), after `grace`
        seconds for a killed process group to go."""
        needle = str(self.workroot).encode()
        deadline = time.monotonic() + grace
        while True:
            found = [pid for pid in _pids() if needle in _environ(pid)]
            if not found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def kill_survivors(self):
        needle = str(self.workroot).encode()
        for pid in _pids():
            if needle in _environ(pid):
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)

    def unreaped_children(self) -> list[str]:
        own = os.getpid()
        ignore = {str(self.victim.pid)}
        return [pid for pid in _pids() if _parent_pid(pid) == own and pid not in ignore]

    def _restore_canaries(self):
        keep = {self.canary, self.canary_dir / "sub", self.canary_dir / "sub" / "nested.txt"}
        keep.add(pathlib.Path(self.unix_path))
        for path in sorted(self.canary_dir.rglob("*"), reverse=True):
            if path not in keep:
                if path.is_dir() and not path.is_symlink():
                    _remove(path)
                else:
                    path.unlink()
        self.canary.write_text(self.secret + "\n")
        (self.canary_dir / "sub" / "nested.txt").write_text(self.secret)
        self.home_canary.write_text(self.home_secret + "\n")
        for path in (self.canary, self.canary_dir / "sub" / "nested.txt", self.home_canary):
            for name in _xattrs(path):
                os.removexattr(path, name)
        for path in (self.canary, self.canary_dir / "sub" / "nested.txt"):
            path.chmod(0o666)
        for path in (self.canary_dir, self.canary_dir / "sub"):
            path.chmod(0o777)

    def close(self):
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        for lis in self.listeners.values():
            lis.close()
        self.victim.kill()
        self.victim.wait()
        self.kill_survivors()
        _remove(self.canary_dir)
        _remove(self.workroot)
        self.home_canary.unlink(missing_ok=True)


def _snippet(path: pathlib.Path, start: int) -> str:
    try:
        return path.read_text()[start : start + 40]
    except OSError:
        return ""


def _around(text: str, secret: str) -> str:
    index = text.find(secret)
    return text[max(0, index - 60) : index + len(secret) + 20]


def _remove(path: pathlib.Path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def arena():
    saved_tempdir = tempfile.tempdir
    with pytest.MonkeyPatch.context() as patch:
        made = Arena()
        patch.setenv(made.env_name, made.env_secret)
        cache = tempfile.mkdtemp(prefix="t2jax-hostile-cache-")
        patch.setenv("T2JAX_CACHE", cache)
        tempfile.tempdir = str(made.workroot)
        try:
            yield made
        finally:
            tempfile.tempdir = saved_tempdir
            made.close()
            _remove(pathlib.Path(cache))


@pytest.fixture(scope="module")
def mbpp_problem(arena):
    return get_task("mbpp").load("all")[0]  # similar_elements


# ---------------------------------------------------------------------------------------------
# The corpus.

PRELUDE = r'''
import os, sys
LOG, LEAKS = [], []
def attempt(label, function, *args, **kwargs):
    try:
        result = function(*args, **kwargs)
    except BaseException as error:
        LOG.append(f"{label}: {type(error).__name__}: {error}"[:300])
        return None
    LOG.append(f"{label}: ok")
    return result
def leak(label, function, *args, **kwargs):
    try:
        result = function(*args, **kwargs)
    except BaseException as error:
        result = f"{type(error).__name__}: {error}"
    LEAKS.append(f"{label}: {result!r}"[:4000])
    return result
def disarm():
    """Neutralizes the child's audit hook (PEP 578): a hook cannot be removed, but the closure
    cell that holds its `deny` function can be rebound, found through gc. From then on only the
    kernel (Landlock, seccomp, uid, namespaces, rlimits) stands in the way."""
    import gc
    disarmed = 0
    for candidate in gc.get_objects():
        if type(candidate).__name__ == "function" and candidate.__closure__:
            names = candidate.__code__.co_freevars
            for name, cell in zip(names, candidate.__closure__):
                if name == "deny" and callable(cell.cell_contents):
                    cell.cell_contents = lambda *args, **kwargs: None
                    disarmed += 1
    return disarmed
def unhooked(source):
    """Runs source (in this module's globals) with the audit hook disarmed."""
    LOG.append(f"audit hook disarmed ({disarm()} cells)")
    exec(source, globals())
def read(path):
    with open(path, "rb") as handle:
        return handle.read(8192)
def write(path, text="pwned"):
    with open(path, "w") as handle:
        handle.write(text)
def report():
    text = "\n".join(LEAKS + LOG)
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass
    return text
def f(x):
    raise RuntimeError(report())
'''

WRITE_EVERY_FD = r"""
def write_every_fd(data):
    for fd in range(256):
        try:
            os.write(fd, data)
        except OSError:
            pass
"""


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile program.

    Attributes:
        code: the program (tokens like @MARK@ are filled in by the arena).
        verdict: "fail" (must not pass), "pass" (must pass: the attack changes nothing the
            scorer sees), "either" (a pass would be harmless: the program supplies the correct
            values itself, e.g. by writing them as events).
        api: "function" (run_function on f), "tests" (run_tests with asserts on f), "mbpp" /
            "mbpp-original" (the first MBPP+ problem scored by the task; `code` is the body of
            similar_elements).
        prelude: prepend PRELUDE (helpers; f raises with the log of attempts).
        twice: run the program's attacks again with the audit hook disarmed (`disarm` in
            PRELUDE), so that only the kernel stands in the way.
        xfail: isolation mode ("*" for all) -> why the sandbox does not contain it yet.
        limits: sandbox limits of the run.
        check: extra assertions on the result.
    """

    name: str
    code: str
    verdict: str = "fail"
    api: str = "function"
    prelude: bool = True
    twice: bool = False
    xfail: dict[str, str] = dataclasses.field(default_factory=dict)
    limits: SandboxLimits = LIMITS
    check: Callable[[Any], None] | None = None
    kernel: bool = True  # relies on Landlock/seccomp (skipped where the kernel lacks them)


def _stderr_capped(result: SandboxResult):
    assert len(result.stderr.encode()) <= LIMITS.max_stderr_bytes


def _output_contained(result: SandboxResult):
    """Over the cap, or killed at the deadline while producing it (on a loaded machine)."""
    assert result.timed_out or (result.note and "cap" in result.note), result.reason
    assert all(len(repr(call.value)) < LIMITS.max_result_bytes for call in result.calls)


def _timed_out(result: SandboxResult):
    assert result.timed_out, result.reason


def _no_amplified_value(result: SandboxResult):
    for call in result.calls:
        size = getattr(call.value, "nbytes", 0)
        assert size <= LIMITS.max_result_bytes, f"a {size}-byte value from a tiny event line"


# Entries that found harness bugs or escapes on commit 19e7dba, fixed in f1bb51a and after (kept
# as regression tests): the two daemons (setsid/setpgid now refused by seccomp; close() no longer
# blocks on a pipe a descendant keeps open), file metadata outside (utime/chmod/xattrs now
# refused by seccomp), the deeply nested and the amplified forged events (decoding now bounded),
# the forged call answer without a value (run_tests raised KeyError), and memory beyond
# memory_bytes through fork (seccomp now refuses clone without CLONE_THREAD: one process, one
# RLIMIT_AS).
# Roomy process and time limits: only the memory bound is under test (two children are enough).
FORK_MEMORY_LIMITS = dataclasses.replace(
    LIMITS, wall_seconds=8.0, memory_bytes=256 * 1024**2, max_processes=4096
)
_BLOCK = 150 * 1024**2


def _memory_bounded(result: SandboxResult):
    first = result.calls[0].value if result.calls else None
    held = first if isinstance(first, int) else 0
    assert held * _BLOCK <= FORK_MEMORY_LIMITS.memory_bytes, f"{held} x 150 MiB held at once"


CASES = [
    # -- honest programs: the sandbox must not break correct answers ---------------------------
    Case(
        "honest",
        "def f(x):\n    return x + 1",
        verdict="pass",
        prelude=False,
        limits=PASS_LIMITS,
        kernel=False,
    ),
    Case(
        "honest tests",
        "def f(x):\n    return x + 1",
        "pass",
        "tests",
        False,
        limits=PASS_LIMITS,
        kernel=False,
    ),
    Case("honest mbpp", "return tuple(set(a) & set(b))", "pass", "mbpp", False, kernel=False),
    Case(
        "honest mbpp original",
        "return tuple(set(a) & set(b))",
        "pass",
        "mbpp-original",
        False,
        kernel=False,
    ),
    # -- files: writes outside the work directory ----------------------------------------------
    Case(
        "dir_fd openat write to / and /tmp",
        twice=True,
        code=r"""
for flags, label in ((os.O_RDONLY, "rdonly"), (os.O_PATH, "opath")):
    fd = attempt(f"open / {label}", os.open, "/", flags)
    if fd is not None:
        attempt(f"openat tmp/ {label}", os.open, f"tmp/@MARK@-dirfd-{label}",
                os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=fd)
        attempt(f"openat / {label}", os.open, f"@MARK@-dirfd-{label}",
                os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=fd)
        attempt(f"mkdirat tmp/ {label}", os.mkdir, f"tmp/@MARK@-dirfd-dir-{label}", dir_fd=fd)
        attempt(f"symlinkat tmp/ {label}", os.symlink, "x", f"tmp/@MARK@-dirfd-link-{label}",
                dir_fd=fd)
fd = attempt("open canary dir", os.open, "@CANARY_DIR@", os.O_RDONLY)
if fd is not None:
    attempt("openat canary append", os.open, "secret.txt", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
    attempt("openat create in canary dir", os.open, "@MARK@-x", os.O_WRONLY | os.O_CREAT,
            0o666, dir_fd=fd)
    leak("openat canary read", lambda: os.read(os.open("secret.txt", os.O_RDONLY, dir_fd=fd), 999))
    attempt("unlinkat canary", os.unlink, "secret.txt", dir_fd=fd)
fd = attempt("open repo", os.open, "@REPO@", os.O_RDONLY)
if fd is not None:
    attempt("openat repo", os.open, "@MARK@-dirfd", os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=fd)
attempt("dotdot", write, "../@MARK@-dotdot")
attempt("dotdot tmp", write, "../../@MARK@-dotdot")
attempt("dotdot /", write, "../../../../../../../@MARK@-dotdot")
attempt("dev shm", write, "/dev/shm/@MARK@-shm")
attempt("var tmp", write, "/var/tmp/@MARK@-vartmp")
attempt("home", write, "@HOME@/@MARK@-home")
""",
    ),
    Case(
        "symlink out of the work directory",
        twice=True,
        code=r"""
attempt("symlink to /tmp", os.symlink, "/tmp", "tmp-link")
attempt("write through it", write, "tmp-link/@MARK@-symlink")
attempt("symlink to /", os.symlink, "/", "root-link")
attempt("write through /", write, "root-link/@MARK@-symlink-root")
attempt("symlink to repo", os.symlink, "@REPO@", "repo-link")
attempt("write through repo", write, "repo-link/@MARK@-symlink-repo")
attempt("symlink to canary", os.symlink, "@CANARY@", "canary-link")
attempt("append through it", lambda: open("canary-link", "a").write("pwned"))
leak("read through it", read, "canary-link")
attempt("symlink to canary dir", os.symlink, "@CANARY_DIR@", "canary-dir-link")
leak("list canary dir", os.listdir, "canary-dir-link")
leak("read nested", read, "canary-dir-link/sub/nested.txt")
attempt("symlink created outside", os.symlink, "x", "/tmp/@MARK@-symlink-outside")
write("local")
attempt("rename out", os.rename, "local", "/tmp/@MARK@-renamed")
attempt("replace canary", os.replace, "local", "@CANARY@")
""",
    ),
    Case(
        "hard link out of the work directory",
        twice=True,
        code=r"""
attempt("link canary in", os.link, "@CANARY@", "canary-hard")
attempt("append via link", lambda: open("canary-hard", "a").write("pwned"))
leak("read via link", read, "canary-hard")
write("mine")
attempt("link out to /tmp", os.link, "mine", "/tmp/@MARK@-hardlink")
attempt("link out to canary dir", os.link, "mine", "@CANARY_DIR@/@MARK@-hardlink")
attempt("link out to repo", os.link, "mine", "@REPO@/@MARK@-hardlink")
attempt("link /etc/passwd in", os.link, "/etc/passwd", "passwd")
fd = attempt("open /tmp", os.open, "/tmp", os.O_RDONLY)
if fd is not None:
    attempt("linkat into /tmp", os.link, "mine", "@MARK@-linkat", dst_dir_fd=fd)
""",
    ),
    Case(
        "/proc/self/root and /proc/self/cwd",
        twice=True,
        code=r"""
attempt("write via /proc/self/root", write, "/proc/self/root/tmp/@MARK@-procroot")
attempt("write / via /proc/self/root", write, "/proc/self/root/@MARK@-procroot")
leak("read canary via /proc/self/root", read, "/proc/self/root@CANARY@")
leak("read home via /proc/self/root", read, "/proc/self/root@HOME_CANARY@")
leak("list /proc/self/root/tmp", os.listdir, "/proc/self/root/tmp")
attempt("write via /proc/self/cwd/..", write, "/proc/self/cwd/../@MARK@-proccwd")
attempt("write via /proc/thread-self/root", write, "/proc/thread-self/root/tmp/@MARK@-thr")
for fd in range(3, 20):
    leak(f"readlink fd {fd}", os.readlink, f"/proc/self/fd/{fd}")
""",
    ),
    Case(
        "/proc of the parent, the harness and init",
        twice=True,
        code=r"""
ppid = os.getppid()
leak("parent environ", read, f"/proc/{ppid}/environ")
leak("harness environ", read, "/proc/@HARNESS@/environ")
leak("harness cmdline", read, "/proc/@HARNESS@/cmdline")
leak("harness cwd README", read, "/proc/@HARNESS@/cwd/README.md")
leak("harness root canary", read, "/proc/@HARNESS@/root@CANARY@")
leak("harness mem", lambda: open("/proc/@HARNESS@/mem", "rb").read(16))
leak("init environ", read, "/proc/1/environ")
leak("init root canary", read, "/proc/1/root@CANARY@")
attempt("write via init root", write, "/proc/1/root/tmp/@MARK@-proc1")
attempt("write via harness root", write, "/proc/@HARNESS@/root/tmp/@MARK@-procppid")
leak("own environ", read, "/proc/self/environ")
leak("os.environ", lambda: dict(os.environ))
leak("secret variable", os.environ.get, "T2JAX_HOSTILE_SECRET")
leak("list /proc", os.listdir, "/proc")
""",
    ),
    # -- ctypes ----------------------------------------------------------------------------------
    Case(
        "ctypes in the main interpreter: libc.system and raw syscalls",
        r"""
import ctypes
libc = attempt("CDLL", ctypes.CDLL, None, use_errno=True)
if libc is not None:
    attempt("system", lambda: libc.system(b"touch /tmp/@MARK@-system; cat @CANARY@ >&2"))
    attempt("syscall openat", lambda: libc.syscall(@SYS_OPENAT@, ctypes.c_long(-100),
            b"/tmp/@MARK@-syscall", 0o101, 0o666))
    attempt("syscall kill", lambda: libc.syscall(@SYS_KILL@, @HARNESS@, 10))
    attempt("kill", lambda: libc.kill(@HARNESS@, 10))
attempt("pythonapi", lambda: ctypes.pythonapi.PySys_AddAuditHook)
attempt("string_at", ctypes.string_at, id(LOG), 16)
""",
    ),
    Case(
        "ctypes, audit hook disarmed: raw syscalls on files",
        r'''
leak("unhooked", unhooked, """
import ctypes
import os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = []
def call(label, function, *args):
    result = function(*args)
    out.append(f"{label}={result}/{ctypes.get_errno()}")
    return result
AT = ctypes.c_long(-100)
call("openat /tmp", libc.syscall, @SYS_OPENAT@, AT, b"/tmp/@MARK@-raw", 0o101, 0o666)
call("openat /", libc.syscall, @SYS_OPENAT@, AT, b"/@MARK@-raw", 0o101, 0o666)
call("openat repo", libc.syscall, @SYS_OPENAT@, AT, b"@REPO@/@MARK@-raw", 0o101, 0o666)
call("openat home", libc.syscall, @SYS_OPENAT@, AT, b"@HOME@/@MARK@-raw", 0o101, 0o666)
call("openat canary dir", libc.syscall, @SYS_OPENAT@, AT, b"@CANARY_DIR@/@MARK@-raw", 0o101, 0o666)
call("mkdir", libc.mkdir, b"/tmp/@MARK@-rawdir", 0o777)
call("symlink", libc.symlink, b"x", b"/tmp/@MARK@-rawlink")
call("link", libc.link, b"@CANARY@", b"canary-link")
for path in (b"@CANARY@", b"@HOME_CANARY@", b"@DATA_FILE@", b"@REPO@/README.md"):
    fd = call("openat read", libc.syscall, @SYS_OPENAT@, AT, path, 0, 0)
    if fd >= 0:
        buffer = ctypes.create_string_buffer(4096)
        count = libc.read(int(fd), buffer, 4096)
        out.append(buffer.raw[: max(count, 0)].decode(errors="replace"))
fd = call("open canary rw", libc.syscall, @SYS_OPENAT@, AT, b"@CANARY@", 0o2002, 0)
if fd >= 0:
    libc.write(int(fd), b"pwned", 5)
call("truncate canary", libc.truncate, b"@CANARY@", ctypes.c_long(0))
call("chmod canary", libc.chmod, b"@CANARY@", 0o700)
call("rename canary", libc.rename, b"@CANARY@", b"@CANARY@.moved")
call("unlink canary", libc.unlink, b"@CANARY_DIR@/sub/nested.txt")
opath = os.open("@CANARY@", os.O_PATH)  # Landlock does not check O_PATH opens
call("linkat AT_EMPTY_PATH", libc.linkat, opath, b"", -100, b"canary-by-fd", 0x1000)
for path in (f"/proc/self/fd/{opath}", "canary-by-fd"):
    try:
        with open(path) as handle:
            out.append(handle.read())
    except OSError as error:
        out.append(f"reopen {path}: {error}")
raise RuntimeError(" ".join(out))
""")
''',
    ),
    Case(
        "ctypes, audit hook disarmed: libc.system, fork and exec",
        r'''
leak("unhooked", unhooked, """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
out = []
status = libc.system(b"touch /tmp/@MARK@-system; cat @CANARY@ >&2; kill -USR1 @HARNESS@")
out.append(f"system={status}/{ctypes.get_errno()}")
argv = (ctypes.c_char_p * 4)(b"sh", b"-c", b"touch /tmp/@MARK@-execv", None)
pid = libc.fork()
if pid == 0:
    libc.execv(b"/bin/sh", argv)
    fd = libc.open(b"/tmp/@MARK@-forked", 0o101, 0o666)
    libc._exit(3)
out.append(f"fork={pid}")
time.sleep(0.2)
out.append(f"execv in parent={libc.execv(b'/bin/sh', argv)}/{ctypes.get_errno()}")
raise RuntimeError(" ".join(out))
""")
''',
    ),
    Case(
        "ctypes, audit hook disarmed: raw socket and connect",
        r'''
leak("unhooked", unhooked, """
import ctypes, struct, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = []
for family, kind in ((2, 1), (10, 1), (1, 1), (2, 2), (16, 3), (17, 3)):
    fd = libc.syscall(@SYS_SOCKET@, family, kind, 0)
    out.append(f"socket({family},{kind})={fd}/{ctypes.get_errno()}")
    if fd >= 0 and family == 2 and kind == 1:
        address = struct.pack("=H", 2) + struct.pack("!H", @TCP4@) + bytes([127, 0, 0, 1])
        address += bytes(8)
        out.append(f"connect={libc.connect(int(fd), address, 16)}/{ctypes.get_errno()}")
        libc.write(int(fd), b"@MARK@", 8)
    if fd >= 0 and family == 1:
        path = b"@UNIX@"
        address = struct.pack("=H", 1) + path + b"\\0" * (108 - len(path))
        out.append(f"connect unix={libc.connect(int(fd), address, 110)}/{ctypes.get_errno()}")
        libc.write(int(fd), b"@MARK@", 8)
pair = (ctypes.c_int * 2)()
out.append(f"socketpair={libc.socketpair(1, 1, 0, pair)}/{ctypes.get_errno()}")
raise RuntimeError(" ".join(out))
""")
''',
    ),
    Case(
        "ctypes, audit hook disarmed: signals to the harness, its group, the victim, -1",
        r'''
leak("unhooked", unhooked, """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = []
def call(label, *args):
    out.append(f"{label}={libc.syscall(*args)}/{ctypes.get_errno()}")
call("kill harness", @SYS_KILL@, @HARNESS@, 10)
call("kill parent", @SYS_KILL@, os.getppid(), 15) if os.getppid() > 1 else None
call("kill harness group", @SYS_KILL@, -@PGID@, 15)
call("kill victim", @SYS_KILL@, @VICTIM@, 9)
call("kill init", @SYS_KILL@, 1, 15)
call("kill -1", @SYS_KILL@, -1, 9)
raise RuntimeError(" ".join(out))
""")
''',
    ),
    Case(
        "file metadata outside: utime, chmod, xattrs (O_PATH dir_fd; audit hook disarmed)",
        r'''
fd = attempt("O_PATH canary dir", os.open, "@CANARY_DIR@", os.O_PATH)
if fd is not None:
    attempt("utime via dir_fd", os.utime, "secret.txt", dir_fd=fd)
    attempt("chmod via dir_fd", os.chmod, "secret.txt", 0o777, dir_fd=fd)
    leak("stat via dir_fd", os.stat, "secret.txt", dir_fd=fd)
leak("unhooked", unhooked, """
import os
out = []
for label, function, args in (
    ("setxattr", os.setxattr, ("@CANARY_DIR@/sub/nested.txt", "user.@MARK@", b"1")),
    ("utime", os.utime, ("@CANARY_DIR@/sub/nested.txt",)),
    ("chmod", os.chmod, ("@CANARY_DIR@", 0o700)),
):
    try:
        function(*args)
        out.append(label + ": ok")
    except OSError as error:
        out.append(label + ": " + str(error))
raise RuntimeError(" ".join(out))
""")
''',
    ),
    # -- processes ---------------------------------------------------------------------------
    Case(
        "fork",
        twice=True,
        code=r"""
pid = attempt("fork", os.fork)
if pid == 0:
    write("/tmp/@MARK@-forked")
    os._exit(0)
attempt("forkpty", os.forkpty)
attempt("fork bomb", lambda: [os.fork() for _ in range(1000)])
""",
    ),
    Case(
        "posix_spawn and exec",
        twice=True,
        code=r"""
command = ["sh", "-c", "touch /tmp/@MARK@-spawn; cat @CANARY@ >&2; kill -USR1 @HARNESS@"]
attempt("posix_spawn", os.posix_spawn, "/bin/sh", command, dict(os.environ))
attempt("posix_spawnp", os.posix_spawnp, "sh", command, dict(os.environ))
attempt("spawnv", os.spawnv, os.P_NOWAIT, "/bin/sh", command)
attempt("execve", os.execve, "/bin/sh", command, dict(os.environ))
attempt("execv", os.execv, "/bin/sh", command)
""",
    ),
    Case(
        "subprocess, os.system, os.popen, multiprocessing, pty",
        twice=True,
        code=r"""
command = "touch /tmp/@MARK@-sub; cat @CANARY@ >&2; kill -USR1 @HARNESS@"
import subprocess
leak("subprocess.run", lambda: subprocess.run(["sh", "-c", command], capture_output=True).stderr)
leak("check_output", subprocess.check_output, ["cat", "@CANARY@"])
attempt("os.system", os.system, command)
leak("os.popen", lambda: os.popen("cat @CANARY@").read())
import multiprocessing
process = multiprocessing.Process(target=write, args=("/tmp/@MARK@-mp",))
attempt("multiprocessing", process.start)
import pty
attempt("pty.spawn", pty.spawn, ["sh", "-c", command])
""",
    ),
    Case(
        "fork_exec from a fresh import of _posixsubprocess (same process group)",
        r"""
import time
sys.modules.pop("_posixsubprocess", None)
import _posixsubprocess
def child():
    write("/tmp/@MARK@-preexec")
    time.sleep(30)
read_end, write_end = os.pipe()
attempt("fork_exec", _posixsubprocess.fork_exec, [b"/bin/sh", b"-c", b"touch /tmp/@MARK@-fe"],
        [b"/bin/sh"], False, (), None, None, -1, -1, -1, -1, -1, -1, read_end, write_end,
        False, False, -1, None, None, None, -1, child, False)
""",
    ),
    Case(
        "daemon: fork_exec with start_new_session, fds closed",
        r"""
import time
sys.modules.pop("_posixsubprocess", None)
import _posixsubprocess
ready_read, ready_write = os.pipe()
def child():  # runs after setsid (start_new_session=True)
    os.write(ready_write, b"x")
    os.closerange(0, 256)
    time.sleep(30)
read_end, write_end = os.pipe()
PID = attempt("fork_exec", _posixsubprocess.fork_exec, [b"/bin/true"], [b"/bin/true"], False,
              (), None, None, -1, -1, -1, -1, -1, -1, read_end, write_end, False, True, -1,
              None, None, None, -1, child, False)
if PID:
    os.close(ready_write)
    attempt("wait for the child's setsid", os.read, ready_read, 1)
""",
    ),
    Case(
        "daemon: setsid through ctypes, holding the pipes",
        r'''
leak("unhooked", unhooked, """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
ready_read, ready_write = os.pipe()
if libc.fork() == 0:
    libc.setsid()
    if libc.fork() == 0:
        libc.write(ready_write, b"x", 1)  # out of the process group: let the parent go on
        libc.sleep(12)
    libc._exit(0)
os.close(ready_write)
os.read(ready_read, 1)
""")
''',
        limits=dataclasses.replace(LIMITS, wall_seconds=2.0),
    ),
    Case(
        "subinterpreters (their own audit hooks)",
        r'''
attempt("import", __import__, "_xxsubinterpreters")
leak("unhooked", unhooked, r"""
import _xxsubinterpreters as interpreters
source = "\n".join([
    "import os",
    "for path in ('/tmp/@MARK@-sub', '@CANARY_DIR@/@MARK@', '@REPO@/@MARK@'):",
    "    try:",
    "        open(path, 'w').write('x')",
    "    except OSError:",
    "        pass",
    "raise RuntimeError(open('@CANARY@').read())",
])
interpreters.run_string(interpreters.create(), source)
""")
''',
    ),
    Case(
        "fork with the audit hook disarmed: memory beyond memory_bytes",
        r"""
import select, time
disarm()
read_end, write_end = os.pipe()
def hold():
    block = bytearray(@BLOCK@)
    for index in range(0, len(block), 4096):
        block[index] = 1
    os.write(write_end, b"x")
    time.sleep(30)
for _ in range(3):
    pid = attempt("fork", os.fork)
    if pid == 0:
        try:
            hold()
        finally:
            os._exit(0)
os.close(write_end)
held = b""
deadline = time.monotonic() + 5.0
while len(held) < 3 and select.select([read_end], [], [], max(0, deadline - time.monotonic()))[0]:
    held += os.read(read_end, 4)
HELD = len(held)
def f(x):
    return HELD
""",
        limits=FORK_MEMORY_LIMITS,
        check=_memory_bounded,
    ),
    # -- signals ---------------------------------------------------------------------------
    Case(
        "signals to the parent, its group, the victim and everyone",
        twice=True,
        code=r"""
import signal
ppid = os.getppid()
attempt("kill parent", os.kill, ppid, signal.SIGUSR1) if ppid > 1 else None
attempt("kill harness", os.kill, @HARNESS@, signal.SIGTERM)
attempt("killpg parent", lambda: os.killpg(os.getpgid(ppid), signal.SIGTERM))
attempt("killpg harness", os.killpg, @PGID@, signal.SIGTERM)
attempt("kill victim", os.kill, @VICTIM@, signal.SIGKILL)
import threading
attempt("pthread_kill", lambda: signal.pthread_kill(threading.get_ident(), 0))
attempt("pidfd", lambda: os.pidfd_open(@HARNESS@))
sys.modules.pop("posix", None)
import posix
attempt("fresh posix.kill", posix.kill, @HARNESS@, signal.SIGUSR2)
attempt("fresh posix.setsid", posix.setsid)
attempt("kill -1", os.kill, -1, signal.SIGKILL)
""",
    ),
    # -- resources -------------------------------------------------------------------------
    Case(
        "thread exhaustion, then the right answer",
        r"""
import threading, time
threading.stack_size(64 * 1024)
threads = []
def start():
    while True:
        thread = threading.Thread(target=time.sleep, args=(60,), daemon=True)
        thread.start()
        threads.append(thread)
attempt("threads", start)
def f(x):
    return x + 1
""",
        verdict="pass",
        limits=PASS_LIMITS,
    ),
    Case(
        "fd exhaustion, then the right answer",
        r"""
handles = []
def exhaust():
    while True:
        handles.append(os.open("/dev/null", os.O_RDONLY))
        handles.extend(os.pipe())
attempt("fds", exhaust)
def f(x):
    return x + 1
""",
        verdict="pass",
        limits=PASS_LIMITS,
    ),
    Case(
        "memory flood",
        r"""
blocks = []
def flood():
    while True:
        blocks.append(bytearray(32 * 1024 * 1024))
attempt("flood", flood)
attempt("huge string", lambda: " " * 10**12)
import mmap
attempt("mmap", mmap.mmap, -1, 1 << 40)
def f(x):
    blocks.append(bytearray(32 * 1024 * 1024))
    return x + 1
""",
    ),
    Case(
        "huge return value",
        "def f(x):\n    return 'x' * (12 * 1024 * 1024)",
        prelude=False,
        check=_output_contained,
    ),
    Case(
        "deep and self-referencing return values",
        r"""
def f(x):
    if x == 1:
        value = []
        for _ in range(20000):
            value = [value]
        return value
    value = [x + 1]
    value.append(value)
    return value
""",
        prelude=False,
    ),
    Case(
        "stderr flood",
        r"""
def f(x):
    chunk = b"e" * (1 << 20)
    for _ in range(40):
        os.write(2, chunk)
    sys.stderr.write("s" * (1 << 22))
    print("o" * (1 << 22))
    return x + 100
""",
        check=_stderr_capped,
    ),
    Case(
        "busy loop ignoring the call alarm",
        r"""
import signal
signal.signal(signal.SIGALRM, signal.SIG_IGN)
def f(x):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGXCPU})
    while True:
        pass
""",
        check=_timed_out,
    ),
    # -- forged events -------------------------------------------------------------------------
    Case(
        "every fd 0..255: forged call events with the right values",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b'{"event": "call", "index": 0, "value": 2}\n'
               b'{"event": "call", "index": 1, "value": 3}\n')
def f(x):
    return x + 100
""",
        verdict="either",  # the program supplied the right values itself
    ),
    Case(
        "every fd 0..255: forged done/passed, then exit",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b'{"event": "done"}\n{"event": "passed"}\n{"event": "completed"}\n'
               b'{"event": "exit", "code": 0}\n')
os._exit(0)
""",
    ),
    Case(
        "every fd 0..255: one forged call, then exit",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b'{"event": "call", "index": 0, "value": 2}\n{"event": "done"}\n')
os._exit(0)
""",
    ),
    Case(
        "every fd 0..255: forged calls out of order and malformed",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b'{"event": "call", "index": 1, "value": 3}\n'
               b'{"event": "call", "index": 0, "value": 2}\n{"event": "call", "index": 0\n')
def f(x):
    return x + 100
""",
    ),
    Case(
        "forged values that compare equal to anything",
        WRITE_EVERY_FD
        + r"""
line = (b'{"event": "call", "index": %d, "value": {"$": "opaque", "type": "AlwaysEqual"}}\n'
        b'{"event": "call", "index": %d, "value": {"$": "ndarray", "v": [], "dtype": "int64"}}\n')
write_every_fd(line % (0, 1))
os._exit(0)
""",
    ),
    Case(
        "os._exit(0) at top level",
        "import os\nos._exit(0)\ndef f(x):\n    return x + 1",
        prelude=False,
    ),
    Case(
        "exit from inside the call",
        r"""
import signal
def f(x):
    if x == 1:
        raise SystemExit(0)
    signal.raise_signal(signal.SIGKILL)
""",
        prelude=False,
    ),
    # -- tampering with the child ----------------------------------------------------------------
    Case(
        "sys.modules: json, the codec, os.write",
        r"""
import json
real_dumps = json.dumps
json.dumps = lambda message, *a, **k: real_dumps({**message, "value": 2, "index": 0})
codec = sys.modules.get("_sandbox_codec")
if codec is not None:
    codec.encode_value = lambda value: 2
main = sys.modules["__main__"]
main.encode_value = lambda value: 2
class FakeJson:
    dumps = staticmethod(lambda message: '{"event": "passed"}')
sys.modules["json"] = FakeJson
real_write = os.write
os.write = lambda fd, data: real_write(fd, b'{"event": "done"}\n' + data)
def f(x):
    return x + 100
""",
    ),
    Case(
        "builtins tampering",
        r"""
import builtins
builtins.isinstance = lambda value, kinds: True
builtins.len = lambda value: 2
builtins.str = lambda *a, **k: "2"
builtins.repr = lambda *a, **k: "2"
builtins.int = lambda *a, **k: 2
builtins.BaseException.__str__ = lambda self: "ok"
def f(x):
    return x + 100
""",
    ),
    Case(
        "objects whose __eq__ always returns True",
        r"""
class AlwaysEqual:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __hash__(self):
        return 0
    def __repr__(self):
        return "2"
    def __reduce__(self):
        return (os.system, ("touch /tmp/@MARK@-reduce",))
def f(x):
    return AlwaysEqual()
""",
    ),
    Case(
        "subclasses of int, str, tuple and float with a lying __eq__",
        r"""
class LyingInt(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
    def __int__(self):
        return 999
    def __index__(self):
        return 999
class LyingStr(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
class LyingTuple(tuple):
    def __eq__(self, other):
        return True
    __hash__ = tuple.__hash__
    def __iter__(self):
        return iter(())
def f(x):
    return LyingInt(x + 100) if x == 1 else (LyingStr("3x"), LyingTuple((3,)), float("nan"))
""",
    ),
    Case(
        "walking frames and gc to replace the runner's functions",
        r"""
import gc, sys
def f(x):
    frame = sys._getframe(1)
    runner = frame.f_globals
    runner["encode_value"] = lambda value: 3
    runner["_call"] = lambda *a, **k: {"event": "call", "value": 3}
    runner["_describe"] = lambda error: "ok"
    while frame is not None:
        request = frame.f_locals.get("request")
        if isinstance(request, dict) and isinstance(request.get("inputs"), list):
            del request["inputs"][1:]
            request["time_limits"][:] = [99.0] * len(request["time_limits"])
        frame = frame.f_back
    for function in gc.get_objects():
        if getattr(function, "__name__", "") == "emit" and getattr(function, "__closure__", None):
            for cell in function.__closure__:
                if isinstance(cell.cell_contents, int):
                    cell.cell_contents = 2  # events to stderr
    return x + 100
""",
        prelude=False,
    ),
    # -- reads -----------------------------------------------------------------------------------
    Case(
        "reading the reference data",
        twice=True,
        code=r"""
leak("data file", read, "@DATA_FILE@")
leak("data dir", os.listdir, "@DATA@")
leak("data mbppplus", os.listdir, "@DATA@/mbppplus")
leak("data via scandir", lambda: [entry.name for entry in os.scandir("@DATA@/mbppplus")])
import glob
leak("glob", glob.glob, "@DATA@/*/*")
leak("gz", read, "@DATA@/mbppplus/MbppPlus-v0.1.0.jsonl.gz")
fd = attempt("open data dir", os.open, "@DATA@", os.O_RDONLY)
if fd is not None:
    leak("openat data", lambda: read(os.open("mbppplus/MbppPlus.jsonl", os.O_RDONLY, dir_fd=fd)))
leak("ground-truth cache", os.listdir, "@HOME@/.cache")
""",
    ),
    Case(
        "reading the checkout",
        twice=True,
        code=r"""
leak("README", read, "@REPO@/README.md")
leak("list checkout", os.listdir, "@REPO@")
leak("runs", os.listdir, "@REPO@/runs")
leak("git config", read, "@REPO@/.git/config")
leak("child script", read, "@REPO@/t2jax/tasks/_sandbox_child.py")
leak("linecache", lambda: __import__("linecache").getline("@REPO@/README.md", 3))
""",
    ),
    Case(
        "reading $HOME and /tmp",
        twice=True,
        code=r"""
leak("home canary", read, "@HOME_CANARY@")
leak("list home", os.listdir, "@HOME@")
leak("ssh", os.listdir, "@HOME@/.ssh")
leak("bash history", read, "@HOME@/.bash_history")
leak("tmp canary", read, "@CANARY@")
leak("nested canary", read, "@CANARY_DIR@/sub/nested.txt")
leak("list canary dir", os.listdir, "@CANARY_DIR@")
leak("list /tmp", os.listdir, "/tmp")
leak("io.FileIO", lambda: __import__("io").FileIO("@CANARY@").read())
leak("mmap", lambda: __import__("mmap").mmap(os.open("@CANARY@", os.O_RDONLY), 0, prot=1)[:])
leak("runpy", lambda: __import__("runpy").run_path("@CANARY@"))
leak("shutil.copy", lambda: __import__("shutil").copy("@CANARY@", "copy.txt"))
leak("copy", read, "copy.txt")
leak("passwd", read, "/etc/passwd")
""",
    ),
    # -- network ---------------------------------------------------------------------------------
    Case(
        "network: TCP v4 and v6, UDP, unix and abstract sockets",
        twice=True,
        code=r"""
import socket
def tcp(family, host, port):
    with socket.socket(family, socket.SOCK_STREAM) as connection:
        connection.settimeout(0.5)
        connection.connect((host, port))
        connection.sendall(b"@MARK@")
def unix(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(0.5)
        connection.connect(address)
        connection.sendall(b"@MARK@")
attempt("tcp4", tcp, socket.AF_INET, "127.0.0.1", @TCP4@)
attempt("tcp6", tcp, socket.AF_INET6, "::1", @TCP6@)
attempt("create_connection", socket.create_connection, ("localhost", @TCP4@), 0.5)
udp = attempt("udp socket", socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp", lambda: udp.sendto(b"@MARK@", ("127.0.0.1", @UDP4@)))
attempt("unix", unix, "@UNIX@")
attempt("abstract", unix, "\0@ABSTRACT@")
attempt("socketpair", socket.socketpair)
sys.modules.pop("_socket", None)
import _socket
fresh = attempt("fresh _socket", _socket.socket, _socket.AF_INET, _socket.SOCK_STREAM)
attempt("fresh connect", lambda: fresh.connect(("127.0.0.1", @TCP4@)))
from multiprocessing.connection import Client
attempt("multiprocessing Client", Client, "@UNIX@")
import urllib.request
attempt("urllib", urllib.request.urlopen, "http://127.0.0.1:@TCP4@/@MARK@", timeout=0.5)
""",
    ),
    # -- harness-side parsing of forged events (bugs) -------------------------------------------
    Case(
        "forged event nested 100000 deep",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b"[" * 100000 + b"]" * 100000 + b"\n")
os._exit(0)
""",
    ),
    Case(
        "forged value with 400 nested tuple tags",
        WRITE_EVERY_FD
        + r"""
value = b'{"$": "tuple", "v": [' * 400 + b"1" + b"]}" * 400
write_every_fd(b'{"event": "call", "index": 0, "value": ' + value + b"}\n")
os._exit(0)
""",
    ),
    Case(
        "forged ndarray whose dtype is 20 million elements",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b'{"event": "call", "index": 0, "value": '
               b'{"$": "ndarray", "v": [0], "dtype": "(20000000,)i8"}}\n')
os._exit(0)
""",
        check=_no_amplified_value,
    ),
    # -- run_tests: the checker's verdict ---------------------------------------------------------
    Case(
        "run_tests: forged passed on every fd, then exit",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b'{"event": "passed"}\n{"event": "ready"}\n{"event": "passed"}\n')
os._exit(0)
""",
        api="tests",
    ),
    Case(
        "run_tests: forged ready and a passing call answer, then exit",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b'{"event": "ready"}\n{"event": "call", "index": 0, "value": 2}\n'
               b'{"event": "passed"}\n')
os._exit(0)
""",
        api="tests",
    ),
    Case(
        "run_tests: AlwaysEqual return values",
        r"""
class AlwaysEqual:
    def __eq__(self, other):
        return True
    def __hash__(self):
        return 0
def f(x):
    return AlwaysEqual()
""",
        api="tests",
    ),
    Case(
        "run_tests: os._exit(0) before the tests",
        "import os\nos._exit(0)\ndef f(x):\n    return x + 1",
        api="tests",
        prelude=False,
    ),
    Case(
        "run_tests: forged call answer without a value",
        WRITE_EVERY_FD
        + r"""
write_every_fd(b'{"event": "ready"}\n{"event": "call", "index": 0}\n')
os._exit(0)
""",
        api="tests",
    ),
    # -- the real MBPP+ task -------------------------------------------------------------------
    Case(
        "mbpp original: forged passed from the function body",
        r"""import os
    for fd in range(256):
        try:
            os.write(fd, b'{"event": "passed"}\n{"event": "call", "index": 0, "value": 2}\n')
        except OSError:
            pass
    os._exit(0)
    return (4, 5)""",
        api="mbpp-original",
        prelude=False,
    ),
    Case(
        "mbpp original: AlwaysEqual",
        r"""class AlwaysEqual(tuple):
        def __eq__(self, other):
            return True
        __hash__ = tuple.__hash__
    return AlwaysEqual()""",
        api="mbpp-original",
        prelude=False,
    ),
    Case(
        "mbpp original: forged answer without a value",
        r"""import os
    for fd in range(256):
        try:
            os.write(fd, b'{"event": "call", "index": 0, "error": ""}\n')
        except OSError:
            pass
    os._exit(0)
    return (4, 5)""",
        api="mbpp-original",
        prelude=False,
    ),
    Case(
        "mbpp: forged wrong events and the canary",
        r"""import os
    try:
        leaked = open("@CANARY@").read()
    except OSError as error:
        leaked = str(error)
    import json
    events = "".join(
        json.dumps({"event": "call", "index": i, "value": {"$": "tuple", "v": [leaked]}}) + "\n"
        for i in range(100)
    )
    for fd in range(256):
        try:
            os.write(fd, events.encode())
        except OSError:
            pass
    os._exit(0)
    return (4, 5)""",
        api="mbpp",
        prelude=False,
    ),
]


def _program(case: Case) -> str:
    if not case.prelude:
        return case.code
    code = PRELUDE + case.code
    if case.twice:
        fresh = "os.makedirs('again', exist_ok=True)\nos.chdir('again')\n"  # new names
        code += f"\nleak('again, unhooked', unhooked, {fresh + case.code!r})\n"
    return code


def _params():
    params = []
    for case in CASES:
        for mode in MODES:
            mode_name = mode if isinstance(mode, str) else mode.values[0]
            marks = list(getattr(mode, "marks", ()))
            reason = case.xfail.get(mode_name) or case.xfail.get("*")
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            if case.kernel:
                marks.append(needs_kernel)
            params.append(pytest.param(case, mode_name, marks=marks, id=f"{case.name}-{mode_name}"))
    return params


def _equal(value, expected) -> bool:
    """A scorer's comparison: anything that fails to compare is a wrong answer."""
    try:
        return bool(value == expected)
    except Exception:
        return False


def _run(case: Case, code: str, mode: str, problem) -> tuple[str, list[str], float, Any]:
    """Runs one case; returns (verdict, result texts, seconds allowed, raw result)."""
    if case.api == "function":
        result = run_function(code, "f", INPUTS, [1.0] * len(INPUTS), limits=case.limits,
                              isolation=mode)  # fmt: skip
        passed = (
            result.completed
            and result.exec_error is None
            and len(result.calls) == len(EXPECTED)
            and all(
                call.error is None and _equal(call.value, expected)
                for call, expected in zip(result.calls, EXPECTED, strict=True)
            )
        )
        return ("pass" if passed else "fail"), _texts(result), case.limits.wall_seconds, result
    if case.api == "tests":
        result = run_tests(code, TESTS, "f", call_seconds=1.0, limits=case.limits, isolation=mode)
        verdict = "pass" if result.completed else "fail"
        return verdict, _texts(result), case.limits.wall_seconds, result
    tests = "original" if case.api == "mbpp-original" else "base"
    task = get_task("mbpp", tests=tests, isolation=mode)
    completion = "\ndef similar_elements(a, b):\n    " + code + "\n```"
    score = task.score(problem, completion)
    # The original tests run under a 10 s wall-clock limit; the base suite under far less.
    return ("pass" if score.correct else "fail"), [score.reason], 10.0, score


def _texts(result: SandboxResult) -> list[str]:
    texts = [str(result.exec_error), result.stderr, str(result.note), result.reason]
    for call in result.calls:
        texts += [repr(call.value), str(call.error)]
    return texts


@pytest.mark.parametrize(("case", "mode"), _params())
def test_hostile(case: Case, mode: str, arena: Arena, request):
    mbpp_problem = request.getfixturevalue("mbpp_problem") if case.api.startswith("mbpp") else None
    before = arena.before()
    code = arena.render(_program(case), before.marker)
    start = time.monotonic()
    raised, verdict, texts, allowed, result = None, "raised", [], case.limits.wall_seconds, None
    try:
        verdict, texts, allowed, result = _run(case, code, mode, mbpp_problem)
    except Exception as error:  # the harness must return a verdict, never raise
        raised = error
    seconds = time.monotonic() - start
    problems = arena.problems(before, texts)
    assert not problems, "\n".join(problems)
    if raised is not None:
        raise AssertionError(f"the harness raised {type(raised).__name__}") from raised
    assert seconds <= allowed + RETURN_SLACK_SECONDS, f"the run took {seconds:.1f} s"
    if case.verdict != "either":
        assert verdict == case.verdict, (verdict, texts[:4])
    if isinstance(result, SandboxResult):
        assert result.isolation == mode
    if case.check is not None:
        case.check(result)


def test_listeners(arena: Arena):
    if arena.ipv6_note:
        pytest.skip(arena.ipv6_note)
    assert set(arena.listeners) == {"tcp4", "tcp6", "udp4", "unix", "abstract"}


def test_corpus_size():
    hostile = [case for case in CASES if not case.name.startswith("honest")]
    assert len(hostile) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------
# The detectors detect: escapes done by the harness itself.


def test_detectors_detect(arena: Arena):
    def detected(action: Callable[[Before], Any], expected: str, texts=()):
        before = arena.before()
        action(before)
        found = arena.problems(before, list(texts), survivor_grace=0.2)
        assert any(expected in problem for problem in found), (expected, found)

    def create_in(directory: str):
        def action(before: Before):
            path = pathlib.Path(directory, f".{before.marker}-detector")
            arena_cleanup.append(path)
            path.write_text("x")

        return action

    arena_cleanup: list[pathlib.Path] = []
    try:
        for directory in arena.watched_dirs:
            detected(create_in(directory), f"changed in {directory}")
            for path in arena_cleanup:
                path.unlink(missing_ok=True)
            arena_cleanup.clear()
    finally:
        for path in arena_cleanup:
            path.unlink(missing_ok=True)

    def append(path: pathlib.Path):
        with path.open("a") as handle:
            handle.write("pwned")

    detected(lambda b: append(arena.canary), "the canary tree changed")
    detected(lambda b: os.utime(arena.canary, ns=(1, 1)), "the canary tree changed")
    detected(lambda b: (arena.canary_dir / "sub" / b.marker).write_text(""), "the canary tree")
    detected(lambda b: append(arena.home_canary), "the canary in $HOME changed")
    detected(lambda b: (arena.workroot / "t2jax-sandbox-left").mkdir(), "left behind")
    (arena.workroot / "t2jax-sandbox-left").rmdir()

    for label, secret in arena.secrets().items():
        detected(lambda b: None, label, texts=[f"stderr... {secret} ..."])
    assert (
        arena.secrets()["the harness's secret environment variable"] == os.environ[arena.env_name]
    )

    def connect(name: str):
        def action(before: Before):
            lis = arena.listeners[name]
            family = lis.sock.family
            with socket.socket(family, lis.kind) as client:
                if lis.kind == socket.SOCK_DGRAM:
                    client.sendto(b"probe", lis.address)
                else:
                    client.connect(lis.address)
                    client.sendall(b"probe")

        return action

    for name in arena.listeners:
        detected(connect(name), f"canary listener {name} was reached")

    detected(lambda b: os.kill(os.getpid(), signal.SIGUSR1), "received signals")

    def kill_victim(before: Before):
        arena.victim.kill()
        arena.victim.wait()

    detected(kill_victim, "the victim process outside the sandbox died")
    assert arena.victim.poll() is None  # replaced

    def survivor(before: Before):
        child = subprocess.Popen(
            ["sleep", "30"],
            env={"HOME": str(arena.workroot / "t2jax-sandbox-fake")},
            start_new_session=True,
        )
        survivors.append(child)

    survivors: list[subprocess.Popen] = []
    detected(survivor, "sandbox processes survived the run")
    for child in survivors:
        child.wait(timeout=5)  # killed by the detector; reaped here

    def child_left(before: Before):
        survivors.append(subprocess.Popen(["sleep", "30"]))

    detected(child_left, "the harness has children left")
    for child in survivors[1:]:
        child.kill()
        child.wait()
