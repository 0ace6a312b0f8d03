"""Wire codecs: openpi msgpack-numpy (SERVING.md 1.7) and OpenVLA json-numpy (SERVING.md 2.1).

msgpack-numpy, byte-compatible with openpi's `openpi_client.msgpack_numpy` (not PyPI `msgpack-numpy`):

    ndarray   -> {b"__ndarray__": True, b"data": bin(C-order bytes), b"dtype": dtype.str, b"shape": [..]}
    np.generic-> {b"__npgeneric__": True, b"data": <native value of .item()>, b"dtype": dtype.str}

packed with `use_bin_type=True`, unpacked with `raw=False` and `strict_map_key=True`. Decoded arrays are
read-only views of the frame (zero-copy), as upstream.

json-numpy, as PyPI `json-numpy` 2.x (used by OpenVLA's `deploy.py`):

    ndarray or np.generic -> {"__numpy__": base64(C-order bytes), "dtype": dtype.str, "shape": [..]}

a scalar has `"shape": []` and decodes to a numpy scalar.

Unlike upstream, decoding is defensive (SERVING.md 4.1, 4.2, 4.6, 4.14): only dtype kinds `b i u f U S`
travel (object, void/structured, complex and datetime kinds are refused on encode *and* decode, so
nothing can unpickle), the byte count must equal `prod(shape) * itemsize` before an array is built,
shapes must be lists of non-negative ints, and msgpack extension types are refused. Every decoding
problem raises `CodecError` (a `ValueError`) with the offending key, never anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import msgpack
import numpy as np

ALLOWED_KINDS = frozenset("biufUS")  # bool, signed, unsigned, float, unicode, bytes (SERVING.md 4.1)
MAX_NDIM = 32
MAX_DTYPE_CHARS = 16


class CodecError(ValueError):
    """A frame or body that does not decode into the protocol's values."""


# ============================================================================ shared checks
def check_dtype(dtype: Any, what: str = "dtype") -> np.dtype:
    """A dtype from its `.str` text (decode) or a numpy dtype (encode), refused unless its kind is allowed."""
    if isinstance(dtype, np.dtype):
        dt = dtype
    else:
        if not isinstance(dtype, str) or not 0 < len(dtype) <= MAX_DTYPE_CHARS:
            raise CodecError(f"{what}: expected a numpy dtype string such as '<f4' or '|u1', found {dtype!r:.40}")
        try:
            dt = np.dtype(dtype)
        except Exception as exc:  # TypeError, ValueError, SyntaxError for malformed text
            raise CodecError(f"{what}: {dtype!r} is not a numpy dtype ({exc})") from None
    if dt.kind not in ALLOWED_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise CodecError(f"{what}: dtype {dt.str!r} (kind {dt.kind!r}) is not allowed on the wire; "
                         f"allowed kinds are bool, int, uint, float, str, bytes ({''.join(sorted(ALLOWED_KINDS))})")
    if dt.itemsize == 0:
        raise CodecError(f"{what}: dtype {dt.str!r} has no size")
    return dt


