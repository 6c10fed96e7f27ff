"""Training pairs of the detail network: a photo unwrapped into the UV chart next to its ground-truth displacement.

One pair per photo of a captured item (``<subject>/<expression>/<photo>``), built by
:mod:`facedetail.detail.pairbuild`; this module holds the format, its checked decoding (what training
reads) and the wild photos' unsupervised pairs. Beside the photo's UV texture, a pair holds what the losses
need in the same chart: the ground-truth displacement (mm) and its mask from
``capture_gt``, the proxy (its vertices and normals: the exact position and normal maps in UV are their
barycentric blend over the chart's raster, :func:`proxy_maps`, which is ~500x smaller to store than the
float32 maps and loses nothing), and the photo's SH lighting estimated against the proxy's normals
(:func:`facedetail.detail.shading.estimate_lighting`).

A sample in a WebDataset shard (key: the pair id with ``/`` as ``__``):

* ``texture.png`` RGBA uint8: the UV texture, alpha = visible in the photo;
* ``displacement.png`` uint16: ``d = (png / 65535 · 2 - 1) · displacement_scale_mm`` (as ``capture_gt``'s PNG);
* ``dmask.png`` uint8: 255 where the displacement is valid;
* ``proxy.npy`` (V, 6) float32: the proxy's vertex positions (mm, model frame) and unit vertex normals;
* ``json``: id, subject, expression, photo, resolution, scale, camera, SH estimate, known SH (synthetic), facts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray

from facedetail.capture.maps import displacement_to_u16, u16_to_displacement
from facedetail.detail.shading import estimate_sh
from facedetail.io.hashing import canonical_json
from facedetail.io.images import decode_png, encode_png
from facedetail.model.morphable import MorphableModel
from facedetail.model.uvmap import mm_per_uv
from facedetail.proxy.texture import UVTexels, texel_geometry

TEXTURE, DISPLACEMENT, DMASK, PROXY, META = "texture.png", "displacement.png", "dmask.png", "proxy.npy", "json"
PAIR_FILES = (TEXTURE, DISPLACEMENT, DMASK, PROXY, META)


class PairError(Exception):
    """A photo that cannot become a pair; the message is its quarantine reason (``kind: detail``)."""


@dataclass(frozen=True)
class DetailPair:
    """One pair, decoded."""

    id: str
    subject: str
    texture: NDArray[np.uint8]
    """(R, R, 3) colours of the photo in UV, 0 where not visible."""
    visible: NDArray[np.bool_]
    """(R, R) texel seen in the photo."""
    displacement: NDArray[np.float32] | None
    """(R, R) ground truth in mm along the proxy normal (0 where invalid); None for a wild photo."""
    dmask: NDArray[np.bool_] | None
    """(R, R) where ``displacement`` is valid."""
    proxy: NDArray[np.float32]
    """(V, 6) proxy vertex positions (mm) and unit normals."""
    sh: NDArray[np.float64]
    """(9, 3) estimated SH lighting (texture units: 8-bit value / 255)."""

    @property
    def resolution(self) -> int:
        return int(self.texture.shape[0])


def pair_key(pair_id: str) -> str:
    """The WebDataset key of a pair id (no ``/`` and no ``.`` in a key)."""
    return pair_id.replace("/", "__").replace(".", "_")


def proxy_maps(raster: UVTexels, proxy: NDArray[np.floating]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(R, R, 3) position (mm) and unit normal maps of a proxy over the chart, 0 outside it."""
    pos, nrm = texel_geometry(raster, np.asarray(proxy[:, :3], np.float64), np.asarray(proxy[:, 3:], np.float64))
    return raster.image(pos), raster.image(nrm)


def lighting_estimate(texture: NDArray[np.uint8], visible: NDArray[np.bool_],
                      normal_map: NDArray[np.floating]) -> NDArray[np.float64]:
    """(9, 3) SH lighting of a UV texture against the proxy's normals (see ``estimate_lighting``; the smooth
    albedo is left to training, which needs it per patch)."""
    tex = torch.from_numpy(texture.astype(np.float64) / 255.0).permute(2, 0, 1)[None]
    normals = torch.from_numpy(np.ascontiguousarray(normal_map, np.float64)).permute(2, 0, 1)[None]
    mask = torch.from_numpy(visible)[None, None]
    return estimate_sh(tex, normals, mask)[0].numpy()


def texel_mm(model: MorphableModel, resolution: int) -> float:
    """Mean size of one texel on the face (mm) at ``resolution``."""
    return mm_per_uv(model.mean, model.uv, model.triangles) / resolution


