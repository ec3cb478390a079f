"""The docs cannot point at things that are not there.

Every repository path that README.md, docs/*.md, deploy/README.md and the module docstrings under
swarmrt/ mention (``swarmrt/routing/wiring.py``, ``benchmarks/bench_skip.py``, a relative markdown
link) must exist, and every dotted name (``swarmrt.routing.wiring``, ``swarmrt.cli:main``,
``swarmrt.routing.policies.SkipScheduler``) must be a module that ``importlib.util.find_spec`` finds,
with the named attribute where one is named. When a module moves, this test names each doc line
that still points at its old place (as tests/unit/test_deploy.py does for deploy/ and the CLI).

And the repository stands on its own: no tracked file cites the team's private notes, which live
outside it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

DOCS = sorted({ROOT / "README.md", ROOT / "deploy" / "README.md", *(ROOT / "docs").glob("*.md")})
"""Markdown files whose mentions are checked."""

MODULE_DOCSTRINGS = sorted(p for p in (ROOT / "swarmrt").rglob("*.py") if "proto" not in p.relative_to(ROOT).parts)
"""Source files whose module docstring is checked (generated stubs aside)."""

TOP_DIRS = ("swarmrt", "docs", "benchmarks", "tests", "examples", "deploy", "proto")
"""Repository-relative paths are recognised by their first directory."""

PATH = re.compile(r"(?<![\w./~$<>-])((?:" + "|".join(TOP_DIRS) + r")/[\w./*-]*)")
MODULE = re.compile(r"(?<![\w./-])(swarmrt(?:\.\w+)+(?::\w+(?:\.\w+)*)?)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

NOT_PATHS = {
    "deploy/swarmrt-bootstrap": "a Kubernetes object (`kubectl exec deploy/NAME`), not a file",
    "tests/test_survives.py": "a file of the reader's own project (docs/testing.md's example)",
    "swarmrt/raw": "a ratio, swarmrt's time over raw TCP's (docs/benchmarks.md)",
}
"""Things that look like repository paths and are not, each with the reason."""

FILE_SUFFIXES = {"proto", "toml", "json", "yaml", "yml", "md", "py", "txt", "log", "jsonl"}
"""``swarmrt.proto`` or ``swarmrt.toml`` is a file name, not a module."""


# -- finding mentions ----------------------------------------------------------------------------
def _clean_path(text: str) -> str:
    """Drop what ends the sentence or the markdown around a path (``**bold**``), not the path."""
    text = text.rstrip(".,:;")
    return text[:-2].rstrip(".,:;") if text.endswith("**") else text


def extract(text: str, markdown: bool = True) -> list[tuple[str, str, int]]:
    """``(kind, mention, line)`` for every repository path (``path``), relative markdown link
    (``link``) and dotted swarmrt name (``module``) in ``text``; ``line`` counts from 1."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for m in PATH.finditer(line):
            path = _clean_path(m.group(1))
            if path not in NOT_PATHS:
                found.append(("path", path, number))
        for m in MODULE.finditer(line):
            name = m.group(1)
            parts = name.split(".")
            if len(parts) == 2 and parts[1] in FILE_SUFFIXES:
                continue
            found.append(("module", name, number))
        if markdown:
            for m in LINK.finditer(line):
                target = m.group(1).split("#", 1)[0]
                if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    found.append(("link", target, number))
    return found


# -- checking them -------------------------------------------------------------------------------
def path_problem(path: str, base: pathlib.Path = ROOT) -> str | None:
    """None when ``path`` (relative to ``base``, globs allowed) names something in the repository."""
    if any(c in path for c in "*?["):
        try:
            return None if list(base.glob(path)) else "matches no file"
        except ValueError as e:  # e.g. "a**": '**' must be a whole component
            return f"not a usable pattern: {e}"
    target = (base / path).resolve()
    if not target.is_relative_to(ROOT):
        return "points outside the repository"
    return None if target.exists() else "does not exist"


@functools.lru_cache(maxsize=None)
def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):  # a parent that is not a package, or fails to import
        return None


def _defines(node: ast.AST, name: str) -> ast.AST | None:
    """The top-level statement of ``node``'s body that binds ``name`` (def, class, assignment, import)."""
    for stmt in getattr(node, "body", []):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name == name:
            return stmt
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return stmt
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == name for a in stmt.names):
                return stmt
        if isinstance(stmt, (ast.If, ast.Try)):
            inner = _defines(stmt, name)
            if inner is not None:
                return inner
    return None


