"""The pipeline's stages in DVC's own DAG order, and their ``Stage`` specs (no Prefect needed)."""

from __future__ import annotations

import graphlib
import heapq
import importlib
import re
from pathlib import Path
from typing import Any

from stages._common import Stage

_CMD = re.compile(r"python -m (stages\.\w+)")


def stage_order(root: Path | str) -> list[tuple[str, str]]:
    """(stage name, module) pairs of the DVC pipeline under ``root``, in DAG order.

    The graph is DVC's own (``Repo.index.graph``, what ``dvc dag`` draws): deps written as
    ``${...}`` interpolations of ``params.yaml`` resolve exactly as ``dvc repro`` resolves them.
    Among stages that do not depend on each other the order of ``dvc.yaml`` is kept. ``root`` may
    be a DVC repository or not yet ``dvc init``-ed (DVC's uninitialized mode), but it must be the
    repository's root, not a folder inside one.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    root_dir = Path(root).resolve()
    try:
        with Repo(str(root_dir), uninitialized=True) as repo:
            if Path(repo.root_dir).resolve() != root_dir:
                raise ValueError(f"{root_dir} is inside the DVC repository {repo.root_dir}: run from its root")
            index = repo.index
            stages = [s for s in _dependencies_first(index.graph, index.stages) if isinstance(s, PipelineStage)]
    except DvcException as err:
        raise ValueError(f"{root_dir}: DVC cannot read the pipeline: {err}") from err
    names = [_stage_name(stage, root_dir) for stage in stages]
    return [(name, _stage_module(name, stage.cmd)) for name, stage in zip(names, stages, strict=True)]


def _stage_name(stage: Any, root_dir: Path) -> str:
    """The name ``dvc dag`` shows from ``root_dir``: bare for ``dvc.yaml`` itself, else ``path:name``."""
    dvcfile = Path(stage.path).relative_to(root_dir).as_posix()
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _dependencies_first(graph: Any, file_order: list[Any]) -> list[Any]:
    """Topological order of DVC's stage graph, whose edges go from a stage to its dependencies.

    Of the stages whose dependencies have all run, the one first in ``file_order`` goes next.
    """
    sorter = graphlib.TopologicalSorter({node: list(graph.successors(node)) for node in graph})
    sorter.prepare()
    position = {stage: i for i, stage in enumerate(file_order)}  # unique: the heap never compares stages
    ready: list[tuple[int, Any]] = []
    order = []
    while sorter.is_active():
        for node in sorter.get_ready():
            heapq.heappush(ready, (position[node], node))
        node = heapq.heappop(ready)[1]
        order.append(node)
        sorter.done(node)
    return order


def _stage_module(name: str, cmd: str | list[str]) -> str:
    """``stages.<module>`` of a stage whose cmd is exactly ``python -m stages.<module>``."""
    commands = [cmd] if isinstance(cmd, str) else list(cmd)
    match = _CMD.fullmatch(commands[0].strip()) if len(commands) == 1 else None
    if match is None:
        raise ValueError(f"dvc.yaml stage {name!r}: cmd must be `python -m stages.<module>`, not {cmd!r}")
    return match.group(1)


def load_stage(module: str) -> Stage[Any]:
    """The ``STAGE`` spec of a stage module."""
    return importlib.import_module(module).STAGE
