"""A weight-free teacher: per-patch 3-D geometry from metric depth and camera intrinsics.

    features(images [B,V,3,H,W], pad_mask [B,V,H,W] | None,
             depth=[B,V,H,W], intrinsics=[B,V,3,3], extrinsics=[B,V,4,4] | None) -> TeacherGrid

Conventions
-----------
* Depth is metric (metres) along the optical axis (the camera-frame Z of the surface point), one value
  per pixel of the same `H x W` grid as the images.
* Intrinsics are pixel-unit OpenCV matrices `K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]` for that grid,
  with `fx, fy > 0`. Pixel `(u, v)` (u = column, v = row) has its centre at the integer coordinates
  `(u, v)` (OpenCV convention, no half-pixel shift), so its back-projection is
  `Y = (v - cy) Z / fy` and `X = (u - cx - s (v - cy) / fy) Z / fx` (= `(u - cx) Z / fx` without skew).
* Camera axes are OpenCV: x right, y down, z forward.
* Extrinsics (optional) are camera-to-world 4x4 matrices in OpenCV camera axes. When given, every view's
  points and normals are expressed in the FIRST view's camera frame: `p_0 = inv(T_0) @ T_v @ p_v`.
  Without them each view stays in its own camera frame.
* A pixel is valid iff its depth is finite, `> near` and `<= far`, and `pad_mask` (if any) is True there.
  `near` (1.05 cm) makes a sensor's "no reading" invalid both as 0 and as LeRobot's depth video decodes it:
  its lowest code, the 0.01 m minimum (0.0100002 after float32 rounding; the next code is 0.01115 m).
  A patch is valid (True) iff it holds at least one valid pixel and at least
  `min_valid_fraction * patch_size**2` of them; its point is the mean of its valid pixels' points.

Features (width `GeometryConfig.feature_dim`, float32), in this order:
1. sin-cos encoding of the patch point `c = p / scale`: for each of x, y, z a block of
   `[sin(f_0 c), ..., sin(f_{K-1} c), cos(f_0 c), ..., cos(f_{K-1} c)]` with `f_k = 2^k * pi`,
   `K = num_freqs` -> `6 K` values;
2. if `include_points`: the raw normalised point `p / scale` (3 values);
3. if `normals`: the raw unit surface normal (3 values), see `GeometryTeacher.patch_normals`.
Invalid patches have all-zero features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Teacher, TeacherGrid, check_images, check_pad_mask

_K_TOL = 1e-5        # tolerance on the fixed entries of K (zeros below the diagonal, K[2,2] = 1)
_T_TOL = 1e-5        # tolerance on the bottom row (0, 0, 0, 1) of an extrinsic matrix
_NORMAL_EPS = 1e-12  # minimum norm of a depth-normalised cross product / a summed patch normal


@dataclass
class GeometryConfig:
    """Settings of the geometry teacher (lengths in metres).

    patch_size: side of a square patch in pixels; H and W must be multiples of it.
    far: depths beyond this are invalid (`Z > far`).
    near: depths at or below this are invalid (`Z <= near`): 0 (no reading), and LeRobot's depth video,
        which stores no reading as its lowest code, 0.01 m (half a code above it by default).
    min_valid_fraction: a patch is valid iff at least this fraction of its pixels is valid (and >= 1 pixel).
    num_freqs: number of sin-cos frequencies `2^k * pi`, k = 0..num_freqs-1.
    scale: coordinates are divided by this many metres before encoding.
    normals: append the per-patch unit surface normal (3 raw values).
    include_points: append the raw normalised point `p / scale` (3 values).
    normal_max_jump: neighbouring pixels whose depths differ by more than this fraction of the
        centre pixel's depth are treated as a depth edge and give no normal.
    """

    patch_size: int = 14
    far: float = 10.0
    near: float = 0.0105
    min_valid_fraction: float = 0.5
    num_freqs: int = 8
    scale: float = 1.0
    normals: bool = True
    include_points: bool = False
    normal_max_jump: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"GeometryConfig.patch_size: expected a positive int, got {self.patch_size!r}")
        if not (self.far > 0):
            raise ValueError(f"GeometryConfig.far: expected a positive distance in metres, got {self.far!r}")
        if not (0.0 <= self.near < self.far):
            raise ValueError(f"GeometryConfig.near: expected a distance in [0, far={self.far!r}) metres, got {self.near!r}")
        if not (0.0 <= self.min_valid_fraction <= 1.0):
            raise ValueError(f"GeometryConfig.min_valid_fraction: expected a value in [0, 1], "
                             f"got {self.min_valid_fraction!r}")
        if not isinstance(self.num_freqs, int) or self.num_freqs < 0:
            raise ValueError(f"GeometryConfig.num_freqs: expected a non-negative int, got {self.num_freqs!r}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"GeometryConfig.scale: expected a positive finite length, got {self.scale!r}")
        if not (self.normal_max_jump > 0):
            raise ValueError(f"GeometryConfig.normal_max_jump: expected a positive fraction, "
                             f"got {self.normal_max_jump!r}")
        if self.feature_dim < 1:
            raise ValueError("GeometryConfig: num_freqs = 0 with normals and include_points off gives no features")

    @property
    def feature_dim(self) -> int:
        """Feature width: `6 * num_freqs + 3 * include_points + 3 * normals`."""
        return 6 * self.num_freqs + 3 * int(self.include_points) + 3 * int(self.normals)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------

def _check_depth(depth: object, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Validate metric depth `[B,V,H,W]` (float) and return it as float32."""
    if depth is None:
        raise ValueError("depth: the geometry teacher needs metric depth [B,V,H,W] in metres "
                         "(pass depth=... to features), got None")
    if not isinstance(depth, torch.Tensor):
        raise TypeError(f"depth: expected a torch.Tensor [B,V,H,W], got {type(depth).__name__}")
    if depth.ndim != 4:
        raise ValueError(f"depth: expected rank 4 [B,V,H,W], got rank {depth.ndim} with shape {tuple(depth.shape)}")
    if shape is not None and tuple(depth.shape) != tuple(shape):
        raise ValueError(f"depth: expected shape {tuple(shape)} (matching the images), got {tuple(depth.shape)}")
    if not depth.is_floating_point():
        raise TypeError(f"depth: expected a floating point tensor in metres, got dtype {depth.dtype}")
    if min(depth.shape) < 1:
        raise ValueError(f"depth: expected non-empty batch, views and image sides, got shape {tuple(depth.shape)}")
    return depth.float()


