"""Stages that take some params from another stage's section, so that two stages cannot disagree.

``reconstruct`` must decode, detect, fit and unwrap exactly as ``wild_proxy`` does, and pick the held-out photos
exactly as ``train_detail`` split them; ``evaluate`` likewise. Such fields are *linked*: they are read from the
other stage's section (validated by that stage's own model), may not be set in the stage's own section, and
end up in the stage's params, so its lineage records the values it ran with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stages._common import PARAMS_FILE, ParamsError, Stage, StageParams, load_section, one_line, validate_params


@dataclasses.dataclass(frozen=True)
class Link:
    """Field ``field`` of this stage's params is ``read(other stage's params)``."""

    field: str
    stage: Callable[[], Stage[Any]]
    """The other stage (a callable, so that modules import lazily and without cycles)."""
    read: Callable[[Any], Any]
    """From that stage's validated params to the value (a model or plain value)."""


@dataclasses.dataclass(frozen=True)
class LinkedStage(Stage[Any]):
    """A :class:`Stage` with :class:`Link` ed fields."""

    links: tuple[Link, ...] = ()

    def load_params(self, root: Path, params_file: str = PARAMS_FILE) -> StageParams:
        """Own section + the linked values, validated strictly as one model."""
        own = load_section(Path(root) / params_file, self.name)
        for link in self.links:
            if link.field in own:
                raise ParamsError(f"{params_file}: {self.name}.{link.field} comes from the "
                                  f"`{link.stage().name}` section (so the two cannot disagree): set it there")
        linked: dict[str, Any] = {}
        cache: dict[str, Any] = {}
        for link in self.links:
            other = link.stage()
            if other.name not in cache:
                cache[other.name] = other.load_params(root, params_file)
            value = link.read(cache[other.name])
            linked[link.field] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        try:
            return validate_params(self.params_model, {**own, **linked})
        except ValidationError as err:
            raise ParamsError(f"invalid params in {params_file}: {one_line(err)}") from None
