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
from facedetail.render.camera import Camera


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
    """Renders pre-shaded triangle meshes through one GL context and one reused scene.

    Shading is done before rendering (per-vertex colours, e.g. albedo x SH shading from
    :mod:`facedetail.render.sh`) and the mesh is drawn unlit (pyrender's ``FLAT`` mode): with
    OSMesa's software rasterizer, pyrender's physically based fragment shader costs ~4x the
    whole rest of a frame at 256², while per-vertex shading of a 3,448-vertex face costs
    ~0.1 ms and gives the same Lambertian image up to interpolation. Only the mesh and camera
    nodes change between frames; the context, scene and shader programs are created once.
    """

    def __init__(self, width: int = 256, height: int = 256) -> None:
        self._pyrender = import_pyrender()
        self.width, self.height = width, height
        self._renderer = self._pyrender.OffscreenRenderer(width, height)
        self._renderer._renderer._program_cache = _one_context_program_cache(self._pyrender)
        self._scene = self._pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0], ambient_light=[1.0, 1.0, 1.0])
        self._mesh_node = None
        self._camera_node = None
        self._material = self._pyrender.MetallicRoughnessMaterial(metallicFactor=0.0, roughnessFactor=1.0)

    def render(self, vertices: np.ndarray, triangles: np.ndarray, colors: np.ndarray,
               camera: Camera) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (H, W, 3), depth in mm float32 (H, W), 0 where empty) of one mesh.

        ``vertices`` (V, 3) are in camera coordinates (see :mod:`facedetail.render.camera`),
        ``colors`` (V, 3) are final linear RGB in [0, 1], ``camera`` must match the renderer's size.
        """
        if (camera.width, camera.height) != (self.width, self.height):
            raise ValueError(f"camera is {camera.width}x{camera.height}, renderer is {self.width}x{self.height}")
        pr = self._pyrender
        gl_vertices = np.asarray(vertices, np.float32) * np.float32([1.0, -1.0, -1.0])  # OpenCV -> OpenGL axes
        rgba = np.empty((len(gl_vertices), 4), np.float32)
        rgba[:, :3] = np.clip(colors, 0.0, 1.0)
        rgba[:, 3] = 1.0
        primitive = pr.Primitive(positions=gl_vertices, color_0=rgba, indices=np.asarray(triangles, np.uint32),
                                 material=self._material, mode=pr.constants.GLTF.TRIANGLES)
        if self._mesh_node is not None:
            self._scene.remove_node(self._mesh_node)
        self._mesh_node = self._scene.add(pr.Mesh([primitive]))
        if self._camera_node is not None:
            self._scene.remove_node(self._camera_node)
        self._camera_node = self._scene.add(_pyrender_camera(pr, camera))
        color, depth = self._renderer.render(self._scene, pr.RenderFlags.FLAT)
        if camera.projection == "orthographic":
            depth = _undo_perspective_linearization(depth, camera.near, camera.far)
        return np.ascontiguousarray(color[..., :3]), depth.astype(np.float32)

    @property
    def compiled_programs(self) -> int:
        """Shader programs this renderer holds (stays constant over frames)."""
        return len(self._renderer._renderer._program_cache._program_cache)

    def close(self) -> None:
        """Release the GL context."""
        self._renderer.delete()

    def __enter__(self) -> MeshRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_context_program_cache(pr: ModuleType):
    """A shader-program cache that compiles each program once per renderer.

    pyrender 0.1.45 keys its cache by ``OpenGL.contextdata.getContext()``, which under OSMesa is a
    new ctypes pointer object on every frame: every render compiled a fresh program and the
    cache grew by one program per image (a leak of 90,000 programs over the paper's set). A
    renderer owns exactly one context, so the key can leave the context out.
    """
    from pyrender.shader_program import ShaderProgramCache

    class OneContextProgramCache(ShaderProgramCache):
        def __init__(self) -> None:
            super().__init__()
            self._by_source: dict = {}

        def get_program(self, vertex_shader, fragment_shader, geometry_shader=None, defines=None):
            key = (vertex_shader, fragment_shader, geometry_shader, tuple(sorted((defines or {}).items())))
            if key not in self._by_source:
                self._by_source[key] = super().get_program(vertex_shader, fragment_shader, geometry_shader, defines)
            return self._by_source[key]

        def clear(self) -> None:
            super().clear()
            self._by_source = {}

    return OneContextProgramCache()


def _pyrender_camera(pr: ModuleType, camera: Camera):
    if camera.projection == "perspective":
        yfov = 2.0 * np.arctan((camera.height / 2.0) / camera.focal_px)
        return pr.PerspectiveCamera(yfov=yfov, znear=camera.near, zfar=camera.far,
                                    aspectRatio=camera.width / camera.height)
    return pr.OrthographicCamera(xmag=camera.width / 2.0 / camera.focal_px, ymag=camera.height / 2.0 / camera.focal_px,
                                 znear=camera.near, zfar=camera.far)


def _undo_perspective_linearization(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """Metric depth of an orthographic render: pyrender 0.1.45 linearizes every depth buffer as perspective."""
    out = np.zeros_like(depth, dtype=np.float64)
    hit = depth > 0
    z_ndc = (far + near - 2.0 * near * far / depth[hit].astype(np.float64)) / (far - near)
    out[hit] = near + (z_ndc + 1.0) / 2.0 * (far - near)
    return out.astype(np.float32)
