"""The package's shape: no import cycles, imports only downward through the layers, modules of
readable size, experiments and benchmarks on the library (never the CLI)."""

import ast
import collections
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "t2jax"
MAX_MODULE_LINES = 500
# Layers, lowest first: a module may import (at module level) only from its own layer or below.
LAYERS = [
    {
        "configuration",
        "config",
        "native",
        "ops",
        "rope",
        "attention",
        "files",
        "padding",
        "svf.core",
        "adapters.core",
    },
    {"checkpoints", "parallel", "model", "plan.hardware", "plan.models", "adapters.peft_format"},
    {
        "plan.rules",
        "loading",
        "logprobs",
        "tasks",
        "svf.targets",
        "svf.factors",
        "svf.cache",
        "adapters.weights",
    },
    {"svf.experts", "svf.shipped"},
    {"prefill", "sampler", "metrics", "evaluation", "reports", "adapted", "export"},
    {"rl", "adaptation", "plan.abstract", "plan.programs", "plan.search"},
    {"sweeps"},
    {"cli"},
]


def _module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The t2jax modules `path` imports at module level (function-level imports are lazy)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("t2jax"):
            base = node.module.removeprefix("t2jax").lstrip(".")
            names = [f"{base}.{alias.name}".lstrip(".") for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("t2jax").lstrip(".") for a in node.names]
        found.update(name for name in names if name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {name: _imports(path, modules) - {name, ""} for name, path in files.items()}
    for name, targets in graph.items():  # `from t2jax.svf import core` is not an import of svf
        graph[name] = {t for t in targets if not any(o.startswith(t + ".") for o in targets)}
    return graph


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == entry or module.startswith(entry + ".") for entry in layer):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py")


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = collections.defaultdict(int)
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state[target] == 1:
                cycles.append([*path[path.index(target) :], target])
            elif state[target] == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [module])
    assert not cycles


def test_imports_go_down_the_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        if module
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward


def test_modules_stay_readable():
    long = {
        _module_name(path): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long


def test_experiments_and_benchmarks_use_the_library_not_the_cli():
    users = [*REPO.glob("experiments/**/*.py"), *REPO.glob("benchmarks/*.py")]
    offenders = [
        str(path.relative_to(REPO))
        for path in users
        if "t2jax.cli" in path.read_text() or "from t2jax import cli" in path.read_text()
    ]
    assert not offenders
