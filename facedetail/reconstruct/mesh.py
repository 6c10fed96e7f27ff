"""From a proxy and a displacement map to files: the detailed mesh (OBJ, binary glTF), the maps as images.

The detailed mesh is the proxy after ``levels`` rounds of midpoint subdivision
(:func:`facedetail.render.detailed.uniform_subdivision_map`: UVs and the proxy's normals interpolated
linearly, the points kept on the proxy's surface), each vertex moved along its interpolated smooth normal
by the displacement sampled bilinearly at its UV (:func:`sample_map`) — the step the original release
left to Blender's Displace modifier.

``displacement.png`` is 16-bit grey: ``mm = value · scale_mm + offset_mm``; both numbers are in a ``tEXt``
chunk of the PNG (``facedetail:displacement``) and in the sidecar ``displacement.json``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import trimesh
from numpy.typing import NDArray
from PIL import Image, PngImagePlugin

from facedetail.capture.maps import displacement_to_u16
from facedetail.io.images import encode_png
from facedetail.model.morphable import MorphableModel
from facedetail.proxy.texture import UVTexels
from facedetail.render.detailed import DetailedSurface, SubdivisionMap, displace, uniform_subdivision_map

PNG_TEXT_KEY = "facedetail:displacement"
U16 = 65535
OBJ_DIGITS = 5
"""Decimals of the OBJ numbers: 10 nm in mm, far below any detail (trimesh's default is 8)."""
TEXTURE_NAME = "texture"
"""Material name of both OBJs: they share one ``texture.png``."""


def sample_map(values: NDArray[np.floating], valid: NDArray[np.bool_], uv: NDArray[np.floating]) -> NDArray[np.float64]:
    """(M,) bilinear samples of an (R, R) UV map at ``uv`` (M, 2), from valid texels only.

    Texel (row, col) has its centre at ``((col + 0.5) / R, (row + 0.5) / R)`` (the chart's convention). Invalid
    texels do not blend in: each sample is the weighted mean of its valid neighbours among the four (the bilinear
    weights renormalised); a point with none gets 0. Exact in float64 (OpenCV's remap rounds positions to 1/32
    texel, 0.2 % of a texel-to-texel step).
    """
    R = values.shape[0]
    uv = np.asarray(uv, np.float64)
    x, y = uv[:, 0] * R - 0.5, uv[:, 1] * R - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    num = np.zeros(len(uv))
    den = np.zeros(len(uv))
    vals = np.asarray(values, np.float64)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            r, c = y0 + dy, x0 + dx
            inside = (r >= 0) & (r < R) & (c >= 0) & (c < R)
            rc, cc = np.clip(r, 0, R - 1), np.clip(c, 0, R - 1)
            w = wy * wx * (inside & valid[rc, cc])
            num += w * np.where(w > 0, vals[rc, cc], 0.0)
            den += w
    return np.divide(num, den, out=np.zeros_like(num), where=den > 1e-12)


class MeshBuilder:
    """Detailed meshes of one model at one density (the subdivision is made once and reused)."""

    def __init__(self, model: MorphableModel, levels: int) -> None:
        self.model, self.levels = model, levels
        self.map: SubdivisionMap = uniform_subdivision_map(model.vertices(), model.triangles, levels)

    @property
    def n_vertices(self) -> int:
        """Vertices of every detailed mesh at this density."""
        return int(self.map.weights.shape[0])

    def detailed(self, proxy_vertices: NDArray[np.floating], displacement: NDArray[np.floating] | None,
                 valid: NDArray[np.bool_] | None) -> DetailedSurface:
        """The proxy subdivided and displaced by the (R, R) map (``None``: the subdivided proxy, undisplaced)."""
        base = self.map.proxy(self.model, proxy_vertices)
        values = None
        if displacement is not None and valid is not None:
            values = sample_map(displacement, valid, base.uv)
        return displace(base, None, values)


def textured_mesh(vertices: NDArray[np.floating], faces: NDArray[np.integer], uv: NDArray[np.floating],
                  texture: NDArray[np.uint8], normals: NDArray[np.floating] | None = None) -> trimesh.Trimesh:
    """A trimesh with UVs and an RGB texture (image rows top-down, so v is flipped for OBJ/glTF's v-up)."""
    uv_up = np.column_stack([uv[:, 0], 1.0 - uv[:, 1]])
    material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(texture), diffuse=(255, 255, 255, 255),
                                                      name=TEXTURE_NAME)
    visual = trimesh.visual.TextureVisuals(uv=uv_up, material=material)
    return trimesh.Trimesh(vertices=np.asarray(vertices, np.float64), faces=np.asarray(faces, np.int64),
                           vertex_normals=None if normals is None else np.asarray(normals, np.float64),
                           visual=visual, process=False)


