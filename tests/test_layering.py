"""The import graph of the library: a DAG from ``stages``/``flows`` down to ``facedetail.io``.

Read statically (``ast``), imports inside functions included, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "facedetail"
ORCHESTRATION = ("stages", "flows", "prefect", "prefect_dask", "prefect_ray", "dvc", "dvclive")


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _unit(name: str, library: Path = LIBRARY) -> str | None:
    """The layer of a library module: its sub-package, or the top-level module's name."""
    parts = name.split(".")
    if parts[0] != library.name or len(parts) < 2:
        return None
    candidate = library / parts[1]
    return parts[1] if candidate.is_dir() or candidate.with_suffix(".py").is_file() else None


def _library_files(library: Path = LIBRARY) -> list[Path]:
    return sorted(p for p in library.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_library_never_imports_orchestration() -> None:
    offenders = {f"{p.relative_to(ROOT)}: {name}" for p in _library_files() for name in _imports(p)
                 if name.split(".")[0] in ORCHESTRATION}
    assert not offenders, sorted(offenders)


def test_the_model_package_does_not_import_the_renderer() -> None:
    offenders = {f"{p.relative_to(ROOT)}: {name}" for p in sorted((LIBRARY / "model").rglob("*.py"))
                 for name in _imports(p) if name.startswith("facedetail.render")}
    assert not offenders, sorted(offenders)


def _graph(library: Path = LIBRARY) -> dict[str, set[str]]:
    root = library.parent
    graph: dict[str, set[str]] = {}
    for path in _library_files(library):
        unit = _unit(".".join(path.relative_to(root).with_suffix("").parts), library)
        if unit is None:
            continue
        graph.setdefault(unit, set()).update(
            u for name in _imports(path, root) if (u := _unit(name, library)) is not None and u != unit)
    return graph


def test_the_library_packages_form_a_dag() -> None:
    graph = _graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle between library packages: {' -> '.join(err.args[1])}")
    # io is the floor: everything may use it, it uses nothing above it but the shared error types
    assert graph["io"] <= {"errors"}, graph["io"]
    assert order.index("io") < order.index("model") < order.index("render")


def test_the_checker_sees_a_lazy_relative_import_cycle(tmp_path: Path) -> None:
    """The DAG test can fail: a package whose ``model`` imports ``render`` inside a function, through a
    relative import, while ``render`` imports ``model``, is a cycle."""
    lib = tmp_path / "facedetail"
    for package, text in {"model": "def f():\n    from ..render import camera\n",
                          "render": "from facedetail.model import morphable\n"}.items():
        (lib / package).mkdir(parents=True)
        (lib / package / "__init__.py").write_text("")
        (lib / package / "core.py").write_text(text)
    graph = _graph(lib)
    assert graph == {"model": {"render"}, "render": {"model"}}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())
