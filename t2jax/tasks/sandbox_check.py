"""`python -m t2jax.tasks.sandbox_check`: what the code sandbox enforces on this machine.

Prints the kernel mechanisms found, then runs a handful of escape attempts in each isolation mode
that works here, with the in-process audit hook left out so that only the kernel contains them,
each against a target the harness sets up (a secret file in `$HOME`, a file in the checkout, a
TCP listener, a signal handler) and checked from outside. Exit status 1 when an attempt got
through.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import tempfile
import threading

from t2jax.tasks import _sandbox_kernel as kernel
from t2jax.tasks.sandbox import (
    SandboxLimits,
    missing_protections,
    namespaces_available,
    run_function,
)

_LIMITS = SandboxLimits(wall_seconds=5.0, memory_bytes=512 * 1024**2)
_CHECKOUT_FILE = pathlib.Path(__file__).resolve()


@dataclasses.dataclass
class _Targets:
    """What the attempts aim at, and what the harness saw of them."""

    secret_file: str
    outside_dir: str
    port: int
    connections: int = 0
    signals: int = 0


def _attempts(targets: _Targets) -> dict[str, str]:
    """Name -> body of `f()`; each returns what it obtained (or raises)."""
    return {
        "runs without root": "import os\n    return os.geteuid() != 0 or 'root'",
        "write outside through dir_fd": (
            "import os\n    fd = os.open('/', os.O_PATH)\n"
            f"    os.open({targets.outside_dir.lstrip('/') + '/escaped'!r}, "
            "os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n    return 'wrote'"
        ),
        "read a secret in $HOME": f"return open({targets.secret_file!r}).read()",
        "read the checkout": f"return open({str(_CHECKOUT_FILE)!r}).read(20)",
        "connect to a local TCP port": (
            "import socket\n"
            f"    socket.create_connection(('127.0.0.1', {targets.port}), timeout=1)\n"
            "    return 'connected'"
        ),
        "signal the harness": f"import os, signal\n    os.kill({os.getpid()}, signal.SIGUSR1)",
    }


def _listen(targets: _Targets) -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    targets.port = server.getsockname()[1]

    def accept():
        while server.fileno() != -1:
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            targets.connections += 1
            connection.close()

    threading.Thread(target=accept, daemon=True).start()
    return server


def self_test() -> list[tuple[str, str, bool, str]]:
    """Runs every attempt in every working mode: (mode, attempt, contained, what happened)."""
    rows = []
    home = pathlib.Path(os.path.expanduser("~"))
    with tempfile.TemporaryDirectory() as outside:
        secret = pathlib.Path(home if os.access(home, os.W_OK) else outside) / ".t2jax-canary"
        secret.write_text("t2jax-canary-secret")
        targets = _Targets(str(secret), outside, port=0)
        server = _listen(targets)
        previous = signal.signal(signal.SIGUSR1, lambda *_: setattr(targets, "signals", 1))
        try:
            modes = ["process", *(["namespaces"] if namespaces_available() else [])]
            for mode in modes:
                for name, body in _attempts(targets).items():
                    before = (targets.connections, targets.signals)
                    code = f"def f():\n    {body}\n"
                    result = run_function(
                        code, "f", [[]], [3.0], limits=_LIMITS, isolation=mode, audit_hook=False
                    )
                    outcome = result.calls[0] if result.calls else None
                    returned = outcome is not None and outcome.error is None
                    text = repr(outcome.value if outcome and not outcome.error else "")
                    escaped = (
                        "canary-secret" in text + result.stderr
                        or "escaped" in os.listdir(outside)
                        or (targets.connections, targets.signals) != before
                        or (returned and outcome.value is not True)
                    )
                    seen = outcome.error if outcome and outcome.error else result.reason
                    rows.append((mode, name, not escaped, (text if escaped else seen)[:90]))
        finally:
            signal.signal(signal.SIGUSR1, previous)
            server.close()
            secret.unlink()
    return rows


def main() -> int:
    """Prints the mechanisms and the attempts; 1 if anything got through."""
    probe = kernel.probe()
    print(f"harness uid {os.geteuid()}, {probe['machine']}")
    print(f"Landlock ABI: {probe['landlock_abi'] or 'not available'}")
    print(f"seccomp filter: {'yes' if probe['seccomp_filter'] else 'no'}")
    print(f"user/net/pid namespaces: {'yes' if namespaces_available() else 'no'}")
    for line in missing_protections():
        print(f"MISSING: {line}")
    rows = self_test()
    for mode, name, contained, detail in rows:
        print(f"{'ok  ' if contained else 'FAIL'} [{mode}] {name}: {detail}")
    failures = sum(not contained for _, _, contained, _ in rows)
    print(f"{len(rows) - failures}/{len(rows)} attempts contained")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
