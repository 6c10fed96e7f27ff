"""Morphable face models: the typed in-memory model and loaders for its source formats."""

from facedetail.model.morphable import N_LANDMARKS, MorphableModel
from facedetail.model.sources import SHARE_FILES, SourceFormat, load_model_source, source_files

__all__ = ["N_LANDMARKS", "SHARE_FILES", "MorphableModel", "SourceFormat", "load_model_source", "source_files"]
