"""A clean detailed surface (a proxy subdivided and displaced along its normal) and its render.

The surface: the proxy mesh is subdivided by :func:`subdivide` (trimesh's crack-free midpoint splits until
no edge is longer than ``edge_mm``), which carries every per-vertex attribute linearly (UV, the proxy's
normals, albedo, ...); each fine vertex then moves along the proxy's interpolated unit normal by a
displacement field evaluated at its UV (:class:`DisplacementField`, e.g.
:class:`facedetail.capture.synthetic.SyntheticDetails`). No noise, holes or misalignment: that is the
scan's business (:func:`facedetail.capture.synthetic.synthesize_scan`, which uses the same subdivision).
Many shapes of one topology (the wild set's faces) share one :class:`SubdivisionMap`: the subdivision of the
mean face as a sparse linear map, applied to each shape.

The shading normal is the proxy's smooth interpolated normal turned by what the displacement changed
(:func:`displace`): the fine vertices lie on the proxy's flat triangles, whose facets would otherwise show.

The render is the image model of :mod:`facedetail.render.faces`: per-vertex ``albedo ⊙ S(n)`` with the SH
shading of :func:`facedetail.render.sh.shade` of the camera-space normals, here the normals of the
*displaced* mesh (so the details show through the shading), rasterized by
:class:`~facedetail.render.offscreen.MeshRenderer`. The projection matrix ``P`` of the render maps the
proxy's model frame (mm) to pixels (:meth:`facedetail.render.camera.Camera.projection_matrix`).

:func:`sh_in_model_frame` re-expresses the camera-frame SH of a render in the model frame, so that
``shade(n_model, sh_model) == shade(R n_model, sh_camera)`` for the normal maps of the UV chart, which are
in the model frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import trimesh
from numpy.typing import ArrayLike, NDArray

from facedetail.model.anchors import LandmarkAnchors, landmark_anchors
from facedetail.model.morphable import MorphableModel
from facedetail.render.camera import Camera, head_pose
from facedetail.render.faces import CAVITY_COLOR, MouthCavity, RenderedFace, background, composite, landmark_visibility
from facedetail.render.offscreen import MeshRenderer
from facedetail.render.sampling import RenderSample, SamplingConfig
from facedetail.render.sh import sh_basis, shade

F64 = NDArray[np.float64]
# Midpoint splits halve edges: 16 rounds reach 1/65536 of the longest proxy edge, far below any edge asked for.
_MAX_ITER = 16


class DisplacementField(Protocol):
    """A displacement along the proxy normal as a function of UV (mm, positive outwards)."""

    def evaluate(self, uv: NDArray[np.float64]) -> NDArray[np.float64]:
        """(M,) displacement in mm at UV points (M, 2)."""
        ...


def subdivide(vertices: ArrayLike, triangles: ArrayLike, max_edge_mm: float,
              attributes: Sequence[ArrayLike] = ()) -> tuple[F64, NDArray[np.int64], list[F64]]:
    """(vertices, faces, attributes) of a mesh split until no edge is longer than ``max_edge_mm``.

    Each split puts one shared vertex at an edge's midpoint (trimesh ``subdivide_to_size``: no cracks),
    and every per-vertex attribute (V, C) is carried to it as the mean of the edge's ends, i.e. linearly
    interpolated; edge lengths are measured on the positions only. The original vertices keep their ids
    (new ones are appended), so anything indexed by proxy vertex ids still points at the same points.
    """
    verts = np.asarray(vertices, np.float64)
    columns = [np.asarray(a, np.float64).reshape(len(verts), -1) for a in attributes]
    stacked = np.hstack([verts, *columns])
    fine, faces = trimesh.remesh.subdivide_to_size(stacked, triangles, max_edge=max_edge_mm, max_iter=_MAX_ITER)
    out, start = [], 3
    for c in columns:
        out.append(fine[:, start:start + c.shape[1]])
        start += c.shape[1]
    return fine[:, :3], faces, out


@dataclass(frozen=True)
class SubdividedProxy:
    """A proxy subdivided to a maximum edge length, with what the displacement needs at every fine vertex."""

    points: F64
    """(N, 3) fine vertex positions (model frame, mm), on the proxy's piecewise-linear surface."""
    faces: NDArray[np.int64]
    """(F, 3) triangles."""
    uv: F64
    """(N, 2) UV coordinates."""
    normals: F64
    """(N, 3) the proxy's vertex normals interpolated and renormalized (the displacement direction)."""
    albedo: F64 | None
    """(N, 3) linear-RGB albedo, if one was carried."""
    n_proxy_vertices: int
    """Vertices of the proxy (the first ``n_proxy_vertices`` fine vertices are the proxy's own)."""


