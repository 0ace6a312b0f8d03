"""Depth storage (issue 21): LeRobot's 12-bit depth video against float32 / float16 parquet columns, on
LIBERO demonstrations recorded by `sf collect libero` (both cameras, metric depth).

    PYTHONPATH=src MUJOCO_GL=egl python benchmarks/depth.py [--dataset D] [--tasks 0,1] [--episodes 1]

Without `--dataset` it records `--episodes` expert episodes per task with float32 depth first (the
lossless reference). Then it writes the same depth maps as each storage (a dataset holding only state,
action and depth, so the bytes are the depth's) and measures:

* bytes per camera-frame (video: the `_depth` MP4s; columns: the data parquet minus the same dataset
  without depth) and the encoding time;
* decoding: ms per camera-frame through `LeRobotEpisodeSource.frame`, in order and at random;
* the depth error of the round trip against float32 (max, mean, p99, and the worst ratio to the stated
  bound, half a quantisation step), and with LeRobot's exact stream settings (g 2: inter frames) how
  many 12-bit codes come back changed;
* the geometry teacher's targets (`teachers/geometry.py`, defaults) from float32 and from round-tripped
  depth, on the native 128-px frames (patch 16: 8x8 grid) and resized to 224 as training does for the
  OFT student (nearest depth, rescaled intrinsics; patch 14: 16x16 grid): patch validity changes, the
  largest and mean absolute feature difference, the per-patch cosine distance the alignment loss sees
  (1 - cos), and the patch points' error in mm.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import device_name, git_commit, write_result  # noqa: E402

try:
    import spatial_forcing  # noqa: F401
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spatial_forcing.data.lerobot import LeRobotEpisodeSource, LeRobotWriter, canonical_features  # noqa: E402
from spatial_forcing.data.lerobot.depth import DepthQuantizer  # noqa: E402
from spatial_forcing.data.lerobot.video import DepthEncoding  # noqa: E402
from spatial_forcing.teachers.geometry import GeometryTeacher  # noqa: E402

DEPTH, K = "observation.depth.", "observation.intrinsics."


def collect(out: Path, tasks: str, episodes: int, size: int, jobs: int) -> Path:
    from spatial_forcing.envs.collect import collect_libero

    s = collect_libero("libero_object", tasks, episodes, out, image_size=size, depth=True, seed=0, video=True,
                       progress=False, depth_format="float32", jobs=jobs)
    print(f"recorded {s['episodes']} episodes ({s['env_steps']} env steps) in {s['seconds']:.0f} s")
    return out


def load(source: LeRobotEpisodeSource, cams: list[str]) -> list[list[dict]]:
    """Every frame's state, action, depth and intrinsics."""
    keys = ["observation.state", "action", *[DEPTH + c for c in cams], *[K + c for c in cams]]
    return [[source.frame(e, t, keys) for t in range(source.episode_length(e))] for e in range(source.num_episodes)]


def write(root: Path, episodes: list[list[dict]], cams: list[str], size: int, depth_format: str | None,
          encoding: DepthEncoding | None = None) -> float:
    """A dataset of state, action and (unless `depth_format` is None) depth; returns the seconds spent."""
    feats = canonical_features({c: (size, size) for c in cams}, 8, 7, depth=depth_format is not None,
                               depth_format=depth_format or "float32")
    feats = {k: v for k, v in feats.items() if not (k.startswith("observation.images.") and not k.endswith("_depth"))}
    t0 = time.perf_counter()
    with LeRobotWriter(root, 20, feats, robot_type="panda", depth_encoding=encoding) as w:
        for e, frames in enumerate(episodes):
            for f in frames:
                keep = ("observation.state", "action", *([DEPTH + c for c in cams] if depth_format else []))
                w.add_frame({k: f[k] for k in keep})
            w.save_episode(task=f"episode {e}")
    return time.perf_counter() - t0


def folder_bytes(root: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file())


def decode_ms(root: Path, cams: list[str], shuffle: bool) -> float:
    source = LeRobotEpisodeSource(root)
    order = [(e, t) for e in range(source.num_episodes) for t in range(source.episode_length(e))]
    if shuffle:
        order = [order[i] for i in np.random.default_rng(0).permutation(len(order))]
    t0 = time.perf_counter()
    for e, t in order:
        source.frame(e, t, [DEPTH + c for c in cams])
    return 1e3 * (time.perf_counter() - t0) / (len(order) * len(cams))


