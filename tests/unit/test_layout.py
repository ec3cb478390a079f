"""The package rules of docs/architecture.md, read from the source (AST), not from a list of good intentions.

- Decision and math modules are pure: they import no network, process, clock or
  thread code, and from swarmrt only other pure modules; randomness comes in as
  an ``rng`` argument, never from the ``random`` module's global generator.
- wire, discovery and pipeline never import roles (nor the local-swarm
  launcher, the CLI or testing): the arrows point from the loops to the parts.
- Nothing in the product imports ``swarmrt.testing``.
- No import cycles among swarmrt's modules, counting imports inside functions
  and the implicit import of a module's parent packages.
- Every source file stays under 800 lines (generated protobuf stubs aside).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "swarmrt"
MAX_LINES = 800
GENERATED = {"swarmrt.wire.proto.swarmrt_pb2", "swarmrt.wire.proto.swarmrt_pb2_grpc"}

PURE = {
    "swarmrt.config",
    "swarmrt.wire.codecs",
    "swarmrt.discovery.records",
    "swarmrt.auth.credential",
    "swarmrt.discovery.reachability",
    "swarmrt.routing.paths",
    "swarmrt.routing.wiring",
    "swarmrt.routing.policies",
    "swarmrt.routing.policy",
    "swarmrt.routing.skip_scheduler",
    "swarmrt.routing.peer_table",
    "swarmrt.routing.links",
    "swarmrt.routing.timeline",
    "swarmrt.routing.live",
    "swarmrt.routing.rebalance",
    "swarmrt.routing.verify",
    "swarmrt.sim.scenario",
    "swarmrt.sim.simulator",
    "swarmrt.sim.planner",
    "swarmrt.sim.live_plan",
    "swarmrt.sim.moves",
    "swarmrt.sim.repair",
    "swarmrt.sim.replay",
    "swarmrt.sim.bounds",
    "swarmrt.sim.bottleneck",
    "swarmrt.sim.scoring",
    "swarmrt.sim.fleet",
    "swarmrt.local_sgd.config",
    "swarmrt.local_sgd.diloco",
    "swarmrt.local_sgd.robust",
    "swarmrt.checkpoint.policy",
    "swarmrt.models.partition",
}
"""Decision and math modules. A name here whose file does not exist fails the test (no stale list)."""

IMPURE_ROOTS = {"grpc", "hivemind", "asyncio", "socket", "ssl", "subprocess", "multiprocessing", "threading",
                "_thread", "concurrent", "time", "datetime", "signal", "selectors", "os", "shutil", "tempfile",
                "urllib", "http", "requests", "fsspec", "uvloop", "psutil"}
"""Network, process, thread, clock and file-system modules a pure module may not import."""

LOWER = ("swarmrt.wire", "swarmrt.discovery", "swarmrt.pipeline")
UPPER = ("swarmrt.roles", "swarmrt.localswarm", "swarmrt.cli", "swarmrt.testing")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _resolve(node: ast.ImportFrom, module_name: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``module_name``)."""
    if node.level == 0:
        return node.module or ""
    package = module_name if is_package else module_name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(name: str) -> list[tuple[str, int]]:
    """Every module ``name`` imports, anywhere in the file (top level or inside functions), with its line;
    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module."""
    path = MODULES[name]
    return imports_in_source(path.read_text(), name, path.name == "__init__.py")


def imports_in_source(source: str, name: str, is_package: bool = False) -> list[tuple[str, int]]:
    """:func:`imports_of` for the text of module ``name``."""
    tree = ast.parse(source, name)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, name, is_package)
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return out


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_pure_list_names_real_modules():
    assert PURE <= set(MODULES), f"listed as pure but missing: {sorted(PURE - set(MODULES))}"


@pytest.mark.parametrize("name", sorted(PURE & set(MODULES)))
def test_pure_modules_import_no_io_and_only_pure_swarmrt(name):
    problems = []
    for module, line in imports_of(name):
        root = module.split(".")[0]
        if root in IMPURE_ROOTS:
            problems.append(f"line {line}: imports {module}")
        elif root == "swarmrt" and module in MODULES and module not in PURE and module != "swarmrt":
            if not (MODULES[module].name == "__init__.py" and any(p.startswith(module + ".") for p in PURE)):
                problems.append(f"line {line}: imports {module}, which is not pure")
    assert not problems, f"{name} must be pure:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(PURE & set(MODULES)))
def test_pure_modules_take_randomness_as_an_argument(name):
    """``random.Random`` (a type, or a generator seeded from an argument) is fine; the global generator is not."""
    tree = ast.parse(MODULES[name].read_text())
    bad = [node.lineno for node in ast.walk(tree)
           if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "random"
           and node.attr != "Random"]
    bad += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "random"
            and any(alias.name != "Random" for alias in node.names)]
    assert not bad, f"{name} uses the global random generator at lines {bad}"


def test_wire_discovery_and_pipeline_never_import_the_loops():
    problems = [f"{name} line {line}: imports {module}"
                for name in MODULES if _within(name, LOWER)
                for module, line in imports_of(name) if _within(module, UPPER)]
    assert not problems, "\n".join(problems)


def test_the_product_never_imports_testing():
    problems = [f"{name} line {line}: imports {module}"
                for name in MODULES if not _within(name, ("swarmrt.testing",))
                for module, line in imports_of(name) if _within(module, ("swarmrt.testing",))]
    assert not problems, "\n".join(problems)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for module, _ in imports_of(name):
            # importing a.b.c runs a/__init__ and a/b/__init__ first: count those edges too
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in MODULES and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones():
    source = (
        "import torch\n"
        "from . import paths\n"
        "def late():\n"
        "    import time\n"
        "    from swarmrt.roles import trainer\n"
    )
    found = {module for module, _ in imports_in_source(source, "swarmrt.routing.example")}
    assert {"torch", "time", "swarmrt.routing.paths", "swarmrt.roles.trainer"} <= found


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_source_file_is_under_800_lines():
    long = {name: n for name, path in MODULES.items() if name not in GENERATED
            for n in [len(path.read_text().splitlines())] if n >= MAX_LINES}
    assert not long, f"files of {MAX_LINES}+ lines: {long}"
