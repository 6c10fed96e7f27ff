"""Capture extraction on surfaces with a known answer: UV raster, ray-cast displacement, high-pass, normals, ICP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from facedetail.capture.align import AlignConfig, align_scan
from facedetail.capture.extract import (
    ExtractConfig,
    ProxyMaps,
    RayCaster,
    extract_displacement,
    highpass,
    signed_distance,
)
from facedetail.capture.maps import displacement_to_u16, u16_to_displacement
from facedetail.capture.scan import CaptureError, load_mesh
from facedetail.model.uvmap import mm_per_uv, rasterize_uv

SIZE = 100.0  # plane side, mm


def grid(n: int, height=None, size: float = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A square grid mesh in z = height(x, y), its triangles (CCW seen from +z) and UVs (v down)."""
    xs = np.linspace(-size / 2, size / 2, n)
    X, Y = np.meshgrid(xs, xs)
    Z = np.zeros_like(X) if height is None else height(X, Y)
    verts = np.stack([X, Y, Z], -1).reshape(-1, 3)
    i = np.arange(n * n).reshape(n, n)
    a, b, c, d = i[:-1, :-1].ravel(), i[:-1, 1:].ravel(), i[1:, :-1].ravel(), i[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    uv = np.stack([(X.ravel() + size / 2) / size, (size / 2 - Y.ravel()) / size], 1)
    return verts, faces, uv


def bump(X, Y, amp=0.5, cx=5.0, cy=-3.0, sigma=2.0):
    return amp * np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * sigma ** 2))


def plane_proxy(R: int) -> ProxyMaps:
    verts, faces, uv = grid(11)
    raster = rasterize_uv(uv, faces, R)
    return ProxyMaps.from_mesh(raster, verts, faces, uv, np.tile([0.0, 0.0, 1.0], (len(verts), 1)))


def test_raster_covers_each_texel_once_and_interpolates_exactly() -> None:
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    raster = rasterize_uv(uv, faces, 37)
    assert raster.covered.all() and raster.overlap_texels == 0
    np.testing.assert_allclose(raster.interpolate(faces, uv), raster.texel_uv, atol=1e-12)
    on_diagonal = np.eye(37, dtype=bool)  # texel centres on the shared edge go to the lower index
    assert (raster.triangle[on_diagonal] == 0).all()
    folded = rasterize_uv(uv, np.array([[0, 1, 2], [0, 1, 2]]), 16)
    assert folded.overlap_texels > 0


def test_raster_of_the_surrey_layout(sfm_model) -> None:
    raster = rasterize_uv(sfm_model.uv, sfm_model.triangles, 128)
    tri = sfm_model.uv[sfm_model.triangles].astype(np.float64)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()
    assert raster.overlap_texels == 0, "the Surrey UV layout does not fold over"
    assert abs(raster.covered.mean() - area) < 0.01
    # Each texel's barycentrics put its interpolated UV back at its centre.
    got = raster.interpolate(sfm_model.triangles, sfm_model.uv)[raster.covered]
    np.testing.assert_allclose(got, raster.texel_uv[raster.covered], atol=1e-6)