def subdivide_proxy(model: MorphableModel, proxy_vertices: ArrayLike, edge_mm: float,
                    albedo: ArrayLike | None = None) -> SubdividedProxy:
    """The proxy ``proxy_vertices`` (model topology) subdivided to ``edge_mm``, carrying UV, normals and ``albedo``."""
    proxy = np.asarray(proxy_vertices, np.float64)
    attributes = [model.uv.astype(np.float64), model.vertex_normals(proxy).astype(np.float64)]
    if albedo is not None:
        attributes.append(np.asarray(albedo, np.float64))
    points, faces, carried = subdivide(proxy, model.triangles, edge_mm, attributes)
    n = carried[1]
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    return SubdividedProxy(points, faces, carried[0], n, carried[2] if albedo is not None else None, len(proxy))


@dataclass(frozen=True, eq=False)
class SubdivisionMap:
    """A subdivision as a fixed linear map: every fine vertex a weighted sum of (at most 3) proxy vertices.

    Made once from one shape (:func:`subdivision_map`) and applied to any shape of the same topology, it costs
    a sparse product per shape instead of a subdivision (~50x less for the Surrey model at 1 mm); the edges are
    then ``edge_mm`` long on the shape it was made from and stretch with the others (by ~±20 % over ±3σ of
    identity).
    """

    faces: NDArray[np.int64]
    """(F, 3) fine triangles."""
    weights: sp.csr_matrix
    """(N, V) interpolation weights: dyadic fractions (midpoints of midpoints), each row summing to 1."""

    def apply(self, values: ArrayLike) -> F64:
        """(N, C) per-vertex ``values`` (V, C) carried to the fine vertices (linear interpolation)."""
        return np.asarray(self.weights @ np.asarray(values, np.float64))

    def proxy(self, model: MorphableModel, proxy_vertices: ArrayLike,
              albedo: ArrayLike | None = None) -> SubdividedProxy:
        """:func:`subdivide_proxy` of ``proxy_vertices`` through this map."""
        proxy = np.asarray(proxy_vertices, np.float64)
        n = self.apply(model.vertex_normals(proxy).astype(np.float64))
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        return SubdividedProxy(self.apply(proxy), self.faces, self.apply(model.uv), n,
                               None if albedo is None else self.apply(albedo), len(proxy))


def subdivision_map(vertices: ArrayLike, triangles: ArrayLike, edge_mm: float) -> SubdivisionMap:
    """The :func:`subdivide` of ``vertices`` to ``edge_mm`` as a :class:`SubdivisionMap`."""
    verts = np.asarray(vertices, np.float64)
    tri = np.asarray(triangles, np.int64)
    fine, faces, index = trimesh.remesh.subdivide_to_size(verts, tri, max_edge=edge_mm, max_iter=_MAX_ITER,
                                                          return_index=True)
    return _barycentric_map(verts, tri, fine, faces, index)