def _check_intrinsics(intrinsics: object, b: int, v: int) -> torch.Tensor:
    """Validate pixel-unit OpenCV intrinsics `[B,V,3,3]` and return them as float32."""
    if intrinsics is None:
        raise ValueError(f"intrinsics: the geometry teacher needs pixel-unit camera matrices [B,V,3,3] = "
                         f"{(b, v, 3, 3)} (pass intrinsics=... to features), got None")
    if not isinstance(intrinsics, torch.Tensor):
        raise TypeError(f"intrinsics: expected a torch.Tensor [B,V,3,3], got {type(intrinsics).__name__}")
    if tuple(intrinsics.shape) != (b, v, 3, 3):
        raise ValueError(f"intrinsics: expected shape {(b, v, 3, 3)} [B,V,3,3], got {tuple(intrinsics.shape)}")
    if not intrinsics.is_floating_point():
        raise TypeError(f"intrinsics: expected a floating point tensor, got dtype {intrinsics.dtype}")
    k = intrinsics.float()
    if not bool(torch.isfinite(k).all()):
        raise ValueError("intrinsics: found non-finite (NaN/inf) entries")
    fx, fy = k[..., 0, 0], k[..., 1, 1]
    if not bool(((fx > 0) & (fy > 0)).all()):
        raise ValueError(f"intrinsics: singular or flipped camera matrix, expected fx > 0 and fy > 0, "
                         f"found fx in [{float(fx.min()):.4g}, {float(fx.max()):.4g}], "
                         f"fy in [{float(fy.min()):.4g}, {float(fy.max()):.4g}]")
    fixed = torch.stack([k[..., 1, 0], k[..., 2, 0], k[..., 2, 1], k[..., 2, 2] - 1.0], dim=-1)
    if not bool((fixed.abs() <= _K_TOL).all()):
        raise ValueError("intrinsics: expected OpenCV form [[fx, s, cx], [0, fy, cy], [0, 0, 1]], found a matrix "
                         f"whose entries K[1,0], K[2,0], K[2,1], K[2,2]-1 reach {float(fixed.abs().max()):.4g}")
    return k


