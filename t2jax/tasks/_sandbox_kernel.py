"""Kernel mechanisms of the code sandbox (standard library only; Linux x86_64 and aarch64).

- **Landlock** (`restrict_filesystem`): the process may read only the Python installation and a
  few device files, and read and write only its working directory; no file may be executed;
  TCP bind/connect is refused (Landlock ABI >= 4); signals and abstract unix sockets cannot reach
  processes outside the sandbox (ABI >= 6). Enforced by the kernel on every path-based access,
  however the path is named (`dir_fd`, symlinks, hard links, `/proc/self/root`, raw syscalls).
- **seccomp** (`deny_syscalls`): a BPF filter refuses sockets, exec, ptrace and cross-process
  memory access, namespaces and mounts, BPF, perf, keyrings, io_uring, handle-based opens, new
  processes (clone without CLONE_THREAD: threads only, so the rlimits of one process bound the
  sandbox), leaving the process group (setsid, setpgid) and metadata changes (chmod, chown, utime,
  xattrs), which Landlock does not govern. What stays visible: `stat` of paths outside
  (existence, size, times), never their content.
- **Privilege drop** (`drop_privileges`): a harness running as root starts the child as root in a
  private mount namespace; the child makes the interpreter's directories reachable for an
  unprivileged uid (root's home is 0700 on many machines) and then becomes that uid, which
  clears every capability. `no_new_privs` is set in every mode.

`probe()` reports which of these the running kernel offers.
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
import struct
import sys

SANDBOX_UID = 65534  # "nobody" on Debian, Ubuntu, Fedora and Alpine
SANDBOX_GID = 65534

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MS_BIND = 0x1000

_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

# Landlock filesystem rights, by the ABI version that introduced them.
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_CONNECT_TCP = 0b11  # ABI 4
_SCOPE_ABSTRACT_UNIX_AND_SIGNAL = 0b11  # ABI 6

_READ = _FS_READ_FILE | _FS_READ_DIR
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE
_WORKDIR = (
    _READ
    | _FS_WRITE_FILE
    | _FS_REMOVE_DIR
    | _FS_REMOVE_FILE
    | _FS_MAKE_DIR
    | _FS_MAKE_REG
    | _FS_MAKE_SYM
    | _FS_REFER
    | _FS_TRUNCATE
)
_SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")
_DEVICE_FILES = {"/dev/null": _FS_READ_FILE | _FS_WRITE_FILE, "/dev/urandom": _FS_READ_FILE}

# seccomp: syscalls refused with EPERM, per architecture (name -> number).
_DENIED_SYSCALLS = {
    "x86_64": {
        "socket": 41, "socketpair": 53, "execve": 59, "ptrace": 101, "personality": 135,
        "pivot_root": 155, "chroot": 161, "mount": 165, "umount2": 166, "kexec_load": 246,
        "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "bpf": 321,
        "execveat": 322, "userfaultfd": 323, "pidfd_send_signal": 424, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434,
        "pidfd_getfd": 438, "mount_setattr": 442,
        # no leaving the process group the harness kills; no metadata changes, which Landlock
        # does not govern (timestamps, modes, owners, xattrs of writable files outside)
        "setpgid": 109, "setsid": 112, "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93,
        "lchown": 94, "utime": 132, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
        "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "utimes": 235,
        "fchownat": 260, "futimesat": 261, "fchmodat": 268, "utimensat": 280, "fchmodat2": 452,
        "setxattrat": 463, "removexattrat": 466,
    },
    "aarch64": {
        "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51, "personality": 92,
        "unshare": 97, "kexec_load": 104, "ptrace": 117, "socket": 198, "socketpair": 199,
        "add_key": 217, "request_key": 218, "keyctl": 219, "execve": 221, "perf_event_open": 241,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "bpf": 280,
        "execveat": 281, "userfaultfd": 282, "pidfd_send_signal": 424, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434,
        "pidfd_getfd": 438, "mount_setattr": 442,
        "setpgid": 154, "setsid": 157, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7,
        "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16, "fchmod": 52, "fchmodat": 53,
        "fchownat": 54, "fchown": 55, "utimensat": 88, "fchmodat2": 452, "setxattrat": 463,
        "removexattrat": 466,
    },
}  # fmt: skip
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_CLONE = {"x86_64": 56, "aarch64": 220}
_FORK_SYSCALLS = {"x86_64": {"fork": 57, "vfork": 58}}  # aarch64 forks through clone only
_CLONE_THREAD = 0x00010000
_CLONE3 = 435  # refused with ENOSYS so that libc falls back to clone, whose flags are checked
_CLONE_NAMESPACE_FLAGS = 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
_X32_SYSCALL_BIT = 0x40000000
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_EPERM, _ENOSYS = 1, 38
_BPF_LD_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: not available or disabled)."""
    try:
        version = _libc().syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)
    except (OSError, AttributeError):
        return 0
    return max(0, int(version))