def uniform_subdivision_map(vertices: ArrayLike, triangles: ArrayLike, levels: int) -> SubdivisionMap:
    """``levels`` rounds of midpoint subdivision (every triangle into 4, trimesh ``subdivide``) as a map.

    Each round adds one vertex per edge: ``V' = V + E``, ``F' = 4F`` (the Surrey model's 3,448 vertices become
    13,632, 54,208 and 216,192 after 1, 2, 3 rounds). UVs and normals carried through the map are linearly
    interpolated: Loop's split without its smoothing, since the points must stay on the proxy's surface. The
    weights depend on the topology only, so a map made from one shape is exact for every shape.
    """
    if not 0 <= levels <= _MAX_ITER:
        raise ValueError(f"levels must be in [0, {_MAX_ITER}]")
    verts = np.asarray(vertices, np.float64)
    tri = np.asarray(triangles, np.int64)
    fine, faces = verts, tri
    for _ in range(levels):
        fine, faces = trimesh.remesh.subdivide(fine, faces)
    # trimesh puts the 4 children of face j at 4j..4j+3 when every face is split: the owner is j // 4^levels.
    owner = np.arange(len(faces)) // (4 ** levels)
    return _barycentric_map(verts, tri, fine, faces, owner)


def _barycentric_map(verts: F64, tri: NDArray[np.int64], fine: F64, faces: NDArray[np.int64],
                     face_owner: NDArray[np.int64]) -> SubdivisionMap:
    """The map of a subdivision whose fine face k lies in proxy triangle ``face_owner[k]``.

    Each fine vertex lies in one proxy triangle (the one its fine faces come from); its barycentric coordinates
    there are its weights. Midpoint splits make them multiples of 2^-16 at most 16 splits deep, so the solved
    values are rounded to that grid: exact.
    """
    owner = np.full(len(fine), -1, np.int64)
    owner[faces.ravel()] = np.repeat(face_owner, 3)
    # A proxy vertex in no triangle (none in a clean model) keeps itself: a degenerate "triangle" of it alone.
    lone = owner < 0
    corners = tri[np.maximum(owner, 0)]
    corners[lone] = np.flatnonzero(lone)[:, None]
    a = verts[corners[:, 0]]
    e1, e2 = verts[corners[:, 1]] - a, verts[corners[:, 2]] - a
    d = fine - a
    g11, g12, g22 = (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)
    r1, r2 = (d * e1).sum(1), (d * e2).sum(1)
    det = np.where(lone, 1.0, g11 * g22 - g12 * g12)
    s, t = (g22 * r1 - g12 * r2) / det, (g11 * r2 - g12 * r1) / det
    step = 2.0 ** -_MAX_ITER
    s, t = np.round(s / step) * step, np.round(t / step) * step
    bary = np.column_stack([1.0 - s - t, s, t])
    weights = sp.csr_matrix((bary.ravel(), (np.repeat(np.arange(len(fine)), 3), corners.ravel())),
                            shape=(len(fine), len(verts)))
    weights.eliminate_zeros()
    if not np.allclose(weights @ verts, fine, atol=1e-6):
        raise ValueError("subdivision_map: fine vertices are not on their proxy triangles")
    return SubdivisionMap(faces, weights)


@dataclass(frozen=True)
class DetailedSurface:
    """A proxy displaced along its normal: the clean detailed surface."""

    vertices: F64
    """(N, 3) displaced positions (model frame, mm)."""
    faces: NDArray[np.int64]
    normals: F64
    """(N, 3) unit shading normals: the proxy's smooth normal turned by the displacement (see :func:`displace`)."""
    albedo: F64 | None
    """(N, 3) per-vertex albedo (None: render in grey 0.7)."""
    displacement: F64
    """(N,) the displacement of each vertex (mm along the proxy normal)."""
    uv: F64
    n_proxy_vertices: int