def check_shape(shape: Any, what: str = "shape") -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise CodecError(f"{what}: expected a list of at most {MAX_NDIM} sizes, found {shape!r:.60}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise CodecError(f"{what}: sizes must be non-negative integers, found {list(shape)!r:.60}")
    return tuple(shape)


def array_from_bytes(data: bytes, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A read-only array over `data`, after checking `len(data) == prod(shape) * itemsize` (no allocation)."""
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise CodecError(f"{what}: {len(data)} data bytes, but shape {list(shape)} of {dtype.str} needs {expected}")
    return np.ndarray(buffer=data, dtype=dtype, shape=shape)


def _numpy_check(obj: np.ndarray | np.generic) -> np.dtype:
    try:
        return check_dtype(obj.dtype)
    except CodecError as exc:  # upstream raises ValueError("Unsupported dtype") here
        raise ValueError(str(exc)) from None


# ============================================================================ msgpack-numpy (openpi)
def _pack_numpy(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        dtype = _numpy_check(obj)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        dtype = _numpy_check(obj)
        value = obj.item()
        if not isinstance(value, (bool, int, float, str, bytes)):
            raise ValueError(f"numpy scalar of dtype {dtype.str} has no native msgpack value")
        return {b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def _unpack_numpy(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        data, dtype, shape = obj.get(b"data"), obj.get(b"dtype"), obj.get(b"shape")
        if not isinstance(data, bytes):
            raise CodecError(f"ndarray map: 'data' must be bin bytes, found {type(data).__name__}")
        return array_from_bytes(data, check_dtype(dtype, "ndarray dtype"), check_shape(shape, "ndarray shape"),
                                "ndarray map")
    if b"__npgeneric__" in obj:
        dtype = check_dtype(obj.get(b"dtype"), "npgeneric dtype")
        data = obj.get(b"data")
        native = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float), "U": (str,), "S": (bytes,)}[dtype.kind]
        if not isinstance(data, native) or (dtype.kind in "iuf" and isinstance(data, bool)):
            raise CodecError(f"npgeneric map: data {data!r:.40} does not fit dtype {dtype.str}")
        try:
            return dtype.type(data)
        except (OverflowError, ValueError, TypeError) as exc:
            raise CodecError(f"npgeneric map: {data!r:.40} is not a {dtype.str} value ({exc})") from None
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack extension type {code} is not part of the protocol")


def packb(obj: Any) -> bytes:
    """Encode one message exactly as openpi's `msgpack_numpy.packb`."""
    return msgpack.packb(obj, default=_pack_numpy, use_bin_type=True)


class Packer:
    """A reusable packer (openpi's `msgpack_numpy.Packer`): `Packer().pack(obj) -> bytes`."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=_pack_numpy, use_bin_type=True)

    def pack(self, obj: Any) -> bytes:
        return self._packer.pack(obj)


def unpackb(data: bytes) -> Any:
    """Decode one message; anything but a well-formed protocol value raises `CodecError`.

    Truncated input, trailing bytes, extension types, non-str/bytes map keys, nesting deeper than
    msgpack's stack and bad ndarray maps are all refused (SERVING.md 4.6).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected a binary frame, found {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_unpack_numpy, raw=False, strict_map_key=True,
                               ext_hook=_refuse_ext)
    except CodecError:
        raise
    except Exception as exc:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError, ...
        raise CodecError(f"not a msgpack message: {type(exc).__name__}: {str(exc)[:120]}") from None


# ============================================================================ json-numpy (OpenVLA)
def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        dtype = _numpy_check(obj)
        data = np.ascontiguousarray(obj).tobytes()
        return {"__numpy__": base64.b64encode(data).decode("ascii"), "dtype": dtype.str, "shape": list(obj.shape)}
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _json_object_hook(obj: dict) -> Any:
    if "__numpy__" not in obj:
        return obj
    text = obj["__numpy__"]
    if not isinstance(text, str):
        raise CodecError(f"json-numpy object: '__numpy__' must be a base64 string, found {type(text).__name__}")
    dtype = check_dtype(obj.get("dtype"), "json-numpy dtype")
    shape = check_shape(obj.get("shape"), "json-numpy shape")
    expected = math.prod(shape) * dtype.itemsize
    if len(text) > 4 * ((expected + 2) // 3) + 4:  # refuse before decoding what cannot fit the shape
        raise CodecError(f"json-numpy object: {len(text)} base64 characters, but shape {list(shape)} of "
                         f"{dtype.str} needs {expected} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CodecError(f"json-numpy object: invalid base64 ({exc})") from None
    array = array_from_bytes(data, dtype, shape, "json-numpy object")
    return array[()] if shape == () else array


def json_dumps(obj: Any) -> str:
    """JSON text with numpy values as json-numpy objects (what `json_numpy.dumps` writes)."""
    return json.dumps(obj, default=_json_default)


def json_loads(text: str | bytes) -> Any:
    """Parse JSON, turning json-numpy objects into (read-only) arrays; problems raise `CodecError`."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, object_hook=_json_object_hook)
    except CodecError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        raise CodecError(f"invalid JSON: {str(exc)[:120]}") from None
