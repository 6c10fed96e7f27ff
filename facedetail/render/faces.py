"""Rendering one face image from a :class:`~facedetail.render.sampling.RenderSample`.

The mesh is posed and shaded in NumPy (albedo ⊙ SH shading of the camera-space normals, the
paper's image model), rasterized by :class:`~facedetail.render.offscreen.MeshRenderer`, and
composited over a generated background. Besides the image, a render knows where every
landmark went: its pixel position, its depth, and whether the depth buffer shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facedetail.model.anchors import LandmarkAnchors, landmark_anchors
from facedetail.model.morphable import MorphableModel
from facedetail.render.camera import Camera, head_pose
from facedetail.render.offscreen import MeshRenderer
from facedetail.render.sampling import BackgroundSampling, RenderSample, SamplingConfig
from facedetail.render.sh import shade

CAVITY_DEPTH_MM = 8.0
"""How far behind the lips the mouth cavity's centre sits."""
CAVITY_COLOR = (0.22, 0.07, 0.07)
"""Unlit colour of the cavity's centre; the cap blends from the lips' colour to this."""
VISIBILITY_TOLERANCE_MM = 3.0
"""A surface hides a landmark only if it is nearer than the landmark by more than this (plus
two pixel sizes, for sloped surfaces)."""


@dataclass(frozen=True)
class RenderedFace:
    """One rendered image and the geometry that maps it to the mesh."""

    image: np.ndarray
    """(H, W, 3) uint8 RGB, composited over the background."""
    mask: np.ndarray
    """(H, W) bool, True where the face mesh covers the pixel."""
    depth: np.ndarray
    """(H, W) float32 camera depth in mm, 0 off the face."""
    landmarks: np.ndarray
    """(68, 2) pixel positions (NaN where the model has no such landmark)."""
    landmark_depth: np.ndarray
    """(68,) camera depth of each landmark in mm."""
    visible: np.ndarray
    """(68,) bool: inside the image and not hidden by the face itself."""
    camera: Camera
    rotation: np.ndarray
    """(3, 3) model-to-camera rotation."""
    translation: np.ndarray
    """(3,) model-to-camera translation in mm."""

    @property
    def projection(self) -> np.ndarray:
        """(3, 4) model (mm) to pixel matrix, see :mod:`facedetail.render.camera`."""
        return self.camera.projection_matrix(self.rotation, self.translation)


