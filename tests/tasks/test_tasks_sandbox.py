"""The sandbox contains hostile programs: each fails with a reason, and the harness lives on
(issues 4 and 12, "Sandbox"; the full hostile corpus is in test_sandbox_hostile.py)."""

import dataclasses
import os
import signal
import time

import pytest

from t2jax.tasks import get_task
from t2jax.tasks.sandbox import (
    OpaqueValue,
    SandboxLimits,
    SandboxServer,
    namespaces_available,
    run_function,
    run_tests,
)

MODES = ["process", *(["namespaces"] if namespaces_available() else [])]
QUICK = SandboxLimits(wall_seconds=3.0, memory_bytes=512 * 1024**2)


@pytest.fixture(autouse=True)
def private_ground_truth_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("T2JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("T2JAX_TEST_SECRET", "hunter2")
    return "hunter2"


def hostile_programs(harness_pid: int, outside_file: str) -> dict[str, str]:
    return {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'yes > /dev/null'])",
        "memory hog": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))",
        "write outside": f"open({outside_file!r}, 'w').write('escaped')",
        "delete outside": f"import os\nos.remove({outside_file!r})",
        "socket": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "kill harness": f"import os, signal\nos.kill({harness_pid}, signal.SIGUSR1)",
        "kill all": "import os\nos.kill(-1, 0)",  # signal 0: harmless even if it got through
        "env secret": "import os\nassert os.environ['T2JAX_TEST_SECRET']",
        "proc environ": f"open('/proc/{harness_pid}/environ').read()",
        "ctypes": "import ctypes\nctypes.CDLL(None).kill(0, 0)",
        "exit zero early": "import os\nos._exit(0)",
        "system exit": "raise SystemExit(0)",
    }


EXPECTED_REASONS = {
    "infinite loop": "timed out",
    "fork bomb": "os.fork is not allowed",
    "subprocess": "subprocess.Popen is not allowed",
    "memory hog": "MemoryError",
    "write outside": "outside the working directory",
    "delete outside": "outside the working directory",
    "socket": "socket",
    "kill parent": "os.kill is not allowed",
    "kill harness": "os.kill is not allowed",
    "kill all": "os.kill is not allowed",
    "env secret": "KeyError",
    "proc environ": "reading /proc/",
    "ctypes": "ctypes",
    "exit zero early": "before finishing",
    "system exit": "SystemExit",
}


@pytest.mark.parametrize("isolation", MODES)
def test_hostile_programs_are_contained(isolation, secret, tmp_path):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    try:
        for name, code in hostile_programs(os.getpid(), str(outside)).items():
            start = time.monotonic()
            program = code + "\ndef f():\n    return 1"
            result = run_function(program, "f", [[]], [1.0], limits=QUICK, isolation=isolation)
            assert not (result.completed and result.exec_error is None), name
            assert EXPECTED_REASONS[name] in result.reason, (name, result.reason)
            assert time.monotonic() - start < QUICK.wall_seconds + 2, name
            assert result.isolation == isolation
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert outside.read_text() == "keep"
    assert received == []
    carry_on = run_function("def f():\n    return 1", "f", [[]], [1.0], isolation=isolation)
    assert carry_on.completed and carry_on.calls[0].value == 1  # the harness carries on


def test_hostile_completions_score_as_failures(secret):
    task = get_task("mbpp")
    problem = task.load("all")[0]
    bodies = {
        "loop": "while True:\n        pass",
        "fork": "import os\n    os.fork()\n    return (4, 5)",
        "memory": "x = bytearray(8 * 1024 ** 3)\n    return (4, 5)",
        "socket": "import socket\n    socket.socket()\n    return (4, 5)",
        "kill": "import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return (4, 5)",
        "secret": "import os\n    return os.environ['T2JAX_TEST_SECRET']",
    }
    for name, body in bodies.items():
        completion = f"\ndef similar_elements(a, b):\n    {body}\n```"
        score = task.score(problem, completion)
        assert not score.correct, name
        assert score.reason, name
    assert task.score(problem, "\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))")


def test_each_call_has_its_own_time_limit():
    code = "import time\ndef f(seconds):\n    time.sleep(seconds)\n    return seconds"
    result = run_function(code, "f", [[0.0], [5.0], [0.0]], [0.3, 0.3, 0.3])
    assert [call.error is None for call in result.calls] == [True, False, True]
    assert "TimeoutError" in result.calls[1].error
    assert result.completed


def test_values_round_trip_and_unknown_objects_are_opaque():
    code = (
        "import collections\n"
        "def f(x):\n"
        "    return [x, (1, 2.5), {3}, frozenset({4}), {(1, 2): [None]}, 1 + 2j, 2 ** 80, b'hi',\n"
        "            collections.OrderedDict(a=1), float('inf')]\n"
        "def g():\n"
        "    return (i for i in range(3))\n"
    )
    value = run_function(code, "f", [["s"]], [1.0]).calls[0].value
    assert value == [
        "s",
        (1, 2.5),
        {3},
        frozenset({4}),
        {(1, 2): [None]},
        1 + 2j,
        2**80,
        b"hi",
        {"a": 1},
        float("inf"),
    ]
    generator = run_function(code, "g", [[]], [1.0]).calls[0].value
    assert isinstance(generator, OpaqueValue) and generator != generator.text


