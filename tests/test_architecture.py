"""The package's shape (ARCHITECTURE.md): no import cycles, no module over ~400 lines,
auxtl's own imports at the top of each module, and no CPU-kernel name outside
auxtl/cpu/ (the model code reaches kernels only through `auxtl.models.ops`)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 420          # "~400": a module that grows past this is due a split
KERNEL_NAMES = re.compile(r"onednn|winograd|native_build|host_memory|sliced_kernel",
                          re.IGNORECASE)
# Function-level imports that stay lazy on purpose: the optional plotting library, the
# optional image decoder, and the registry loading the built-in task package (whose
# modules import auxtl's public API, so a top-level import would be a cycle).
LAZY_OK = {"matplotlib", "matplotlib.pyplot", "PIL", "auxtl.tasks", "importlib",
           "importlib.util", "pkgutil", "jax._src"}


def _modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every Python module of auxtl (tasks/ is auxtl.tasks)."""
    found = {}
    for root, package in ((REPO / "auxtl", "auxtl"), (REPO / "tasks", "auxtl.tasks")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest known module that `name` is or lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: pathlib.Path, module: str) -> list[tuple[str, bool]]:
    """(imported auxtl module, imported at module level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from auxtl import freezing` imports the submodule auxtl.freezing
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        out += [(name, id(node) in top) for name in names]
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        targets = {_resolve(name) for name, _ in _imports(path, module)}
        # importing auxtl.x runs auxtl/__init__ first; that edge is Python's, not a design one
        graph[module] = {t for t in targets if t and t != module and t != "auxtl"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


# The data-flow order of ARCHITECTURE.md: a module imports only from its own group or
# groups above it (a group is a module or package, the longest that matches).
ORDER = ("errors", "version", "user_cache", "registry", "tasks", "losses", "heads", "models.ops",
         "models.layers", "models.trunk", "models.small_cnn", "models.resnet", "models.nin",
         "models", "models.target", "cifar", "data", "resize", "splits", "pretrain_model",
         "optim", "train_state", "pretrain_step", "parallel", "streaming", "run_folder", "reporting",
         "trunk_metadata", "checkpoints", "interop", "pretrain_data", "pretrain_checkpoint", "pretrain", "target_data", "surgery", "transplant",
         "freezing", "finetune_step", "seeds", "finetune_config", "stats", "probes", "head_init", "finetune", "recipes",
         "transfer",
         "search", "cpu", "compile_cache", "bench", "cli_configs", "cli_interop", "cli")
# The registry imports the built-in task package to register its tasks, whose files
# import auxtl's public API like any user's task file: a plug-in edge, not a design one.
PLUGIN_EDGES = {("auxtl.registry", "auxtl.tasks")}


def _group(module: str) -> str | None:
    name = module.removeprefix("auxtl.")
    matches = [g for g in ORDER if name == g or name.startswith(g + ".")]
    return max(matches, key=len) if matches else None


def test_imports_point_up_the_data_flow_order():
    wrong = []
    for module, targets in _graph().items():
        if module == "auxtl":   # the package's __init__ re-exports everything
            continue
        group = _group(module)
        assert group is not None, f"{module} has no place in ORDER (ARCHITECTURE.md)"
        for target in targets:
            if (module, target) in PLUGIN_EDGES:
                continue
            if ORDER.index(_group(target)) > ORDER.index(group):
                wrong.append(f"{module} ({group}) imports {target} ({_group(target)}), "
                             f"which comes after it")
    assert wrong == []


def test_the_module_list_is_the_package():
    assert "auxtl.cpu" in MODULES and "auxtl.models.ops" in MODULES
    assert "auxtl.tasks.rotation" in MODULES and "auxtl.bench.throughput" in MODULES


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_the_size_limit(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines (limit {MAX_LINES}): split it"


def test_auxtl_imports_are_at_module_top():
    lazy = []
    for module, path in MODULES.items():
        for name, at_top in _imports(path, module):
            if not at_top and name not in LAZY_OK:
                lazy.append(f"{path.relative_to(REPO)}: {name}")
    assert lazy == []


def test_no_cpu_kernel_name_outside_auxtl_cpu():
    """Only auxtl/cpu/ names its kernels; the rest reaches them through the ops hooks
    (models/ops.py) or `auxtl.cpu`'s four public functions."""
    cpu = REPO / "auxtl" / "cpu"
    named = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in MODULES.values() if cpu not in path.parents
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if KERNEL_NAMES.search(line)]
    assert named == []
