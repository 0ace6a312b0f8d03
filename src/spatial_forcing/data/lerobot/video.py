"""MP4 video through PyAV: encoder settings (`VideoEncoding` for RGB, `DepthEncoding` for LeRobot's
12-bit depth video), per-episode encoding, concatenation of episodes by remuxing, stream probing, and
random access by timestamp (`_VideoReader`)."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .depth import DepthQuantizer
from .layout import VIDEO_TOLERANCE_S, LeRobotFormatError

DEPTH_PIX_FMT = "gray12le"


@dataclass
class VideoEncoding:
    """Encoder settings recorded in each video feature's `info` (B.3)."""

    vcodec: str = "auto"
    pix_fmt: str = "yuv420p"
    g: int = 2
    crf: int = 30
    preset: int | str | None = None
    fast_decode: int = 0
    extra_options: dict[str, str] = field(default_factory=dict)

    def resolved(self) -> VideoEncoding:
        """A copy with `vcodec='auto'` resolved to an encoder this PyAV build has."""
        import av

        codec = self.vcodec
        if codec in ("auto", "av1"):
            codec = "libsvtav1" if "libsvtav1" in av.codecs_available else "h264"
        if codec not in av.codecs_available:
            raise LeRobotFormatError(f"video codec {codec!r} is not available in this PyAV build")
        preset = self.preset
        if preset is None and codec == "libsvtav1":
            preset = 12
        return VideoEncoding(codec, self.pix_fmt, self.g, self.crf, preset, self.fast_decode, dict(self.extra_options))

    def options(self) -> dict[str, str]:
        """Codec options as strings (mirrors LeRobot's `get_codec_options`)."""
        opts = {"g": str(self.g), "crf": str(self.crf)}
        if self.preset is not None:
            opts["preset"] = str(self.preset)
        if self.vcodec == "libsvtav1":
            opts["svtav1-params"] = f"fast-decode={max(0, min(2, self.fast_decode))}"
        elif self.vcodec in ("h264", "libx264", "hevc", "libx265"):
            opts["bf"] = "0"  # no B-frames: keeps DTS monotonic when episodes are concatenated
        for k, v in self.extra_options.items():
            opts.setdefault(k, str(v))
        return opts

    def info(self) -> dict[str, Any]:
        return {
            "video.g": self.g,
            "video.crf": self.crf,
            "video.preset": self.preset,
            "video.fast_decode": self.fast_decode,
            "video.video_backend": "pyav",
            "video.extra_options": dict(self.extra_options),
        }


@dataclass
class DepthEncoding(VideoEncoding):
    """LeRobot 0.6.1's `DepthEncoderConfig` (see `depth.py`): HEVC through libx265, `gray12le`, crf 30
    (unused: lossless), `x265-params lossless=1`, and the log quantiser; with one deliberate change and
    one addition, both recorded in the feature's info:

    * **`g` 1 (every frame intra-coded) instead of LeRobot's 2.** 12-bit lossless x265 P/B frames do not
      decode to the codes that were encoded when the depth has fine detail: with LeRobot 0.6.1's own
      settings and PyAV 15.1, frames of random depth came back up to 251 codes off (8 % of d + 3.5 m;
      PyAV 18: up to ~1,300), the same file decoding identically with FFmpeg 7 and 8, while smooth depth
      and every intra-only stream we tried round-tripped exactly. Intra-only makes the quantisation the
      only loss, and a random access decodes one frame. It costs size on smooth depth
      (`benchmarks/results/depth.json`).
    * `log-level=error` in `x265-params`: x265 prints a banner per episode otherwise.
    """

    vcodec: str = "hevc"
    pix_fmt: str = DEPTH_PIX_FMT
    g: int = 1
    extra_options: dict[str, str] = field(default_factory=lambda: {"x265-params": "lossless=1:log-level=error"})
    quantizer: DepthQuantizer = field(default_factory=DepthQuantizer)

    def resolved(self) -> DepthEncoding:
        """Check that this PyAV build has an HEVC encoder taking 12-bit grayscale (PyAV's wheels ship
        libx265 built with 12-bit support)."""
        import av

        name = "libx265" if self.vcodec in ("hevc", "libx265") else self.vcodec
        try:
            formats = [f.name for f in (av.Codec(name, "w").video_formats or [])]
        except Exception:  # noqa: BLE001 - av raises several types for an unknown codec
            formats = []
        if self.pix_fmt not in formats:
            raise LeRobotFormatError(
                f"depth video: this PyAV build ({av.__version__}) has no {name} encoder for {self.pix_fmt} "
                f"(LeRobot's 12-bit depth video); store depth as float32 columns instead (depth_format='float32')")
        return self

    def info(self) -> dict[str, Any]:
        return {**super().info(), **self.quantizer.info()}