def _check_extrinsics(extrinsics: object, b: int, v: int) -> torch.Tensor | None:
    """Validate camera-to-world matrices `[B,V,4,4]` and return them as float32 (or None)."""
    if extrinsics is None:
        return None
    if not isinstance(extrinsics, torch.Tensor):
        raise TypeError(f"extrinsics: expected a torch.Tensor [B,V,4,4] or None, got {type(extrinsics).__name__}")
    if tuple(extrinsics.shape) != (b, v, 4, 4):
        raise ValueError(f"extrinsics: expected shape {(b, v, 4, 4)} [B,V,4,4] camera-to-world, "
                         f"got {tuple(extrinsics.shape)}")
    if not extrinsics.is_floating_point():
        raise TypeError(f"extrinsics: expected a floating point tensor, got dtype {extrinsics.dtype}")
    t = extrinsics.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError("extrinsics: found non-finite (NaN/inf) entries")
    bottom = t[..., 3, :] - torch.tensor([0.0, 0.0, 0.0, 1.0], device=t.device)
    if not bool((bottom.abs() <= _T_TOL).all()):
        raise ValueError(f"extrinsics: expected a bottom row (0, 0, 0, 1), found a deviation of "
                         f"{float(bottom.abs().max()):.4g}")
    if not bool((torch.linalg.det(t[..., :3, :3]).abs() > 1e-8).all()):
        raise ValueError("extrinsics: found a singular rotation block")
    return t


def _check_patch_grid(h: int, w: int, patch: int) -> tuple[int, int]:
    """Return the patch grid `(H/p, W/p)`, or raise if a side is not a multiple of `patch_size`."""
    if h % patch or w % patch:
        raise ValueError(f"patch_size: image sides must be multiples of patch_size={patch}, got H x W = {h} x {w} "
                         f"(expected e.g. {max(patch, h - h % patch)} x {max(patch, w - w % patch)})")
    return h // patch, w // patch


# ----------------------------------------------------------------------------------------------
# Geometry helpers (all float32, on the depth's device)
# ----------------------------------------------------------------------------------------------