def seccomp_supported() -> bool:
    """Whether the kernel filters syscalls and this module has a filter for the architecture."""
    try:
        with open("/proc/self/status") as status:
            enabled = any(line.startswith("Seccomp:") for line in status)
    except OSError:
        return False
    return enabled and _machine() in _DENIED_SYSCALLS


def set_no_new_privs():
    """prctl(PR_SET_NO_NEW_PRIVS): exec can never grant privileges (setuid bits, file caps)."""
    _check(_libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


def interpreter_roots() -> list[str]:
    """Directories the interpreter reads from: its installation and its (virtual) environment."""
    prefixes = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix}
    return sorted({os.path.realpath(prefix) for prefix in prefixes})


def read_only_roots() -> list[str]:
    """Everything the sandboxed interpreter may read besides its working directory."""
    libraries = [path for path in _SYSTEM_LIBRARY_DIRS if os.path.isdir(path)]
    return [*interpreter_roots(), *libraries]


def restrict_filesystem(workdir: str, abi: int):
    """Applies a Landlock domain to this process (and its future children): read access to
    `read_only_roots()`, read/write access to `workdir`, no execution, no TCP, no signals or
    abstract unix sockets across the domain's border. Requires no_new_privs."""
    libc = _libc()
    handled_fs = _FS_RIGHTS_BY_ABI[max(v for v in _FS_RIGHTS_BY_ABI if v <= abi)]
    attributes = struct.pack(
        "=QQQ",
        handled_fs,
        _NET_BIND_CONNECT_TCP if abi >= 4 else 0,
        _SCOPE_ABSTRACT_UNIX_AND_SIGNAL if abi >= 6 else 0,
    )
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    buffer = ctypes.create_string_buffer(attributes[:size])
    ruleset = _check(libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, buffer, size, 0), "landlock")
    try:
        rules = [(root, _READ) for root in read_only_roots()]
        rules += [(path, rights) for path, rights in _DEVICE_FILES.items() if os.path.exists(path)]
        rules.append((workdir, _WORKDIR))
        for path, rights in rules:
            _allow_beneath(libc, ruleset, path, rights & handled_fs)
        _check(libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _allow_beneath(libc, ruleset: int, path: str, rights: int):
    descriptor = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(descriptor).st_mode):
            rights &= _FILE_RIGHTS
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, descriptor))
        _check(
            libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, rule, 0),
            f"landlock rule for {path}",
        )
    finally:
        os.close(descriptor)


def _instruction(code: int, k: int, jump_true: int = 0, jump_false: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jump_true, jump_false, k)


