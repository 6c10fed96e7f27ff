"""Base class of the library's typed configs.

Configs are pydantic models so that a stage can nest them in its params (one definition of a
field, its bounds and its docstring) and validate ``params.yaml`` against them, while the
library itself never reads that file.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    """A frozen config: unknown keys are errors and each field's docstring is its description."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)
