"""Tests of the weight-free geometry teacher against analytic planes (CPU, float64 ground truth)."""

from __future__ import annotations

import math

import pytest
import torch

from spatial_forcing.teachers.base import TeacherGrid
from spatial_forcing.teachers.geometry import GeometryConfig, GeometryTeacher

H, W, P = 28, 42, 14  # a 2 x 3 patch grid


def make_k(fx: float = 50.0, fy: float = 60.0, cx: float = 20.5, cy: float = 13.0, s: float = 0.0) -> torch.Tensor:
    return torch.tensor([[fx, s, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def rot_x(deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)


def rot_y(deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)


def pose(rot: torch.Tensor, trans: tuple[float, float, float]) -> torch.Tensor:
    t = torch.eye(4, dtype=torch.float64)
    t[:3, :3] = rot
    t[:3, 3] = torch.tensor(trans, dtype=torch.float64)
    return t


def plane_depth(k: torch.Tensor, normal: torch.Tensor, d: float, cam_to_world: torch.Tensor | None = None,
                h: int = H, w: int = W) -> torch.Tensor:
    """Depth `[h, w]` (float64) of the plane `normal . x = d` (world frame) seen by a camera at `cam_to_world`."""
    t = torch.eye(4, dtype=torch.float64) if cam_to_world is None else cam_to_world
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)
    rays = pix @ torch.linalg.inv(k).T  # camera-frame rays with z = 1
    depth = (d - normal @ t[:3, 3]) / ((rays @ t[:3, :3].T) @ normal)
    assert bool((depth > 0).all())
    return depth


def images_like(depth: torch.Tensor) -> torch.Tensor:
    b, v, h, w = depth.shape
    return torch.full((b, v, 3, h, w), 0.5)


def unit(*xs: float) -> torch.Tensor:
    n = torch.tensor(xs, dtype=torch.float64)
    return n / n.norm()


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def test_fronto_parallel_plane_patch_means():
    k = make_k()
    depth = torch.full((1, 1, H, W), 2.0)
    teacher = GeometryTeacher(patch_size=P)
    points, valid = teacher.patch_points(depth, k[None, None].float())
    assert points.shape == (1, 1, 2, 3, 3) and points.dtype == torch.float32
    assert bool(valid.all())
    # Top-left patch: columns/rows 0..13, mean index 6.5; pixel centres at integer coordinates.
    expected_tl = [(6.5 - 20.5) * 2 / 50, (6.5 - 13.0) * 2 / 60, 2.0]
    torch.testing.assert_close(points[0, 0, 0, 0], torch.tensor(expected_tl), atol=1e-6, rtol=0)
    # Bottom-right patch: columns 28..41 (mean 34.5), rows 14..27 (mean 20.5).
    expected_br = [(34.5 - 20.5) * 2 / 50, (20.5 - 13.0) * 2 / 60, 2.0]
    torch.testing.assert_close(points[0, 0, 1, 2], torch.tensor(expected_br), atol=1e-6, rtol=0)
    # Every patch: ((mean u) - cx) Z / fx, ((mean v) - cy) Z / fy.
    mu = torch.arange(3) * P + 6.5
    mv = torch.arange(2) * P + 6.5
    torch.testing.assert_close(points[0, 0, :, :, 0], ((mu - 20.5) * 2 / 50).expand(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(points[0, 0, :, :, 1], ((mv - 13.0) * 2 / 60)[:, None].expand(2, 3), atol=1e-6, rtol=0)


def test_tilted_plane_points_and_normals():
    k = make_k(fx=55.0, fy=52.0, cx=21.0, cy=14.5, s=0.7)  # skew exercises the full OpenCV model
    n = unit(0.25, -0.3, -1.0)  # oriented towards the camera: n . p < 0 for points in front
    d = float(n @ torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    depth = plane_depth(k, n, d)[None, None].float()
    teacher = GeometryTeacher(patch_size=P)
    points, valid = teacher.patch_points(depth, k[None, None].float())
    assert bool(valid.all())
    residual = points.double() @ n - d
    assert float(residual.abs().max()) < 1e-4
    normals, normal_valid = teacher.patch_normals(depth, k[None, None].float())
    assert bool(normal_valid.all())
    torch.testing.assert_close(normals[0, 0].double(), n.expand(2, 3, 3), atol=1e-4, rtol=0)
    assert bool(((normals.double() * points.double()).sum(-1) < 0).all())  # towards the camera


def test_extrinsics_express_views_in_first_camera_frame():
    k = make_k()
    t0 = pose(rot_y(10.0), (0.3, -0.1, 0.5))
    t1 = t0 @ pose(rot_y(-20.0) @ rot_x(8.0), (0.6, 0.1, 0.3))  # view 1 relative to view 0
    n0 = unit(0.1, 0.2, -1.0)  # the plane in view 0's camera frame
    d0 = float(n0 @ torch.tensor([0.0, 0.0, 2.5], dtype=torch.float64))
    n_w = t0[:3, :3] @ n0
    d_w = d0 + float(n_w @ t0[:3, 3])
    depth = torch.stack([plane_depth(k, n_w, d_w, t0), plane_depth(k, n_w, d_w, t1)])[None].float()
    ks = k.expand(1, 2, 3, 3).float()
    ext = torch.stack([t0, t1])[None].float()
    teacher = GeometryTeacher(patch_size=P)

    points, valid = teacher.patch_points(depth, ks, extrinsics=ext)
    assert bool(valid.all())
    assert float((points.double() @ n0 - d0).abs().max()) < 1e-4
    normals, _ = teacher.patch_normals(depth, ks, extrinsics=ext)
    torch.testing.assert_close(normals[0].double(), n0.expand(2, 2, 3, 3), atol=1e-4, rtol=0)

    own, _ = teacher.patch_points(depth, ks)  # each view in its own camera frame
    torch.testing.assert_close(own[:, 0], points[:, 0], atol=1e-5, rtol=0)  # view 0 unchanged
    # Without poses view 1 lies on another plane: far off view 0's plane, with a normal ~20 degrees away.
    assert float((own[:, 1].double() @ n0 - d0).abs().max()) > 0.2
    own_normals, _ = teacher.patch_normals(depth, ks)
    assert float((own_normals[0, 1].double() @ n0).max()) < math.cos(math.radians(10.0))


# ----------------------------------------------------------------------------------------------
# Validity
# ----------------------------------------------------------------------------------------------

def invalid_depth_map() -> torch.Tensor:
    depth = torch.full((1, 1, H, W), 2.0)
    d = depth[0, 0]
    d[0:7, 0:14] = 0.0                      # patch (0,0): 98 zeros, exactly half valid
    d[0:7, 14:28] = float("inf")            # patch (0,1): 98 + 1 infinite -> 97 valid
    d[7, 14] = float("inf")
    d[3, 30] = float("nan")                 # patch (0,2): one NaN
    d[14:28, 0:14] = 10.5                   # patch (1,0): all beyond far
    d[14:21, 14:28] = -1.0                  # patch (1,1): 98 + 2 negative -> 96 valid
    d[21, 14:16] = -1.0
    d[20, 35] = 10.0                        # patch (1,2): exactly at far is valid
    return depth


def test_invalid_depth_marks_expected_patches():
    k = make_k()[None, None].float()
    depth = invalid_depth_map()
    teacher = GeometryTeacher(patch_size=P, far=10.0, min_valid_fraction=0.5)
    points, valid = teacher.patch_points(depth, k)
    assert valid[0, 0].tolist() == [[True, False, True], [False, False, True]]
    # Half-valid patch: mean over rows 7..13 only (mean v = 10), columns 0..13 (mean u = 6.5).
    expected = [(6.5 - 20.5) * 2 / 50, (10.0 - 13.0) * 2 / 60, 2.0]
    torch.testing.assert_close(points[0, 0, 0, 0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert bool(torch.isfinite(points).all())
    assert bool((points[~valid] == 0).all())

    loose = GeometryTeacher(patch_size=P, far=10.0, min_valid_fraction=0.25)
    _, valid_loose = loose.patch_points(depth, k)
    assert valid_loose[0, 0].tolist() == [[True, True, True], [False, True, True]]


def test_no_reading_is_invalid_as_zero_and_as_lerobots_depth_minimum():
    """A sensor's hole is 0, and LeRobot's depth video decodes it as its lowest code (0.01 m): both are
    invalid under the default `near`; the next 12-bit code is a valid reading."""
    import numpy as np

    from spatial_forcing.data.lerobot.depth import DepthQuantizer

    code0, code1 = DepthQuantizer().dequantize(np.array([0, 1], np.uint16)).tolist()
    assert 0.01 <= code0 < GeometryConfig().near < code1  # 0.0100002 < 0.0105 < 0.01115
    k = make_k()[None, None].float()
    depth = torch.full((1, 1, H, W), 2.0)
    depth[..., :P, :P] = 0.0  # patch (0, 0): no reading
    depth[..., :P, P:2 * P] = code0  # patch (0, 1): LeRobot's no reading
    depth[..., :P, 2 * P:3 * P] = code1  # patch (0, 2): the nearest reading its video holds
    _, valid = GeometryTeacher(patch_size=P).patch_points(depth, k)
    assert valid[0, 0].tolist() == [[False, False, True], [True, True, True]]
    _, valid0 = GeometryTeacher(patch_size=P, near=0.0).patch_points(depth, k)
    assert valid0[0, 0].tolist() == [[False, True, True], [True, True, True]]
    with pytest.raises(ValueError, match="GeometryConfig.near"):
        GeometryConfig(near=20.0)


def test_pad_mask_marks_expected_patches():
    k = make_k()[None, None].float()
    depth = torch.full((1, 1, H, W), 2.0)
    pad = torch.ones(1, 1, H, W, dtype=torch.bool)
    pad[..., 21:] = False  # patch column 1 keeps 7 of 14 columns, column 2 none
    teacher = GeometryTeacher(patch_size=P)
    points, valid = teacher.patch_points(depth, k, pad_mask=pad)
    assert valid[0, 0].tolist() == [[True, True, False], [True, True, False]]
    torch.testing.assert_close(points[0, 0, 0, 1, 0], torch.tensor((17.0 - 20.5) * 2 / 50), atol=1e-6, rtol=0)
    grid = teacher.features(images_like(depth), pad, depth=depth, intrinsics=k)
    assert torch.equal(grid.valid, valid)
    assert bool((grid.feats[~grid.valid] == 0).all())


def test_normals_robust_to_depth_edges_and_isolated_pixels():
    k = make_k()[None, None].float()
    depth = torch.full((1, 1, H, W), 1.0)
    depth[..., 20:] = 3.0        # a depth step inside patch column 1
    depth[..., 14:, 1:14:2] = 0.0  # patch (1,0): every other column invalid -> no pixel has a valid normal
    teacher = GeometryTeacher(patch_size=P)
    normals, normal_valid = teacher.patch_normals(depth, k)
    _, valid = teacher.patch_points(depth, k)
    assert bool(valid.all())  # 98 of 196 valid pixels still make patch (1,0) valid
    assert normal_valid[0, 0].tolist() == [[True, True, True], [False, True, True]]
    facing = torch.tensor([0.0, 0.0, -1.0]).expand(5, 3)
    torch.testing.assert_close(normals[normal_valid], facing, atol=1e-5, rtol=0)
    assert bool((normals[0, 0, 1, 0] == 0).all())


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------

def test_features_shape_values_and_zeros():
    k = make_k()
    depth = torch.full((2, 2, H, W), 2.0)
    depth[1, 0] = 1.5
    depth[0, 1, :14, :14] = float("nan")  # patch (0,0) of view 1 of sample 0 invalid
    ks = k.expand(2, 2, 3, 3).float()
    cfg = GeometryConfig(patch_size=P, num_freqs=3, scale=2.0)
    teacher = GeometryTeacher(cfg)
    assert teacher.dim == cfg.feature_dim == 6 * 3 + 3
    grid = teacher.features(images_like(depth), depth=depth, intrinsics=ks, unrelated_extra="ignored")
    assert isinstance(grid, TeacherGrid)
    assert grid.feats.shape == (2, 2, 2, 3, teacher.dim) and grid.feats.dtype == torch.float32
    assert not grid.feats.requires_grad
    assert grid.valid.sum() == 2 * 2 * 6 - 1 and not bool(grid.valid[0, 1, 0, 0])
    assert bool((grid.feats[0, 1, 0, 0] == 0).all())
    assert bool(torch.isfinite(grid.feats).all())

    points, _ = teacher.patch_points(depth, ks)
    p = points[1, 0, 1, 2].double() / 2.0  # normalised by scale = 2 m
    f = grid.feats[1, 0, 1, 2].double()
    for axis in range(3):
        for j in range(3):
            angle = 2.0 ** j * math.pi * float(p[axis])
            assert f[6 * axis + j].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert f[6 * axis + 3 + j].item() == pytest.approx(math.cos(angle), abs=1e-5)
    # Hand value for frequency k=1 (2 pi) of x: X = (34.5 - 20.5) * 1.5 / 50 = 0.42 m -> c = 0.21.
    assert f[1].item() == pytest.approx(math.sin(2 * math.pi * 0.21), abs=1e-5)
    torch.testing.assert_close(grid.feats[grid.valid][:, 18:], torch.tensor([0.0, 0.0, -1.0]).expand(23, 3),
                               atol=1e-5, rtol=0)


def test_feature_dim_options():
    assert GeometryConfig().feature_dim == 6 * 8 + 3
    assert GeometryConfig(num_freqs=4, normals=False).feature_dim == 24
    cfg = GeometryConfig(patch_size=P, num_freqs=2, normals=False, include_points=True, scale=4.0)
    teacher = GeometryTeacher(cfg)
    depth = torch.full((1, 1, H, W), 2.0)
    k = make_k()[None, None].float()
    grid = teacher.features(images_like(depth), depth=depth, intrinsics=k)
    assert grid.feats.shape[-1] == teacher.dim == 15
    points, _ = teacher.patch_points(depth, k)
    torch.testing.assert_close(grid.feats[..., 12:], points / 4.0)


def test_teacher_is_frozen():
    teacher = GeometryTeacher()
    teacher.train()
    assert teacher.name == "geometry" and not teacher.training
    assert list(teacher.parameters()) == []


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    teacher = GeometryTeacher(patch_size=P)
    depth = torch.full((1, 1, H, W), 2.0)
    imgs = images_like(depth)
    k = make_k()[None, None].float()
    with pytest.raises(ValueError, match="depth"):
        teacher.features(imgs, intrinsics=k)
    with pytest.raises(ValueError, match="intrinsics"):
        teacher.features(imgs, depth=depth)
    with pytest.raises(ValueError, match=r"depth: expected shape \(1, 1, 28, 42\)"):
        teacher.features(imgs, depth=depth[..., :14], intrinsics=k)
    with pytest.raises(ValueError, match="depth: expected rank 4"):
        teacher.features(imgs, depth=depth[0], intrinsics=k)
    with pytest.raises(TypeError, match="depth"):
        teacher.features(imgs, depth=depth.long(), intrinsics=k)
    with pytest.raises(ValueError, match=r"intrinsics: expected shape \(1, 1, 3, 3\)"):
        teacher.features(imgs, depth=depth, intrinsics=k[0])
    singular = k.clone()
    singular[..., 0, 0] = 0.0
    with pytest.raises(ValueError, match="intrinsics: singular"):
        teacher.features(imgs, depth=depth, intrinsics=singular)
    nan_k = k.clone()
    nan_k[..., 0, 2] = float("nan")
    with pytest.raises(ValueError, match="intrinsics: found non-finite"):
        teacher.features(imgs, depth=depth, intrinsics=nan_k)
    with pytest.raises(ValueError, match="extrinsics"):
        teacher.features(imgs, depth=depth, intrinsics=k, extrinsics=torch.eye(4))
    with pytest.raises(TypeError, match="pad_mask"):
        teacher.features(imgs, torch.ones(1, 1, H, W), depth=depth, intrinsics=k)
    odd = torch.full((1, 1, 30, W), 2.0)
    with pytest.raises(ValueError, match=r"patch_size.*30 x 42"):
        teacher.features(images_like(odd), depth=odd, intrinsics=k)
    with pytest.raises(ValueError, match="patch_size"):
        GeometryConfig(patch_size=0)
    with pytest.raises(ValueError, match="min_valid_fraction"):
        GeometryConfig(min_valid_fraction=1.5)


# ---------------------------------------------------------------- sf teacher-features at any size (issue 21)
def _frame_files(tmp_path, side=256):
    """A 256-px view of a fronto-parallel plane at 1.5 m with a box at 0.8 m, like a LIBERO frame."""
    import json

    import numpy as np
    from PIL import Image

    depth = np.full((side, side), 1.5, np.float32)
    depth[100:160, 60:140] = 0.8
    k = [[220.0, 0.0, side / 2 - 0.5], [0.0, 220.0, side / 2 - 0.5], [0.0, 0.0, 1.0]]
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(tmp_path / "view.png")
    np.save(tmp_path / "depth.npy", depth)
    (tmp_path / "K.json").write_text(json.dumps(k))
    return ["--images", tmp_path / "view.png", "--depth", tmp_path / "depth.npy", "--intrinsics", tmp_path / "K.json"]


@pytest.mark.parametrize("fit, grid, valid", [([], 18, 18 * 18), (["--image-size", "224"], 16, 256),
                                              (["--fit", "pad"], 19, 18 * 18)])
def test_teacher_features_take_a_256_px_frame(tmp_path, capsys, fit, grid, valid):
    from spatial_forcing.cli import main
    from spatial_forcing.teachers.io import load_grid

    files = _frame_files(tmp_path)
    out = tmp_path / "f.safetensors"
    assert main(["teacher-features", "--teacher", "geometry", *map(str, files), *fit, "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "fit " in capsys.readouterr().out
    g = load_grid(out)
    assert g.feats.shape == (1, 1, grid, grid, 51) and int(g.valid.sum()) == valid
    if fit == ["--fit", "pad"]:  # the last row and column hold padding: invalid, zero features
        assert not g.valid[0, 0, -1].any() and not g.valid[0, 0, :, -1].any() and g.valid[0, 0, :-1, :-1].all()
        assert float(g.feats[0, 0, -1].abs().max()) == 0.0


def test_fit_to_patches_keeps_the_camera():
    """Resizing rescales K with pixel centres at +0.5: the image edges back-project to the same rays."""
    from spatial_forcing.teachers.io import fit_to_patches

    k = torch.tensor([[[[220.0, 0.0, 127.5], [0.0, 230.0, 120.0], [0.0, 0.0, 1.0]]]])
    images, depth = torch.zeros(1, 1, 3, 256, 256), torch.rand(1, 1, 256, 256) + 0.5
    _, d2, k2, pad, _ = fit_to_patches(images, depth, k, 14)
    assert d2.shape[-2:] == (252, 252) and pad is None
    assert set(d2.unique().tolist()) <= set(depth.unique().tolist())  # nearest: no interpolated depths
    for side_old, side_new in ((-0.5, -0.5), (255.5, 251.5)):
        for axis in (0, 1):  # x: fx, cx; y: fy, cy
            ray_old = (side_old - k[0, 0, axis, 2]) / k[0, 0, axis, axis]
            ray_new = (side_new - k2[0, 0, axis, 2]) / k2[0, 0, axis, axis]
            assert abs(float(ray_old - ray_new)) < 1e-6
    _, d3, k3, pad, _ = fit_to_patches(images, depth, k, 14, mode="pad")
    assert d3.shape[-2:] == (266, 266) and torch.equal(k3, k) and int(pad.sum()) == 256 * 256


def test_teacher_features_refuses_files_that_are_not_what_they_claim(tmp_path, capsys):
    """`sf teacher-features --teacher geometry` with a view that is no image, or depth / intrinsics files that
    are not arrays of numbers: one line on stderr naming the file, exit status 2, nothing written."""
    import numpy as np

    from spatial_forcing.cli import main

    good = dict(zip(*[iter(map(str, _frame_files(tmp_path)))] * 2))  # --images / --depth / --intrinsics
    (tmp_path / "notes.png").write_text("a text file named like an image\n")
    (tmp_path / "cut.png").write_bytes((tmp_path / "view.png").read_bytes()[:60])
    (tmp_path / "notes.npy").write_text("a text file named like an array\n")
    np.save(tmp_path / "words.npy", np.full((256, 256), "far"))
    np.save(tmp_path / "objects.npy", np.array([{"depth": 1.5}], dtype=object), allow_pickle=True)
    (tmp_path / "K.npy").write_bytes(b"\x00garbage")
    (tmp_path / "cut.json").write_text("[[220.0, 0.0,")
    (tmp_path / "words.json").write_text('[["fx", 0, 127.5], [0, 220, 127.5], [0, 0, 1]]')
    depth = "expected a depth map (.npy array of metres)"
    cases = [("--images", "notes.png", "notes.png: not a readable image"),
             ("--images", "cut.png", "cut.png: not a readable image"),
             ("--depth", "notes.npy", f"notes.npy: {depth}, found a file that is not a .npy array"),
             ("--depth", "words.npy", "words.npy: expected a depth map of real numbers"),
             ("--depth", "objects.npy", f"objects.npy: {depth}, found an unreadable .npy file"),
             ("--intrinsics", "K.npy", "K.npy: expected intrinsics"),
             ("--intrinsics", "cut.json", "cut.json: expected intrinsics as a JSON list of rows"),
             ("--intrinsics", "words.json", "words.json: expected intrinsics of numbers")]
    before = sorted(p.name for p in tmp_path.iterdir())
    for option, name, message in cases:
        argv = [x for k, v in {**good, option: str(tmp_path / name)}.items() for x in (k, v)]
        assert main(["teacher-features", "--teacher", "geometry", *argv, "--device", "cpu",
                     "--out", str(tmp_path / "f.safetensors")]) == 2, name
        out, err = capsys.readouterr()
        assert err.startswith("sf teacher-features: error: ") and err.count("\n") == 1, err
        assert message in err, err
        assert "Traceback" not in out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no feature file, nothing else
