"""What every stage shares: strict params loading, the stage spec, its inputs, and the CLI wrapper.

A stage module declares its params model, its inputs and a ``build`` function that writes its
outputs into an open :class:`~facedetail.io.transaction.StageOutput`; :meth:`Stage.run` does the
rest (input checks, lineage, the atomic output, manifest hashes, metrics, the run record), the
same for ``python -m stages.<name>`` (DVC) and for the Prefect flow.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import yaml
from pydantic import ValidationError

from facedetail.config import Config, key_data
from facedetail.errors import FacedetailError, InterruptedRunError, SourceFileError
from facedetail.io.cards import CardSpec, write_card
from facedetail.io.executors import EXECUTOR_ENV, executor_session
from facedetail.io.hashing import params_hash
from facedetail.io.licences import LicenceRules, parse_rules
from facedetail.io.lineage import ParentRef
from facedetail.io.transaction import RunLayout, StageOutput, stage_output
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import UVChartConfig

PARAMS_FILE = "params.yaml"
LICENCES_SECTION = "licences"
"""Top-level params section with the licences of the user's own raw data (read by every stage for its card)."""
SHARED_SECTIONS = ("uv_chart",)
"""Top-level params sections shared by several stages: a stage whose params model has a field of that
name gets the section there (and may not set it inside its own section)."""
PARTIAL_DIR = Path("data/.partial")


class ParamsError(FacedetailError):
    """``params.yaml`` cannot be read as stage parameters (not YAML, a section that is not a mapping, ...)."""


class StageParams(Config):
    """Base of every stage's params: unknown keys are errors, field docstrings are descriptions."""


P = TypeVar("P", bound=StageParams)


@dataclass(frozen=True)
class StageResult:
    """What a stage run produced."""

    stage: str
    out_dir: Path
    outputs: dict[str, str]
    """Output dataset name (repo-relative path) -> sha256."""
    summary: dict[str, Any]
    """Small, flat facts about the outputs (counts, sizes, timings) for reports and Prefect artifacts."""
    lineage: dict[str, Any]
    """The per-run lineage record."""


@dataclass(frozen=True)
class Input:
    """One input of a stage run: checked before the run starts, hashed into its lineage."""

    path: str
    """Relative to the repository root."""
    made_by: str | None = None
    """The stage that writes it, for the one-line remedy (``Run `dvc repro <stage>` first``)."""
    remedy: str | None = None
    """The remedy when no stage makes it."""
    check: Callable[[Path], object] | None = None
    """Opens the input (e.g. a model file) so that bad content fails here, in one line, not in a worker."""
    lineage: bool = True
    """Hash it into the lineage record (False for a file only checked, e.g. inside an input folder)."""
    what: str = "input"
    """What it is, for the message (``morphable model not found``)."""
    kind: Literal["file", "folder", "any"] = "any"
    """What must be at ``path``."""

    def resolve(self, root: Path) -> Path:
        """The checked path: a missing input, or a file where a folder must be, is a :class:`SourceFileError`."""
        path = root / self.path
        remedy = self.remedy or f"Run `dvc repro {self.made_by}` first (or fix the path)"
        if not path.exists():
            raise SourceFileError(path, f"{self.what} not found", remedy)
        if (self.kind == "file" and not path.is_file()) or (self.kind == "folder" and not path.is_dir()):
            raise SourceFileError(path, f"{self.what} must be a {self.kind}", remedy)
        if self.check is not None:
            self.check(path)
        return path


def model_input(path: str) -> Input:
    """The morphable model written by ``face_model``, opened before the run so a non-model fails at once."""
    return Input(path, "face_model", check=MorphableModel.load, what="morphable model", kind="file")


@dataclass(frozen=True)
class Stage(Generic[P]):
    """A stage: name, params model, inputs, and ``build(params, root, out) -> summary``."""

    name: str
    params_model: type[P]
    build: Callable[[P, Path, StageOutput], dict[str, Any]]
    inputs: Callable[[P], Sequence[Input]]
    seed: Callable[[P], int | None] = lambda params: None
    resumable: bool = False
    """Keeps finished work in ``data/.partial/<name>`` across a killed run (removed on success)."""
    headline: tuple[str, ...] = ()
    """Dotted metric keys the end-of-run summary shows (two or three)."""
    items: str | None = None
    """The metric that counts the stage's items, where manifest rows are not items (one row per file)."""
    look_at: tuple[str, ...] = ()
    """Files of the output a person opens to judge it (contact sheets, previews)."""
    limits: str = ""
    """Known limits of the output, one line, for its ``CARD.md``."""
    sources: Callable[[P, StageOutput], Sequence[str]] = lambda params, out: ()
    """Model or data files the run read from installed packages (ids of
    :data:`facedetail.io.licences.PACKAGE_SOURCES`), given the params and the built output: their versions,
    hashes and licences go into the card and travel to every dataset derived from this one."""

    @property
    def out_dir(self) -> Path:
        return Path("data") / self.name

    @property
    def metrics(self) -> Path:
        return Path("metrics") / f"{self.name}.json"

    @property
    def work_dir(self) -> Path:
        return PARTIAL_DIR / self.name

    def load_params(self, root: Path, params_file: str = PARAMS_FILE) -> P:
        """This stage's section of ``root/params.yaml``, validated strictly (see :func:`validate_params`).

        Invalid params are a :class:`ParamsError` (one line), which no orchestrator retries.
        """
        section = load_section(root / params_file, self.name)
        for shared in SHARED_SECTIONS:
            if shared in self.params_model.model_fields:
                if shared in section:
                    raise ParamsError(f"{params_file}: {self.name}.{shared} is not a stage param: set the "
                                      f"top-level `{shared}:` section, which every stage that uses it shares")
                section = {**section, shared: load_section(root / params_file, shared)}
        try:
            return validate_params(self.params_model, section)
        except ValidationError as err:
            raise ParamsError(f"invalid params in {params_file}: {one_line(err)}") from None

    def run(self, params: P, root: Path, parent: ParentRef | None = None) -> StageResult:
        """Check the inputs, then build the outputs inside one output transaction."""
        root = Path(root)
        inputs = list(self.inputs(params))
        paths = [i.resolve(root) for i in inputs]
        layout = RunLayout(root, self.out_dir, self.metrics, work_dir=self.work_dir if self.resumable else None)
        rules = licence_rules(root)
        content = key_data(params, frozenset({"run"}))
        with stage_output(self.name, params.model_dump(mode="json"),
                          [p for p, i in zip(paths, inputs, strict=True) if i.lineage], layout,
                          seed=self.seed(params), parent=parent, content_params=content) as out:
            summary = self.build(params, root, out)
            self.write_card(params, root, out, [i.path for i in inputs if i.lineage], rules, params_hash(content))
        return StageResult(self.name, root / self.out_dir, out.outputs, summary, out.record)

    def write_card(self, params: P, root: Path, out: StageOutput, input_paths: Sequence[str], rules: LicenceRules,
                   content_hash: str) -> None:
        """The output's ``CARD.md``, from the stage's description (its module docstring) and limits, and the data."""
        module = sys.modules.get(self.build.__module__)
        described = (module.__doc__ if module else None) or "Not described: the stage module has no docstring."
        spec = CardSpec(self.name, described, self.limits, self.headline, content_hash,
                        tuple(self.sources(params, out)), tuple(input_paths), rules)
        write_card(spec, root, out.dir, out.input_hashes, out.metrics)


