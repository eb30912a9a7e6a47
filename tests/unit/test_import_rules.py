"""The import rules of the three packages, read from the source (an ast scan, nothing imported).

- ``ai`` imports neither ``dicom_node`` nor ``training``; ``dicom_node`` never imports
  ``training`` (``dicom_node -> ai <- training``), at module level or inside a function.
- The module-level imports among the packages' modules form no circle. ``if TYPE_CHECKING:``
  blocks are left out (they never run). ``from pkg import sub`` where ``sub`` is a module is an
  edge to ``pkg.sub`` only, and the implicit import of a module's parent packages is not an
  edge: a package's ``__init__`` importing its submodules while they import each other through
  the package is how Python packages work, not a circle of ours.
- Imports inside a function are listed separately. They may not hide a circle (counted as
  edges, the graph stays acyclic), and one of our modules is imported inside a function only
  to defer a heavy optional import: the imported module pulls one of :data:`HEAVY` in at module
  level (itself or through the modules it imports); the reason is the one written there. The
  light ones that predate this test are named in :data:`KNOWN_LIGHT_DEFERRED`, each with why.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ai", "dicom_node", "training")
FORBIDDEN = {"ai": {"dicom_node", "training"}, "dicom_node": {"training"}, "training": set()}

HEAVY = {
    "torch": "PyTorch takes seconds to import; only inference, training and bundle loading "
             "need it",
    "torchvision": "comes with torch",
    "flask": "the web UI is optional (web.enabled); the listener starts without it",
    "waitress": "the web server, as flask",
    "matplotlib": "plots are drawn on demand (reports, the dashboard's figures)",
    "highdicom": "output building (SR/SC/GSPS) and its IOD tables: not needed to receive",
    "cv2": "OpenCV's native library: only rendering and synthesis need it",
    "scipy": "only metrics and synthesis need it",
    "pynetdicom": "the DICOM network stack: the CLI's offline commands do without it",
    "apscheduler": "the evaluation scheduler: only a serving node runs it",
}

# Light modules of ours imported inside a function (importer, imported) that predate this
# test. None hides a circle (test_function_level_imports_hide_no_circle); they are left to the
# helpers of issue 9 whose files they are. The test fails on any new one, not on one removed.
KNOWN_LIGHT_DEFERRED: dict[tuple[str, str], str] = {
    ("dicom_node.cli", "dicom_node.results"): "the CLI imports a subcommand's code when run",
    ("dicom_node.web", "dicom_node.store.db"): "create_app's imports, the web's scope",
    ("training.cli", "ai.types"): "the CLI's error tuples, training helper's scope",
    ("training.cli", "training.deidentify"): "the CLI imports a subcommand's code when run",
    ("training.cli", "training.report"): "the CLI imports a subcommand's code when run",
    ("training.cli", "training.split"): "the CLI imports a subcommand's code when run",
    ("training.deidentify", "training.report"): "training helper's scope",
    ("training.demo", "training.report"): "training helper's scope",
    ("training.evaluate", "training.report"):
        "report imports evaluate under TYPE_CHECKING only; training helper's scope",
}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the most specific module of ours named, or the top-level external name
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _ours(name: str) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package = package[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        names = subs if len(subs) == len(node.names) else [*subs, base]
    out = []
    for name in names:
        ours = _ours(name) if name.split(".")[0] in PACKAGES else None
        out.append(ours or name.split(".")[0])
    return out


def _walk(module: str, node: ast.AST, in_function: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            for target in _targets(module, child):
                if target != module:
                    yield Import(module, target, child.lineno, in_function)
        nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(module, child, in_function or nested)


IMPORTS = [imp for m, p in MODULES.items() for imp in _walk(m, ast.parse(p.read_text()), False)]
TOP_LEVEL: dict[str, set[str]] = {m: set() for m in MODULES}
for _imp in IMPORTS:
    if not _imp.in_function:
        TOP_LEVEL[_imp.importer].add(_imp.target)
TOP_LEVEL_AND_DEFERRED = {m: set(targets) for m, targets in TOP_LEVEL.items()}


def _where(imp: Import) -> str:
    return f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line} imports {imp.target}"


def _pulls_in(module: str) -> set[str]:
    """Everything ``module`` imports at module level, transitively (ours and external)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for target in TOP_LEVEL.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (more than one module) of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v] & MODULES.keys():
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
                found.append(sorted(component))

    for v in MODULES:
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_packages() -> None:
    assert {"ai.inference", "dicom_node.service", "training.cli"} <= MODULES.keys()
    assert "dicom_node.worker" in TOP_LEVEL["dicom_node.service"]


def test_no_forbidden_package_imports() -> None:
    bad = [_where(i) for i in IMPORTS
           if i.target.split(".")[0] in FORBIDDEN[i.importer.split(".")[0]]]
    assert bad == []


def test_no_import_circles_at_module_level() -> None:
    assert _circles(TOP_LEVEL) == []


def test_function_level_imports_hide_no_circle() -> None:
    """With the deferred imports counted as edges the graph still has no circle: a deferred
    import never stands in for a circle, whatever else it is for."""
    deferred = [i for i in IMPORTS if i.in_function and i.target in MODULES]
    assert deferred, "the scan should see the deferred torch/Flask imports"
    for imp in deferred:
        TOP_LEVEL_AND_DEFERRED[imp.importer].add(imp.target)
    assert _circles(TOP_LEVEL_AND_DEFERRED) == []


def test_function_level_imports_defer_only_heavy_modules() -> None:
    light = []
    for imp in IMPORTS:
        if not imp.in_function or imp.target not in MODULES:
            continue  # module level, or an external module (a stdlib or HEAVY one)
        if _pulls_in(imp.target) & HEAVY.keys():
            continue
        if (imp.importer, imp.target) not in KNOWN_LIGHT_DEFERRED:
            light.append(_where(imp))
    assert light == [], "import these at module level (they are light)"
    assert all(reason.strip() for reason in KNOWN_LIGHT_DEFERRED.values())