def seccomp_program(machine: str, processes: bool = False) -> bytes:
    """The BPF filter of `deny_syscalls` for `machine` ("x86_64" or "aarch64"); `processes`
    allows clone without CLONE_THREAD (fork), which the filter otherwise refuses: with no new
    processes, the rlimits of the one process bound the whole sandbox."""
    program = [
        _instruction(_BPF_LD_ABS, 4),  # seccomp_data.arch
        _instruction(_BPF_JEQ, _AUDIT_ARCH[machine], 1, 0),
        _instruction(_BPF_RET, _RET_KILL_PROCESS),
        _instruction(_BPF_LD_ABS, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":  # the x32 ABI's numbers would bypass the table below
        program += [
            _instruction(_BPF_JGE, _X32_SYSCALL_BIT, 0, 1),
            _instruction(_BPF_RET, _RET_KILL_PROCESS),
        ]
    denied = dict(_DENIED_SYSCALLS[machine])
    if not processes:
        denied.update(_FORK_SYSCALLS.get(machine, {}))
    for number in sorted(denied.values()):
        program += [
            _instruction(_BPF_JEQ, number, 0, 1),
            _instruction(_BPF_RET, _RET_ERRNO | _EPERM),
        ]
    clone_checks = [
        _instruction(_BPF_LD_ABS, 16),  # low half of seccomp_data.args[0]: clone's flags
        _instruction(_BPF_JSET, _CLONE_NAMESPACE_FLAGS, 0, 1),
        _instruction(_BPF_RET, _RET_ERRNO | _EPERM),
    ]
    if not processes:
        clone_checks += [
            _instruction(_BPF_JSET, _CLONE_THREAD, 1, 0),
            _instruction(_BPF_RET, _RET_ERRNO | _EPERM),
        ]
    program += [
        _instruction(_BPF_JEQ, _CLONE3, 0, 1),
        _instruction(_BPF_RET, _RET_ERRNO | _ENOSYS),
        _instruction(_BPF_JEQ, _CLONE[machine], 0, len(clone_checks)),
        *clone_checks,
        _instruction(_BPF_RET, _RET_ALLOW),
    ]
    return b"".join(program)


def deny_syscalls(processes: bool = False):
    """Installs the seccomp filter (requires no_new_privs); inherited by every child. Filters
    stack: a process that installed it with `processes=True` can add the stricter one later."""
    code = seccomp_program(_machine(), processes)
    instructions = ctypes.create_string_buffer(code)
    program = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(instructions))
    buffer = ctypes.create_string_buffer(program)
    _check(_libc().prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, buffer, 0, 0), "seccomp")


def _traversable_by_others(path: str) -> bool:
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def _first_closed_ancestor(path: str) -> str | None:
    """The outermost directory on the way to `path` that an unprivileged uid cannot enter."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if os.path.isdir(current) and not _traversable_by_others(current):
            return current
    return None


def open_closed_ancestors(paths: list[str]):
    """Inside a private mount namespace (as root): every directory on the way to `paths` that
    other users cannot enter (e.g. a 0700 /root holding pyenv) is covered by a 0755 tmpfs that
    holds only bind mounts of the paths below it. The real filesystem is unchanged."""
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    closed: dict[str, list[str]] = {}
    for path in paths:
        ancestor = _first_closed_ancestor(path)
        if ancestor is not None and ancestor != path:
            closed.setdefault(ancestor, []).append(path)
    for ancestor, below in closed.items():
        held = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in below]
        _check(libc.mount(b"none", ancestor.encode(), b"tmpfs", 0, b"mode=0755"), "tmpfs")
        for path, descriptor in held:
            os.makedirs(path, mode=0o755, exist_ok=True)
            source = f"/proc/self/fd/{descriptor}".encode()
            _check(libc.mount(source, path.encode(), None, _MS_BIND | _MS_REC, None), "bind")
            os.close(descriptor)


def drop_privileges(reachable: list[str]):
    """As root: a private mount namespace where `reachable` can be entered by SANDBOX_UID, then
    that uid and gid with no supplementary groups (which clears every capability)."""
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "private mounts")
    open_closed_ancestors(reachable)
    os.setgroups([])
    os.setgid(SANDBOX_GID)
    os.setuid(SANDBOX_UID)


def probe() -> dict[str, object]:
    """What this kernel and process offer the sandbox."""
    abi = landlock_abi()
    return {
        "landlock_abi": abi,
        "landlock_filesystem": abi >= 1,
        "landlock_tcp": abi >= 4,
        "landlock_signal_scope": abi >= 6,
        "seccomp_filter": seccomp_supported(),
        "root": os.geteuid() == 0,
        "machine": _machine(),
    }