def boundary_loops(triangles: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops of a consistently oriented triangle mesh, each in the mesh's edge direction.

    Written here rather than taken from trimesh, whose ``outline()`` needs optional path
    dependencies and does not keep the edge direction that a cap's winding must follow.
    """
    directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    present = {tuple(e) for e in directed.tolist()}
    successor = {a: b for a, b in directed.tolist() if (b, a) not in present}
    loops, seen = [], set()
    for start in sorted(successor):
        if start in seen:
            continue
        loop, v = [], start
        while v not in seen and v in successor:
            seen.add(v)
            loop.append(v)
            v = successor[v]
        if v == start:
            loops.append(np.asarray(loop, np.int64))
    return loops


@dataclass(frozen=True)
class MouthCavity:
    """A cap closing the model's mouth opening, so that the background never shows through it.

    The cap is a fan from the inner-lip boundary loop to one extra vertex placed
    ``CAVITY_DEPTH_MM`` behind the loop's centre; its colour fades to ``CAVITY_COLOR``.
    """

    loop: np.ndarray
    """Vertex ids of the inner-lip boundary loop."""
    triangles: np.ndarray
    """(len(loop), 3) fan triangles; the extra vertex has id ``n_vertices``."""

    @classmethod
    def of(cls, model: MorphableModel) -> MouthCavity | None:
        """The cavity of ``model``'s mouth opening, or None if it has none (a closed mouth)."""
        inner_lips = model.landmark_vertices[60:68]
        inner_lips = set(inner_lips[inner_lips >= 0].tolist())
        touching = [loop for loop in boundary_loops(model.triangles) if inner_lips & set(loop.tolist())]
        if not touching:
            return None
        loop = max(touching, key=lambda lp: len(inner_lips & set(lp.tolist())))
        centre = model.n_vertices
        tris = np.column_stack([np.roll(loop, -1), loop, np.full(len(loop), centre)])
        return cls(loop, tris.astype(np.int64))

    def centre(self, vertices: np.ndarray) -> np.ndarray:
        """(3,) the extra vertex for model-space ``vertices`` (the face looks towards +z)."""
        return vertices[self.loop].mean(axis=0) - np.array([0.0, 0.0, CAVITY_DEPTH_MM])


class FaceRenderer:
    """Renders faces of one model at one image size, re-using a GL context."""

    def __init__(self, model: MorphableModel, size: int, config: SamplingConfig) -> None:
        self.model = model
        self.size = size
        self.config = config
        self.anchors: LandmarkAnchors = landmark_anchors(model)
        self.centre = model.mean.astype(np.float64).mean(axis=0)
        self.cavity = MouthCavity.of(model)
        self.triangles = model.triangles if self.cavity is None else np.vstack([model.triangles,
                                                                                 self.cavity.triangles])
        self._mesh = MeshRenderer(size, size)

    def camera(self, distance_mm: float) -> Camera:
        cam = self.config.camera
        return Camera.framing(self.size, self.size, cam.projection, cam.fov_deg, distance_mm)

    def render(self, sample: RenderSample) -> RenderedFace:
        """Render one face under ``sample``'s parameters."""
        model = self.model
        vertices = model.vertices(sample.alpha, sample.beta).astype(np.float64)
        camera = self.camera(sample.distance_mm)
        rotation, translation = head_pose(self.centre, sample.yaw, sample.pitch, sample.roll,
                                          sample.distance_mm, sample.translate_px, camera)
        cam_vertices = vertices @ rotation.T + translation
        normals = model.vertex_normals(vertices).astype(np.float64) @ rotation.T
        colors = model.albedo(sample.albedo) * shade(normals, sample.sh)
        if self.cavity is not None:
            cam_vertices = np.vstack([cam_vertices, self.cavity.centre(vertices) @ rotation.T + translation])
            colors = np.vstack([colors, CAVITY_COLOR])
        rgb, depth = self._mesh.render(cam_vertices, self.triangles, colors, camera)
        mask = depth > 0
        image = composite(rgb, mask, background(sample, self.size, self.size, self.config.background))

        cam_landmarks = self.anchors.points(vertices) @ rotation.T + translation
        uv = camera.project(cam_landmarks)
        visible = landmark_visibility(uv, cam_landmarks[:, 2], depth, camera)
        return RenderedFace(image, mask, depth, uv, cam_landmarks[:, 2], visible, camera, rotation, translation)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def landmark_visibility(uv: np.ndarray, z: np.ndarray, depth: np.ndarray, camera: Camera) -> np.ndarray:
    """(N,) bool: the point projects into the image and no surface lies in front of it.

    A point is hidden when every pixel of its 3x3 neighbourhood shows a surface nearer than
    the point (by more than the tolerance). A neighbour that is background or no nearer
    makes it visible: points on the silhouette, such as the jaw contour, sit where the depth
    buffer jumps between the face and the background.
    """
    h, w = depth.shape
    visible = np.zeros(len(uv), bool)
    for i, ((u, v), zi) in enumerate(zip(uv, z, strict=True)):
        if not (np.isfinite(u) and np.isfinite(v) and -0.5 <= u < w - 0.5 and -0.5 <= v < h - 0.5):
            continue
        c, r = round(u), round(v)
        patch = depth[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
        tol = VISIBILITY_TOLERANCE_MM + 2.0 * camera.pixel_size_mm(zi)
        visible[i] = bool(np.any((patch == 0) | (patch >= zi - tol)))
    return visible


def background(sample: RenderSample, height: int, width: int, config: BackgroundSampling) -> np.ndarray:
    """(H, W, 3) uint8 background of ``sample``: solid, linear gradient or smooth colour noise."""
    c0, c1 = sample.background_colors
    if sample.background_kind == "solid":
        img = np.broadcast_to(c0, (height, width, 3))
    elif sample.background_kind == "gradient":
        a = np.radians(sample.background_angle_deg)
        ys, xs = np.mgrid[0:height, 0:width]
        t = np.cos(a) * xs / max(width - 1, 1) + np.sin(a) * ys / max(height - 1, 1)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
        img = c0 + (c1 - c0) * t[..., None]
    else:
        grid = np.random.default_rng(sample.background_seed).uniform(0.0, 1.0, (config.noise_cells,) * 2 + (3,))
        img = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def composite(rgb: np.ndarray, mask: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Face over background with a one-pixel softened silhouette.

    OSMesa renders without multisampling, so the silhouette is aliased; averaging the 3x3
    neighbourhood along it stands in for anti-aliasing at negligible cost.
    """
    out = np.where(mask[..., None], rgb, bg)
    m = mask.astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(m, kernel) != cv2.erode(m, kernel)
    out[edge] = cv2.blur(out, (3, 3))[edge]
    return out
