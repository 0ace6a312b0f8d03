"""Reading the OpenVLA LIBERO RLDS shards (TFRecord files of `tf.train.Example`s) without TensorFlow.

Formats: DATA.md Part A. One TFRecord record = one serialized `tf.train.Example` = one whole episode
(A.2, A.4). Layers, bottom up:

    crc32c / mask_crc / unmask_crc      TFRecord checksums (A.2)
    iter_records(path)                  (offset, data) per record, CRCs checked
    parse_example(buf)                  protobuf wire decoding of one Example (A.3)
    find_shards(dataset_dir)            shard discovery through dataset_info.json `name` (A.1)
    RLDSEpisodeSource(dataset_dir)      the `EpisodeSource` of `data/schema.py`, OFT standardisation (A.6)

The source indexes every episode on construction by walking record headers and the Example's map-entry
headers only (images are skipped by their length prefix, never read). The first access to an episode
reads its record once (data CRC checked there), decodes the small arrays and keeps, per camera, the file
offsets of each step's JPEG; a frame then costs one `pread` of that JPEG plus a TF-exact decode
(`tfimage.decode_jpeg`).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import tfimage
from .schema import ACTION, IMAGE, STATE, TASK
from .standardize import ACTION_MASKS, STANDARDIZATIONS, standardize_libero

try:  # C implementation (SSE4.2 / ARMv8 CRC instructions); the pure-Python fallback is ~1000x slower
    import google_crc32c as _gcrc
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    _gcrc = None


class RLDSError(ValueError):
    """A malformed RLDS dataset, TFRecord file or Example (the message names file and byte offset)."""


# ----------------------------------------------------------------------------------------------- CRC

_CRC_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def _make_crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _CRC_POLY if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_crc_table()


def crc32c_py(data: bytes) -> int:
    """Table-driven pure-Python CRC-32C (init and xor-out 0xFFFFFFFF); the fallback of `crc32c`."""
    crc = _U32
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of `data`; `crc32c(b"123456789") == 0xE3069283`. Uses `google_crc32c` when installed."""
    if _gcrc is not None:
        return _gcrc.value(bytes(data) if not isinstance(data, bytes) else data)
    return crc32c_py(data)


def mask_crc(crc: int) -> int:
    """TFRecord masking: rotate right by 15 bits, then add 0xA282EAD8 (mod 2^32)."""
    crc &= _U32
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask_crc(masked: int) -> int:
    """Inverse of `mask_crc`."""
    r = (masked - _MASK_DELTA) & _U32
    return ((r >> 17) | (r << 15)) & _U32


# ------------------------------------------------------------------------------------- TFRecord framing

_HEADER = struct.Struct("<QI")  # length (uint64 LE), masked CRC of the 8 length bytes (uint32 LE)
_U32LE = struct.Struct("<I")


def _record_spans(buf: Any, size: int, path: str | Path, verify: bool) -> Iterator[tuple[int, int, int]]:
    """`(record offset, data offset, data length)` for each record of the TFRecord bytes `buf[:size]`.

    Reads only the 12-byte headers; with `verify` the length CRC is checked. A record that does not fit
    in the file is a truncation error; EOF is legal only at a record boundary.
    """
    off = 0
    while off < size:
        if size - off < _HEADER.size:
            raise RLDSError(f"{path}: truncated record header at byte offset {off}: expected {_HEADER.size} "
                            f"header bytes, found {size - off} before the end of the file")
        length, length_crc = _HEADER.unpack_from(buf, off)
        if verify:
            found = mask_crc(crc32c(bytes(buf[off:off + 8])))
            if found != length_crc:
                raise RLDSError(f"{path}: length CRC mismatch in the record at byte offset {off}: stored "
                                f"0x{length_crc:08x}, computed 0x{found:08x} (corrupt file or not a TFRecord file)")
        start = off + _HEADER.size
        if length > size - start - 4:
            raise RLDSError(f"{path}: truncated record at byte offset {off}: its header announces {length} data "
                            f"bytes + 4 CRC bytes, but only {size - start} bytes remain in the file")
        yield off, start, length
        off = start + length + 4


def _check_data_crc(path: str | Path, record_offset: int, data: bytes, stored: int) -> None:
    found = mask_crc(crc32c(data))
    if found != stored:
        raise RLDSError(f"{path}: data CRC mismatch in the record at byte offset {record_offset} "
                        f"({len(data)} data bytes): stored 0x{stored:08x}, computed 0x{found:08x}")


