"""Cameras and head poses, in one convention shared by every stage.

Camera coordinates are OpenCV's: x right, y down, z forward (into the scene), in mm. Pixel
coordinates ``(u, v)`` put the centre of the pixel in column ``c``, row ``r`` at ``(c, r)``.
A model point ``X`` (mm, the model's own axes: y up, face towards +z) maps to the camera by
``X_cam = R X + t`` and to pixels by the 3x4 matrix ``P``: ``(u w, v w, w) = P (X, 1)``,
where ``w`` is the depth for a perspective camera and 1 for an orthographic one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Projection = Literal["perspective", "orthographic"]

# Model axes (y up, +z towards the viewer) to camera axes (y down, +z away from the viewer).
MODEL_TO_CAMERA = np.diag([1.0, -1.0, -1.0])


def euler_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """(3, 3) head rotation in model axes: ``Rz(roll) @ Rx(pitch) @ Ry(yaw)`` (right-handed, degrees)."""
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


@dataclass(frozen=True)
class Camera:
    """Intrinsics of a pinhole (``perspective``) or orthographic camera with square pixels.

    ``focal_px`` is the focal length in pixels, or for an orthographic camera its scale in
    pixels per mm. ``near``/``far`` bound the depth range the renderer resolves.
    """

    width: int
    height: int
    projection: Projection
    focal_px: float
    near: float
    far: float

    @classmethod
    def framing(cls, width: int, height: int, projection: Projection, fov_deg: float, distance: float,
                depth_margin: float = 400.0) -> Camera:
        """A camera whose vertical field of view is ``fov_deg`` at ``distance`` (orthographic: same scale)."""
        focal = (height / 2.0) / np.tan(np.radians(fov_deg) / 2.0)
        if projection == "orthographic":
            focal /= distance
        return cls(width, height, projection, float(focal), max(distance - depth_margin, 1.0),
                   distance + depth_margin)

    @property
    def principal_point(self) -> tuple[float, float]:
        """Image centre in pixel coordinates."""
        return (self.width - 1) / 2.0, (self.height - 1) / 2.0

    def intrinsic_matrix(self) -> np.ndarray:
        """(3, 3) ``K`` (for an orthographic camera: the affine scale and offset)."""
        cx, cy = self.principal_point
        return np.array([[self.focal_px, 0.0, cx], [0.0, self.focal_px, cy], [0.0, 0.0, 1.0]])

    def projection_matrix(self, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
        """(3, 4) ``P`` mapping homogeneous model points to homogeneous pixels for a pose ``(R, t)``."""
        extrinsic = np.column_stack([rotation, translation])
        k = self.intrinsic_matrix()
        if self.projection == "perspective":
            return k @ extrinsic
        return np.vstack([k[:2, :2] @ extrinsic[:2] + np.column_stack([np.zeros((2, 3)), k[:2, 2]]),
                          [0.0, 0.0, 0.0, 1.0]])

    def project(self, points_cam: np.ndarray) -> np.ndarray:
        """(N, 2) pixel coordinates of camera-space points (N, 3)."""
        p = np.asarray(points_cam, np.float64)
        cx, cy = self.principal_point
        scale = self.focal_px / p[:, 2:3] if self.projection == "perspective" else self.focal_px
        return p[:, :2] * scale + np.array([cx, cy])

    def pixel_size_mm(self, depth: float) -> float:
        """Size of one pixel in mm at ``depth`` (the orthographic scale ignores depth)."""
        return depth / self.focal_px if self.projection == "perspective" else 1.0 / self.focal_px


def head_pose(centre: np.ndarray, yaw: float, pitch: float, roll: float, distance: float,
              shift_px: np.ndarray, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """``(R, t)`` placing a head rotated about model point ``centre`` at ``distance`` in front of the camera.

    ``shift_px`` moves the centre's image off the principal point by that many pixels.
    """
    rotation = MODEL_TO_CAMERA @ euler_rotation(yaw, pitch, roll)
    offset = np.asarray(shift_px, np.float64) * camera.pixel_size_mm(distance)
    translation = np.array([offset[0], offset[1], distance]) - rotation @ np.asarray(centre, np.float64)
    return rotation, translation
