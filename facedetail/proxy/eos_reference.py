"""eos-py's ``fit_shape_and_pose`` on the Surrey model: the reference our fitter is measured against.

eos fits one image at a time (camera, contour correspondence with occluding edges, identity with
λ_identity, blendshapes by NNLS), in C++. We run it on the same landmarks, in the same face-normalised
frame as ours (facedetail.proxy.evaluate.eos_comparison), and measure its error on the same landmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facedetail.errors import SourceFileError
from facedetail.model.sfm import SFM_REMEDY

SHARE_FILES = ("sfm_shape_3448.bin", "expression_blendshapes_3448.bin", "ibug_to_sfm.txt",
               "sfm_3448_edge_topology.json", "sfm_model_contours.json")


@dataclass(frozen=True)
class EosFit:
    """One eos fit: coefficients and the 2-D positions (image px, y down) of every model vertex."""

    alpha: np.ndarray
    beta: np.ndarray
    projected: np.ndarray
    """(V, 2) all vertices projected with eos's fitted camera."""
    yaw_deg: float
    """eos's ``RenderingParameters.get_yaw_pitch_roll()``, which is in degrees already."""
    pitch_deg: float
    roll_deg: float


class EosFitter:
    """Loads the Surrey model and its fitting files from eos's share folder once; fits images one by one."""

    def __init__(self, share: Path, iterations: int = 5, lambda_identity: float = 30.0) -> None:
        import eos

        for name in SHARE_FILES:
            if not (share / name).is_file():
                raise SourceFileError(share / name, "eos share file missing", SFM_REMEDY)
        self._eos = eos
        shape = eos.morphablemodel.load_model(str(share / "sfm_shape_3448.bin"))
        blendshapes = eos.morphablemodel.load_blendshapes(str(share / "expression_blendshapes_3448.bin"))
        self.model = eos.morphablemodel.MorphableModel(
            shape.get_shape_model(), blendshapes, color_model=eos.morphablemodel.PcaModel(),
            vertex_definitions=None, texture_coordinates=shape.get_texture_coordinates())
        self.mapper = eos.core.LandmarkMapper(str(share / "ibug_to_sfm.txt"))
        self.edges = eos.morphablemodel.load_edge_topology(str(share / "sfm_3448_edge_topology.json"))
        self.contour_landmarks = eos.fitting.ContourLandmarks.load(str(share / "ibug_to_sfm.txt"))
        self.model_contour = eos.fitting.ModelContour.load(str(share / "sfm_model_contours.json"))
        self.iterations = iterations
        self.lambda_identity = lambda_identity

    def fit(self, landmarks: np.ndarray, width: int, height: int) -> EosFit:
        """Fit one face: landmarks (68, 2) in image px (x right, y down) of a width x height image."""
        eos = self._eos
        points = [eos.core.Landmark(str(i + 1), [float(x), float(y)]) for i, (x, y) in enumerate(landmarks)]
        mesh, pose, alpha, beta = eos.fitting.fit_shape_and_pose(
            self.model, points, self.mapper, width, height, self.edges, self.contour_landmarks,
            self.model_contour, num_iterations=self.iterations, lambda_identity=self.lambda_identity)
        verts = np.asarray(mesh.vertices, dtype=np.float64)
        clip = np.c_[verts, np.ones(len(verts))] @ (np.asarray(pose.get_projection()) @
                                                    np.asarray(pose.get_modelview())).T
        ndc = clip[:, :3] / clip[:, 3:]
        # glm::project with eos's viewport (0, height, width, -height): y grows downwards.
        projected = np.c_[width * (ndc[:, 0] * 0.5 + 0.5), height - height * (ndc[:, 1] * 0.5 + 0.5)]
        # get_yaw_pitch_roll() returns degrees (glm::degrees of the rotation's Euler angles); converting
        # them again gave values like -3076°.
        yaw, pitch, roll = (float(v) for v in pose.get_yaw_pitch_roll())
        return EosFit(np.asarray(alpha), np.asarray(beta), projected, yaw, pitch, roll)