def numpy_rasterize_uv(uv, triangles, R: int, chunk_texels: int = 4_000_000, eps: float = 1e-12):
    """The NumPy rasterizer that the compiled loop replaced (commit 35f44b3), verbatim, as the oracle for
    its bytes: triangles' padded bounding boxes evaluated in chunks, the claims sorted by (texel, triangle)."""
    tri = np.asarray(triangles, np.int64)
    # Continuous texel coordinates: texel centres sit on integers.
    pix = np.asarray(uv, np.float64) * R - 0.5
    corners = pix[tri]  # (T, 3, 2), x = column, y = row
    lo = np.ceil(corners.min(axis=1)).astype(np.int64)
    hi = np.floor(corners.max(axis=1)).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, R - 1)
    size = hi - lo + 1  # (T, 2) bbox width, height in texels
    e1 = corners[:, 1] - corners[:, 0]
    e2 = corners[:, 2] - corners[:, 0]
    area2 = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    live = np.flatnonzero((size > 0).all(axis=1) & (np.abs(area2) > 0))
    # Chunks of triangles with similar bounding boxes, each padded to its largest box.
    order = live[np.argsort(size[live, 0] * size[live, 1], kind="stable")]
    texel_ids, tri_ids, barys, interior = [], [], [], []
    start = 0
    while start < order.size:
        h = w = 1
        stop = start
        while stop < order.size:
            t = order[stop]
            nh, nw = max(h, size[t, 1]), max(w, size[t, 0])
            if (stop - start + 1) * nh * nw > chunk_texels and stop > start:
                break
            h, w, stop = nh, nw, stop + 1
        chunk = order[start:stop]
        start = stop
        rows = lo[chunk, 1, None, None] + np.arange(h)[None, :, None]  # (n, h, 1)
        cols = lo[chunk, 0, None, None] + np.arange(w)[None, None, :]  # (n, 1, w)
        in_box = (rows <= hi[chunk, 1, None, None]) & (cols <= hi[chunk, 0, None, None])
        dx = cols - corners[chunk, 0, 0, None, None]
        dy = rows - corners[chunk, 0, 1, None, None]
        inv = 1.0 / area2[chunk, None, None]
        b1 = (dx * e2[chunk, 1, None, None] - dy * e2[chunk, 0, None, None]) * inv
        b2 = (dy * e1[chunk, 0, None, None] - dx * e1[chunk, 1, None, None]) * inv
        b0 = 1.0 - b1 - b2
        inside = in_box & (b0 >= -eps) & (b1 >= -eps) & (b2 >= -eps)
        n_idx, r_idx, c_idx = np.nonzero(inside)
        rr = rows[n_idx, r_idx, 0]
        cc = cols[n_idx, 0, c_idx]
        texel_ids.append(rr * R + cc)
        tri_ids.append(chunk[n_idx])
        b = np.stack([b0[inside], b1[inside], b2[inside]], axis=1)
        barys.append(np.clip(b, 0.0, 1.0))
        interior.append((b > eps).all(axis=1))
    triangle = np.full(R * R, -1, np.int32)
    bary = np.zeros((R * R, 3))
    overlap = 0
    if texel_ids:
        texel = np.concatenate(texel_ids)
        owner = np.concatenate(tri_ids)
        b_all = np.concatenate(barys)
        strict = np.concatenate(interior)
        # Lowest triangle index wins a texel: sort by (texel, triangle) and keep each texel's first.
        key = np.lexsort((owner, texel))
        texel, owner, b_all, strict = texel[key], owner[key], b_all[key], strict[key]
        first = np.ones(texel.size, bool)
        first[1:] = texel[1:] != texel[:-1]
        triangle[texel[first]] = owner[first]
        bary[texel[first]] = b_all[first] / b_all[first].sum(axis=1, keepdims=True)
        _, claims = np.unique(texel[strict], return_counts=True)
        overlap = int((claims > 1).sum())
    return triangle.reshape(R, R), bary.reshape(R, R, 3), overlap


def assert_same_raster_bytes(uv, triangles, R: int) -> None:
    got = rasterize_uv(uv, triangles, R)
    triangle, bary, overlap = numpy_rasterize_uv(uv, triangles, R)
    assert got.triangle.dtype == triangle.dtype and got.bary.dtype == bary.dtype
    assert got.triangle.tobytes() == triangle.tobytes()
    assert got.bary.tobytes() == bary.tobytes()  # bytes, so -0.0 and 0.0 differ too
    assert got.overlap_texels == overlap


