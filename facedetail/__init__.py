"""facedetail: reproducible pipeline for single-image facial detail synthesis (Chen et al., ICCV 2019)."""

__version__ = "0.1.0"