def _has_attributes(module: str, attributes: list[str]) -> bool:
    """Read from the source first (no import): each name bound at the top of the module, then inside
    the class it names. Import only when the source does not say (inherited or dynamic attributes)."""
    spec = _spec(module)
    if spec.origin and spec.origin.endswith(".py"):
        node: ast.AST | None = ast.parse(pathlib.Path(spec.origin).read_text())
        for i, attr in enumerate(attributes):
            node = _defines(node, attr)
            if node is None or (i < len(attributes) - 1 and not isinstance(node, ast.ClassDef)):
                break
        else:
            return True
    try:
        obj = importlib.import_module(module)
        for attr in attributes:
            obj = getattr(obj, attr)
    except (ImportError, AttributeError):
        return False
    return True


def module_problem(name: str) -> str | None:
    """None when ``name`` (``pkg.mod``, ``pkg.mod:attr`` or ``pkg.mod.Attr.attr``) resolves."""
    module, _, attr = name.partition(":")
    parts = module.split(".")
    cut = next((c for c in range(len(parts), 0, -1) if _spec(".".join(parts[:c])) is not None), 0)
    if cut == 0:
        return "no such module"
    found = ".".join(parts[:cut])
    if attr and cut < len(parts):
        return f"no module {module}"
    attributes = parts[cut:] + (attr.split(".") if attr else [])
    if not attributes or _has_attributes(found, attributes):
        return None
    if not _has_attributes(found, attributes[:1]):
        return f"no module or attribute {found}.{attributes[0]}"
    return f"{found} has no {'.'.join(attributes)}"


def problems(text: str, base: pathlib.Path, markdown: bool = True) -> list[str]:
    out = []
    for kind, mention, line in extract(text, markdown):
        if kind == "path":
            why = path_problem(mention)
        elif kind == "link":
            why = path_problem(mention, base)
        else:
            why = module_problem(mention)
        if why:
            out.append(f"line {line}: {mention}: {why}")
    return out


def layout_problems(text: str) -> list[str]:
    """README's layout block names files by their bare names beside their folder
    (``swarmrt/sim/   ... planning (planner.py)``): each must be in that folder."""
    section = text.partition("\n## Layout")[2].partition("\n## ")[0]
    block = section.partition("```")[2].partition("```")[0]
    out = []
    for line in block.splitlines():
        folder, _, description = line.partition(" ")
        if folder.endswith("/"):
            out += [f"layout: {folder}{name}: does not exist" for name in re.findall(r"\b\w+\.py\b", description)
                    if not (ROOT / folder / name).exists()]
    return out