def test_output_and_stderr_are_capped():
    code = "import sys\ndef f():\n    sys.stderr.write('e' * 10**6)\n    return 'x' * 10**7"
    limits = SandboxLimits(wall_seconds=5.0, max_result_bytes=10**6, max_stderr_bytes=1000)
    result = run_function(code, "f", [[]], [2.0], limits=limits)
    assert "cap" in result.reason and len(result.stderr) <= 1000


def test_stop_callback_ends_the_run_early():
    code = "import time\ndef f(i):\n    time.sleep(0.05 * i)\n    return i"
    result = run_function(code, "f", [[i] for i in range(50)], [1.0] * 50, stop=lambda i, _: i == 2)
    assert result.stopped_early and len(result.calls) == 3


def test_working_directory_is_fresh_and_removed():
    code = "import os\ndef f():\n    open('scratch.txt', 'w').write('x')\n    return os.getcwd()"
    first = run_function(code, "f", [[]], [1.0]).calls[0].value
    second = run_function(code, "f", [[]], [1.0]).calls[0].value
    assert first != second and not os.path.exists(first) and not os.path.exists(second)


def test_environment_is_scrubbed(secret):
    code = "import os\ndef f():\n    return dict(os.environ)"
    environment = run_function(code, "f", [[]], [1.0]).calls[0].value
    assert "T2JAX_TEST_SECRET" not in environment and secret not in str(environment)
    assert environment["PYTHONHASHSEED"] == "0"


def test_server_isolates_each_request():
    setup = "def handle(payload):\n    return eval(payload['code'])\n"
    server = SandboxServer(setup, request_timeout=1.0)
    try:
        assert server.call({"code": "1 + 1"}).value == 2
        assert "os.kill" in server.call({"code": "__import__('os').kill(1, 9)"}).error
        assert server.call({"code": "[0 for _ in iter(int, 1)]"}).error == "timeout"
        assert server.call({"code": "__import__('os')._exit(3)"}).error == "no answer"
        state = "globals().__setitem__('handle', None)"
        server.call({"code": state})
        assert server.call({"code": "2 * 3"}).value == 6  # no state leaks between requests
    finally:
        server.close()


def test_unknown_isolation_mode_is_an_error():
    with pytest.raises(ValueError, match="isolation"):
        run_function("def f():\n    pass", "f", [[]], [1.0], isolation="container")


def test_run_tests_passes_only_on_the_checkers_word():
    tests = "assert f(2) == 3\nassert f(5) == 6"
    assert run_tests("def f(x):\n    return x + 1", tests, "f").completed
    wrong = run_tests("def f(x):\n    return x", tests, "f")
    assert not wrong.completed and "AssertionError" in wrong.reason
    raising = run_tests("def f(x):\n    raise ValueError('no')", tests, "f")
    assert not raising.completed and "CandidateError: ValueError: no" in raising.reason
    broken = run_tests("def f(x) return x", tests, "f")
    assert not broken.completed and "SyntaxError" in broken.reason


def test_the_kernel_alone_contains_the_self_test_attempts():
    """`python -m t2jax.tasks.sandbox_check`: every attempt made without the audit hook."""
    from t2jax.tasks.sandbox_check import self_test

    rows = self_test()
    assert len(rows) >= 6 and all(contained for _, _, contained, _ in rows), rows


@pytest.fixture
def no_landlock(monkeypatch):
    from t2jax.tasks import _sandbox_process

    real = _sandbox_process.kernel_plan

    def without_landlock(namespaces):
        return dataclasses.replace(real(namespaces), landlock_abi=0)

    monkeypatch.setattr(_sandbox_process, "kernel_plan", without_landlock)
    _sandbox_process.warn_once.cache_clear()
    yield
    _sandbox_process.warn_once.cache_clear()


def test_strict_refuses_and_auto_warns_without_landlock(no_landlock, monkeypatch):
    code = "def f():\n    return 1"
    with pytest.raises(RuntimeError, match=r"strict.*Landlock"):
        run_function(code, "f", [[]], [1.0], isolation="strict")
    monkeypatch.setenv("T2JAX_SANDBOX", "strict")
    with pytest.raises(RuntimeError, match="Landlock"):
        run_function(code, "f", [[]], [1.0])
    monkeypatch.setenv("T2JAX_SANDBOX", "auto")
    with pytest.warns(RuntimeWarning, match="missing: Landlock") as caught:
        assert run_function(code, "f", [[]], [1.0]).completed
        assert run_function(code, "f", [[]], [1.0]).completed
    assert len(caught) == 1  # once per process


def test_cli_sandbox_switch_sets_the_process_default(monkeypatch):
    from t2jax.cli.app import build_parser

    monkeypatch.delenv("T2JAX_SANDBOX", raising=False)
    assert build_parser().parse_args(["--sandbox", "strict", "params", "--model", "m"]).sandbox
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--sandbox", "none", "params", "--model", "m"])
