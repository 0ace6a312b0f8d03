"""LeRobotDataset v3.0 on disk: a writer and an `EpisodeSource` reader (spec: DATA.md Part B).

Layout written and read (B.1)::

    meta/info.json                                   DatasetInfo (written LAST, see below)
    meta/stats.json                                  min/max/mean/std/count/q01/q10/q50/q90/q99
    meta/tasks.parquet                               index `task` (string) + column `task_index`
    meta/episodes/chunk-000/file-000.parquet         one row per episode (+ flattened `stats/...`)
    data/chunk-000/file-000.parquet                  frames, one row group per episode
    videos/<key>/chunk-000/file-000.mp4              frames of many episodes, concatenated

Decisions (documented here because the spec leaves them open):

* **Video codec.** LeRobot's default: AV1 via ``libsvtav1``, ``yuv420p``, ``g=2``, ``crf=30``,
  ``preset=12`` (B.3). PyAV's wheels ship ``libsvtav1`` (encode) and ``libdav1d`` (decode); when
  ``libsvtav1`` is missing ``vcodec="auto"`` falls back to H.264 with B-frames off (B-frames would
  make the per-file concatenation by remuxing produce non-monotonic DTS). Each episode is encoded
  to its own temporary MP4 and the episodes of one output file are concatenated by remuxing
  (no re-encode) when the file is closed, so the B.8 size rule is applied with exact sizes.
* **Depth.** As LeRobot 0.6 stores it (`depth.py`): a depth-map video feature
  ``observation.images.<cam>_depth`` (12-bit log-quantised ``gray12le`` HEVC, lossless x265), written
  with every frame intra-coded (`video.DepthEncoding`: LeRobot's ``g=2`` inter frames do not always
  decode to the codes encoded) and read from LeRobot's files as ``observation.depth.<cam>`` in metres,
  equal to what LeRobot returns. ``depth_format="float32"`` stores the lossless ``Array2D`` parquet
  column ``observation.depth.<cam>`` instead (the only format before; read as always), ``"float16"``
  halves it (relative error <= 2**-11). The reader always returns float32 metres. Depth-map
  statistics are LeRobot's: per channel, shape ``(1, 1, 1)``, in the recorded ``depth_unit``.
* **Statistics.** Per-episode statistics (``stats/<feature>/<stat>`` in the episode table) are
  exact (numpy ``linear`` quantiles) instead of LeRobot's 5,000-bin histograms. Dataset-level
  statistics are exact as well for image/video features (per-channel 256-bin histograms of all
  pixels, divided by 255, shape ``(C, 1, 1)``) and for numeric features of at most
  ``EXACT_STATS_MAX_ELEMENTS`` values per frame. Larger numeric features (depth maps) use
  LeRobot's aggregation (B.7): pooled mean/std, count-weighted average of per-episode quantiles.
  A numeric feature of shape ``(..., n)`` gets statistics of shape ``(n,)`` (LeRobot reduces all
  but the last axis).
* **Interruption safety.** The writer works in a hidden sibling folder ``.<name>.partial-<id>``;
  ``finalize()`` writes ``meta/info.json`` last and then renames the folder onto ``root``
  (an existing dataset there is replaced only with ``overwrite=True``, by two renames: old ->
  ``.<name>.old-<id>``, new -> ``root``; then the old copy is deleted). An exception or
  KeyboardInterrupt before that leaves the previous dataset (or nothing) at ``root``; the
  ``with`` form and ``abort()`` remove the partial folder. The reader refuses a folder without
  ``meta/info.json`` and one whose counts disagree with the files.

Modules: `layout.py` (paths, feature specs, the parquet layout), `stats.py`, `depth.py` (LeRobot's depth
quantiser), `video.py` (PyAV encoding, concatenation, random access), `writer.py`, `reader.py`.
"""

from .depth import DepthQuantizer
from .layout import (
    CODEBASE_VERSION, DEPTH_FORMATS, LIBERO_CAMERA_ALIASES, LIBERO_KEY_ALIASES, LeRobotFormatError, canonical_features,
)
from .reader import LeRobotEpisodeSource, load_info, read_intrinsics
from .stats import aggregate_stats, compute_stats, expected_stats_shape
from .video import DepthEncoding, VideoEncoding
from .writer import LeRobotWriter

__all__ = [
    "CODEBASE_VERSION",
    "DEPTH_FORMATS",
    "DepthEncoding",
    "DepthQuantizer",
    "LIBERO_CAMERA_ALIASES",
    "LIBERO_KEY_ALIASES",
    "LeRobotEpisodeSource",
    "LeRobotFormatError",
    "LeRobotWriter",
    "VideoEncoding",
    "read_intrinsics",
    "aggregate_stats",
    "canonical_features",
    "compute_stats",
    "expected_stats_shape",
    "load_info",
]