def backproject(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-frame points `[B,V,H,W,3]` of every pixel, pixel `(u, v)` centred at integer `(u, v)`.

    `Y = (v - cy) Z / fy`, `X = (u - cx - s (v - cy) / fy) Z / fx`, `Z = depth` (OpenCV axes, metres).
    Non-finite depths give non-finite points; callers mask them.
    """
    _, _, h, w = depth.shape
    k = intrinsics[..., None, None, :, :]  # [B,V,1,1,3,3]
    fx, fy, s, cx, cy = k[..., 0, 0], k[..., 1, 1], k[..., 0, 1], k[..., 0, 2], k[..., 1, 2]
    u = torch.arange(w, dtype=torch.float32, device=depth.device)[None, :]
    v = torch.arange(h, dtype=torch.float32, device=depth.device)[:, None]
    ry = (v - cy) / fy
    rx = (u - cx - s * ry) / fx
    return torch.stack([rx * depth, ry * depth, depth], dim=-1)


def relative_poses(extrinsics: torch.Tensor) -> torch.Tensor:
    """`inv(T_0) @ T_v` for every view: `[B,V,4,4]` maps view-v camera points into view 0's frame."""
    first = extrinsics[:, :1].expand_as(extrinsics)
    return torch.linalg.solve(first, extrinsics)


def pixel_normals(points: torch.Tensor, valid: torch.Tensor, max_jump: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel unit normals `[B,V,H,W,3]` and their validity `[B,V,H,W]` in each view's camera frame.

    At pixel `(u, v)` the normal is `dy x dx` with forward differences `dx = P(u+1, v) - P(u, v)` and
    `dy = P(u, v+1) - P(u, v)`, flipped if needed so that it points towards the camera (`n . P < 0`).
    It is valid iff the three pixels are valid and neither neighbour's depth differs from `Z(u, v)` by
    more than `max_jump * Z(u, v)` (a depth edge). The last row and column have no normal.
    """
    p00, p01, p10 = points[..., :-1, :-1, :], points[..., :-1, 1:, :], points[..., 1:, :-1, :]
    z = p00[..., 2:3]
    ok = valid[..., :-1, :-1] & valid[..., :-1, 1:] & valid[..., 1:, :-1]
    ok &= ((p01[..., 2:3] - z).abs() <= max_jump * z).squeeze(-1)
    ok &= ((p10[..., 2:3] - z).abs() <= max_jump * z).squeeze(-1)
    safe_z = torch.where(ok[..., None], z, torch.ones_like(z))
    # Dividing by Z (> 0) keeps the direction and makes the cross product's size depth-independent.
    dx = torch.where(ok[..., None], (p01 - p00) / safe_z, torch.zeros_like(z))
    dy = torch.where(ok[..., None], (p10 - p00) / safe_z, torch.zeros_like(z))
    n = torch.linalg.cross(dy, dx, dim=-1)
    norm = n.norm(dim=-1, keepdim=True)
    ok &= (norm > _NORMAL_EPS).squeeze(-1)
    n = torch.where(ok[..., None], n / norm.clamp_min(_NORMAL_EPS), torch.zeros_like(n))
    facing = (n * torch.where(ok[..., None], p00, torch.zeros_like(p00))).sum(-1, keepdim=True)
    n = torch.where(facing > 0, -n, n)
    n = torch.nn.functional.pad(n, (0, 0, 0, 1, 0, 1))  # zero last column and row
    ok = torch.nn.functional.pad(ok, (0, 1, 0, 1), value=False)
    return n, ok


def patch_sum(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Sum `[B,V,H,W,C]` over non-overlapping `patch x patch` blocks -> `[B,V,H/p,W/p,C]`."""
    b, v, h, w, c = x.shape
    return x.view(b, v, h // patch, patch, w // patch, patch, c).sum(dim=(3, 5))


def sincos_encode(coords: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """`[..., 3]` -> `[..., 6 * num_freqs]`: per coordinate `[sin(f_k c)]_k, [cos(f_k c)]_k`, `f_k = 2^k pi`."""
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32, device=coords.device)
    angles = coords[..., None] * freqs  # [..., 3, K]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------

class GeometryTeacher(Teacher):
    """Frozen, weight-free teacher whose patch features encode metric 3-D geometry (module docstring)."""

    name = "geometry"
    needs_depth = True

    def __init__(self, config: GeometryConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is not None and overrides:
            raise ValueError(f"GeometryTeacher: pass either a GeometryConfig or keyword overrides, "
                             f"not both (got overrides {sorted(overrides)})")
        self.config = config if config is not None else GeometryConfig(**overrides)
        self.dim = self.config.feature_dim
        self.freeze()

    # -- geometry ------------------------------------------------------------------------------

    def _pixel_geometry(self, depth: torch.Tensor, intrinsics: torch.Tensor,
                        pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Camera-frame pixel points `[B,V,H,W,3]` (0 where invalid) and pixel validity `[B,V,H,W]`."""
        valid = torch.isfinite(depth) & (depth > self.config.near) & (depth <= self.config.far)
        if pad_mask is not None:
            valid &= pad_mask
        points = backproject(torch.where(valid, depth, torch.ones_like(depth)), intrinsics)
        return torch.where(valid[..., None], points, torch.zeros_like(points)), valid

    def _validated(self, depth: object, intrinsics: object, extrinsics: object, pad_mask: object,
                   shape: tuple[int, ...] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Check every geometry input (errors name the argument) -> float32 depth, K, extrinsics, pad_mask."""
        depth = _check_depth(depth, shape)
        b, v, h, w = depth.shape
        _check_patch_grid(h, w, self.config.patch_size)
        k = _check_intrinsics(intrinsics, b, v).to(depth.device)
        t = _check_extrinsics(extrinsics, b, v)
        if pad_mask is not None:
            if not isinstance(pad_mask, torch.Tensor):
                raise TypeError(f"pad_mask: expected a bool torch.Tensor [B,V,H,W] or None, got {type(pad_mask).__name__}")
            if tuple(pad_mask.shape) != (b, v, h, w):
                raise ValueError(f"pad_mask: expected shape {(b, v, h, w)} (True = real pixel), got {tuple(pad_mask.shape)}")
            if pad_mask.dtype != torch.bool:
                raise TypeError(f"pad_mask: expected dtype bool (True = real pixel), got {pad_mask.dtype}")
            pad_mask = pad_mask.to(depth.device)
        return depth, k, (None if t is None else t.to(depth.device)), pad_mask

    @torch.no_grad()
    def patch_points(self, depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor | None = None,
                     pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch mean 3-D points `[B,V,h,w,3]` (metres) and patch validity `[B,V,h,w]` (True = valid).

        Points are in each view's camera frame, or in the first view's camera frame when camera-to-world
        `extrinsics [B,V,4,4]` are given. Invalid patches hold the point (0, 0, 0).
        """
        points, valid, _ = self._patch_geometry(*self._validated(depth, intrinsics, extrinsics, pad_mask),
                                                with_normals=False)
        return points, valid

    @torch.no_grad()
    def patch_normals(self, depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor | None = None,
                      pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch unit surface normals `[B,V,h,w,3]` and their validity `[B,V,h,w]`.

        Each patch's normal is the normalised sum of the per-pixel normals (`pixel_normals`) of its valid
        pixels, oriented towards the camera of the view that sees it, then rotated into the first view's
        frame when `extrinsics` are given. A valid patch whose pixels give no normal (all at depth edges,
        invalid neighbours) keeps its patch validity but gets the normal (0, 0, 0) and normal-validity
        False; invalid patches always get (0, 0, 0) / False.
        """
        _, _, normals = self._patch_geometry(*self._validated(depth, intrinsics, extrinsics, pad_mask),
                                             with_normals=True)
        return normals

    def _patch_geometry(self, depth: torch.Tensor, k: torch.Tensor, t: torch.Tensor | None,
                        pad_mask: torch.Tensor | None, with_normals: bool):
        """Patch points, patch validity and (optionally) `(normals, normal_valid)` from validated inputs."""
        cfg = self.config
        pix, pix_valid = self._pixel_geometry(depth, k, pad_mask)
        count = patch_sum(pix_valid[..., None].float(), cfg.patch_size)  # [B,V,h,w,1]
        needed = cfg.min_valid_fraction * cfg.patch_size ** 2 - 1e-6
        valid = ((count >= needed) & (count >= 1)).squeeze(-1)
        points = patch_sum(pix, cfg.patch_size) / count.clamp_min(1.0)
        normals = None
        if with_normals:
            pn, pn_ok = pixel_normals(pix, pix_valid, cfg.normal_max_jump)
            summed = patch_sum(pn, cfg.patch_size)
            norm = summed.norm(dim=-1, keepdim=True)
            n_ok = valid & (norm > _NORMAL_EPS).squeeze(-1) & patch_sum(pn_ok[..., None].float(),
                                                                         cfg.patch_size).squeeze(-1).gt(0)
            normals = (torch.where(n_ok[..., None], summed / norm.clamp_min(_NORMAL_EPS), torch.zeros_like(summed)),
                       n_ok)
        if t is not None:
            rel = relative_poses(t)[:, :, None, None]  # [B,V,1,1,4,4]
            rot, trans = rel[..., :3, :3], rel[..., :3, 3]
            points = (rot @ points[..., None]).squeeze(-1) + trans
            if normals is not None:
                n, n_ok = normals
                n = (rot @ n[..., None]).squeeze(-1)
                n = n / n.norm(dim=-1, keepdim=True).clamp_min(_NORMAL_EPS)  # rotation blocks may carry scale
                normals = (torch.where(n_ok[..., None], n, torch.zeros_like(n)), n_ok)
        points = torch.where(valid[..., None], points, torch.zeros_like(points))
        return points, valid, normals

    # -- features ------------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, images: torch.Tensor, pad_mask: torch.Tensor | None = None, **extras) -> TeacherGrid:
        """Geometry features of the views: `TeacherGrid(feats [B,V,h,w,dim] float32, valid [B,V,h,w])`.

        Extras: `depth [B,V,H,W]` (metres, required), `intrinsics [B,V,3,3]` (pixels, required),
        `extrinsics [B,V,4,4]` camera-to-world (optional). Other extras are ignored, so a trainer may pass
        one batch dict to every teacher. Colours are not used; `images` fixes B, V, H, W and the device.
        """
        check_images(images)
        check_pad_mask(pad_mask, images)
        b, v, _, h, w = images.shape
        dev = images.device
        depth = extras.get("depth")
        if isinstance(depth, torch.Tensor):
            depth = depth.to(dev)
        inputs = self._validated(depth, extras.get("intrinsics"), extras.get("extrinsics"),
                                 None if pad_mask is None else pad_mask.to(dev), shape=(b, v, h, w))
        points, valid, normals = self._patch_geometry(*inputs, with_normals=self.config.normals)
        coords = points / self.config.scale
        parts = [sincos_encode(coords, self.config.num_freqs)]
        if self.config.include_points:
            parts.append(coords)
        if normals is not None:
            parts.append(normals[0])
        feats = torch.cat(parts, dim=-1)
        feats = torch.where(valid[..., None], feats, torch.zeros_like(feats))
        return TeacherGrid(feats=feats.float().contiguous(), valid=valid)