def licence_rules(root: Path, params_file: str = PARAMS_FILE) -> LicenceRules:
    """The ``licences:`` section of ``root/params.yaml``, validated (a problem is a one-line :class:`ParamsError`).

    A run given its params directly, in a folder without a params file, has no declarations (as a file
    without the section): its raw inputs get the licences facedetail knows, or ``undeclared``.
    """
    if not (root / params_file).is_file():
        return parse_rules(None)
    try:
        return parse_rules(load_section(root / params_file, LICENCES_SECTION))
    except ValueError as err:
        raise ParamsError(f"{params_file}: {err}") from None


def validate_params(model: type[P], section: dict[str, Any]) -> P:
    """Strict validation, as the values are written in YAML: a bool or a float is not an int, numbers
    are finite, strings are not numbers. (JSON mode: lists are accepted for tuples.)"""
    try:
        text = json.dumps(section, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ParamsError(f"values must be plain YAML scalars, lists and mappings ({err})") from None
    return model.model_validate_json(text, strict=True)


def load_section(params_path: Path, section: str) -> dict[str, Any]:
    """One section of a params file; a missing section means all defaults."""
    try:
        data = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ParamsError(f"{params_path}: cannot be read ({err.strerror or err})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ParamsError(f"{params_path}: not valid YAML ({' '.join(str(err).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{params_path}: must be a mapping of stage sections, not a {type(data).__name__}")
    values = data.get(section)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ParamsError(f"{params_path}: section {section!r} must be a mapping of parameters, "
                          f"not a {type(values).__name__}")
    return values


def inject_chart(data: Any, *path: str) -> Any:
    """Params data with ``uv_chart.resolution`` copied to the library config field at ``path``.

    For a ``mode="before"`` validator of a stage whose library config has its own resolution field (e.g.
    ``process.resolution``): that field is the shared chart's, so setting it in the stage section is an error.
    """
    if not isinstance(data, dict):
        return data
    chart = data.get("uv_chart") or {}
    resolution = chart.get("resolution", UVChartConfig().resolution) if isinstance(chart, dict) else None
    data = dict(data)
    node: dict[str, Any] = data
    for key in path[:-1]:
        child = node.get(key) or {}
        if not isinstance(child, dict):
            return data
        node[key] = child = dict(child)
        node = child
    if path[-1] in node:
        raise ValueError(f"{'.'.join(path)} is the shared `uv_chart.resolution`: set that top-level section instead")
    node[path[-1]] = resolution
    return data


def worker_count(requested: int) -> int:
    """Processes to use: ``requested``, or one per CPU core this process may run on when 0."""
    return requested or len(os.sched_getaffinity(0))


def one_line(err: ValidationError) -> str:
    """A pydantic validation error as one line: ``key: problem; key: problem``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in err.errors())


def main(stage: Stage[Any], argv: list[str] | None = None) -> int:
    """CLI entry point used by ``python -m stages.<name>``: one-line errors, exit code 2 (1: interrupted, rerun)."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage.name}", description=f"Run stage {stage.name}.")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: cwd)")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file relative to the root")
    args = parser.parse_args(argv)
    try:
        params = stage.load_params(args.root, args.params)
        # `dvc repro` users scale out the same way the flow does: FACEDETAIL_EXECUTOR=dask://host:8786 (or
        # ray://…) sends the stage's shards to that cluster; a local cluster gets one worker per core.
        with executor_session(os.environ.get(EXECUTOR_ENV), worker_count(0)):
            result = stage.run(params, args.root)
    except (FacedetailError, FileNotFoundError, ValueError) as err:
        print(f"error: {stage.name}: {err}", file=sys.stderr)
        return 2
    except InterruptedRunError as err:
        print(f"error: {stage.name}: {err}", file=sys.stderr)
        return 1
    shown = result.out_dir.resolve().relative_to(args.root.resolve())
    print(f"{stage.name}: wrote {shown} ({json.dumps(result.summary, sort_keys=True)})")
    return 0