def obj_files(mesh: trimesh.Trimesh, stem: str) -> dict[str, bytes]:
    """``{stem}.obj`` and ``{stem}.mtl`` as bytes; the material reads ``texture.png`` (:func:`texture_png`).

    The OBJ text is formatted by Arrow's C++ number-to-string casts, not by trimesh's exporter: for a 216,192-vertex
    face trimesh took 2.2 s (Python ``str.format`` per row), this 0.6 s, for the same numbers (5 decimals of mm)."""
    uv = np.asarray(mesh.visual.uv, np.float64)
    normals = np.asarray(mesh.vertex_normals, np.float64)
    faces = np.asarray(mesh.faces, np.int64) + 1
    corner = [pc.cast(pa.array(faces[:, k]), pa.string()) for k in range(3)]
    body = b"".join([
        _lines("v", np.asarray(mesh.vertices, np.float64), OBJ_DIGITS), _lines("vt", uv, 6),
        _lines("vn", normals, OBJ_DIGITS),
        _csv(pc.binary_join_element_wise(pa.scalar("f"), *[pc.binary_join_element_wise(c, c, c, "/") for c in corner],
                                         " ")),
    ])
    header = f"# facedetail: {len(uv)} vertices, {len(faces)} triangles, mm\nmtllib {stem}.mtl\nusemtl {TEXTURE_NAME}\n"
    mtl = (f"newmtl {TEXTURE_NAME}\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\nillum 1\n"
           f"map_Kd {TEXTURE_NAME}.png\n")
    return {f"{stem}.obj": header.encode() + body, f"{stem}.mtl": mtl.encode()}


def texture_png(texture: NDArray[np.uint8]) -> dict[str, bytes]:
    """``texture.png``, the file both OBJs' materials read (zlib level 3: 1024² in ~0.1 s)."""
    return {f"{TEXTURE_NAME}.png": encode_png(texture, 3)}


def _lines(prefix: str, values: NDArray[np.float64], digits: int) -> bytes:
    cols = [pc.cast(pa.array(np.round(values[:, k], digits) + 0.0), pa.string()) for k in range(values.shape[1])]
    return _csv(pc.binary_join_element_wise(pa.scalar(prefix), *cols, " "))


def _csv(lines: pa.Array) -> bytes:
    buf = io.BytesIO()
    pa_csv.write_csv(pa.table({"line": lines}), buf, pa_csv.WriteOptions(include_header=False, quoting_style="none"))
    return buf.getvalue()


def glb_bytes(mesh: trimesh.Trimesh) -> bytes:
    """The mesh (with its texture) as binary glTF."""
    return trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh), include_normals=True)


def chart_mask(texels: UVTexels) -> NDArray[np.bool_]:
    """(R, R) True on the texels the UV chart covers."""
    mask = np.zeros((texels.resolution,) * 2, bool)
    mask[texels.rows, texels.cols] = True
    return mask


def fill_texture(texture: NDArray[np.uint8], visible: NDArray[np.bool_]) -> NDArray[np.uint8]:
    """The texture with hidden texels set to the mean visible colour (so a viewer shows no black holes)."""
    out = texture.copy()
    if visible.any():
        out[~visible] = np.round(texture[visible].reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    return out


@dataclass(frozen=True)
class DisplacementPNG:
    """How ``displacement.png`` stores mm: ``capture_gt``'s 16-bit encoding of ±``range_mm``
    (:func:`facedetail.capture.maps.displacement_to_u16`), written down as ``mm = value · scale_mm + offset_mm``."""

    range_mm: float

    @classmethod
    def for_range(cls, max_abs_mm: float) -> DisplacementPNG:
        """±``max_abs_mm`` over the 16-bit range (0 mm at the middle value)."""
        return cls(max_abs_mm)

    @property
    def scale_mm(self) -> float:
        return 2.0 * self.range_mm / U16

    @property
    def offset_mm(self) -> float:
        return -self.range_mm

    def meta(self) -> dict[str, Any]:
        return {"unit": "mm", "scale_mm": self.scale_mm, "offset_mm": self.offset_mm,
                "formula": "mm = value * scale_mm + offset_mm", "bits": 16}

    def encode(self, displacement_mm: NDArray[np.floating]) -> bytes:
        """16-bit PNG bytes with the scale and offset in a text chunk (values beyond the range are clipped)."""
        values, _ = displacement_to_u16(displacement_mm, self.range_mm)
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_TEXT_KEY, json.dumps(self.meta(), sort_keys=True))
        buf = io.BytesIO()
        Image.fromarray(values).save(buf, format="PNG", pnginfo=info, compress_level=3)
        return buf.getvalue()

    @staticmethod
    def decode(data: bytes) -> NDArray[np.float64]:
        """Millimetres from :meth:`encode`'s bytes, using the scale and offset in the PNG's own text chunk."""
        with Image.open(io.BytesIO(data)) as img:
            meta = json.loads(img.text[PNG_TEXT_KEY])  # type: ignore[attr-defined]
            values = np.asarray(img, np.float64)
        return values * float(meta["scale_mm"]) + float(meta["offset_mm"])


def normal_map_png(normals: NDArray[np.floating], valid: NDArray[np.bool_]) -> bytes:
    """8-bit RGB PNG of unit model-frame normals: ``rgb = (n + 1) / 2 · 255``, (128, 128, 128) where invalid."""
    rgb = np.where(valid[..., None], np.round((np.asarray(normals) + 1.0) * 127.5), 128).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