def test_raster_is_the_numpy_rasterizers_bytes_on_hand_made_layouts() -> None:
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ccw, cw = np.array([[0, 1, 2], [0, 2, 3]]), np.array([[0, 2, 1], [0, 3, 2]])
    # Clockwise triangles give -0.0 barycentrics on the shared edge; the bytes must keep their sign.
    assert np.signbit(numpy_rasterize_uv(square, cw, 37)[1]).any()
    rng = np.random.default_rng(3)
    scattered = rng.uniform(-0.2, 1.2, (60, 2))  # off-chart corners, overlaps, zero-area repeats
    cases = [(square, ccw, 37), (square, cw, 37), (square, ccw, 1), (square, np.array([[0, 1, 2], [0, 1, 2]]), 16),
             (scattered, rng.integers(0, 60, (200, 3)), 97)]
    for uv, faces, R in cases:
        assert_same_raster_bytes(uv, faces, R)


@pytest.mark.parametrize("R", [256, 1024])
def test_raster_is_the_numpy_rasterizers_bytes_on_the_surrey_layout(sfm_model, R) -> None:
    assert_same_raster_bytes(sfm_model.uv, sfm_model.triangles, R)


def test_plane_with_a_bump_and_a_dent_gives_them_back() -> None:
    def height(X, Y):
        return bump(X, Y) + bump(X, Y, amp=-0.3, cx=-20.0, cy=15.0, sigma=3.0)

    sv, sf, _ = grid(401, height)
    proxy = plane_proxy(128)
    maps = extract_displacement(proxy, trimesh.Trimesh(sv, sf, process=False),
                                ExtractConfig(highpass_sigma_mm=0.0))
    truth = height(proxy.positions[..., 0], proxy.positions[..., 1])
    assert maps.mask.all() and maps.masked_fraction == 0.0
    # The scan is the bump sampled every 0.25 mm: linear interpolation between its vertices is off
    # by at most h²/8 · max|d''| = 0.25²/8 · 0.5/2² ≈ 0.001 mm.
    assert np.abs(maps.distance - truth).max() < 0.0015
    assert maps.distance.max() == pytest.approx(0.5, abs=0.01) and maps.distance.min() == pytest.approx(-0.3, abs=0.01)


def test_sphere_with_a_radial_bump_gives_it_back() -> None:
    """A latitude-longitude patch of a sphere (r = 80 mm): the proxy's normals now vary, the scan is curved."""
    radius, n_coarse, n_fine = 80.0, 24, 300

    def patch(n: int, lift=None):
        theta = np.linspace(np.radians(60), np.radians(120), n)  # polar angle
        phi = np.linspace(np.radians(-30), np.radians(30), n)
        T, P = np.meshgrid(theta, phi, indexing="ij")
        dirs = np.stack([np.sin(T) * np.sin(P), np.cos(T), np.sin(T) * np.cos(P)], -1)
        r = radius + (0.0 if lift is None else lift(T, P))
        verts = (dirs * np.asarray(r)[..., None]).reshape(-1, 3)
        i = np.arange(n * n).reshape(n, n)
        a, b, c, d = i[:-1, :-1].ravel(), i[:-1, 1:].ravel(), i[1:, :-1].ravel(), i[1:, 1:].ravel()
        faces = np.concatenate([np.stack([a, c, d], 1), np.stack([a, d, b], 1)])
        uv = np.stack([(P.ravel() - phi[0]) / (phi[-1] - phi[0]), (T.ravel() - theta[0]) / (theta[-1] - theta[0])], 1)
        return verts, faces, uv, dirs.reshape(-1, 3)

    def lift(T, P):  # a 0.4 mm radial bump of σ = 3 mm (arc length) at the patch centre
        arc2 = (radius * (T - np.pi / 2)) ** 2 + (radius * P) ** 2
        return 0.4 * np.exp(-arc2 / (2 * 3.0 ** 2))

    cv, cf, cuv, cn = patch(n_coarse)
    sv, sf, _, _ = patch(n_fine, lift)
    raster = rasterize_uv(cuv, cf, 96)
    proxy = ProxyMaps.from_mesh(raster, cv, cf, cuv, cn)
    maps = extract_displacement(proxy, trimesh.Trimesh(sv, sf, process=False), ExtractConfig(highpass_sigma_mm=0.0))
    # Truth at each texel: the scan's radius along the proxy normal, minus the flat proxy's distance
    # to the sphere (its chords lie inside the sphere by up to h²/(8r) = 0.08 mm), so the ray starts
    # below the sphere and the bump rides on that offset.
    p, n = proxy.positions[maps.mask], proxy.normals[maps.mask]
    T = np.arccos(np.clip(n[:, 1], -1, 1))
    P = np.arctan2(n[:, 0], n[:, 2])
    chord_gap = radius - np.einsum("ij,ij->i", p, n)
    truth = chord_gap + lift(T, P)
    assert maps.masked_fraction < 0.01
    assert np.abs(maps.distance[maps.mask] - truth).max() < 0.01
    assert maps.distance.max() > 0.4


