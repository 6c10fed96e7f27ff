"""Capture-system displacement ground truth: scan pairs to UV displacement maps, and a synthetic capture set.

* :mod:`~facedetail.capture.scan`: the input layout (one folder per subject/expression), loading and checks;
* :mod:`~facedetail.model.uvmap`: exact rasterization of a mesh in its UV space;
* :mod:`~facedetail.capture.align`: rigid alignment of a scan to its proxy (trimmed point-to-plane ICP);
* :mod:`~facedetail.capture.extract`: signed distance along the proxy normal by ray casting, high-pass, normals;
* :mod:`~facedetail.capture.process`: one item end to end, and the accuracy against a known ground truth;
* :mod:`~facedetail.capture.maps`: the output files (float32 mm, 16-bit PNG with its scale) and reading them back;
* :mod:`~facedetail.capture.patches`: 256² training patches at a stride, per face region;
* :mod:`~facedetail.capture.synthetic`: procedural expression-dependent details and synthetic scans;
* :mod:`~facedetail.capture.preview`: the preview sheet.
"""

from facedetail.capture.maps import CaptureMaps, list_items, load_item
from facedetail.capture.patches import LOWER, UPPER, PatchSet, RegionBox, cut_patches, face_regions, patch_origins

__all__ = [
    "LOWER",
    "UPPER",
    "CaptureMaps",
    "PatchSet",
    "RegionBox",
    "cut_patches",
    "face_regions",
    "list_items",
    "load_item",
    "patch_origins",
]
