"""The import layering, built from the source: every import of every module, function-level
imports included (those under `if TYPE_CHECKING:` are not imports at run time), resolved to the
project's modules.

The contract (README "Layout"):
- no import cycles between the project's modules;
- lstm_deploy imports nothing of lstm_deploy_export or lstm_deploy_serving; its torch-free modules
  (the bundle contract and what it needs) import no torch, not even through each other;
- lstm_deploy_export's jobs point one way: tools and export (siblings) <- check <- bench <- cli;
  only cli knows lstm_deploy_serving (to register `serve` and `loadtest`);
- lstm_deploy_serving imports no torch, nothing of lstm_deploy_export, and of lstm_deploy only
  the torch-free modules;
- no module of the three packages is over the house size.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "lstm_deploy": ROOT / "lstm_deploy",
    "lstm_deploy_export": ROOT / "export" / "lstm_deploy_export",
    "lstm_deploy_serving": ROOT / "serving" / "lstm_deploy_serving",
}
TORCH_FREE = {
    "lstm_deploy",
    "lstm_deploy.bundle",
    "lstm_deploy.signature",
    "lstm_deploy.config",
    "lstm_deploy.versions",
    "lstm_deploy.cli_common",
}
# The jobs of lstm_deploy_export, lowest first: a module may import its own job and lower ones.
EXPORT_LAYERS = {"tools": 0, "export": 0, "check": 1, "bench": 2, "cli": 3}
MAX_LINES = 450
# Copied verbatim into a Triton model repository, where only numpy is installed: self-contained.
VENDORED = {"batching", "errors", "sequences", "triton_model"}


def modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def _nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, but not the bodies of `if TYPE_CHECKING:` (imports for the type checker only)."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            yield from (n for child in node.orelse for n in [child, *_nodes(child)])
            continue
        yield node
        yield from _nodes(node)


def _imported(name: str, tree: ast.Module, is_package: bool) -> Iterator[tuple[str, int]]:
    """(module, line) for every import in the tree, relative ones resolved."""
    for node in _nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                # `from package import module` imports the module; `from module import name` not
                yield (
                    (f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base),
                    (node.lineno),
                )


def _graph() -> dict[str, dict[str, int]]:
    """{module: {imported module (project's or third-party top level): line}}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: dict[str, int] = {}
        for target, line in _imported(name, tree, path.name == "__init__.py"):
            if target not in MODULES:
                target = target.split(".")[0]  # a third-party package, by its top level
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


GRAPH = _graph()


def _where(module: str, target: str) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{GRAPH[module][target]} imports {target}"


def _reachable(start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for target in GRAPH.get(todo.pop(), {}):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_graph_sees_the_imports() -> None:
    """A check that cannot fail proves nothing: the graph holds known edges, lazy ones too."""
    assert "lstm_deploy.config" in GRAPH["lstm_deploy.bundle"]
    assert "torch" in GRAPH["lstm_deploy.model"]
    assert "lstm_deploy_export.check.validate" in GRAPH["lstm_deploy_export.cli.validate"]
    assert "lstm_deploy_serving.cli" in GRAPH["lstm_deploy_export.cli"]  # function-level


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the project's modules: each must be one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in (t for t in GRAPH[v] if t in MODULES):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_contract_is_torch_free() -> None:
    for module in TORCH_FREE:
        reached = _reachable(module)
        assert reached & set(MODULES) <= TORCH_FREE, (module, sorted(reached - TORCH_FREE))
        assert not reached & {"torch", "numpy", "onnx", "onnxruntime"}, (module, sorted(reached))


def test_model_package_depends_on_neither_export_nor_serving() -> None:
    bad = [
        _where(m, t)
        for m in MODULES
        if m.split(".")[0] == "lstm_deploy"
        for t in GRAPH[m]
        if t.split(".")[0] in ("lstm_deploy_export", "lstm_deploy_serving")
    ]
    assert not bad, bad


def test_export_jobs_point_one_way() -> None:
    bad = []
    for m in (m for m in MODULES if m.startswith("lstm_deploy_export.")):
        job = m.split(".")[1]
        for t in GRAPH[m]:
            if t.startswith("lstm_deploy_serving") and job != "cli":
                bad.append(_where(m, t))
            if t.startswith("lstm_deploy_export.") and job in EXPORT_LAYERS:
                other = t.split(".")[1]
                if other != job and EXPORT_LAYERS[other] >= EXPORT_LAYERS[job]:
                    bad.append(_where(m, t))
    assert not bad, bad


def test_serving_reads_bundles_through_the_contract_only() -> None:
    bad = []
    for m in (m for m in MODULES if m.startswith("lstm_deploy_serving")):
        for t in GRAPH[m]:
            if (
                t in ("torch", "lstm_deploy_export")
                or t.startswith("lstm_deploy_export.")
                or (t.split(".")[0] == "lstm_deploy" and t not in TORCH_FREE)
            ):
                bad.append(_where(m, t))
            elif m.rsplit(".", 1)[-1] in VENDORED and t.split(".")[0] == "lstm_deploy":
                bad.append(_where(m, t) + " (a vendored module must stay self-contained)")
    assert not bad, bad


@pytest.mark.parametrize("module", sorted(MODULES))
def test_house_size(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines; split it along its ideas"