def package_table_problems(text: str) -> list[str]:
    """docs/architecture.md's package table names each package's modules by bare name
    (``| `swarmrt.sim` | ... | `scenario.py`, `planner.py` |``): each must be in that package
    (or, for a top-level module such as ``swarmrt.config``, directly under swarmrt/)."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        packages = re.findall(r"`swarmrt\.(\w+)`", cells[0]) if len(cells) >= 3 else []
        if not packages:
            continue
        dirs = [ROOT / "swarmrt" / p for p in packages]
        bases = [d for d in dirs if d.is_dir()] + ([ROOT / "swarmrt"] if not all(d.is_dir() for d in dirs) else [])
        for name in re.findall(r"`([\w.]+\.py|\w+/)`", cells[-1]):
            if not any((base / name).exists() for base in bases):
                out.append(f"package table: {', '.join(packages)}: {name}: does not exist")
    return out


def _docstring_of(path: pathlib.Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(), str(path)), clean=False) or ""


# -- the tests -----------------------------------------------------------------------------------
def test_the_extractor_finds_paths_links_and_names():
    sample = (
        "See `swarmrt/routing/wiring.py`, [the rules](architecture.md#layers) and\n"
        "benchmarks/bench_skip.py. Call swarmrt.routing.wiring.choose_peer, swarmrt.cli:main or\n"
        "`swarmrt.sim.scenario`. Not paths: https://github.com/x/swarmrt/y, s3://bucket/docs/x,\n"
        "/shared/checkpoints, proto/swarmrt.proto's stubs, the file swarmrt.toml, ~/docs/notes.\n"
    )
    assert extract(sample) == [
        ("path", "swarmrt/routing/wiring.py", 1),
        ("link", "architecture.md", 1),
        ("path", "benchmarks/bench_skip.py", 2),
        ("module", "swarmrt.routing.wiring.choose_peer", 2),
        ("module", "swarmrt.cli:main", 2),
        ("module", "swarmrt.sim.scenario", 3),
        ("path", "proto/swarmrt.proto", 4),
    ]


def test_the_checks_reject_what_is_not_there():
    assert path_problem("swarmrt/routing/wiring.py") is None
    assert path_problem("swarmrt/core/routing.py") == "does not exist"
    assert path_problem("tests/unit/test_*.py") is None
    assert path_problem("tests/unit/test_nothing_*.py") == "matches no file"
    assert path_problem("../../outside.md", ROOT / "docs") == "points outside the repository"
    assert module_problem("swarmrt.routing.wiring") is None
    assert module_problem("swarmrt.routing.wiring.choose_peer") is None
    assert module_problem("swarmrt.cli:main") is None
    assert module_problem("swarmrt.routing.policies.SkipScheduler.replan") is None
    assert module_problem("swarmrt.core.routing") is not None
    assert module_problem("swarmrt.cli:no_such_function") is not None
    assert module_problem("swarmrt.routing.policies.NoSuchPolicy") is not None
    assert layout_problems("\n## Layout\n```\nswarmrt/sim/   the simulator (simulator.py, gone.py)\n```\n") == [
        "layout: swarmrt/sim/gone.py: does not exist"]
    assert package_table_problems("| `swarmrt.sim` | the simulator | `simulator.py`, `gone.py`, `scenarios/` |") == [
        "package table: sim: gone.py: does not exist"]
    assert package_table_problems("| `swarmrt.sim` | not the run config | `config.py` |") == [
        "package table: sim: config.py: does not exist"]
    assert package_table_problems("| `swarmrt.config` | the run config | `config.py` |") == []
    assert problems("moved to swarmrt/net/x.py and swarmrt.net.x", ROOT) == [
        "line 1: swarmrt/net/x.py: does not exist", "line 1: swarmrt.net.x: no module or attribute swarmrt.net"]


def test_the_scan_reads_the_real_docs():
    """Guards against a scan that silently finds nothing (a renamed folder, a broken pattern)."""
    readme = {(kind, mention) for kind, mention, _ in extract((ROOT / "README.md").read_text())}
    assert {("path", "swarmrt/config.py"), ("link", "deploy/README.md"), ("module", "swarmrt.models:tiny_llama")} <= readme
    architecture = {m for _, m, _ in extract((ROOT / "docs" / "architecture.md").read_text())}
    assert "swarmrt.routing.wiring.choose_peer" in architecture
    assert ROOT / "docs" / "scenarios.md" in DOCS


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_and_module_a_doc_mentions_exists(doc):
    found = problems(doc.read_text(), doc.parent)
    assert not found, f"{doc.relative_to(ROOT)} mentions what is not in the repository:\n" + "\n".join(found)


def test_the_readme_layout_names_real_files():
    readme = (ROOT / "README.md").read_text()
    assert "## Layout" in readme, "README.md has no Layout section to check"
    found = layout_problems(readme)
    assert not found, "README.md's layout names files that are not there:\n" + "\n".join(found)


def test_the_architecture_package_table_names_real_modules():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "| `swarmrt.routing` |" in text, "docs/architecture.md has no package table to check"
    found = package_table_problems(text)
    assert not found, "docs/architecture.md's package table names modules that are not there:\n" + "\n".join(found)


def test_every_path_and_module_a_module_docstring_mentions_exists():
    found = [f"{path.relative_to(ROOT)} docstring {p}" for path in MODULE_DOCSTRINGS
             for p in problems(_docstring_of(path), path.parent, markdown=False)]
    assert not found, "module docstrings mention what is not in the repository:\n" + "\n".join(found)


FORBIDDEN = ("../" + "shared", "HIVEMIND" + "-NOTES", "shared" + "/scenarios", "/work" + "/shared")
"""Citations of notes that live outside the repository (spelled in pieces so this file does not match)."""


def _tracked_files() -> list[pathlib.Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_cites_notes_outside_the_repository():
    hits = []
    for path in _tracked_files():
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            hits += [f"{path.relative_to(ROOT)}:{number}: {word}" for word in FORBIDDEN if word in line]
    assert not hits, ("these cite files outside the repository; say what the reader needs here instead:\n"
                      + "\n".join(hits))


def test_the_citation_check_would_see_a_citation():
    line = "format: " + FORBIDDEN[2] + "/README.md"
    assert [w for w in FORBIDDEN if w in line] == [FORBIDDEN[2]]
