"""Offscreen rendering with pyrender (OSMesa on headless machines, EGL where asked for)."""

from facedetail.render.offscreen import MeshRenderer, configure_gl_platform, import_pyrender

__all__ = ["MeshRenderer", "configure_gl_platform", "import_pyrender"]
