"""The package's layout is its architecture (ARCHITECTURE.md): common/ is a few subpackages, each saying in its
docstring which others it may import ("May import: core, imaging."), imports only go down those layers, and no
module imports itself back through others. The graph is built from the source (ast), module-level imports and
imports inside functions alike, so a hidden upward import fails here."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "registration")
MAX_LINES = 400
MAX_TOP_MODULES = 8


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name -> file."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """The dotted names ``path`` (module ``name``) imports anywhere in its body, relative imports resolved:
    for ``from a.b import c`` both ``a.b`` and ``a.b.c`` (one of them is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a package's __init__ counts as the package)."""
    modules = project_modules()
    return {name: {n for n in imported_names(path, name) if n in modules and n != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def subpackages() -> dict[str, Path]:
    return {p.parent.name: p for p in sorted((ROOT / "common").glob("*/__init__.py"))}


def allowed_imports(init: Path) -> set[str]:
    """The subpackages an __init__.py's docstring allows ("May import: a, b." or "May import: nothing.")."""
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    m = re.search(r"May import:\s*([^.]*)\.", doc)
    assert m, f"{init}: the docstring has no 'May import: ...' line"
    names = {n.strip() for n in m.group(1).split(",") if n.strip()}
    return set() if names == {"nothing"} else names


def _layer(module: str, layers: set[str]) -> str | None:
    """The subpackage of common/ that ``module`` belongs to ("common.inference.pipeline" -> "inference")."""
    parts = module.split(".")
    return parts[1] if parts[0] == "common" and len(parts) > 1 and parts[1] in layers else None


def test_find_cycle_finds_a_cycle_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imported_names_sees_function_level_and_relative_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from common.core import atomic\n    from .sibling import x\n", encoding="utf-8")
    names = imported_names(f, "common.records.m")
    assert {"common.core", "common.core.atomic", "common.records.sibling", "common.records.sibling.x"} <= names


def test_common_is_a_handful_of_subpackages_with_their_job_in_the_docstring():
    top = [p.name for p in (ROOT / "common").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MAX_TOP_MODULES, top
    subs = subpackages()
    assert len(subs) >= 4, sorted(subs)
    for name, init in subs.items():
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 10, f"common/{name}/__init__.py needs a docstring saying its job"
        assert allowed_imports(init) <= set(subs), f"{name}: allows an unknown subpackage"
    loose = [p for p in (ROOT / "common").glob("*/") if p.is_dir() and p.name != "__pycache__"
             and not (p / "__init__.py").exists()]
    assert not loose, loose


def test_no_import_cycle_among_the_projects_modules():
    graph = import_graph()
    assert len(graph) > 60
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_subpackages_import_only_what_their_docstring_allows_and_the_layers_have_no_cycle():
    subs = subpackages()
    allowed = {name: allowed_imports(init) for name, init in subs.items()}
    assert find_cycle(allowed) is None, f"the layers allow a cycle: {find_cycle(allowed)}"
    wrong = []
    for module, targets in import_graph().items():
        if not module.startswith("common"):
            continue  # registration/ sits above common/ and may import any of it
        for target in targets:
            if target.startswith("registration"):
                wrong.append(f"{module} -> {target} (common never imports registration)")
                continue
            src, dst = _layer(module, set(subs)), _layer(target, set(subs))
            if src and dst and dst != src and dst not in allowed[src]:
                wrong.append(f"{module} -> {target} ({src} may import {sorted(allowed[src]) or 'nothing'})")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("folder", [*PACKAGES, "."])
def test_no_module_over_the_line_limit(folder):
    files = sorted((ROOT / folder).glob("*.py")) if folder == "." else sorted((ROOT / folder).rglob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_the_project_root_is_where_pyproject_is():
    from common.core.paths import PROJECT_ROOT

    assert PROJECT_ROOT == ROOT and (PROJECT_ROOT / "pyproject.toml").is_file()


def test_no_test_file_imports_another_test_file():
    """Shared test helpers live in tests/helpers/ (or conftest.py fixtures), not in another test file."""
    wrong = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        names = imported_names(path, f"tests.{path.stem}")
        others = sorted(n for n in names if n.split(".")[-1].startswith("test_") or n.startswith(("test_", "tests.test_"))
                        or n.split(".")[0] == "conftest")
        if others:
            wrong[path.name] = others
    assert not wrong, wrong
