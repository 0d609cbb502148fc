"""The repository's own rules: unique test basenames, shipped weights within their budget,
and dependencies that point one way.

Test folders are not packages, so pytest imports each test module by its basename; two
files of one name in different folders make the second fail to collect ("import file
mismatch") in a full run, though each passes alone.

The import rules read every module's imports, at the top and inside functions (an import
inside a function is still a dependency, only a hidden one):
  - no import cycle between files of `imagen_jax`;
  - `imagen_jax.pipelines` never imports `imagen_jax.training`;
  - `imagen_jax.diffusion` imports no Flax (the math sees networks as functions);
  - `imagen_jax.shapes` (the domain) imports nothing from training, pipelines or models;
  - nothing outside `imagen_jax.proj` imports it (a config names its code as a string);
and the mains (train.py, sample.py, eval/, tools/) import no project folder either.
"""

from __future__ import annotations

import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "imagen_jax"


def test_test_module_basenames_are_unique():
    root = pathlib.Path(__file__).parent
    names = collections.Counter(p.name for p in root.rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imported_names(path: pathlib.Path, name: str) -> set[str]:
    """Every dotted name a file imports (absolute, relative imports resolved), with the
    `from X import y` form giving both X and X.y (y may be a module or a name in X)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _project_module(imported: str, modules) -> str | None:
    """The file of `modules` that an imported name lands in (its longest prefix)."""
    while imported:
        if imported in modules:
            return imported
        imported = imported.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's __init__ counts as a file)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = {_project_module(i, modules) for i in _imported_names(path, name)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one file (Tarjan), each sorted;
    a package __init__ that re-exports its own modules is not a cycle with them."""
    edges = {
        m: {t for t in ts if not (m.startswith(f"{t}.") and _is_package(t))}
        for m, ts in graph.items()
    }
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _is_package(name: str) -> bool:
    return (ROOT / name.replace(".", "/") / "__init__.py").exists()


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """The imports that break a rule of the module docstring, one line each."""
    bad = []
    rules = [
        ("pipelines", ("training",)),
        ("shapes", ("training", "pipelines", "models")),
    ]
    proj = f"{PACKAGE}.proj"
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _in(target, proj) and not _in(module, proj):
                bad.append(f"{module} imports the project folder: {target}")
            for source, banned in rules:
                if _in(module, f"{PACKAGE}.{source}"):
                    bad += [
                        f"{module} imports {target} ({source} must not import {b})"
                        for b in banned
                        if _in(target, f"{PACKAGE}.{b}")
                    ]
    for name, path in _modules().items():
        if _in(name, f"{PACKAGE}.diffusion"):
            flax = sorted(i for i in _imported_names(path, name) if _in(i, "flax"))
            bad += [f"{name} imports {i} (diffusion imports no Flax)" for i in flax[:1]]
    return bad


def _main_files() -> list[pathlib.Path]:
    mains = [ROOT / "train.py", ROOT / "sample.py"]
    for folder in ("eval", "tools", "bench"):
        mains += sorted((ROOT / folder).rglob("*.py"))
    return [p for p in mains if p.exists()]


def test_shipped_weights_fit_the_budget():
    """Everything under checkpoints/ (the shipped models and their cards) within 40 MB."""
    files = [p for p in (ROOT / "checkpoints").rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    largest = sorted(files, key=lambda p: -p.stat().st_size)[:3]
    assert total <= 40 * 2**20, (total, [str(p.relative_to(ROOT)) for p in largest])


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles between files:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_dependencies_point_one_way():
    bad = forbidden_imports(import_graph())
    assert bad == [], "forbidden imports:\n" + "\n".join(bad)


def test_mains_do_not_import_the_project_folder():
    bad = []
    for path in _main_files():
        names = _imported_names(path, path.stem)
        bad += [f"{path.relative_to(ROOT)} imports {n}" for n in sorted(names) if "proj" in n]
    assert bad == []


def test_the_rules_catch_what_they_name():
    """The checks themselves fail on a graph that breaks each rule."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    bad = forbidden_imports(
        {
            f"{PACKAGE}.pipelines.x": {f"{PACKAGE}.training.y"},
            f"{PACKAGE}.shapes.x": {f"{PACKAGE}.models.y"},
            f"{PACKAGE}.data.x": {f"{PACKAGE}.proj.shapes.y"},
        }
    )
    assert len(bad) == 3, bad