def vertex_normals(vertices: ArrayLike, faces: ArrayLike) -> F64:
    """(N, 3) unit area-weighted vertex normals (NumPy ``bincount``: ~5x faster than trimesh's, same bits every run)."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    tri = v[f]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # |n| = 2 · area: area-weighted sums
    corners = f.ravel()
    out = np.column_stack([np.bincount(corners, weights=np.repeat(face_n[:, c], 3), minlength=len(v))
                           for c in range(3)])
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def displace(base: SubdividedProxy, field: DisplacementField | None,
             values: NDArray[np.float64] | None = None) -> DetailedSurface:
    """The detailed surface of ``base``: each vertex moved by ``field`` (or precomputed ``values``) along its normal.

    ``field=None`` and no ``values``: the undisplaced subdivided proxy (same sampling, for comparisons).
    """
    if values is None:
        values = np.zeros(len(base.points)) if field is None else np.asarray(field.evaluate(base.uv), np.float64)
    vertices = base.points + values[:, None] * base.normals
    # The fine vertices lie on the proxy's flat triangles, so the displaced mesh's own normals keep the proxy's
    # facets. The shading normal is the proxy's smooth (interpolated) normal turned by what the displacement
    # changed: n_smooth + (n(displaced) - n(undisplaced)), exact to first order in the detail slopes, which
    # is how the proxy renders (Gouraud) plus the details.
    flat = vertex_normals(base.points, base.faces)
    turned = base.normals + (vertex_normals(vertices, base.faces) - flat)
    normals = turned / np.linalg.norm(turned, axis=1, keepdims=True)
    return DetailedSurface(vertices, base.faces, normals, base.albedo, values, base.uv, base.n_proxy_vertices)


def detailed_surface(model: MorphableModel, proxy_vertices: ArrayLike, field: DisplacementField | None,
                     edge_mm: float, albedo: ArrayLike | None = None) -> DetailedSurface:
    """The clean detailed surface of a proxy: subdivided to ``edge_mm``, displaced by ``field``, with ``albedo``."""
    return displace(subdivide_proxy(model, proxy_vertices, edge_mm, albedo), field)


def subdivided_cavity(cavity: MouthCavity, faces: NDArray[np.int64], n_vertices: int) -> MouthCavity:
    """The mouth cavity of a subdivided mesh: the fan over the fine boundary loop through the coarse loop.

    Subdivision keeps the proxy's vertex ids and only inserts midpoints into boundary edges, so the fine
    loop is found by walking the fine boundary from the coarse loop's first vertex.
    """
    directed = np.asarray(faces, np.int64)[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    lo, hi = directed.min(axis=1), directed.max(axis=1)
    _, first, counts = np.unique(lo * n_vertices + hi, return_index=True, return_counts=True)
    boundary = directed[first[counts == 1]]  # an edge of one face only, in that face's direction
    successor = dict(zip(boundary[:, 0].tolist(), boundary[:, 1].tolist(), strict=True))
    start = int(cavity.loop[0])
    loop, v = [start], successor.get(start)
    while v is not None and v != start and len(loop) <= len(boundary):
        loop.append(v)
        v = successor.get(v)
    coarse = set(cavity.loop.tolist())
    if v != start or not coarse <= set(loop):
        raise ValueError("the subdivided mesh's boundary does not contain the mouth loop")
    fine = np.asarray(loop, np.int64)
    fan = np.column_stack([np.roll(fine, -1), fine, np.full(len(fine), n_vertices)])
    return MouthCavity(fine, fan.astype(np.int64))


@dataclass(frozen=True)
class DetailedRender:
    """A render of a detailed surface (before any background)."""

    rgb: NDArray[np.uint8]
    """(H, W, 3) the face's pixels (black where ``mask`` is False)."""
    mask: NDArray[np.bool_]
    depth: NDArray[np.float32]
    """(H, W) camera depth in mm, 0 off the face."""
    projection: F64
    """(3, 4) ``P`` from the proxy's model frame (mm) to pixels (pixel centres at integers)."""


def render_surface(renderer: MeshRenderer, surface: DetailedSurface, camera: Camera, rotation: ArrayLike,
                   translation: ArrayLike, sh: ArrayLike, cavity: MouthCavity | None = None) -> DetailedRender:
    """Render ``surface`` posed by ``(R, t)`` under camera-frame SH ``sh`` (9, 3): ``albedo ⊙ shade(R n, sh)``.

    ``cavity`` (of this surface's topology, see :func:`subdivided_cavity`) closes the mouth as
    :class:`~facedetail.render.faces.FaceRenderer` does, so the background never shows through it.
    """
    R = np.asarray(rotation, np.float64)
    t = np.asarray(translation, np.float64)
    albedo = np.full((len(surface.vertices), 3), 0.7) if surface.albedo is None else surface.albedo
    colors = albedo * shade(surface.normals @ R.T, np.asarray(sh, np.float64))
    cam_vertices = surface.vertices @ R.T + t
    triangles = surface.faces
    if cavity is not None:
        cam_vertices = np.vstack([cam_vertices, cavity.centre(surface.vertices) @ R.T + t])
        colors = np.vstack([colors, CAVITY_COLOR])
        triangles = np.vstack([triangles, cavity.triangles])
    rgb, depth = renderer.render(cam_vertices, triangles, colors, camera)
    return DetailedRender(rgb, depth > 0, depth, camera.projection_matrix(R, t))


