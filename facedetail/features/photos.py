"""Fixed sample photos for smoke checks of the photo path (detector, crop, network, dictionary)."""

from __future__ import annotations

import numpy as np


def astronaut_image() -> np.ndarray:
    """``skimage.data.astronaut()``: a public-domain photo of a smiling face (Eileen Collins), RGB uint8."""
    # Imported here: scikit-image is only needed by the stages that look at this one photo.
    from skimage import data

    return data.astronaut()
