"""A memory-mapped store of frozen teacher features: the teacher runs once per (episode, frame)
over all views, on un-augmented frames, and training reads grids instead of running it.

On disk, beside the dataset (default ``<dataset>/teacher_cache/<teacher>/``)::

    meta.json    teacher, weights, layer (VGGT block pair; null for a teacher without layers), dim,
                 grid (h, w), image_size, cameras, dtype, episode_lengths,
                 "complete": true once every row is written (training refuses an incomplete store)
    feats.npy    [N, V, h, w, D] float16 (or float32)   N = all frames; row = episode start + t
    valid.npy    [N, V, h, w] bool                       the teacher's validity (padding, no depth)
    progress.json {"rows": n}                            rows written so far (a run resumes there)

Both arrays are `.npy` files opened with `np.load(mmap_mode="r")`: a sample reads only its own
rows, and every data-loader worker maps the file on first use (nothing is pickled).

What the cache changes: the online teacher sees the student's augmented pixels; the cached one
saw the un-augmented frame, and its grid is cropped with the sample's crop box (`data/dataset.py`),
so random crops still line up but **colour jitter does not reach the teacher**. With augmentation
off the two paths give the same targets (tested).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Teacher

DTYPES = {"float16": np.float16, "float32": np.float32}
META = "meta.json"


def default_location(dataset: str | Path, teacher: str) -> Path:
    return Path(dataset) / "teacher_cache" / teacher


class TeacherCache:
    """Read side: `read(episode, t) -> (feats [V,h,w,D], valid [V,h,w])` as numpy arrays."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_file = self.folder / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"teacher cache {self.folder}: no {META} (build it with `sf cache-teacher`)")
        self.meta = json.loads(meta_file.read_text())
        if not self.meta.get("complete"):
            done = _read_progress(self.folder)
            raise ValueError(f"teacher cache {self.folder} is incomplete ({done} of {self.meta.get('rows')} rows); "
                             f"run the same `sf cache-teacher` command again to finish it")
        lengths = np.asarray(self.meta["episode_lengths"], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.lengths = lengths
        self._feats: np.ndarray | None = None
        self._valid: np.ndarray | None = None

    # Maps are opened lazily (per worker process) and never pickled.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_feats": None, "_valid": None}

    @property
    def cameras(self) -> list[str]:
        return list(self.meta["cameras"])

    def check(self, teacher: str, cameras: list[str], image_size: int, lengths: list[int], layer: int = -1) -> None:
        """Refuse a store that was built for another teacher, layer, camera set, resolution or dataset."""
        m = self.meta
        problems = []
        if m["teacher"] != teacher:
            problems.append(f"teacher {m['teacher']!r} (this run: {teacher!r})")
        elif teacher == "vggt" and "layer" not in m:
            raise ValueError(f"teacher cache {self.folder}: {META} does not record which VGGT layer it holds (built "
                             f"by an older version); rebuild it with `sf cache-teacher --layer {layer}`, or, if it "
                             f"was built with that layer, add \"layer\": {layer} to {self.folder / META}")
        elif teacher == "vggt" and m["layer"] != layer:
            problems.append(f"VGGT layer {m['layer']} (this run's --align-teacher-layer: {layer})")
        if m["cameras"] != list(cameras):
            problems.append(f"cameras {m['cameras']} (this run: {list(cameras)})")
        if m["image_size"] != image_size:
            problems.append(f"image_size {m['image_size']} (the policy's: {image_size})")
        if list(m["episode_lengths"]) != list(lengths):
            problems.append(f"{len(m['episode_lengths'])} episodes of other lengths than the dataset's {len(lengths)}")
        if problems:
            raise ValueError(f"teacher cache {self.folder} does not fit this run: it holds " + "; ".join(problems))

    def read(self, episode: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        if self._feats is None:
            self._feats = np.load(self.folder / "feats.npy", mmap_mode="r")
            self._valid = np.load(self.folder / "valid.npy", mmap_mode="r")
        if not 0 <= t < self.lengths[episode]:
            raise IndexError(f"teacher cache {self.folder}: episode {episode} has {self.lengths[episode]} frames, "
                             f"asked for frame {t}")
        row = int(self.starts[episode]) + int(t)
        return np.array(self._feats[row]), np.array(self._valid[row])


STORE_FILES = (META, "feats.npy", "valid.npy", "progress.json")


def clear_store(folder: str | Path) -> None:
    """Remove a store's files (`sf cache-teacher --overwrite`); other files in the folder stay."""
    for name in STORE_FILES:
        (Path(folder) / name).unlink(missing_ok=True)


def _read_progress(folder: Path) -> int:
    f = folder / "progress.json"
    return int(json.loads(f.read_text())["rows"]) if f.is_file() else 0


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def build_cache(source: Any, teacher: Teacher, out: str | Path, *, teacher_name: str, weights: str | None,
                cameras: list[str], image_size: int, batch_size: int = 16, num_workers: int = 2,
                dtype: str = "float16", device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Run `teacher` over every frame of `source` (views `cameras`, frames resized to `image_size` as
    the training pipeline does, no augmentation) into `out`. Resumes a partial store built with the
    same settings. Returns a summary."""
    from torch.utils.data import DataLoader, Subset

    from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig
    from spatial_forcing.data.schema import DEPTH, IMAGE, INTRINSICS
    from spatial_forcing.data.stats import cached_statistics

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, found {dtype!r}")
    out = Path(out)
    device = torch.device(device)
    needs_depth = teacher.needs_depth
    pipe = PipelineConfig(chunk_len=1, chunk_mode="repeat_last", image_size=image_size, augment=False, depth=needs_depth)
    frames = ChunkedDataset(source, cached_statistics(source), pipe, cameras=cameras)
    lengths = [source.episode_length(e) for e in range(source.num_episodes)]
    n = len(frames)  # one row per frame, in episode order (chunk_len 1, every frame)
    settings = {"teacher": teacher_name, "weights": weights, "layer": getattr(teacher, "layer", None),
                "cameras": list(cameras), "image_size": image_size, "dtype": dtype, "episode_lengths": lengths,
                "rows": n}
    meta_file = out / META
    start = 0
    if meta_file.is_file():
        old = json.loads(meta_file.read_text())
        same = {k: old.get(k) for k in settings} == settings
        if not same:
            raise ValueError(f"{out} already holds a teacher cache built with other settings "
                             f"({ {k: old.get(k) for k in settings if old.get(k) != settings[k]} }); "
                             f"choose another --output or delete it")
        if old.get("complete"):
            return {"rows": n, "written": 0, "seconds": 0.0, "folder": str(out), "bytes": _size(out), "resumed": True}
        start = _read_progress(out)

    loader = DataLoader(Subset(frames, range(start, n)), batch_size=batch_size, num_workers=num_workers,
                        **({"multiprocessing_context": "forkserver"} if num_workers else {}))
    feats = valid = None
    if start:
        feats = np.load(out / "feats.npy", mmap_mode="r+")
        valid = np.load(out / "valid.npy", mmap_mode="r+")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=start, desc=f"cache {teacher_name}", unit="frame", dynamic_ncols=True)
    t0, row, last_flush = time.perf_counter(), start, time.perf_counter()
    teacher = teacher.to(device)
    with torch.no_grad():
        for batch in loader:
            images = torch.stack([batch[IMAGE + c] for c in cameras], 1).to(device).float().div_(255.0)
            extras = {}
            if needs_depth:
                extras = {"depth": torch.stack([batch[DEPTH + c] for c in cameras], 1).to(device),
                          "intrinsics": torch.stack([batch[INTRINSICS + c] for c in cameras], 1).to(device)}
            grid = teacher.features(images, **extras)
            if feats is None:  # first batch: the grid's shape is known, allocate the store
                feats, valid = _allocate(out, n, grid.feats.shape[1:], dtype, {**settings, "dim": grid.dim,
                                         "grid": list(grid.feats.shape[2:4])})
            k = len(images)
            feats[row:row + k] = grid.feats.float().cpu().numpy().astype(DTYPES[dtype])
            valid[row:row + k] = grid.valid.cpu().numpy()
            row += k
            if time.perf_counter() - last_flush > 30 or row == n:
                feats.flush()
                valid.flush()
                _write_json(out / "progress.json", {"rows": row})
                last_flush = time.perf_counter()
            if bar is not None:
                bar.update(k)
    if bar is not None:
        bar.close()
    meta = json.loads(meta_file.read_text())
    meta["complete"] = True
    _write_json(meta_file, meta)
    return {"rows": n, "written": n - start, "seconds": time.perf_counter() - t0, "folder": str(out),
            "bytes": _size(out), "resumed": start > 0}


def _allocate(out: Path, n: int, row_shape: tuple[int, ...], dtype: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    v, h, w, d = row_shape
    need = n * v * h * w * (d * np.dtype(DTYPES[dtype]).itemsize + 1)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need > free:
        raise OSError(f"teacher cache: {n} frames x {v} views x {h}x{w}x{d} {dtype} need {need / 1e9:.1f} GB, "
                      f"{out} has {free / 1e9:.1f} GB free")
    feats = np.lib.format.open_memmap(out / "feats.npy", mode="w+", dtype=DTYPES[dtype], shape=(n, v, h, w, d))
    valid = np.lib.format.open_memmap(out / "valid.npy", mode="w+", dtype=np.bool_, shape=(n, v, h, w))
    _write_json(out / "progress.json", {"rows": 0})
    _write_json(out / META, {**meta, "complete": False})
    return feats, valid


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.npy"))