def test_highpass_keeps_details_and_removes_a_broad_mismatch() -> None:
    def height(X, Y):  # a 2 mm, σ = 30 mm proxy mismatch plus a 0.3 mm, σ = 1 mm detail
        return bump(X, Y, amp=2.0, cx=0, cy=0, sigma=30.0) + bump(X, Y, amp=0.3, sigma=1.0)

    sv, sf, _ = grid(501, height)
    proxy = plane_proxy(256)
    maps = extract_displacement(proxy, trimesh.Trimesh(sv, sf, process=False), ExtractConfig(highpass_sigma_mm=4.0))
    assert maps.sigma_texels == pytest.approx(4.0 / (SIZE / 256))
    detail = bump(proxy.positions[..., 0], proxy.positions[..., 1], amp=0.3, sigma=1.0)
    expected = highpass(detail, maps.mask, maps.sigma_texels)
    # Away from the border, the high-passed mismatch is ~A·σ²/L² ≈ 2 · 16/900 = 0.036 mm at most.
    inner = np.zeros_like(maps.mask)
    inner[40:-40, 40:-40] = True
    assert np.abs(maps.displacement - expected)[inner].max() < 0.04
    assert np.abs(maps.distance - maps.displacement)[inner].max() > 1.5  # the mismatch was there and is gone


def test_holes_and_out_of_reach_texels_are_masked() -> None:
    sv, sf, suv = grid(201, lambda X, Y: bump(X, Y))
    centroids = suv[sf].mean(axis=1)
    keep = np.linalg.norm(centroids - [0.25, 0.25], axis=1) > 0.1  # a 10 mm hole
    proxy = plane_proxy(64)
    maps = extract_displacement(proxy, trimesh.Trimesh(sv, sf[keep], process=False), ExtractConfig())
    dist = np.linalg.norm(proxy.positions[..., :2] - [-25.0, 25.0], axis=-1)
    assert not maps.mask[dist < 9.0].any()  # a texel whose ray falls through the hole has no hit within reach
    assert maps.mask[dist > 11.0].all()
    assert maps.masked_fraction == pytest.approx(np.pi * 10.0 ** 2 / SIZE ** 2, rel=0.2)
    far = extract_displacement(proxy, trimesh.Trimesh(sv + np.array([0, 0, 6.0]), sf, process=False), ExtractConfig())
    assert far.masked_fraction == 1.0, "a scan 6 mm away is beyond max_distance_mm = 5"


def test_both_ray_backends_agree() -> None:
    pytest.importorskip("rtree", reason="trimesh's NumPy intersector needs rtree")
    sv, sf, _ = grid(61, lambda X, Y: bump(X, Y, sigma=6.0))
    scan = trimesh.Trimesh(sv, sf, process=False)
    proxy = plane_proxy(32)
    p, n = proxy.positions[proxy.covered][:300], proxy.normals[proxy.covered][:300]
    fast = signed_distance(RayCaster(scan, "embree"), p, n, 5.0)
    slow = signed_distance(RayCaster(scan, "triangle"), p, n, 5.0)
    np.testing.assert_allclose(fast, slow, atol=1e-9)


