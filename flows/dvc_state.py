"""What DVC says of a stage (stale or not) and recording a finished one in ``dvc.lock``, through DVC's API.

The flow asks DVC itself, stage by stage in DAG order after the stages before it ran, so its
decisions are ``dvc repro``'s: a stage runs when ``dvc status`` lists it (a changed dep, param,
out or command, or no lock entry yet), and is then committed as ``dvc repro`` records it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DvcState:
    """The DVC repository at ``root`` (opened afresh per question: each answer sees the last commit)."""

    root: Path

    @classmethod
    def open(cls, root: Path) -> DvcState | None:
        """The repository at ``root``; None when ``root`` has no ``.dvc`` folder (not ``dvc init``-ed)."""
        return cls(Path(root)) if (Path(root) / ".dvc").is_dir() else None

    @contextlib.contextmanager
    def _repo(self) -> Iterator[Any]:
        from dvc.repo import Repo

        # Inside the root: parts of DVC's API (the run cache of `commit`) resolve paths from the current
        # directory. The flow calls DVC only between stages, so no stage runs while the directory is changed.
        with contextlib.chdir(self.root), Repo(str(self.root)) as repo:
            yield repo

    def target(self, name: str) -> str:
        """The stage as an absolute ``dvc.yaml:name`` target: DVC resolves a bare name from the current
        directory, which need not be ``root``."""
        dvcfile, _, stage = name.rpartition(":")
        return f"{self.root.resolve() / (dvcfile or 'dvc.yaml')}:{stage}"

    def status(self, name: str) -> list[Any]:
        """``dvc status <name>``'s entries for the stage; empty when it is up to date."""
        with self._repo() as repo:
            found = repo.status(targets=[self.target(name)])
        return [entry for entries in found.values() for entry in entries]

    def stale_reason(self, name: str) -> str | None:
        """None when the stage is up to date; else DVC's status of it, as one short line."""
        entries = self.status(name)
        if not entries:
            return None
        return "; ".join(_describe(entry) for entry in entries)

    def commit(self, name: str) -> None:
        """Record the stage's deps, params and outs in ``dvc.lock`` and cache its outs (``dvc commit -f``)."""
        with self._repo() as repo:
            repo.commit(self.target(name), force=True)


def _describe(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        parts = []
        for what, changes in entry.items():
            if isinstance(changes, dict):
                shown = ", ".join(f"{path}: {change}" for path, change in list(changes.items())[:3])
                more = f" (+{len(changes) - 3})" if len(changes) > 3 else ""
                parts.append(f"{what} {shown}{more}")
            else:
                parts.append(f"{what}: {changes}")
        return "; ".join(parts)
    return json.dumps(entry, default=str)