def read_depth(root: Path, cams: list[str]) -> dict[str, np.ndarray]:
    source = LeRobotEpisodeSource(root)
    return {c: np.stack([source.frame(e, t, [DEPTH + c])[DEPTH + c] for e in range(source.num_episodes)
                         for t in range(source.episode_length(e))]) for c in cams}


def codes_changed(root: Path, cams: list[str], reference: dict[str, np.ndarray]) -> dict:
    """Codes read back from the stream against the codes the quantiser gives the float32 depth."""
    source, q = LeRobotEpisodeSource(root), DepthQuantizer()
    changed = worst = 0
    for c in cams:
        i = 0
        for e in range(source.num_episodes):
            for t in range(source.episode_length(e)):
                got = source._video_frame(e, t, f"observation.images.{c}_depth", depth=True).astype(int)
                diff = np.abs(got - q.quantize(reference[c][i]).astype(int))
                changed, worst, i = changed + int((diff > 0).sum()), max(worst, int(diff.max())), i + 1
    return {"codes_changed": changed, "largest_code_change": worst}


def errors(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    q = DepthQuantizer()
    d = np.concatenate([ref[c].ravel() for c in ref]).astype(np.float64)
    e = np.abs(np.concatenate([got[c].ravel() for c in ref]).astype(np.float64) - d)
    inside = (d >= q.depth_min) & (d <= q.depth_max)
    return {"max_mm": round(1e3 * e.max(), 4), "mean_mm": round(1e3 * e.mean(), 4),
            "p99_mm": round(1e3 * float(np.quantile(e, 0.99)), 4),
            "worst_ratio_to_bound": round(float((e[inside] / q.max_error(d[inside])).max()), 4),
            "pixels_outside_range": int((~inside).sum()), "depth_range_m": [round(float(d.min()), 4),
                                                                              round(float(d.max()), 4)]}


def targets(depth: dict[str, np.ndarray], ks: dict[str, np.ndarray], cams: list[str], side: int | None,
            patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Geometry-teacher grids of every frame (views = cameras): feats, valid, patch points."""
    d = torch.from_numpy(np.stack([depth[c] for c in cams], 1))  # [N, V, H, W]
    k = torch.from_numpy(np.stack([ks[c] for c in cams], 1)).float()
    if side is not None:  # as the training pipeline: nearest depth, intrinsics with pixel centres at +0.5
        h = d.shape[-1]
        d = torch.nn.functional.interpolate(d, size=(side, side), mode="nearest")
        s = side / h
        k = k.clone()
        k[..., 0, 0] *= s
        k[..., 1, 1] *= s
        k[..., 0, 1] *= s
        k[..., 0, 2] = (k[..., 0, 2] + 0.5) * s - 0.5
        k[..., 1, 2] = (k[..., 1, 2] + 0.5) * s - 0.5
    teacher = GeometryTeacher(patch_size=patch)
    images = torch.zeros(d.shape[0], d.shape[1], 3, d.shape[2], d.shape[3])
    g = teacher.features(images, depth=d, intrinsics=k)
    points, _ = teacher.patch_points(d, k)
    return g.feats, g.valid, points


def target_effect(got: dict, ref: dict, ks: dict, cams: list[str], side: int | None, patch: int) -> dict:
    fa, va, pa = targets(ref, ks, cams, side, patch)
    fb, vb, pb = targets(got, ks, cams, side, patch)
    both = va & vb
    diff = (fa - fb).abs()[both]
    cos = torch.nn.functional.cosine_similarity(fa[both], fb[both], dim=-1)
    point = (pa - pb).norm(dim=-1)[both]
    dims = fa.shape[-1]
    return {"grid": list(fa.shape[2:4]), "patch": patch, "patches": int(va.numel()),
            "validity_changed": int((va != vb).sum()),
            "feature_abs_diff_max": round(float(diff.max()), 6), "feature_abs_diff_mean": round(float(diff.mean()), 6),
            "feature_abs_diff_max_by_block": {  # sin-cos of x, y, z at 8 frequencies, then the normal
                "sincos_lowest_freq": round(float((fa - fb).abs()[both][:, [0, 8, 16, 24, 32, 40]].max()), 6),
                "sincos_highest_freq": round(float((fa - fb).abs()[both][:, [7, 15, 23, 31, 39, 47]].max()), 6),
                "normal": round(float((fa - fb).abs()[both][:, dims - 3:].max()), 6)},
            "one_minus_cos_max": round(float((1 - cos).max()), 6), "one_minus_cos_mean": round(float((1 - cos).mean()), 8),
            "patch_point_error_mm_max": round(1e3 * float(point.max()), 4),
            "patch_point_error_mm_mean": round(1e3 * float(point.mean()), 4)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, help="a LeRobot dataset with float32 depth (default: record one)")
    p.add_argument("--tasks", default="0,1")
    p.add_argument("--episodes", type=int, default=1, help="episodes per task to record")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "depth.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = args.dataset or collect(tmp / "recorded", args.tasks, args.episodes, args.image_size, args.jobs)
        source = LeRobotEpisodeSource(dataset)
        cams = [c for c in source.cameras if DEPTH + c in source.features]
        size = int(source.features[DEPTH + cams[0]]["shape"][0])
        episodes = load(source, cams)
        frames = sum(len(f) for f in episodes)
        rgb = folder_bytes(dataset, "videos/observation.images.*/**/*.mp4")
        ref = {c: np.stack([f[DEPTH + c] for fr in episodes for f in fr]) for c in cams}
        ks = {c: np.stack([f[K + c] for fr in episodes for f in fr]) for c in cams}
        base_s = write(tmp / "none", episodes, cams, size, None)
        base = folder_bytes(tmp / "none", "data/**/*.parquet")
        storages = {"float32": ("float32", None), "float16": ("float16", None),
                    "video (LeRobot depth video, g 1: ours)": ("video", None),
                    "video (LeRobot's exact settings, g 2)": ("video", DepthEncoding(g=2))}
        results: dict = {}
        for name, (fmt, enc) in storages.items():
            root = tmp / name.split()[0].replace("(", "") / str(len(results))
            seconds = write(root, episodes, cams, size, fmt, enc)
            nbytes = (folder_bytes(root, "videos/**/*.mp4") if fmt == "video"
                      else folder_bytes(root, "data/**/*.parquet") - base)
            got = read_depth(root, cams)
            r = {"bytes_per_camera_frame": round(nbytes / (frames * len(cams))), "total_mb": round(nbytes / 2**20, 2),
                 "encode_ms_per_camera_frame": round(1e3 * max(0.0, seconds - base_s) / (frames * len(cams)), 3),
                 "decode_ms_per_camera_frame_sequential": round(decode_ms(root, cams, False), 3),
                 "decode_ms_per_camera_frame_random": round(decode_ms(root, cams, True), 3),
                 "depth_error": errors(got, ref)}
            if fmt == "video":
                r["stream"] = codes_changed(root, cams, ref)
            if fmt != "float32":
                r["teacher_targets_native"] = target_effect(got, ref, ks, cams, None, 16)
                r["teacher_targets_224"] = target_effect(got, ref, ks, cams, 224, 14)
            results[name] = r
            print(f"{name}: {r['bytes_per_camera_frame']} B/camera-frame, decode "
                  f"{r['decode_ms_per_camera_frame_random']:.2f} ms random, max error {r['depth_error']['max_mm']} mm")
    f32 = results["float32"]["bytes_per_camera_frame"]
    video = results["video (LeRobot depth video, g 1: ours)"]
    out = {"benchmark": "depth", "date": _dt.date.today().isoformat(), "device": device_name(torch.device("cpu")),
           "commit": git_commit(), "dataset": str(args.dataset or f"libero_object tasks {args.tasks}, "
                                                   f"{args.episodes} expert episode(s) each (sf collect libero)"),
           "frames": frames, "cameras": cams, "image_size": size,
           "rgb_video_bytes_per_camera_frame": round(rgb / (frames * len(cams))) if rgb else None,
           "results": results,
           "video_over_float32_size": round(video["bytes_per_camera_frame"] / f32, 4),
           "summary": (f"LeRobot's depth video takes {video['bytes_per_camera_frame']} B per camera-frame against "
                       f"{f32} B for float32 columns ({f32 / video['bytes_per_camera_frame']:.1f}x smaller); the round "
                       f"trip errs by at most {video['depth_error']['max_mm']} mm (mean "
                       f"{video['depth_error']['mean_mm']} mm)")}
    write_result(args.out, out)
    print(out["summary"])
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
