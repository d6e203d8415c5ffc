"""vmcap's module structure: no import cycles, subpackages layered by stage, no stdlib names.

The graph counts every import, also those inside functions: a lazy import
that closes a cycle hides the cycle from Python, not from the reader of the
code, and turns into an ImportError as soon as someone hoists it. Only
imports under ``if TYPE_CHECKING:`` (annotations) are left out.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "vmcap"

# Bottom to top: a module may import modules of its own layer and of layers below it.
# The leaf modules (errors, cpus, progress) import nothing of vmcap but errors.
LAYERS = ("leaf", "fileio", "kernel", "formats", "plan", "source", "top")
LEAF_MODULES = {"vmcap.errors", "vmcap.cpus", "vmcap.progress", "vmcap"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def vmcap_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The vmcap modules ``module`` imports anywhere in its text (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = package_of(module, path.name == "__init__.py")
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # "from vmcap.kernel import vmcoreinfo" imports the submodule
            found.update(f"{target}.{a.name}" for a in node.names)
    return {name for name in found if name in known and name != module}


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = vmcap_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def layer_of(module: str) -> str:
    if module in LEAF_MODULES:
        return "leaf"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return "top"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.endswith("__init__") or nxt == "vmcap":
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_analysis_sees_lazy_imports():
    # the graph must include imports made inside functions, or the checks below prove nothing
    graph = import_graph()
    assert "vmcap.api" in graph["vmcap"]  # vmcap/__init__.py imports api inside __getattr__


def test_no_import_cycles():
    graph = {m: {t for t in ts if t != "vmcap"} for m, ts in import_graph().items() if m != "vmcap"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_subpackages_import_only_their_layer_and_below():
    order = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for module, targets in import_graph().items():
        if module == "vmcap":
            continue
        for target in targets:
            if target == "vmcap" or target.endswith("__init__"):
                continue
            if order[layer_of(target)] > order[layer_of(module)]:
                wrong.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("module", sorted(vmcap_modules()))
def test_no_module_is_named_like_a_stdlib_module(module):
    # vmcap/copy.py and vmcap/inspect.py once did: a script run from inside the
    # package directory then imports vmcap's module instead of the stdlib's.
    assert module.rpartition(".")[2] not in sys.stdlib_module_names or module.endswith("__init__")


def test_ruff_finds_nothing():
    """One line length and import order (pyproject's [tool.ruff]) for the package, tests, packaging and bench."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install '.[test]' brings it)")
    root = PACKAGE_DIR.parent
    done = subprocess.run([ruff, "check", "--no-cache", "vmcap", "tests", "packaging", "bench"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