def npy_bytes(array: NDArray[np.generic]) -> bytes:
    """An array as ``.npy`` file bytes (no pickle), for a shard member."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_pair(pair: DetailPair, displacement_scale_mm: float, png_compression: int,
                **facts: Any) -> tuple[dict[str, bytes], int]:
    """A pair as a shard sample (``facts`` go into its JSON), and the count of displacement texels clipped
    by the 16-bit range."""
    pair_id = pair.id
    expression = pair_id.split("/")[1] if pair_id.count("/") >= 1 else ""
    meta = {"id": pair_id, "subject": pair.subject, "expression": expression, "resolution": pair.resolution,
            "displacement_scale_mm": displacement_scale_mm, "sh": np.round(pair.sh, 9).tolist(), **facts}
    rgba = np.dstack([pair.texture, pair.visible.astype(np.uint8) * 255])
    sample = {"__key__": pair_key(pair_id), TEXTURE: encode_png(rgba, png_compression),
              PROXY: npy_bytes(pair.proxy), META: canonical_json(meta).encode()}
    clipped = 0
    if pair.displacement is not None and pair.dmask is not None:
        png16, clipped = displacement_to_u16(np.where(pair.dmask, pair.displacement, 0.0), displacement_scale_mm)
        sample[DISPLACEMENT] = encode_png(png16, png_compression)
        sample[DMASK] = encode_png(pair.dmask.astype(np.uint8) * 255, png_compression)
    return sample, int(clipped)


def _decode_u16(data: bytes) -> NDArray[np.uint16]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 2 or image.dtype != np.uint16:
        raise ValueError("not a 16-bit grey PNG")
    return image


def decode_pair(sample: dict[str, bytes], resolution: int, n_vertices: int) -> DetailPair:
    """A shard sample back as arrays, checked; raises :class:`PairError` with the reason when it is unusable.

    Checks: every file present and decodable, all maps ``resolution``² (mismatched sizes), a finite
    displacement, a non-empty mask, a proxy of ``n_vertices`` finite vertices.
    """
    missing = [name for name in (TEXTURE, PROXY, META) if name not in sample]
    if missing:
        raise PairError(f"incomplete pair: missing {', '.join(missing)}")
    try:
        meta = json.loads(sample[META])
        rgba = decode_png(sample[TEXTURE], alpha=True)
    except Exception as err:  # any undecodable byte string is one reason, not a crash
        raise PairError(f"unreadable texture: {type(err).__name__}: {err}") from None
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise PairError(f"unreadable texture: expected an RGBA 8-bit PNG, got shape {rgba.shape} {rgba.dtype}")
    try:
        proxy = np.load(io.BytesIO(sample[PROXY]), allow_pickle=False)
    except Exception as err:
        raise PairError(f"unreadable proxy: {type(err).__name__}: {err}") from None
    if proxy.shape != (n_vertices, 6) or not np.isfinite(proxy).all():
        raise PairError(f"bad proxy: shape {proxy.shape}, expected ({n_vertices}, 6) finite values")
    displacement = dmask = None
    if DISPLACEMENT in sample:
        try:
            png = _decode_u16(sample[DISPLACEMENT])
            dmask = decode_png(sample[DMASK], grey=True) > 127
        except Exception as err:
            raise PairError(f"unreadable displacement: {type(err).__name__}: {err}") from None
        displacement = u16_to_displacement(png, float(meta["displacement_scale_mm"]))
        if png.shape != dmask.shape:
            raise PairError(f"mismatched sizes: displacement {png.shape}, mask {dmask.shape}")
    shapes = {"texture": rgba.shape[:2]} | ({} if displacement is None else {"displacement": displacement.shape})
    if any(s != (resolution, resolution) for s in shapes.values()):
        raise PairError("mismatched sizes: " + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in shapes.items())
                        + f", chart {resolution}x{resolution}")
    # A 16-bit PNG cannot hold NaN: NaN displacement is refused where the pair is built (pairbuild).
    if dmask is not None and not dmask.any():
        raise PairError("empty mask: no valid ground-truth texel")
    visible = rgba[..., 3] > 127
    if not visible.any():
        raise PairError("empty mask: no texel of the texture is visible")
    sh = np.asarray(meta.get("sh"), np.float64)
    if sh.shape != (9, 3) or not np.isfinite(sh).all():
        raise PairError(f"bad lighting: sh must be 9x3 finite values, not {sh.shape}")
    return DetailPair(str(meta["id"]), str(meta["subject"]), np.ascontiguousarray(rgba[..., :3]), visible,
                      displacement, dmask, proxy.astype(np.float32), sh)


def wild_pair(sample: dict[str, bytes], texture_ext: str, model: MorphableModel, texels: UVTexels) -> DetailPair:
    """A ``wild_proxy`` sample (UV texture + fitted α, β) as an unsupervised pair: no displacement, the SH
    lighting estimated here as for the capture pairs. Raises :class:`PairError` with the reason."""
    try:
        meta = json.loads(sample["json"])
        rgba = decode_png(sample[texture_ext], alpha=True)
        alpha = np.asarray(meta["alpha"], np.float64)
        beta = np.asarray(meta["beta"], np.float64)
    except Exception as err:  # any undecodable sample is one reason, not a crash
        raise PairError(f"unreadable texture: {type(err).__name__}: {err}") from None
    if rgba.shape[:2] != (texels.resolution, texels.resolution):
        raise PairError(f"mismatched sizes: texture {rgba.shape[0]}x{rgba.shape[1]}, chart "
                        f"{texels.resolution}x{texels.resolution} (set wild_proxy's uv_chart alike)")
    visible = rgba[..., 3] > 127
    if not visible.any():
        raise PairError("empty mask: no texel of the texture is visible")
    vertices = model.vertices(alpha, beta).astype(np.float64)
    proxy = np.hstack([vertices, model.vertex_normals(vertices)]).astype(np.float32)
    if not np.isfinite(proxy).all():
        raise PairError("bad proxy: non-finite vertices")
    texture = np.ascontiguousarray(rgba[..., :3])
    _, normal_map = proxy_maps(texels, proxy)
    sh = lighting_estimate(texture, visible, normal_map)
    return DetailPair(str(meta["id"]), str(meta["id"]), texture, visible, None, None, proxy, sh)