def test_normal_map_tilts_with_the_displacement_slope() -> None:
    proxy = plane_proxy(64)
    slope = 0.1
    ramp = slope * proxy.positions[..., 0]  # d = 0.1 x: the detailed surface is z = 0.1 x
    sv, sf, _ = grid(41, lambda X, Y: slope * X)
    maps = extract_displacement(proxy, trimesh.Trimesh(sv, sf, process=False), ExtractConfig(highpass_sigma_mm=0.0))
    np.testing.assert_allclose(maps.distance, ramp, atol=1e-6)
    expected = np.array([-slope, 0.0, 1.0]) / np.hypot(slope, 1.0)
    np.testing.assert_allclose(maps.normals[maps.mask], np.broadcast_to(expected, (int(maps.mask.sum()), 3)),
                               atol=1e-5)


def test_png_encoding_round_trips_within_half_a_step() -> None:
    d = np.linspace(-2.5, 2.5, 10_001).reshape(1, -1)
    png, clipped = displacement_to_u16(d, 2.0)
    assert png.dtype == np.uint16 and clipped == int((np.abs(d) > 2.0).sum())
    back = u16_to_displacement(png, 2.0)
    inside = np.abs(d) <= 2.0
    assert np.abs(back - d)[inside].max() <= 2.0 / 65535 + 1e-6
    assert back.max() == pytest.approx(2.0) and back.min() == pytest.approx(-2.0)


def test_icp_undoes_a_small_motion_and_rejects_a_backwards_scan() -> None:
    # An elliptic bowl with a bump off its axis: all six degrees of freedom are fixed by the surface.
    sv, sf, _ = grid(121, lambda X, Y: 0.002 * X ** 2 + 0.004 * Y ** 2 + bump(X, Y, amp=3.0, sigma=8.0))
    scan = trimesh.Trimesh(sv, sf, process=False)
    proxy_points = np.asarray(scan.vertices)[::7]
    motion = trimesh.transformations.rotation_matrix(np.radians(2.0), [0.3, 1.0, 0.2], point=[0, 0, 0])
    motion[:3, 3] = [1.5, -2.0, 1.0]
    moved = trimesh.transform_points(scan.vertices, motion)
    moved_normals = np.asarray(scan.vertex_normals) @ motion[:3, :3].T
    result = align_scan(proxy_points, moved, moved_normals, AlignConfig(), np.random.default_rng(0))
    back = trimesh.transform_points(moved, result.transform)
    assert np.abs(back - scan.vertices).max() < 0.02
    assert result.residual_mm < 0.05 < result.residual_before_mm and result.rotation_deg == pytest.approx(2.0, abs=0.05)
    turned = trimesh.transformations.rotation_matrix(np.pi, [0, 1, 0], point=[0, 0, 30.0])
    with pytest.raises(CaptureError, match="alignment failed"):
        align_scan(proxy_points, trimesh.transform_points(scan.vertices, turned),
                   np.asarray(scan.vertex_normals) @ turned[:3, :3].T, AlignConfig(), np.random.default_rng(0))


def test_mm_per_uv_of_a_plane() -> None:
    verts, faces, uv = grid(5)
    assert mm_per_uv(verts, uv, faces) == pytest.approx(SIZE)


def test_an_obj_with_uv_seams_keeps_its_vertex_order(tmp_path: Path) -> None:
    """trimesh splits OBJ vertices at UV seams unless told to keep the file's order; a proxy in the
    model's topology must come back with exactly the file's vertices."""
    path = tmp_path / "seam.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\nvt 0.5 0.5\n"
                    "f 1/1 2/2 3/3\nf 2/5 4/4 3/3\n")
    mesh = load_mesh(path, "proxy")
    np.testing.assert_array_equal(mesh.vertices, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(mesh.faces, [[0, 1, 2], [1, 3, 2]])
