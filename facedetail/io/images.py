"""PNG encoding and decoding of uint8/uint16 images in RGB order, without timestamps (equal pixels, equal bytes)."""

from __future__ import annotations

import cv2
import numpy as np


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