def iter_records(path: str | Path, verify: bool = True) -> Iterator[tuple[int, bytes]]:
    """Yield `(byte offset of the record, record data)` for every record of a TFRecord file.

    With `verify` both the length CRC and the data CRC are checked; any mismatch, or a file that ends
    inside a record, raises `RLDSError` naming the file and the record's byte offset.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for off, start, length in _record_spans(mm, size, path, verify):
                data = mm[start:start + length]
                if verify:
                    _check_data_crc(path, off, data, _U32LE.unpack_from(mm, start + length)[0])
                yield off, data


# ------------------------------------------------------------------------------- protobuf wire decoding

_MASK64 = (1 << 64) - 1
_EMPTY_F32 = np.zeros(0, np.float32)
_EMPTY_I64 = np.zeros(0, np.int64)
BYTES_LIST, FLOAT_LIST, INT64_LIST = 1, 2, 3  # Feature oneof field numbers


class _Truncated(Exception):
    def __init__(self, pos: int, what: str):
        super().__init__(pos, what)
        self.pos, self.what = pos, what


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """Decode one base-128 varint at `buf[pos]` (not past `end`); returns `(value mod 2^64, new pos)`."""
    if pos >= end:
        raise _Truncated(pos, "varint runs past the end of its message")
    b = buf[pos]
    pos += 1
    if b < 0x80:
        return b, pos
    result = b & 0x7F
    shift = 7
    while True:
        if pos >= end:
            raise _Truncated(pos, "varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise _Truncated(pos, "varint longer than 10 bytes")


def _skip_field(buf: Any, pos: int, end: int, tag: int) -> int:
    """Skip the value of a field whose tag was just read; returns the position after it."""
    wire = tag & 7
    if wire == 0:
        _, pos = _varint(buf, pos, end)
    elif wire == 1:
        pos += 8
    elif wire == 2:
        n, pos = _varint(buf, pos, end)
        pos += n
    elif wire == 5:
        pos += 4
    elif wire == 3:  # start group: skip nested fields until the matching end group
        field = tag >> 3
        while True:
            inner, pos = _varint(buf, pos, end)
            if inner & 7 == 4:
                if inner >> 3 != field:
                    raise _Truncated(pos, f"end-group of field {inner >> 3} closes a group of field {field}")
                break
            pos = _skip_field(buf, pos, end, inner)
    else:
        raise _Truncated(pos, f"invalid wire type {wire} (tag 0x{tag:x})")
    if pos > end:
        raise _Truncated(end, f"field (tag 0x{tag:x}) runs past the end of its message")
    return pos


def _length_delimited(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """`(start, stop)` of the length-delimited payload at `pos`."""
    n, pos = _varint(buf, pos, end)
    if n > end - pos:
        raise _Truncated(pos, f"length-delimited field of {n} bytes runs past the end of its message "
                              f"({end - pos} bytes left)")
    return pos, pos + n


def _packed_varints(buf: Any, a: int, b: int) -> np.ndarray:
    """Vectorised decoding of the packed varints in `buf[a:b]` as int64 (two's complement, not zigzag)."""
    raw = np.frombuffer(buf, np.uint8, b - a, a)
    if raw.size == 0:
        return _EMPTY_I64
    if int(raw.max()) < 0x80:  # all single-byte varints (0 ... 127): the common 0/1 flags
        return raw.astype(np.int64)
    last = raw < 0x80
    if not last[-1]:
        raise _Truncated(b, "packed varint list ends inside a varint")
    ends = np.flatnonzero(last)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > 10:
        raise _Truncated(a + int(starts[int(np.argmax(lengths))]), "varint longer than 10 bytes")
    shifts = ((np.arange(raw.size) - np.repeat(starts, lengths)) * 7).astype(np.uint64)
    values = (raw & 0x7F).astype(np.uint64) << shifts
    return np.bitwise_or.reduceat(values, starts).view(np.int64)


def _decode_bytes_list(buf: Any, spans: list[tuple[int, int]], as_spans: bool) -> list[bytes] | np.ndarray:
    """BytesList payloads → list of bytes (or, with `as_spans`, an int64 `[N, 2]` array of (start, stop))."""
    out: list = []
    for pos, end in spans:
        while pos < end:
            tag = buf[pos]
            if tag == 0x0A:  # field 1, length-delimited: the common case, inlined
                pos += 1
                n = buf[pos] if pos < end else 0x80
                if n < 0x80:
                    pos += 1
                else:
                    n, pos = _varint(buf, pos, end)
                if n > end - pos:
                    raise _Truncated(pos, f"bytes element of {n} bytes runs past the end of its BytesList")
                out.append((pos, pos + n) if as_spans else bytes(buf[pos:pos + n]))
                pos += n
            else:
                tag, pos = _varint(buf, pos, end)
                pos = _skip_field(buf, pos, end, tag)
    if as_spans:
        return np.asarray(out, np.int64).reshape(-1, 2)
    return out


def _decode_float_list(buf: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    pieces: list[np.ndarray] = []
    single: list[bytes] = []  # consecutive unpacked floats, flushed as one piece to keep the order
    for pos, end in spans:
        while pos < end:
            tag, pos = _varint(buf, pos, end)
            if tag == 0x0A:  # packed
                a, b = _length_delimited(buf, pos, end)
                if (b - a) % 4:
                    raise _Truncated(a, f"packed FloatList of {b - a} bytes is not a multiple of 4")
                if single:
                    pieces.append(np.frombuffer(b"".join(single), "<f4"))
                    single = []
                pieces.append(np.frombuffer(buf, "<f4", (b - a) // 4, a))
                pos = b
            elif tag == 0x0D:  # unpacked: one fixed32 per element
                if pos + 4 > end:
                    raise _Truncated(pos, "unpacked float runs past the end of its FloatList")
                single.append(bytes(buf[pos:pos + 4]))
                pos += 4
            else:
                pos = _skip_field(buf, pos, end, tag)
    if single:
        pieces.append(np.frombuffer(b"".join(single), "<f4"))
    if not pieces:
        return _EMPTY_F32.copy()
    if len(pieces) == 1:
        return pieces[0].astype(np.float32)  # copy: do not keep the record buffer alive
    return np.concatenate(pieces).astype(np.float32, copy=False)


def _decode_int64_list(buf: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    pieces: list[np.ndarray] = []
    single: list[int] = []
    for pos, end in spans:
        while pos < end:
            tag, pos = _varint(buf, pos, end)
            if tag == 0x0A:  # packed
                a, b = _length_delimited(buf, pos, end)
                if single:
                    pieces.append(np.array(single, np.uint64).view(np.int64))
                    single = []
                pieces.append(_packed_varints(buf, a, b))
                pos = b
            elif tag == 0x08:  # unpacked
                v, pos = _varint(buf, pos, end)
                single.append(v)
            else:
                pos = _skip_field(buf, pos, end, tag)
    if single:
        pieces.append(np.array(single, np.uint64).view(np.int64))
    if not pieces:
        return _EMPTY_I64.copy()
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()


def _feature_spans(buf: Any, spans: list[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]]:
    """`(kind, list payload spans)` of a Feature given as one or more (merged) message spans.

    kind 0 = no oneof set. A kind set twice merges (concatenates); a different kind replaces (oneof).
    """
    kind, lists = 0, []
    for pos, end in spans:
        while pos < end:
            tag, pos = _varint(buf, pos, end)
            field = tag >> 3
            if tag & 7 == 2 and field in (BYTES_LIST, FLOAT_LIST, INT64_LIST):
                a, b = _length_delimited(buf, pos, end)
                if field != kind:
                    kind, lists = field, []
                lists.append((a, b))
                pos = b
            else:
                pos = _skip_field(buf, pos, end, tag)
    return kind, lists


def _example_entries(buf: Any, start: int, end: int) -> dict[str, list[tuple[int, int]]]:
    """Map `key → Feature message spans` of a serialized Example in `buf[start:end]` (headers only)."""
    entries: dict[str, list[tuple[int, int]]] = {}
    pos = start
    while pos < end:  # Example
        tag, pos = _varint(buf, pos, end)
        if tag != 0x0A:
            pos = _skip_field(buf, pos, end, tag)
            continue
        fa, fb = _length_delimited(buf, pos, end)
        pos = fb
        while fa < fb:  # Features
            tag, fa = _varint(buf, fa, fb)
            if tag != 0x0A:
                fa = _skip_field(buf, fa, fb, tag)
                continue
            ea, eb = _length_delimited(buf, fa, fb)
            fa = eb
            key, value = b"", []
            while ea < eb:  # map entry {key = 1, value = 2}, any field order
                tag, ea = _varint(buf, ea, eb)
                if tag == 0x0A:
                    ka, kb = _length_delimited(buf, ea, eb)
                    key = bytes(buf[ka:kb])
                    ea = kb
                elif tag == 0x12:
                    va, vb = _length_delimited(buf, ea, eb)
                    value.append((va, vb))  # a repeated message field merges
                    ea = vb
                else:
                    ea = _skip_field(buf, ea, eb, tag)
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _Truncated(ea, f"feature key {key[:40]!r} is not UTF-8") from exc
            entries[name] = value  # a duplicated key: the last entry wins, as in protobuf maps
    return entries


def _decode_feature(buf: Any, spans: list[tuple[int, int]], as_spans: bool = False) -> list | np.ndarray:
    kind, lists = _feature_spans(buf, spans)
    if kind == FLOAT_LIST:
        return _decode_float_list(buf, lists)
    if kind == INT64_LIST:
        return _decode_int64_list(buf, lists)
    if kind == BYTES_LIST:
        return _decode_bytes_list(buf, lists, as_spans)
    return []


def _wire_error(exc: _Truncated, where: str, base: int = 0) -> RLDSError:
    return RLDSError(f"{where}: malformed tf.train.Example at byte {exc.pos - base} of the record: {exc.what}")


def parse_example(buf: bytes | bytearray | memoryview, span_keys: Collection[str] = (),
                  where: str = "serialized Example") -> dict[str, list | np.ndarray]:
    """Decode a serialized `tf.train.Example` into `{key: values}` (DATA.md A.3).

    FloatList → float32 array, Int64List → int64 array, BytesList → list of bytes, a Feature with no
    list set → `[]`. Packed and unpacked encodings (also mixed), unknown fields and any map-entry order
    are accepted. Keys in `span_keys` holding a BytesList come back as an int64 `[N, 2]` array of
    `(start, stop)` offsets into `buf` instead of copies. Malformed input raises `RLDSError`.
    """
    try:
        entries = _example_entries(buf, 0, len(buf))
        return {k: _decode_feature(buf, v, k in span_keys) for k, v in entries.items()}
    except _Truncated as exc:
        raise _wire_error(exc, where) from None
    except IndexError:  # pragma: no cover - every read is bounds-checked; kept as a safety net
        raise RLDSError(f"{where}: malformed tf.train.Example (read past the end)") from None


def _feature_length(buf: Any, spans: list[tuple[int, int]]) -> tuple[int, int]:
    """`(kind, number of values)` of a Feature without decoding it (packed floats: by byte length)."""
    kind, lists = _feature_spans(buf, spans)
    if kind == FLOAT_LIST:
        n = 0
        for pos, end in lists:
            while pos < end:
                tag, pos = _varint(buf, pos, end)
                if tag == 0x0A:
                    a, b = _length_delimited(buf, pos, end)
                    n += (b - a) // 4
                    pos = b
                elif tag == 0x0D:
                    n += 1
                    pos += 4
                else:
                    pos = _skip_field(buf, pos, end, tag)
        return kind, n
    if kind == INT64_LIST:
        return kind, len(_decode_int64_list(buf, lists))
    if kind == BYTES_LIST:
        return kind, len(_decode_bytes_list(buf, lists, True))
    return kind, 0


# ------------------------------------------------------------------------------------- dataset layout

_SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<split>[^-.]+)\.tfrecord-(?P<index>\d+)-of-(?P<count>\d+)$")


def resolve_dataset_dir(path: str | Path) -> Path:
    """The folder holding `dataset_info.json`: `path` itself, or its newest version subfolder
    (`libero_10_no_noops/` → `libero_10_no_noops/1.0.0/`)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such RLDS dataset folder")
    if (path / "dataset_info.json").is_file():
        return path
    versions = [p for p in path.iterdir() if p.is_dir() and (p / "dataset_info.json").is_file()]
    if not versions:
        raise RLDSError(f"{path}: not an RLDS dataset: no dataset_info.json in the folder or in a version "
                        f"subfolder (expected e.g. {path}/1.0.0/dataset_info.json)")

    def version_key(p: Path) -> tuple:
        return tuple(int(x) if x.isdigit() else -1 for x in p.name.split("."))

    return max(versions, key=version_key)


def read_dataset_info(dataset_dir: str | Path) -> dict:
    """The parsed `dataset_info.json` of a dataset folder."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.is_file():
        raise RLDSError(f"{dataset_dir}: not an RLDS dataset: no dataset_info.json")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RLDSError(f"{info_path}: not a readable JSON file ({exc})") from exc
    if not isinstance(info, dict):
        raise RLDSError(f"{info_path}: expected a JSON object, found {type(info).__name__}")
    return info


def shard_lengths(info: dict, split: str = "train") -> list[int] | None:
    """Episodes per shard from `dataset_info.json` `splits[name=split].shardLengths`, if recorded."""
    for entry in info.get("splits", []) or []:
        if isinstance(entry, dict) and entry.get("name") == split and entry.get("shardLengths") is not None:
            try:
                return [int(x) for x in entry["shardLengths"]]
            except (TypeError, ValueError):
                return None
    return None


def find_shards(dataset_dir: str | Path, split: str = "train") -> list[Path]:
    """The shard files of `split`, sorted by shard index, after checking the set is complete (A.1).

    The file prefix is `dataset_info.json["name"]` (e.g. `liber_o10` for libero_10), never the folder
    name. Without a `name`, any `*.tfrecord-*` files are used if they share one prefix. Shards of
    another dataset in the folder, or missing shards (by the `-of-NNNNN` suffix), are errors.
    """
    dataset_dir = Path(dataset_dir)
    info = read_dataset_info(dataset_dir)
    name = info.get("name")
    all_files = sorted(p for p in dataset_dir.glob("*.tfrecord-*") if p.is_file())
    parsed: dict[Path, re.Match] = {}
    for p in all_files:
        m = _SHARD_RE.match(p.name)
        if m is None:
            raise RLDSError(f"{p}: not a shard file name; expected '<name>-<split>.tfrecord-NNNNN-of-NNNNN'")
        parsed[p] = m
    if isinstance(name, str) and name:
        expected = f"{name}-{split}"
        foreign = [p for p, m in parsed.items() if m["name"] != name]
        if foreign:
            raise RLDSError(f"{foreign[0]}: shard of another dataset in {dataset_dir}: expected the prefix "
                            f"'{expected}.tfrecord-' (dataset_info.json name '{name}'), found "
                            f"'{parsed[foreign[0]]['name']}-{parsed[foreign[0]]['split']}'"
                            + (f" ({len(foreign)} such files)" if len(foreign) > 1 else ""))
    else:
        names = sorted({m["name"] for m in parsed.values()})
        if len(names) > 1:
            raise RLDSError(f"{dataset_dir}: dataset_info.json has no 'name' and the shards have several "
                            f"prefixes {names}; cannot tell which dataset to read")
        name = names[0] if names else "?"
    shards = [p for p, m in parsed.items() if m["name"] == name and m["split"] == split]
    if not shards:
        raise RLDSError(f"{dataset_dir}: not an RLDS dataset: no shards '{name}-{split}.tfrecord-*' "
                        f"(found {len(all_files)} *.tfrecord-* files)")
    counts = {int(parsed[p]["count"]) for p in shards}
    if len(counts) > 1:
        raise RLDSError(f"{dataset_dir}: shards of '{name}-{split}' disagree on the shard count: "
                        f"-of- suffixes {sorted(counts)}")
    count = counts.pop()
    by_index = {int(parsed[p]["index"]): p for p in shards}
    missing = [i for i in range(count) if i not in by_index]
    extra = sorted(i for i in by_index if i >= count)
    if missing or extra:
        detail = []
        if missing:
            shown = ", ".join(f"{name}-{split}.tfrecord-{i:05d}-of-{count:05d}" for i in missing[:8])
            detail.append(f"{len(missing)} missing: {shown}" + (", ..." if len(missing) > 8 else ""))
        if extra:
            detail.append(f"indices past the count: {extra}")
        raise RLDSError(f"{dataset_dir}: incomplete shard set: expected {count} shards (-of-{count:05d}), "
                        f"found {len(by_index)}; " + "; ".join(detail))
    return [by_index[i] for i in range(count)]


# ------------------------------------------------------------------------------------- episode source

# Per-step keys of one episode (A.4): the Feature kind and the number of values per step.
AGENTVIEW_KEY = "steps/observation/image"
WRIST_KEY = "steps/observation/wrist_image"
STATE_KEY = "steps/observation/state"
ACTION_KEY = "steps/action"
INSTRUCTION_KEY = "steps/language_instruction"
PER_STEP_KEYS = {
    AGENTVIEW_KEY: (BYTES_LIST, 1), WRIST_KEY: (BYTES_LIST, 1), STATE_KEY: (FLOAT_LIST, 8),
    "steps/observation/joint_state": (FLOAT_LIST, 7), ACTION_KEY: (FLOAT_LIST, 7),
    "steps/reward": (FLOAT_LIST, 1), "steps/discount": (FLOAT_LIST, 1), "steps/is_first": (INT64_LIST, 1),
    "steps/is_last": (INT64_LIST, 1), "steps/is_terminal": (INT64_LIST, 1), INSTRUCTION_KEY: (BYTES_LIST, 1),
}
REQUIRED_KEYS = (ACTION_KEY, STATE_KEY, AGENTVIEW_KEY, WRIST_KEY, INSTRUCTION_KEY)
CAMERA_KEYS = {"agentview": AGENTVIEW_KEY, "wrist": WRIST_KEY}  # canonical camera → RLDS key (A.6 views)
ACTION_MASK = ACTION_MASKS["libero"]  # OFT BOUNDS_Q99 mask: the gripper stays 0/1 (A.6)


@dataclass(frozen=True)
class EpisodeRecord:
    """Where one episode lives: shard file, record offset, data offset and length, number of steps."""
    shard: int
    offset: int
    data_offset: int
    length: int
    num_steps: int


@dataclass
class _Layout:
    state: np.ndarray                 # [T, 8] float32, standardised per the source setting
    action: np.ndarray                # [T, 7] float32
    task: str
    image_spans: dict[str, np.ndarray]  # camera → [T, 2] absolute (start, stop) file offsets of the JPEGs


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """JPEG/PNG bytes → uint8 `[H, W, 3]` RGB (no flip: the RLDS frames are already rotated 180°, A.4).
    JPEGs decode to the pixels the published pipeline's `tf.io.decode_image` gives (TF's fast integer IDCT,
    `tfimage.decode_jpeg`); Pillow's accurate IDCT would differ in most values, by up to ~17 levels."""
    try:
        arr = tfimage.decode_image(data)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RLDSError(f"{where}: cannot decode the image ({len(data)} bytes): {exc}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise RLDSError(f"{where}: expected an RGB image, decoded shape {arr.shape}")
    return arr


class RLDSEpisodeSource:
    """Random access by (episode, frame) to an OpenVLA LIBERO RLDS dataset (`EpisodeSource`).

    `dataset_dir` is the folder with `dataset_info.json` (or its parent holding version folders).
    `standardize="libero"` applies the OFT transform (A.6) to `observation.state` / `action`; `None`
    returns the raw RLDS arrays. With `verify_crc`, length CRCs are checked while indexing and each
    record's data CRC the first time the record is read (`verify()` checks every record at once).
    `cache_episodes` bounds the LRU of decoded per-episode arrays and JPEG offsets (~30 kB each).
    """

    cameras: list[str] = list(CAMERA_KEYS)
    action_mask: list[bool] = ACTION_MASK

    def __init__(self, dataset_dir: str | Path, *, verify_crc: bool = True, standardize: str | None = "libero",
                 cache_episodes: int = 2048):
        if standardize not in STANDARDIZATIONS:
            raise ValueError(f"standardize must be one of {STANDARDIZATIONS}, got {standardize!r}")
        self.root = resolve_dataset_dir(dataset_dir)
        self.info = read_dataset_info(self.root)
        self.shards = find_shards(self.root)
        self.name = str(self.info.get("name") or _SHARD_RE.match(self.shards[0].name)["name"])
        self.standardize = standardize
        self.verify_crc = verify_crc
        self.cache_episodes = max(1, int(cache_episodes))
        self._cache: OrderedDict[int, _Layout] = OrderedDict()
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self.episodes: list[EpisodeRecord] = []
        expected = shard_lengths(self.info)
        for i, shard in enumerate(self.shards):
            found = self._index_shard(i)
            if expected is not None and len(expected) == len(self.shards) and found != expected[i]:
                raise RLDSError(f"{shard}: holds {found} episodes, but dataset_info.json shardLengths says "
                                f"{expected[i]} (truncated or replaced shard)")

    # -- indexing -------------------------------------------------------------------------------------

    def _index_shard(self, shard: int) -> int:
        """Append the EpisodeRecords of one shard; reads record headers and map-entry headers only."""
        path = self.shards[shard]
        before = len(self.episodes)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 0
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for off, start, length in _record_spans(mm, size, path, self.verify_crc):
                    where = f"{path}, record at byte offset {off}"
                    try:
                        entries = _example_entries(mm, start, start + length)
                        missing = [k for k in REQUIRED_KEYS if k not in entries]
                        if missing:
                            raise RLDSError(f"{where}: required key '{missing[0]}' missing from the episode "
                                            f"(missing: {missing}; present: {sorted(entries)})")
                        kind, n = _feature_length(mm, entries[ACTION_KEY])
                    except _Truncated as exc:
                        raise _wire_error(exc, where, start) from None
                    if kind != FLOAT_LIST or n % 7:
                        raise RLDSError(f"{where}: '{ACTION_KEY}' must be a float_list of 7*T values, found "
                                        f"{_KIND_NAMES[kind]} with {n} values")
                    self.episodes.append(EpisodeRecord(shard, off, start, length, n // 7))
        return len(self.episodes) - before

    # -- EpisodeSource --------------------------------------------------------------------------------

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return sum(r.num_steps for r in self.episodes)

    def episode_length(self, episode: int) -> int:
        return self._record(episode).num_steps

    def episode_arrays(self, episode: int) -> dict[str, np.ndarray]:
        lay = self._layout(episode)
        return {STATE: lay.state.copy(), ACTION: lay.action.copy()}

    def task(self, episode: int) -> str:
        return self._layout(episode).task

    def frame(self, episode: int, t: int, keys: list[str] | None = None) -> dict[str, Any]:
        """One step in the canonical schema: images (uint8 HWC), state, action, task."""
        lay = self._layout(episode)
        n = len(lay.action)
        if not 0 <= t < n:
            raise IndexError(f"{self.name}: step {t} out of range for episode {episode} with {n} steps")
        out: dict[str, Any] = {}
        for key in keys if keys is not None else self.keys:
            if key.startswith(IMAGE) and key[len(IMAGE):] in lay.image_spans:
                cam = key[len(IMAGE):]
                a, b = (int(x) for x in lay.image_spans[cam][t])
                rec = self.episodes[episode]
                out[key] = decode_image(self._pread(rec.shard, b - a, a),
                                        f"{self.shards[rec.shard]}, episode {episode} (record at byte offset "
                                        f"{rec.offset}), step {t}, '{CAMERA_KEYS[cam]}'")
            elif key == STATE:
                out[key] = lay.state[t].copy()
            elif key == ACTION:
                out[key] = lay.action[t].copy()
            elif key == TASK:
                out[key] = lay.task
            else:
                raise KeyError(f"{self.name}: no key '{key}' in this dataset; available: {self.keys}")
        return out

    @property
    def keys(self) -> list[str]:
        """The canonical keys `frame` can return."""
        return [IMAGE + c for c in self.cameras] + [STATE, ACTION, TASK]

    # -- raw access -----------------------------------------------------------------------------------

    def episode_location(self, episode: int) -> tuple[Path, int]:
        """`(shard path, byte offset of the record)` of an episode."""
        rec = self._record(episode)
        return self.shards[rec.shard], rec.offset

    def read_record(self, episode: int) -> bytes:
        """The serialized Example of an episode (data CRC checked when `verify_crc`)."""
        rec = self._record(episode)
        data = self._pread(rec.shard, rec.length, rec.data_offset)
        if self.verify_crc:
            stored = _U32LE.unpack(self._pread(rec.shard, 4, rec.data_offset + rec.length))[0]
            _check_data_crc(self.shards[rec.shard], rec.offset, data, stored)
        return data

    def read_episode(self, episode: int, decode_images: bool = False) -> dict[str, list | np.ndarray]:
        """Every feature of the episode's Example, undecoded (`parse_example`), images as JPEG bytes
        unless `decode_images` (then uint8 `[T, H, W, 3]` arrays)."""
        rec = self._record(episode)
        where = f"{self.shards[rec.shard]}, record at byte offset {rec.offset}"
        feats = parse_example(self.read_record(episode), where=where)
        if decode_images:
            for key in CAMERA_KEYS.values():
                if key in feats:
                    frames = [decode_image(b, f"{where}, '{key}' step {t}") for t, b in enumerate(feats[key])]
                    feats[key] = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
        return feats

    def verify(self) -> None:
        """Check the length and data CRC of every record of every shard (raises `RLDSError`)."""
        for path in self.shards:
            for _ in iter_records(path, verify=True):
                pass

    # -- internals ------------------------------------------------------------------------------------

    def _record(self, episode: int) -> EpisodeRecord:
        if not 0 <= episode < len(self.episodes):
            raise IndexError(f"{self.name}: episode {episode} out of range ({len(self.episodes)} episodes)")
        return self.episodes[episode]

    def _layout(self, episode: int) -> _Layout:
        with self._lock:
            lay = self._cache.get(episode)
            if lay is not None:
                self._cache.move_to_end(episode)
                return lay
        lay = self._build_layout(episode)
        with self._lock:
            self._cache[episode] = lay
            while len(self._cache) > self.cache_episodes:
                self._cache.popitem(last=False)
        return lay

    def _build_layout(self, episode: int) -> _Layout:
        rec = self._record(episode)
        where = f"{self.shards[rec.shard]}, record at byte offset {rec.offset}"
        data = self.read_record(episode)
        steps = rec.num_steps
        span_keys = set(CAMERA_KEYS.values())
        feats: dict[str, Any] = {}
        try:
            entries = _example_entries(data, 0, len(data))
            for key in REQUIRED_KEYS:
                if key not in entries:
                    raise RLDSError(f"{where}: required key '{key}' missing from the episode "
                                    f"(present: {sorted(entries)})")
            for key, (kind, width) in PER_STEP_KEYS.items():
                if key not in entries:
                    continue
                found, _ = _feature_spans(data, entries[key])
                if found not in (kind, 0):
                    raise RLDSError(f"{where}: '{key}' must be {_KIND_NAMES[kind]}, found {_KIND_NAMES[found]}")
                value = _decode_feature(data, entries[key], key in span_keys)
                if len(value) != width * steps:
                    raise RLDSError(f"{where}: '{key}' has {len(value)} values, expected {width * steps} "
                                    f"({width} per step x T={steps} from '{ACTION_KEY}')")
                feats[key] = value
        except _Truncated as exc:
            raise _wire_error(exc, where) from None
        state = feats[STATE_KEY].reshape(steps, 8)
        action = feats[ACTION_KEY].reshape(steps, 7)
        if self.standardize == "libero":
            state, action = standardize_libero(state, action)
        task = self._task(feats[INSTRUCTION_KEY], where)
        spans = {cam: np.asarray(feats[key], np.int64).reshape(steps, 2) + rec.data_offset
                 for cam, key in CAMERA_KEYS.items()}
        return _Layout(state=state, action=action, task=task, image_spans=spans)

    @staticmethod
    def _task(values: list, where: str) -> str:
        if not values:
            return ""
        first = values[0]
        for t, v in enumerate(values):
            if v != first:
                raise RLDSError(f"{where}: '{INSTRUCTION_KEY}' is not constant over the episode: step 0 "
                                f"{first[:80]!r}, step {t} {v[:80]!r}")
        try:
            return first.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RLDSError(f"{where}: '{INSTRUCTION_KEY}' is not UTF-8 ({exc})") from exc

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked worker: own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._fds[shard] = fd
        return fd

    def _pread(self, shard: int, n: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            data = os.pread(self._fd(shard), n, offset)
        else:  # pragma: no cover - Windows
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                data = f.read(n)
        if len(data) != n:
            raise RLDSError(f"{self.shards[shard]}: short read at byte offset {offset}: expected {n} bytes, "
                            f"found {len(data)} (file truncated since it was indexed?)")
        return data

    def close(self) -> None:
        """Close the shard file descriptors (reopened on demand)."""
        fds, self._fds = self._fds, {}
        if self._pid == os.getpid():
            for fd in fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"], state["_lock"], state["_cache"] = {}, None, OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return (f"RLDSEpisodeSource({str(self.root)!r}, name={self.name!r}, shards={len(self.shards)}, "
                f"episodes={self.num_episodes}, standardize={self.standardize!r})")


_KIND_NAMES = {0: "an empty Feature", BYTES_LIST: "a bytes_list", FLOAT_LIST: "a float_list",
               INT64_LIST: "an int64_list"}
