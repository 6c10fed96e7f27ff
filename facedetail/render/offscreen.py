"""Headless mesh rendering with pyrender.

pyrender picks its OpenGL platform from ``PYOPENGL_PLATFORM`` at import time, so this module
sets it (OSMesa unless the user chose ``egl`` or a display is present) before importing
pyrender. Two known incompatibilities of pyrender 0.1.45 are handled here, in one place:
it pins PyOpenGL 3.1.0, which lacks ``OSMesaCreateContextAttribs`` (``make setup`` installs
PyOpenGL >= 3.1.4 over the pin), and its bounds code uses ``np.infty``, removed in NumPy 2.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

from facedetail.errors import FacedetailError


def configure_gl_platform() -> str:
    """Set ``PYOPENGL_PLATFORM`` to ``osmesa`` unless it is set or a display exists; returns it."""
    if "PYOPENGL_PLATFORM" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["PYOPENGL_PLATFORM"] = "osmesa"
    return os.environ.get("PYOPENGL_PLATFORM", "")


def import_pyrender() -> ModuleType:
    """Import pyrender on a configured platform, with a clear error when OSMesa is missing."""
    platform = configure_gl_platform()
    if not hasattr(np, "infty"):
        np.infty = np.inf  # pyrender 0.1.45 still uses the NumPy 1 alias
    try:
        import pyrender
    except (ImportError, AttributeError) as err:
        raise FacedetailError(
            f"pyrender could not start OpenGL on platform {platform!r} ({err}); install Debian's "
            "libosmesa6 (`make setup` does) or set PYOPENGL_PLATFORM=egl on a GPU machine"
        ) from None
    return pyrender


class MeshRenderer:
    """Renders triangle meshes with per-vertex colours through one reusable GL context.

    The camera is orthographic, looking down -z; each call frames the mesh's x/y extent with a
    margin. One directional light from the camera plus ambient light.
    """

    def __init__(self, width: int = 256, height: int = 256, margin: float = 1.1,
                 light_intensity: float = 3.0, ambient: float = 0.35) -> None:
        self._pyrender = import_pyrender()
        self.width, self.height, self.margin = width, height, margin
        self._light_intensity, self._ambient = light_intensity, ambient
        self._renderer = self._pyrender.OffscreenRenderer(width, height)

    def render(self, vertices: np.ndarray, triangles: np.ndarray, colors: np.ndarray,
               background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (H, W, 3), depth float32 (H, W), 0 where empty) of one mesh."""
        pr = self._pyrender
        vertices = np.asarray(vertices, np.float64)
        lo, hi = vertices.min(0), vertices.max(0)
        centre = (lo + hi) / 2.0
        half = max((hi[0] - lo[0]) * self.height / self.width, hi[1] - lo[1]) / 2.0 * self.margin
        colors = np.clip(np.asarray(colors, np.float64), 0, 1)
        rgba = np.column_stack([colors, np.ones(len(colors))])
        mesh = pr.Mesh.from_trimesh(_trimesh(vertices - centre, triangles, rgba), smooth=True)
        scene = pr.Scene(bg_color=[*background, 1.0], ambient_light=[self._ambient] * 3)
        scene.add(mesh)
        depth_range = float(hi[2] - lo[2]) + 10.0
        pose = np.eye(4)
        pose[2, 3] = depth_range
        camera = pr.OrthographicCamera(xmag=half * self.width / self.height, ymag=half, znear=0.1,
                                       zfar=3 * depth_range)
        scene.add(camera, pose=pose)
        scene.add(pr.DirectionalLight(color=np.ones(3), intensity=self._light_intensity), pose=pose)
        color, depth = self._renderer.render(scene)
        return np.ascontiguousarray(color[..., :3]), depth.astype(np.float32)

    def close(self) -> None:
        """Release the GL context."""
        self._renderer.delete()

    def __enter__(self) -> MeshRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _trimesh(vertices: np.ndarray, triangles: np.ndarray, rgba: np.ndarray):
    import trimesh

    return trimesh.Trimesh(vertices, triangles, vertex_colors=(rgba * 255).astype(np.uint8), process=False)
