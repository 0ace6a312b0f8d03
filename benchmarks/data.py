"""Training-pipeline throughput: decode + chunk + normalise + augment, 2 views at 224 px, from a
LIBERO-like RLDS dataset and from the same data as a LeRobot v3 mp4 dataset.

    PYTHONPATH=src python benchmarks/data.py [--episodes 8] [--steps 120] [--workers 2] [--samples 1500]

Synthetic data of the published layout (256x256 JPEG frames, 8-D state, 7-D action) is written to a
temporary folder first; the timed loop is `make_loader(ChunkedDataset(...))` with shuffled access.
Target (issue): >= 150 samples/s on 2 CPU cores from both sources.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import device_name, git_commit, write_result  # noqa: E402

try:
    from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig, make_loader
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig, make_loader
from spatial_forcing.data.convert import rlds_to_lerobot
from spatial_forcing.data.lerobot import LeRobotEpisodeSource
from spatial_forcing.data.rlds import RLDSEpisodeSource, crc32c, mask_crc
from spatial_forcing.data.sampler import ResumableSampler
from spatial_forcing.data.stats import compute_statistics

TARGET = 150.0


# ------------------------------------------------------------------ a minimal RLDS writer (benchmark data only)
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _feature(kind: str, values) -> bytes:
    if kind == "bytes":
        return _ld(1, b"".join(_ld(1, v) for v in values))
    if kind == "float":
        return _ld(2, _ld(1, np.asarray(values, "<f4").tobytes()))
    return _ld(3, _ld(1, b"".join(_varint(int(v)) for v in values)))


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", mask_crc(crc32c(length))) + data + struct.pack("<I", mask_crc(crc32c(data)))


def _frame(rng: np.random.Generator, t: int, view: int) -> bytes:
    y, x = np.mgrid[0:256, 0:256]
    img = np.stack([(x + 3 * t) % 256, (y + 50 * view) % 256, (x * y // 64 + t) % 256], -1).astype(np.float32)
    img += rng.normal(0, 12, img.shape)  # texture, so JPEGs are about LIBERO-sized
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_rlds(folder: Path, episodes: int, steps: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    records = []
    for e in range(episodes):
        feats = {
            "steps/observation/image": _feature("bytes", [_frame(rng, t, 0) for t in range(steps)]),
            "steps/observation/wrist_image": _feature("bytes", [_frame(rng, t, 1) for t in range(steps)]),
            "steps/observation/state": _feature("float", rng.normal(size=steps * 8)),
            "steps/observation/joint_state": _feature("float", rng.normal(size=steps * 7)),
            "steps/action": _feature("float", rng.uniform(-1, 1, steps * 7)),
            "steps/reward": _feature("float", [0.0] * (steps - 1) + [1.0]),
            "steps/discount": _feature("float", [1.0] * steps),
            "steps/is_first": _feature("int", [1] + [0] * (steps - 1)),
            "steps/is_last": _feature("int", [0] * (steps - 1) + [1]),
            "steps/is_terminal": _feature("int", [0] * (steps - 1) + [1]),
            "steps/language_instruction": _feature("bytes", [b"pick up the black bowl"] * steps),
        }
        entries = b"".join(_ld(1, _ld(1, k.encode()) + _ld(2, v)) for k, v in feats.items())
        records.append(_record(_ld(1, entries)))
    (folder / "bench-train.tfrecord-00000-of-00001").write_bytes(b"".join(records))
    (folder / "dataset_info.json").write_text(json.dumps({"name": "bench", "version": "1.0.0"}))
    return folder


# ------------------------------------------------------------------ timing
def throughput(source, workers: int, samples: int, batch: int = 32) -> dict:
    ds = ChunkedDataset(source, compute_statistics(source), PipelineConfig(chunk_len=8, image_size=224, augment=True))
    loader = make_loader(ds, ResumableSampler(len(ds), seed=0), batch_size=batch, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up and first decode are not throughput
    n, t0 = 0, time.perf_counter()
    while n < samples:
        batch_data = next(it)
        n += len(batch_data["action"])
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt, "dataset_samples": len(ds)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=1500)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "data.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # workers do the work; the main process only collates
    with tempfile.TemporaryDirectory() as tmp:
        rlds_dir = write_rlds(Path(tmp) / "rlds", args.episodes, args.steps)
        print(f"wrote {args.episodes} synthetic episodes x {args.steps} steps (256 px JPEG, 2 views)")
        rlds_to_lerobot(rlds_dir, Path(tmp) / "lerobot", progress=False)
        results = {}
        for name, source in (("rlds", RLDSEpisodeSource(rlds_dir)),
                             ("lerobot_mp4", LeRobotEpisodeSource(Path(tmp) / "lerobot", standardize="libero"))):
            results[name] = throughput(source, args.workers, args.samples)
            print(f"{name:12s} {results[name]['samples_per_s']:7.1f} samples/s "
                  f"({results[name]['samples']} samples, {args.workers} workers, 2 views at 224, augmented)")
    out = {"benchmark": "data", "date": _dt.date.today().isoformat(), "device": device_name(torch.device("cpu")),
           "torch": torch.__version__, "commit": git_commit(), "workers": args.workers,
           "pipeline": "decode + resize to 224 (Lanczos) + chunk 8 + q01/q99 normalise + crop 90% + colour jitter",
           "results": results, "target_samples_per_s": TARGET,
           "pass": all(r["samples_per_s"] >= TARGET for r in results.values())}
    write_result(args.out, out)
    print(f"target >= {TARGET:.0f} samples/s: {'PASS' if out['pass'] else 'FAIL'}; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
