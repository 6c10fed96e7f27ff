"""PNG encoding and decoding of uint8/uint16 images in RGB order, without timestamps (equal pixels, equal bytes)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
from isal import isal_zlib

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


def encode_png(image: np.ndarray, compression: int) -> bytes:
    """PNG bytes of an RGB (H, W, 3), RGBA (H, W, 4) or grey (H, W) uint8/uint16 image; OpenCV writes no timestamps."""
    if image.ndim == 3 and image.shape[2] == 4:
        bgr = image[..., [2, 1, 0, 3]]
    else:
        bgr = image[..., ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes, grey: bool = False, alpha: bool = False) -> np.ndarray:
    """RGB (H, W, 3), RGBA (H, W, 4) with ``alpha`` (of a 4-channel PNG), or grey (H, W) uint8 image."""
    flag = cv2.IMREAD_GRAYSCALE if grey else (cv2.IMREAD_UNCHANGED if alpha else cv2.IMREAD_COLOR)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if image is None:
        raise ValueError("not a decodable image")
    if grey:
        return image
    if alpha:
        if image.ndim != 3 or image.shape[2] != 4:
            raise ValueError(f"expected an RGBA PNG, got shape {image.shape}")
        return image[..., [2, 1, 0, 3]]
    return image[..., ::-1]


def encode_png_fast(image: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of a grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4) uint8 image, 5-10x faster than :func:`encode_png`.

    Every row gets PNG's "Up" filter (one vectorised subtraction; libpng's per-row filter search costs
    as much as the compression on a UV texture) and the stream is deflated by ISA-L (``isal``) at
    ``level`` 0-3. Measured on 1024² UV textures (bench/proxy.py): 4 ms and 430 KB against OpenCV's
    45 ms and 480 KB at zlib level 1. A standard PNG (any decoder reads it); no timestamps, so equal
    pixels give equal bytes for one isal version.
    """
    pixels = np.asarray(image)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or channels not in _COLOUR_TYPE:
        raise ValueError(f"expected a grey, RGB or RGBA uint8 image, got {pixels.dtype} {pixels.shape}")
    h, w = pixels.shape[:2]
    flat = np.ascontiguousarray(pixels).reshape(h, w * channels)
    rows = np.empty((h, 1 + w * channels), np.uint8)
    rows[:, 0] = 2  # filter type Up: each byte minus the one above it (the first row: minus zero)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOUR_TYPE[channels], 0, 0, 0)
    return b"".join([_PNG_MAGIC, _chunk(b"IHDR", header), _chunk(b"IDAT", isal_zlib.compress(rows, level)),
                     _chunk(b"IEND", b"")])


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))
