"""What a person looks at to judge one reconstruction: photo | proxy shaded | detailed shaded | displacement."""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from facedetail.model.morphable import MorphableModel
from facedetail.render.camera import MODEL_TO_CAMERA, Camera
from facedetail.render.detailed import DetailedSurface
from facedetail.render.offscreen import MeshRenderer
from facedetail.render.sh import directional_sh, shade
from facedetail.render.sheet import label_grid

# Camera frame (y down, z away from the viewer): a light from the upper left, a little grazing, so that
# shallow wrinkles show in the shading.
RAKING_LIGHT = directional_sh(np.array([-0.55, -0.45, -0.70]) / np.linalg.norm([-0.55, -0.45, -0.70]),
                              intensity=0.85, ambient=0.15)
GREY = 0.78
_DISTANCE_MM = 1000.0
_MARGIN = 1.08


def diverging(values_mm: NDArray[np.floating], valid: NDArray[np.bool_], range_mm: float) -> NDArray[np.uint8]:
    """RGB image of a signed map: blue below 0, white at 0, red above, saturated at ±``range_mm``; grey outside."""
    t = np.clip(np.asarray(values_mm, np.float64) / range_mm, -1.0, 1.0)[..., None]
    white, red, blue = np.array([1.0, 1.0, 1.0]), np.array([0.70, 0.05, 0.10]), np.array([0.05, 0.25, 0.70])
    rgb = np.where(t >= 0, white + t * (red - white), white - t * (blue - white))
    rgb = np.where(valid[..., None], rgb, 0.55)
    return np.round(rgb * 255).astype(np.uint8)


def face_crop(photo: NDArray[np.uint8], landmarks: NDArray[np.floating], size: int,
              margin: float = 0.35) -> NDArray[np.uint8]:
    """A square crop of ``photo`` around its landmarks (``margin`` of their extent on each side), resized."""
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    centre, side = (lo + hi) / 2.0, float((hi - lo).max()) * (1.0 + 2.0 * margin)
    scale = size / max(side, 1.0)
    affine = np.array([[scale, 0.0, size / 2.0 - scale * centre[0]], [0.0, scale, size / 2.0 - scale * centre[1]]])
    return cv2.warpAffine(photo, affine, (size, size), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))


class PreviewRenderer:
    """Frontal orthographic renders of surfaces of one model, in grey under a raking light (one GL context)."""

    def __init__(self, model: MorphableModel, size: int) -> None:
        self.size = size
        lo, hi = model.mean.min(0), model.mean.max(0)
        self.centre = (lo + hi) / 2.0
        scale = size / (float(max(hi[0] - lo[0], hi[1] - lo[1])) * _MARGIN)
        self.camera = Camera(size, size, "orthographic", scale, _DISTANCE_MM - 500.0, _DISTANCE_MM + 500.0)
        self.renderer = MeshRenderer(size, size)

    def shaded(self, surface: DetailedSurface) -> NDArray[np.uint8]:
        """RGB render of ``surface`` on white (its shading normals under :data:`RAKING_LIGHT`)."""
        cam_v = (surface.vertices - self.centre) @ MODEL_TO_CAMERA.T + np.array([0.0, 0.0, _DISTANCE_MM])
        colours = GREY * shade(surface.normals @ MODEL_TO_CAMERA.T, RAKING_LIGHT)
        rgb, depth = self.renderer.render(cam_v, surface.faces, colours, self.camera)
        return np.where(depth[..., None] > 0, rgb, np.uint8(255))

    def close(self) -> None:
        self.renderer.close()


def preview_panel(photo_crop: NDArray[np.uint8], proxy: NDArray[np.uint8], detailed: NDArray[np.uint8],
                  displacement_rgb: NDArray[np.uint8], range_mm: float) -> NDArray[np.uint8]:
    """The four tiles side by side with labels."""
    size = proxy.shape[0]
    tiles = [cv2.resize(t, (size, size), interpolation=cv2.INTER_AREA) if t.shape[0] != size else t
             for t in (photo_crop, proxy, detailed, displacement_rgb)]
    return label_grid(tiles, ["photo", "proxy", "detailed", f"displacement ±{range_mm:g} mm"], columns=4)