@contextlib.contextmanager
def _quiet_av() -> Iterator[None]:
    """Silence libav/SVT chatter (e.g. the faststart 'second pass' notice) while encoding."""
    import av.logging

    os.environ.setdefault("SVT_LOG", "1")
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        yield
    finally:
        av.logging.set_level(previous)


class _EpisodeVideoEncoder:
    """Encodes one camera of one episode into its own temporary MP4."""

    def __init__(self, path: Path, fps: int, height: int, width: int, enc: VideoEncoding):
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.frames = 0
        self._quantizer = enc.quantizer if isinstance(enc, DepthEncoding) else None
        with _quiet_av():
            self._container = av.open(str(path), "w")
            self._stream = self._container.add_stream(enc.vcodec, rate=fps, options=enc.options())
        self._stream.pix_fmt = enc.pix_fmt
        self._stream.width = width
        self._stream.height = height

    def add(self, image: np.ndarray) -> None:
        """One frame: RGB uint8 `[H, W, 3]`, or for depth float metres `[H, W]` (quantised here)."""
        import av

        if self._quantizer is not None:
            frame = av.VideoFrame.from_ndarray(self._quantizer.quantize(image), format=DEPTH_PIX_FMT)
        else:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        with _quiet_av():
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        with _quiet_av():
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()


def _concatenate_videos(parts: Sequence[tuple[Path, int]], out: Path, fps: int) -> None:
    """Concatenate MP4 episodes (same encoder settings) by remuxing, each shifted to its start."""
    import av

    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_av(), av.open(str(out), "w", options={"movflags": "faststart"}) as oc:
        ostream = None
        offset_s = 0.0
        for path, frames in parts:
            with av.open(str(path)) as ic:
                istream = ic.streams.video[0]
                if ostream is None:
                    ostream = oc.add_stream_from_template(istream, opaque=True)
                    ostream.time_base = istream.time_base
                offset = round(offset_s / istream.time_base)
                for packet in ic.demux(istream):
                    if packet.dts is None:
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = ostream
                    oc.mux(packet)
            offset_s += frames / fps


