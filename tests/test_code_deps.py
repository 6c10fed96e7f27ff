"""Every stage's code deps in ``dvc.yaml`` cover the code it really runs, and nothing it does not.

For each stage, the stage module's imports of ``facedetail.*`` and ``stages.*`` are followed
statically and transitively with :mod:`ast` (imports inside functions too; package ``__init__``
files; relative imports; ``from pkg import submodule``; ``importlib.import_module("literal")``;
not imports under ``if TYPE_CHECKING:``, which never run). Data files a module names by a literal
path inside the package (``facedetail/assets/eos-share.sha256``) count as well. A dep covers a
file when it is that file or a folder above it.

Print the minimal covering deps of every stage (and what to add or drop in ``dvc.yaml``)::

    .venv/bin/python tests/test_code_deps.py
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("facedetail", "stages")  # first-party code a stage can run; neither is ever a dep as a whole
FOLDER_SHARE = 0.5  # a stage that runs at least this share of a sub-package's .py files depends on its folder
_CMD = re.compile(r"python -m (stages\.\w+)")


@dataclass(frozen=True)
class StageCode:
    """What one stage runs: file -> the chain of files that leads there (stage module first)."""

    name: str
    module: str
    chains: dict[str, tuple[str, ...]]
    unresolved: tuple[str, ...]  # "file: import x" for first-party imports that name no file

    def uncovered(self, deps: list[str]) -> dict[str, tuple[str, ...]]:
        return {f: chain for f, chain in self.chains.items() if not any(covers(d, f) for d in deps)}

    def unused(self, deps: list[str]) -> list[str]:
        return [d for d in code_deps(deps) if not any(covers(d, f) for f in self.chains)]


def covers(dep: str, path: str) -> bool:
    dep = dep.rstrip("/")
    return path == dep or path.startswith(dep + "/")


def code_deps(deps: list[str]) -> list[str]:
    """The deps that name first-party code (not ``${...}`` data paths)."""
    return [d for d in deps if "${" not in d and d.split("/", 1)[0] in PACKAGES]


def pipeline_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, tuple[str, list[str]]]:
    """stage -> (module, literal deps). Code deps are plain paths, so plain YAML is enough here."""
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    stages = {}
    for name, stage in spec.items():
        match = _CMD.fullmatch(str(stage["cmd"]).strip())
        assert match, f"dvc.yaml stage {name!r}: cmd must be `python -m stages.<module>`"
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        stages[name] = (match.group(1), deps)
    return stages


def module_file(module: str) -> str | None:
    """Repository-relative file that ``import module`` runs, if first-party and present."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):  # Python's own precedence
        if candidate.is_file():
            return candidate.relative_to(ROOT).as_posix()
    return None


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """All nodes except the bodies of ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield child
                yield from _runtime_nodes(child)
            continue
        yield node
        yield from _runtime_nodes(node)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: str) -> tuple[list[str], list[str], list[str]]:
    """(first-party modules, data files, unresolvable imports) that the file at ``path`` uses."""
    file = ROOT / path
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=path)
    module = ".".join(Path(path).with_suffix("").parts)
    package = module.removesuffix(".__init__") if file.name == "__init__.py" else module.rpartition(".")[0]
    modules: list[str] = []
    data: list[str] = []
    unresolved: list[str] = []

    def need(name: str, what: str) -> None:
        if name.split(".")[0] not in PACKAGES:
            return
        for m in _with_parents(name):
            if module_file(m) is None:
                unresolved.append(f"{path}: {what} (no file for {m})")
                return
            modules.append(m)

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                need(alias.name, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            need(source, f"from {'.' * node.level}{node.module or ''} import ...")
            for alias in node.names:  # `from pkg import submodule` runs the submodule
                if alias.name != "*" and module_file(f"{source}.{alias.name}"):
                    need(f"{source}.{alias.name}", f"from {source} import {alias.name}")
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                need(node.args[0].value, f"import_module({node.args[0].value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value:
            data.extend(_data_file(node.value, file))
    return modules, data, unresolved


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def _data_file(literal: str, file: Path) -> list[str]:
    """A non-Python file inside a first-party package that a string literal names, if any."""
    top = ROOT / Path(file).relative_to(ROOT).parts[0]
    for base in (top, file.parent):
        try:
            candidate = (base / literal).resolve()
        except (OSError, ValueError):
            continue
        if candidate.is_file() and candidate.suffix != ".py" and candidate.is_relative_to(top):
            return [candidate.relative_to(ROOT).as_posix()]
    return []


def stage_code(name: str, module: str) -> StageCode:
    """Breadth-first walk from ``python -m <module>``: every file it runs, with a shortest chain."""
    chains: dict[str, tuple[str, ...]] = {}
    unresolved: list[str] = []
    queue: list[str] = []
    for m in _with_parents(module):
        f = module_file(m)
        assert f, f"stage {name!r}: no file for {m}"
        chains[f] = (f,) if m == module else (module_file(module) or m, f)
        queue.append(f)
    while queue:
        path = queue.pop(0)
        if not path.endswith(".py"):
            continue
        modules, data, missing = imports_of(path)
        unresolved.extend(missing)
        for f in [module_file(m) for m in modules] + data:
            if f and f not in chains:
                chains[f] = (*chains[path], f)
                queue.append(f)
    return StageCode(name, module, chains, tuple(dict.fromkeys(unresolved)))


def minimal_deps(files: list[str] | set[str]) -> list[str]:
    """Fewest deps covering ``files``: a sub-package's folder when the stage runs at least
    :data:`FOLDER_SHARE` of its ``.py`` files (a data-only folder: when it uses any file), else
    single files;
    the top-level packages (``facedetail/``, ``stages/``) always as single files."""
    deps: set[str] = set()
    by_folder: dict[str, set[str]] = {}
    for f in files:
        parts = f.split("/")
        if len(parts) <= 2:
            deps.add(f)
        else:
            by_folder.setdefault("/".join(parts[:2]), set()).add(f)
    for folder, used in by_folder.items():
        code = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")}
        python_share = len(used & code) / len(code) if code else 1.0
        deps.update([folder] if python_share >= FOLDER_SHARE else used)
    return sorted(deps, key=lambda d: (not d.startswith("stages/"), d))


def all_stage_code() -> dict[str, tuple[StageCode, list[str]]]:
    return {name: (stage_code(name, module), deps) for name, (module, deps) in pipeline_stages().items()}


def test_code_deps_cover_every_imported_file() -> None:
    problems = []
    for name, (code, deps) in all_stage_code().items():
        missing = code.uncovered(deps)
        if not missing:
            continue
        lines = [f"stage {name!r}: its deps: in dvc.yaml do not cover {len(missing)} file(s) it runs:"]
        lines += [f"    {f}    via {' -> '.join(chain)}" for f, chain in sorted(missing.items())]
        add = [d for d in minimal_deps(code.chains) if any(covers(d, f) for f in missing)]
        lines.append(f"  add to {name}'s deps: {add}")
        lines.append(f"  (or set its code deps to {minimal_deps(code.chains)})")
        problems.append("\n".join(lines))
    assert not problems, "\n".join(problems) + "\nrun `.venv/bin/python tests/test_code_deps.py` for every stage"


def test_code_deps_are_all_used() -> None:
    """A code dep the stage never runs only makes it rerun for nothing (90K renders, say)."""
    problems = [f"stage {name!r}: dep {dep!r} covers no file the stage runs; drop it"
                for name, (code, deps) in all_stage_code().items() for dep in code.unused(deps)]
    assert not problems, "\n".join(problems)


def test_first_party_imports_resolve() -> None:
    problems = [f"stage {name!r}: {u}" for name, (code, _) in all_stage_code().items() for u in code.unresolved]
    assert not problems, "\n".join(problems)


def test_walk_follows_package_inits_and_transitive_imports() -> None:
    """The walker itself, on this repository: transitive edges the issue found missing."""
    code = stage_code("render_faces", "stages.render_faces")
    assert code.chains["stages/render_faces.py"] == ("stages/render_faces.py",)
    assert "stages/__init__.py" in code.chains and "facedetail/__init__.py" in code.chains
    assert any(f.startswith("facedetail/model/") for f in code.chains), code.chains
    assert minimal_deps({"facedetail/config.py", "stages/_common.py"}) == ["stages/_common.py", "facedetail/config.py"]


def main() -> int:
    """Print each stage's minimal covering code deps, and the changes dvc.yaml needs."""
    for name, (code, deps) in all_stage_code().items():
        suggested = minimal_deps(code.chains)
        current = code_deps(deps)
        print(f"{name}:")
        for dep in suggested:
            print(f"      - {dep}")
        add = [d for d in suggested if d not in current]
        drop = [d for d in current if d not in suggested]
        if add or drop:
            print(f"    # vs dvc.yaml: add {add}, drop {drop}")
        for u in code.unresolved:
            print(f"    # unresolved: {u}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