def sh_in_model_frame(sh: ArrayLike, rotation: ArrayLike) -> F64:
    """(9, 3) SH coefficients that shade model-frame normals as ``sh`` shades camera-frame normals ``R n``.

    Order-2 SH is closed under rotation, so a 9x9 matrix ``A`` with ``Y(R n) = Y(n) A`` exists; it is solved
    exactly (least squares on 64 directions, which span the 9 functions) and ``A sh`` returned.
    """
    R = np.asarray(rotation, np.float64)
    k = np.arange(64) + 0.5  # a Fibonacci sphere: well spread, deterministic
    z = 1.0 - 2.0 * k / 64
    phi = k * np.pi * (3.0 - np.sqrt(5.0))
    n = np.column_stack([np.sqrt(1.0 - z * z) * np.cos(phi), np.sqrt(1.0 - z * z) * np.sin(phi), z])
    A = np.linalg.lstsq(sh_basis(n), sh_basis(n @ R.T), rcond=None)[0]
    return A @ np.asarray(sh, np.float64)


class DetailedFaceRenderer:
    """:class:`~facedetail.render.faces.FaceRenderer`'s renders of a :class:`RenderSample`, of a detailed face.

    Same camera, pose, albedo, lighting, background, mouth cavity, landmarks and visibility; the mesh is the
    proxy ``model(α, β)`` subdivided to ``edge_mm`` (one :class:`SubdivisionMap`, made on the mean face, for
    every render) and displaced by a detail field.
    """

    def __init__(self, model: MorphableModel, size: int, config: SamplingConfig, edge_mm: float) -> None:
        self.model = model
        self.size = size
        self.config = config
        self.edge_mm = edge_mm
        self.anchors: LandmarkAnchors = landmark_anchors(model)
        self.centre = model.mean.astype(np.float64).mean(axis=0)
        self.map = subdivision_map(model.mean, model.triangles, edge_mm)
        coarse = MouthCavity.of(model)
        self.cavity = None if coarse is None else subdivided_cavity(coarse, self.map.faces, self.map.weights.shape[0])
        self._mesh = MeshRenderer(size, size)

    def camera(self, distance_mm: float) -> Camera:
        cam = self.config.camera
        return Camera.framing(self.size, self.size, cam.projection, cam.fov_deg, distance_mm)

    def render(self, sample: RenderSample, field: DisplacementField | None) -> RenderedFace:
        """Render the face of ``sample`` with the details ``field`` (None: the subdivided proxy, undisplaced)."""
        vertices = self.model.vertices(sample.alpha, sample.beta).astype(np.float64)
        surface = displace(self.map.proxy(self.model, vertices, self.model.albedo(sample.albedo)), field)
        camera = self.camera(sample.distance_mm)
        rotation, translation = head_pose(self.centre, sample.yaw, sample.pitch, sample.roll, sample.distance_mm,
                                          sample.translate_px, camera)
        out = render_surface(self._mesh, surface, camera, rotation, translation, sample.sh, self.cavity)
        image = composite(out.rgb, out.mask, background(sample, self.size, self.size, self.config.background))
        # Landmarks stay on the proxy: the truth describes the proxy, which the details move by < 1 mm.
        cam_landmarks = self.anchors.points(vertices) @ rotation.T + translation
        uv = camera.project(cam_landmarks)
        visible = landmark_visibility(uv, cam_landmarks[:, 2], out.depth, camera)
        return RenderedFace(image, out.mask, out.depth, uv, cam_landmarks[:, 2], visible, camera, rotation,
                            translation)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> DetailedFaceRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
