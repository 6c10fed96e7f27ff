"""Base class of the library's typed configs, the roles a field can play, and the one content key.

Configs are pydantic models so that a stage can nest them in its params (one definition of a
field, its bounds and its docstring) and validate ``params.yaml`` against them, while the
library itself never reads that file.

Every field changes what a stage writes unless it is declared otherwise, with one of:

* :func:`run_only` — how a run executes (worker processes, progress): never changes an output byte;
* :func:`set_level` — which items a set holds or what its reports show (a count, a contact sheet),
  never the content of one item: left out of the per-item reuse key, so the items of a grown set
  keep their keys (and bytes), and a killed run's finished shards stay reusable;
* :func:`input_path` — where an input lies: the stage puts the input's *content* hash in the key
  instead, so the same file at another path gives the same key.

:func:`content_key` is the one place a reuse key is made from a config, so a new field that
changes an output cannot be left out of a key by accident: it is in unless declared out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from facedetail.io.hashing import params_hash

Role = Literal["run", "set", "input"]
_ROLE_KEY = "facedetail_role"
_NOT_IN_ITEM_KEY: frozenset[str] = frozenset({"run", "set", "input"})


class Config(BaseModel):
    """A frozen config: unknown keys are errors, numbers must be finite, each field's docstring is its description."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)


def _field(role: Role, default: Any, **kwargs: Any) -> Any:
    return Field(default, json_schema_extra={_ROLE_KEY: role}, **kwargs)


def run_only(default: Any, **kwargs: Any) -> Any:
    """A field that only says how a run executes (workers, progress): left out of every content key."""
    return _field("run", default, **kwargs)


def set_level(default: Any, **kwargs: Any) -> Any:
    """A field that shapes the set (how many items, what a report shows), not any one item's content."""
    return _field("set", default, **kwargs)


def input_path(default: Any, **kwargs: Any) -> Any:
    """A path to an input file or folder: keys hold the input's content hash, not the path."""
    return _field("input", default, **kwargs)


def field_role(model: type[BaseModel], name: str) -> Role | None:
    """The declared role of ``model.name``, or None for a field that shapes every output."""
    extra = model.model_fields[name].json_schema_extra
    return extra.get(_ROLE_KEY) if isinstance(extra, dict) else None  # type: ignore[return-value]


def key_data(config: BaseModel, leave_out: frozenset[str] = _NOT_IN_ITEM_KEY) -> dict[str, Any]:
    """``config`` as plain data without the fields whose role is in ``leave_out``, nested configs included."""
    out: dict[str, Any] = {}
    for name in type(config).model_fields:
        if field_role(type(config), name) in leave_out:
            continue
        value = getattr(config, name)
        out[name] = (key_data(value, leave_out) if isinstance(value, BaseModel)
                     else config.model_dump(mode="json", include={name})[name])
    return out


def content_key(config: BaseModel, inputs: Mapping[str, str] | None = None,
                switched_off: Iterable[str] = ()) -> str:
    """The reuse key of one item made with ``config`` from inputs of these content hashes.

    Run-only, set-level and input-path fields are left out; ``inputs`` (name -> sha256 of the
    content the stage read) stand for the paths; ``switched_off`` names top-level fields of an optional
    step that is off, whose settings change no output.
    """
    data = key_data(config)
    for name in switched_off:
        data[name] = "off"
    if inputs:
        data["inputs"] = dict(sorted(inputs.items()))
    return params_hash(data)
