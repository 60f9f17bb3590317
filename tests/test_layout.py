"""The layout a newcomer reads: layers import only downward, a long module says why it is one
file, and the Layout of docs/architecture.md names every module in the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "server", "client", "simulations", "benchmarks")
# What each layer may import of ours: common is the shared contract; server and client never
# import each other; simulations (and the console script in it) sit on top.
MAY_IMPORT = {
    "common": {"common"},
    "server": {"common", "server"},
    "client": {"common", "client"},
    "simulations": {"common", "server", "client", "simulations"},
    "benchmarks": {"common", "server", "client", "simulations", "benchmarks"},
}
# The console script runs the benchmark suite (`fedpersona bench`): the one module below the
# benchmarks that may import them.
CONSOLE_SCRIPT = ROOT / "simulations" / "cli.py"
MAX_LINES = 400
ONE_FILE = "One file on purpose, over the usual length:"
MAX_FUNCTION_LINES = 80
ONE_FUNCTION = "One function on purpose, over the usual length:"


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """Top-level names of everything ``path`` imports (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_import_only_downward(path: Path) -> None:
    layer = path.relative_to(ROOT).parts[0]
    ours = imported_packages(path) & set(PACKAGES)
    allowed = MAY_IMPORT[layer] | ({"benchmarks"} if path == CONSOLE_SCRIPT else set())
    assert ours <= allowed, f"{path.relative_to(ROOT)} imports {ours - allowed}"


def test_a_long_module_says_why_it_is_one_file() -> None:
    unexplained = []
    for path in modules():
        text = path.read_text()
        if text.count("\n") > MAX_LINES and ONE_FILE not in " ".join(
            (ast.get_docstring(ast.parse(text)) or "").split()
        ):
            unexplained.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not unexplained, f"over {MAX_LINES} lines without '{ONE_FILE} …': {unexplained}"


def long_functions(paths: list[Path], root: Path = ROOT) -> list[str]:
    """Functions over ``MAX_FUNCTION_LINES`` lines (``def`` to its last line, docstring
    included) whose docstring does not say ``ONE_FUNCTION …``."""
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            why = " ".join((ast.get_docstring(node) or "").split())
            if length > MAX_FUNCTION_LINES and ONE_FUNCTION not in why:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_is_long_without_saying_why() -> None:
    tests = sorted((ROOT / "tests").glob("*.py"))
    assert long_functions(modules() + tests) == []


def test_a_long_function_is_found(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n\ndef g():\n    return 1\n")
    found = long_functions([tmp_path / "long.py"], root=tmp_path)
    assert found == [f"long.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]


def module_name(path: Path, root: Path = ROOT) -> str:
    """``client/federation/device.py`` → ``client.federation.device`` (a package: its folder)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Which of ``paths``' modules each imports (function-level and ``TYPE_CHECKING`` imports
    included: a circle through them is still two files that cannot be read apart)."""
    names = {module_name(p): p for p in paths}
    edges: dict[str, set[str]] = {n: set() for n in names}
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in names:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges[name].add(full if full in names else node.module)
    return edges


def defined_names(path: Path) -> set[str]:
    """The top-level names a module defines or imports (what ``from it import x`` can take)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                out |= {t.id for t in names if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return out


def unresolved_imports(paths: list[Path], importers: list[Path], root: Path = ROOT) -> list[str]:
    """``importer: from module import name`` lines, anywhere in ``importers`` (lazy imports
    inside functions included), whose ``name`` is neither a module among ``paths`` nor a
    top-level name of ``module``: a lazy one fails only when its function first runs."""
    names = {module_name(p, root): p for p in paths}
    defined = {n: defined_names(p) for n, p in names.items()}
    bad = []
    for path in importers:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in names:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full not in names and alias.name not in defined[node.module]:
                        bad.append(
                            f"{path.relative_to(root)}: from {node.module} import {alias.name}"
                        )
    return bad


def test_every_import_of_our_own_names_resolves() -> None:
    tests = sorted((ROOT / "tests").glob("*.py"))
    assert unresolved_imports(modules(), modules() + tests) == []


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v] - {v}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other() -> None:
    found = circles(import_graph(modules()))
    assert not found, f"import circles: {found}"


def test_a_stale_lazy_import_is_found(tmp_path: Path) -> None:
    # A module whose function imports a name its package no longer has.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "real.py").write_text("VALUE = 1\n")
    user = tmp_path / "pkg" / "user.py"
    user.write_text("def f():\n    from pkg import gone\n    from pkg.real import VALUE, lost\n")
    paths = sorted((tmp_path / "pkg").glob("*.py"))

    bad = unresolved_imports(paths, paths, root=tmp_path)
    assert bad == ["pkg/user.py: from pkg import gone", "pkg/user.py: from pkg.real import lost"]


def test_the_checks_can_fail(tmp_path: Path) -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"a", "b"}, "b": set()}) == []
    # Prepare: a common module importing client, and a long one with no reason given.
    upward = tmp_path / "bad.py"
    upward.write_text("def f():\n    from client.federation.device import Device\n")
    # Execute / Assert
    assert imported_packages(upward) & set(PACKAGES) == {"client"}
    assert not {"client"} <= MAY_IMPORT["common"]
    long = '"""A module."""\n' + "x = 1\n" * (MAX_LINES + 1)
    assert ONE_FILE not in (ast.get_docstring(ast.parse(long)) or "")


def test_the_layout_names_every_module() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    block = architecture.split("## Layout", 1)[1].split("```", 2)[1]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))
    missing = [
        str(p.relative_to(ROOT)) for p in modules() if p.stem != "__init__" and p.stem not in words
    ]
    packages = sorted(
        p.parent
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("__init__.py")
        if p.parent.parent != ROOT
    )
    for sub in [*packages, ROOT / "client" / "api" / "web"]:
        if f"{sub.name}/" not in block:
            missing.append(str(sub.relative_to(ROOT)) + "/")
    assert not missing, f"docs/architecture.md's Layout does not name: {missing}"


def test_the_flower_app_bundle_holds_every_module_the_apps_import() -> None:
    # `flwr run` packs the project into a FAB with Flower's own rules (.gitignore included):
    # a pattern that drops a package (once: `federation/` dropped client/federation/) breaks
    # every ClientApp on a real device while local runs still find the files on disk.
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    # Execute
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        packed = set(fab.namelist())

    # Assert
    needed = {
        str(p.relative_to(ROOT))
        for pkg in ("common", "server", "client")
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert needed - packed == set()
