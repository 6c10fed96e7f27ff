"""Every stage's code deps in ``dvc.yaml`` cover the code it really runs, and nothing it does not.

For each stage, the stage module's imports of ``facedetail.*`` and ``stages.*`` are followed
statically and transitively with :mod:`ast` (imports inside functions too; package ``__init__``
files; relative imports; ``from pkg import submodule``; ``importlib.import_module("literal")``;
not imports under ``if TYPE_CHECKING:``, which never run). Data files a module names by a literal
path inside the package (``facedetail/assets/eos-share.sha256``) count as well. A dep covers a
file when it is that file or a folder above it.

Print the minimal covering deps of every stage (and what to add or drop in ``dvc.yaml``), with
the import chain of every file, or write them into ``dvc.yaml``'s deps lists::

    .venv/bin/python tests/test_code_deps.py [--chains] [--write]
"""

from __future__ import annotations

import ast
import functools
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
_RELPATH = re.compile(r"[\w.-]+(/[\w.-]+)+")  # a string literal that may name a data file


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


@functools.cache
def imports_of(path: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
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
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _RELPATH.fullmatch(node.value):
            data.extend(_data_file(node.value, file))
    return tuple(modules), tuple(data), tuple(unresolved)


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def _data_file(literal: str, file: Path) -> list[str]:
    """A non-Python file inside a first-party package that a string literal names, if any."""
    top = ROOT / Path(file).relative_to(ROOT).parts[0]
    for base in (top, file.parent):
        candidate = (base / literal).resolve()
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
        for f in [module_file(m) for m in modules] + list(data):
            if f and f not in chains:
                chains[f] = (*chains[path], f)
                queue.append(f)
    return StageCode(name, module, chains, tuple(dict.fromkeys(unresolved)))


def minimal_deps(files: list[str] | set[str]) -> list[str]:
    """Few deps covering ``files``: a sub-package's folder when the stage runs at least
    :data:`FOLDER_SHARE` of its ``.py`` files (a data-only folder: when it uses any file of it),
    else single files; files directly in ``facedetail/`` or ``stages/`` always one by one."""
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


def suggested_deps(code: StageCode) -> list[str]:
    """:func:`minimal_deps` of what the stage runs, its own module first."""
    own = module_file(code.module)
    return sorted(minimal_deps(code.chains), key=lambda d: d != own)


@functools.cache
def all_stage_code() -> dict[str, tuple[StageCode, list[str]]]:
    return {name: (stage_code(name, module), deps) for name, (module, deps) in pipeline_stages().items()}


def test_code_deps_cover_every_imported_file() -> None:
    problems = []
    for name, (code, deps) in all_stage_code().items():
        missing = code.uncovered(deps)
        if not missing:
            continue
        lines = [f"stage {name!r}: its `deps:` in dvc.yaml do not cover {len(missing)} file(s) it runs:"]
        lines += [f"    {f}    via {' -> '.join(chain)}" for f, chain in sorted(missing.items())]
        add = [d for d in suggested_deps(code) if any(covers(d, f) for f in missing)]
        lines.append(f"  add to {name}'s deps: {add}")
        lines.append(f"  (or set its code deps to {suggested_deps(code)})")
        problems.append("\n".join(lines))
    assert not problems, "\n".join(problems) + (
        "\n`.venv/bin/python tests/test_code_deps.py` shows every stage; `... --write` puts them in dvc.yaml")


def test_code_deps_are_all_used() -> None:
    """A code dep the stage never runs only makes it rerun for nothing (90K renders, say)."""
    problems = [f"stage {name!r}: dep {dep!r} covers no file the stage runs; drop it"
                for name, (code, deps) in all_stage_code().items() for dep in code.unused(deps)]
    assert not problems, "\n".join(problems)


def test_first_party_imports_resolve() -> None:
    problems = [f"stage {name!r}: {u}" for name, (code, _) in all_stage_code().items() for u in code.unresolved]
    assert not problems, "\n".join(problems)


def test_walker_on_a_made_up_tree(tmp_path: Path, monkeypatch) -> None:
    """Function-level, relative, submodule and import_module imports, package ``__init__``s, data
    files; not ``TYPE_CHECKING`` imports; the folder-or-files rule; and the dvc.yaml rewrite."""
    files = {
        "stages/__init__.py": "",
        "stages/s.py": "from typing import TYPE_CHECKING\nfrom facedetail.b import thing\n"
                       "if TYPE_CHECKING:\n    from facedetail import typed_only\n"
                       "def f():\n    from facedetail.pkg import sub, NAME\n",
        "facedetail/__init__.py": "",
        "facedetail/b.py": "from .pkg.rel import x\nimport facedetail.few.one\nthing = 1\n",
        "facedetail/pkg/__init__.py": "from . import helper\nNAME = 1\n",
        "facedetail/pkg/helper.py": "import importlib\nimportlib.import_module('facedetail.dyn')\n",
        "facedetail/pkg/rel.py": "TABLE = 'data/table.csv'\nx = 1\n",
        "facedetail/pkg/data/table.csv": "a,b\n",
        "facedetail/pkg/sub.py": "from facedetail.gone import y\n",
        "facedetail/pkg/unused.py": "",
        "facedetail/dyn.py": "",
        "facedetail/typed_only.py": "",
        **{f"facedetail/few/{n}.py": "" for n in ("__init__", "one", "two", "three", "four")},
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    imports_of.cache_clear()
    try:
        code = stage_code("s", "stages.s")
    finally:
        imports_of.cache_clear()
    assert set(code.chains) == set(files) - {"facedetail/pkg/unused.py", "facedetail/typed_only.py",
                                             "facedetail/few/two.py", "facedetail/few/three.py",
                                             "facedetail/few/four.py"}
    assert code.chains["facedetail/dyn.py"] == ("stages/s.py", "facedetail/pkg/__init__.py",
                                                "facedetail/pkg/helper.py", "facedetail/dyn.py")
    assert [u.split(":")[0] for u in code.unresolved] == ["facedetail/pkg/sub.py"]
    suggested = minimal_deps(code.chains)
    assert suggested == ["stages/__init__.py", "stages/s.py", "facedetail/__init__.py", "facedetail/b.py",
                         "facedetail/dyn.py", "facedetail/few/__init__.py", "facedetail/few/one.py", "facedetail/pkg"]
    assert set(code.uncovered(["stages/", "facedetail/__init__.py", "facedetail/b.py", "facedetail/dyn.py",
                               "facedetail/few", "facedetail/pkg/"])) == set()
    assert set(code.uncovered(suggested[:-1])) == {f for f in code.chains if f.startswith("facedetail/pkg/")}
    assert code.unused(["facedetail/pkg", "facedetail/typed_only.py", "${s.input}", "data/x"]) == [
        "facedetail/typed_only.py"]

    dvc_yaml = ("# comment\nstages:\n  s:\n    cmd: python -m stages.s\n    deps:\n      - stages/s.py\n"
                "      - facedetail\n      - ${s.input}\n    # kept\n    outs:\n      - data/s\n"
                "  t:\n    cmd: python -m stages.t\n    deps:\n      - stages/t.py\nplots:\n  - data/s/x.png\n")
    rewritten = rewrite_code_deps(dvc_yaml, {"s": ["stages/s.py", "facedetail/b.py"]})
    assert rewritten == dvc_yaml.replace("      - facedetail\n", "      - facedetail/b.py\n")


def rewrite_code_deps(text: str, suggested: dict[str, list[str]]) -> str:
    """``dvc.yaml`` text with each stage's code deps replaced by ``suggested[stage]``, in place:
    comments, data deps (kept after the code deps) and everything else stay as they are."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    in_stages, stage = False, None
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if line.strip() and not line.startswith((" ", "#")):
            in_stages, stage = line.startswith("stages:"), None
        elif in_stages and (m := re.fullmatch(r"  ([\w-]+):\s*", line)):
            stage = m.group(1)
        elif stage in suggested and re.fullmatch(r"    deps:\s*", line):
            items = []
            while i < len(lines) and lines[i].startswith("      - "):
                items.append(lines[i])
                i += 1
            data = [item for item in items if not code_deps([item.strip()[2:].strip()])]
            out += [f"      - {d}\n" for d in suggested[stage]] + data
    return "".join(out)


def main(argv: list[str]) -> int:
    """Print each stage's minimal covering code deps and the changes dvc.yaml needs.

    ``--chains``: also show, for every file a stage runs, the import chain that gets there.
    ``--write``: put the minimal code deps into dvc.yaml (deps lists only; comments stay).
    """
    suggested = {}
    for name, (code, deps) in all_stage_code().items():
        suggested[name] = suggested_deps(code)
        current = code_deps(deps)
        print(f"{name}:")
        for dep in suggested[name]:
            print(f"      - {dep}")
        add = [d for d in suggested[name] if d not in current]
        drop = [d for d in current if d not in suggested[name]]
        if add or drop:
            print(f"    # vs dvc.yaml: add {add}, drop {drop}")
        for u in code.unresolved:
            print(f"    # unresolved: {u}")
        if "--chains" in argv:
            for f, chain in sorted(code.chains.items()):
                print(f"    # {f}  <-  {' -> '.join(chain)}")
    if "--write" in argv:
        dvc_yaml = ROOT / "dvc.yaml"
        dvc_yaml.write_text(rewrite_code_deps(dvc_yaml.read_text(encoding="utf-8"), suggested), encoding="utf-8")
        print(f"wrote {dvc_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
