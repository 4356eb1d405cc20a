"""The layout's rules, checked on the source: no import cycles, a pure core (Ray and the servers at the edges), no
task named outside ``tasks/``, task packages imported outside ``tasks/`` only by that task's listed edges, and
``__all__`` in public modules. Imports are read with ``ast`` from every module, function-level ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "opsvlm"
# Modules that must stay pure: no Ray, MLflow or web server, and nothing of the layers above them.
PURE = ("opsvlm.tasks", "opsvlm.video", "opsvlm.metrics", "opsvlm.stats", "opsvlm.config", "opsvlm.types")
FORBIDDEN_IN_PURE = ("ray", "mlflow", "fastapi", "starlette", "opsvlm.train", "opsvlm.evaluate", "opsvlm.serving")
TASK_NAMES = ("operations", "inspection")
# The only modules outside ``tasks/`` that import one task's own package (beyond ``opsvlm.tasks.base``): the Ray,
# MLflow and HTTP side of a capability only that task has. They cannot live in ``tasks/``, which stays pure; each
# serves exactly one task, and the generic machinery (train, evaluate, registry, inference, workflow, the serving
# core, video, model) never imports them.
TASK_EDGES = {
    "opsvlm.data.pipeline": "opsvlm.tasks.operations",  # Ray Data preparation of OpenPack recordings into clips
    "opsvlm.timeline": "opsvlm.tasks.operations",  # whole-recording timelines: windows, fusion, grammar decoding
    "opsvlm.annotate": "opsvlm.tasks.operations",  # the Ray Data batch annotation job over recordings
    "opsvlm.serving.timeline": "opsvlm.tasks.operations",  # POST /timeline
    "opsvlm.data.inspection_prep": "opsvlm.tasks.inspection",  # Ray Data preparation of YOLO datasets into objects
    "opsvlm.serving.objects": "opsvlm.tasks.inspection",  # POST /predict_objects: stage-1 detections -> conditions
    "opsvlm.detection": "opsvlm.tasks.inspection",  # the stage-1 detector: Ray Train, MLflow registry, Serve
}
# Other modules allowed one task package, that are no task capability: the tiny test checkpoint's tokenizer is
# trained on a fixed corpus that holds the operation names (changing it would move every pinned figure).
FIXTURES = {"opsvlm.testing.tiny": "opsvlm.tasks.operations"}
# Where the edges are put together: the app's tuple of endpoints, and the in-process backend that answers /timeline's
# question about the model.
COMPOSITION = ("opsvlm.serving.app", "opsvlm.serving.local")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved; ``from a import b`` gives ``a.b``
    when ``a.b`` is a module, else ``a``)."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in known else base)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for imported in imports_of(path, name):
            # an import of a.b.c also runs a and a.b: depend on the deepest known module it names
            parts = imported.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    if candidate != name:
                        targets.add(candidate)
                    break
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # a package's __init__ importing its own submodules is how packages re-export: not a cycle by itself
            if node.startswith(nxt + ".") or nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("prefix", PURE)
def test_pure_core_imports_no_ray_mlflow_server_or_upper_layers(prefix: str) -> None:
    offenders = []
    for name, path in modules().items():
        if name == prefix or name.startswith(prefix + "."):
            for imported in imports_of(path, name):
                if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN_IN_PURE):
                    offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders


def test_nothing_outside_tasks_names_a_task() -> None:
    offenders = []
    for name, path in modules().items():
        if name.startswith("opsvlm.tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
                offenders.append(f"{name}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Compare):
                names = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]
                if any(v in TASK_NAMES for v in names):
                    offenders.append(f"{name}:{node.lineno} compares with a task name")
    assert not offenders, offenders


def _edge_of(name: str) -> str | None:
    return next((task for edge, task in TASK_EDGES.items() if name == edge or name.startswith(edge + ".")), None)


def test_only_task_edges_import_a_task_package() -> None:
    """Outside ``tasks/`` a module reaches a task through ``opsvlm.tasks.base`` (the registry and the hooks); only the
    listed edges import a task package, each only its own task's."""
    offenders = []
    for name, path in modules().items():
        if name.startswith("opsvlm.tasks"):
            continue
        allowed = _edge_of(name) or FIXTURES.get(name)
        for imported in imports_of(path, name):
            if not imported.startswith("opsvlm.tasks.") or imported == "opsvlm.tasks.base":
                continue
            if allowed is None or not (imported == allowed or imported.startswith(allowed + ".")):
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders


def test_generic_machinery_does_not_import_task_edges() -> None:
    """Training, evaluation, the registry, inference, the workflow, the model and the serving core know no task edge
    (so a new task needs no change there)."""
    offenders = []
    for name, path in modules().items():
        if name.startswith("opsvlm.tasks") or _edge_of(name) is not None or name in COMPOSITION:
            continue
        for imported in imports_of(path, name):
            if _edge_of(imported) is not None:
                offenders.append(f"{name} imports the task edge {imported}")
    assert not offenders, offenders


def test_public_modules_declare_all() -> None:
    missing = []
    for name, path in modules().items():
        if name.split(".")[-1].startswith("_") and path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defines = any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_") for n in tree.body)
        declares = any(
            isinstance(n, (ast.Assign, ast.AnnAssign))
            and any(
                isinstance(t, ast.Name) and t.id == "__all__"
                for t in getattr(n, "targets", [getattr(n, "target", None)])
            )
            for n in tree.body
        )
        if defines and not declares:
            missing.append(name)
    assert not missing, missing