def _probe_video(path: Path, fps: int) -> dict[str, Any]:
    """The stream-derived `video.*` entries of a video feature's info (as LeRobot's)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return {
            "video.height": s.height,
            "video.width": s.width,
            "video.codec": s.codec_context.codec.canonical_name,
            "video.pix_fmt": s.pix_fmt,
            "video.fps": int(s.base_rate or s.average_rate or fps),
            "video.channels": len(av.VideoFormat(s.pix_fmt).components),
            "has_audio": len(c.streams.audio) > 0,
        }


class _VideoReader:
    """Random access to frames of one MP4 by timestamp, with PyAV.

    Keeps the container open and the frames decoded since the last seek (the last GOP and
    whatever followed): a request at or shortly after the last decoded frame decodes forward
    without seeking, which makes sequential access cost one decode per frame.
    """

    def __init__(self, path: Path, fps: int, *, cache_frames: int = 32, forward_frames: int = 16,
                 depth: bool = False):
        self.path = path
        self._format = DEPTH_PIX_FMT if depth else "rgb24"  # depth: the uint16 12-bit codes
        self._fps = fps
        self._cache_frames = cache_frames
        self._forward_s = forward_frames / fps
        self._container = None
        self._pid = -1
        self._cache: OrderedDict[float, Any] = OrderedDict()
        self._last_ts: float | None = None
        self._first_ts: float | None = None  # the first frame decoded after the last seek

    def _open(self) -> None:
        import av

        if self._container is not None and self._pid == os.getpid():
            return
        self._container = av.open(str(self.path))
        self._stream = self._container.streams.video[0]
        # one decoding thread: random access decodes one or two frames after each seek, where frame
        # threading only adds latency, and DataLoader workers already fill the cores
        self._stream.codec_context.thread_count = 1
        self._tb = self._stream.time_base
        self._pid = os.getpid()
        self._reset()

    def _reset(self) -> None:
        self._cache.clear()
        self._frames = self._container.decode(self._stream)
        self._last_ts = None

    def close(self) -> None:
        if self._container is not None and self._pid == os.getpid():
            self._container.close()
        self._container = None

    def _lookup(self, ts: float, tol: float) -> float | None:
        """The cached frame time within `tol` of `ts`, if any."""
        return next((t for t in self._cache if abs(t - ts) < tol), None)

    def _seek(self, target: float) -> None:
        # the last keyframe at or before `target`: the wanted frame itself when it is a keyframe
        self._container.seek(max(0, int(target / self._tb)), backward=True, any_frame=False, stream=self._stream)
        self._reset()

    def _decode_until(self, ts: float, tol: float) -> None:
        self._first_ts = None
        for frame in self._frames:
            if frame.pts is None:
                continue
            t = float(frame.pts * self._tb)
            if self._first_ts is None:
                self._first_ts = t
            self._cache[t] = frame
            while len(self._cache) > self._cache_frames:
                self._cache.popitem(last=False)
            self._last_ts = t
            if t >= ts - tol:
                return

    def frame(self, ts: float, tol: float = VIDEO_TOLERANCE_S) -> np.ndarray:
        """The frame at `ts` seconds (within `tol`): RGB uint8 `[H, W, 3]`, or a depth video's uint16
        codes `[H, W]`."""
        import av

        try:
            return self._frame(ts, tol)
        except av.error.FFmpegError as exc:
            self.close()
            raise LeRobotFormatError(f"{self.path}: expected a readable video, found a damaged one ({exc})") from exc

    def _frame(self, ts: float, tol: float) -> np.ndarray:
        self._open()
        hit = self._lookup(ts, tol)
        if hit is None and self._last_ts is not None and self._last_ts < ts <= self._last_ts + self._forward_s:
            self._decode_until(ts, tol)  # shortly ahead: decode forward, no seek
            hit = self._lookup(ts, tol)
        back = 0.0
        while hit is None:
            # Seeking goes by decoding time: with B-frames (LeRobot's HEVC and AV1 streams have them) the
            # keyframe found can present after `ts`; then seek earlier, by 2, 4, 8 ... frames.
            target = max(0.0, ts + tol - back)
            self._seek(target)
            self._decode_until(ts, tol)
            hit = self._lookup(ts, tol)
            if hit is not None or target == 0.0 or self._first_ts is None or self._first_ts <= ts + tol:
                break
            back = max(2.0 * back, 2.0 / self._fps)
        if hit is None:
            near = min(self._cache, key=lambda t: abs(t - ts), default=None)
            raise LeRobotFormatError(
                f"{self.path}: no frame at t={ts:.6f}s within {tol}s (nearest decoded: {near})"
            )
        frame = self._cache[hit]
        if not isinstance(frame, np.ndarray):
            frame = frame.to_ndarray(format=self._format)
            self._cache[hit] = frame
        return frame


