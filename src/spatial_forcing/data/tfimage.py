"""TensorFlow's image ops as the published OpenVLA-OFT pipeline calls them, bit for bit, without TensorFlow.

The published data pipeline (dlimp ``resize_image`` after ``tf.io.decode_image``) and the published LIBERO
evaluation (``resize_image_for_policy``: ``tf.image.encode_jpeg`` -> ``tf.io.decode_image`` -> the same
resize) use three TF ops. Each is reproduced here exactly, and pinned against TensorFlow's own output by
``tests/test_tfimage.py`` (fixtures made by ``tools/tf_image_oracle.py`` with tensorflow-cpu):

* ``encode_jpeg`` = ``tf.image.encode_jpeg`` with its defaults: libjpeg(-turbo) ``jpeg_set_defaults`` (accurate
  integer DCT, no Huffman optimisation, baseline), ``jpeg_set_quality(95, force_baseline)``, 4:2:0 chroma,
  and a JFIF header of 300 x 300 dots per inch. Pillow writes the same bytes when given ``dpi=(300, 300)``;
  without it the JFIF density differs (5 header bytes, no pixel).
* ``decode_jpeg`` = ``tf.io.decode_image`` on a JPEG: libjpeg-turbo with the **fast integer IDCT**
  (``JDCT_IFAST``, TensorFlow's default for every decode op, "sacrificing image quality for speed") and
  fancy (triangle) chroma upsampling. Pillow always decodes with the accurate IDCT (``JDCT_ISLOW``): 60-70 %
  of the values of a LIBERO frame then differ, by up to 17 levels. simplejpeg (a libjpeg-turbo binding)
  exposes both settings (``fastdct=True``, ``fastupsample=False``).
* ``resize_lanczos3`` = ``tf.image.resize(method="lanczos3", antialias=True)``, i.e. the CPU
  ``ScaleAndTranslate`` kernel with zero translation, in float32: per-axis spans and weights as TF computes
  them (float32 inverse scale rounded from double, ``sinf``-based Lanczos, sequential normalisation), then
  **rows first** (height), then columns, each output a sequential float32 sum over its span from 0.
  ``resize_uint8`` adds dlimp's / OFT's ``cast(clip(round(x), 0, 255), uint8)`` (round half to even).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import math
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["JPEG_QUALITY", "TF_JPEG_DPI", "encode_jpeg", "decode_jpeg", "decode_image", "jpeg_roundtrip",
           "lanczos3_kernel", "lanczos3_weights", "resize_lanczos3", "resize_uint8", "implementation"]

JPEG_QUALITY = 95  # tf.image.encode_jpeg default
TF_JPEG_DPI = 300  # tf.image.encode_jpeg default density_unit "in", x_density = y_density = 300
_JPEG_MAGIC = b"\xff\xd8"
_PI = np.float32(3.14159265359)  # TF's kPI (float)
_RADIUS = np.float32(3)


def _check_image(image: Any, what: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (1, 3) or 0 in a.shape:
        raise ValueError(f"{what}: expected a uint8 (H, W, 3) or (H, W, 1) image, found {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


# ------------------------------------------------------------------------------------------------ JPEG

def encode_jpeg(image: Any, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 HxWx3 -> the bytes ``tf.image.encode_jpeg(image, quality=quality)`` returns (default settings:
    baseline, accurate DCT, 4:2:0 chroma, unoptimised Huffman tables, JFIF 300 dpi)."""
    a = _check_image(image)
    if a.shape[2] != 3:
        raise ValueError(f"encode_jpeg: expected an RGB (H, W, 3) image, found shape {a.shape}")
    if not isinstance(quality, (int, np.integer)) or isinstance(quality, bool) or not 0 <= quality <= 100:
        raise ValueError(f"quality: expected an int in 0..100, found {quality!r}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0",
                            dpi=(TF_JPEG_DPI, TF_JPEG_DPI))
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 HxWx3 RGB, the pixels ``tf.io.decode_image(data, dtype=tf.uint8)`` returns for a
    colour JPEG (libjpeg-turbo, fast integer IDCT, fancy upsampling). A grayscale JPEG comes back as 3
    equal channels (TF would keep 1)."""
    import simplejpeg

    return simplejpeg.decode_jpeg(bytes(data), colorspace="RGB", fastdct=True, fastupsample=False)


def decode_image(data: bytes) -> np.ndarray:
    """JPEG or other Pillow-readable bytes -> uint8 HxWx3 RGB. JPEGs decode as TensorFlow decodes them
    (``decode_jpeg``); lossless formats (PNG, ...) decode identically everywhere, through Pillow."""
    if bytes(data[:2]) == _JPEG_MAGIC:
        return decode_jpeg(data)
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)


def jpeg_roundtrip(image: Any, quality: int = JPEG_QUALITY) -> np.ndarray:
    """``tf.io.decode_image(tf.image.encode_jpeg(image))`` (the OFT evaluation repeats the storage JPEG)."""
    return decode_jpeg(encode_jpeg(image, quality))


# -------------------------------------------------------------------------------------------- Lanczos3

@lru_cache(maxsize=1)
def _libm_sinf() -> Any:
    """The C library's ``sinf``, the function TF's kernel calls (``std::sin(float)``); None if not found."""
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        fn = libm.sinf
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


def _sinf(a: np.ndarray) -> np.ndarray:
    """float32 sine as C's ``sinf`` computes it. glibc's ``sinf`` is not correctly rounded (about 1.4 % of
    arguments land one ulp away from the rounded double sine), and numpy's float32 ``sin`` differs from
    both, so the weights would differ from TF's in the last bit; without a C ``sinf``, the rounded double."""
    a = np.asarray(a, dtype=np.float32)
    fn = _libm_sinf()
    if fn is None:
        return np.sin(a.astype(np.float64)).astype(np.float32)
    return np.fromiter((fn(float(v)) for v in a.ravel()), dtype=np.float32, count=a.size).reshape(a.shape)


def lanczos3_kernel(x: Any) -> np.ndarray:
    """TF's ``LanczosKernelFunc(3)`` in float32: 0 for |x| > 3, 1 for |x| <= 1e-3 (compared in double),
    else ``3 sinf(pi x) sinf(pi x / 3) / (pi pi x x)`` evaluated left to right in float32, with the C
    library's ``sinf`` (``_sinf``)."""
    x = np.abs(np.asarray(x, dtype=np.float32))
    safe = np.where(x.astype(np.float64) <= 1e-3, np.float32(1), x).astype(np.float32)
    s1 = _sinf(_PI * safe)
    s2 = _sinf((_PI * safe) / _RADIUS)
    out = ((_RADIUS * s1) * s2) / (((_PI * _PI) * safe) * safe)
    out = np.where(x.astype(np.float64) <= 1e-3, np.float32(1), out)
    return np.where(x > _RADIUS, np.float32(0), out).astype(np.float32)


def lanczos3_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """TF ``ComputeSpansCore`` (lanczos3, antialias, zero translation) for one axis (see ``_weights``)."""
    start, w = _weights(int(n_in), int(n_out))
    return start.copy(), w.copy()


@lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """TF ``ComputeSpansCore`` (lanczos3, antialias, zero translation) for one axis: ``(starts [n_out] int64,
    weights [n_out, span] float32)``; output i reads inputs ``starts[i] + k`` (k < span; taps past the
    image edge have weight 0). Output sample i is centred at ``(i + 0.5) / scale`` in input pixel-edge
    coordinates; input j (centre j + 0.5) within ``3 ks`` gets ``L3((j + 0.5 - c) / ks)``, ``ks = max(1 /
    scale, 1)``, and each row is normalised by the reciprocal of its sequential float32 sum."""
    n_in, n_out = int(n_in), int(n_out)
    if n_in < 1 or n_out < 1:
        raise ValueError(f"lanczos3_weights: expected positive sizes, found {n_in} -> {n_out}")
    scale = np.float32(n_out) / np.float32(n_in)  # tf.image.resize: float32 sizes divided
    inv_scale = np.float32(1.0 / float(scale))  # `const float inv_scale = 1.0 / scale` (double, then float)
    ks = max(inv_scale, np.float32(1))
    reach = _RADIUS * ks
    span = min(2 * math.ceil(float(reach)) + 1, n_in)
    sample = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * inv_scale
    inside = (sample >= 0) & (sample <= np.float32(n_in))  # always true without translation
    lo = np.clip(np.ceil((sample - reach) - np.float32(0.5)).astype(np.int64), 0, n_in - 1)
    hi = np.clip(np.floor((sample + reach) - np.float32(0.5)).astype(np.int64), 0, n_in - 1) + 1
    src = lo[:, None] + np.arange(span)[None, :]
    pos = (src.astype(np.float32) + np.float32(0.5)) - sample[:, None]
    w = lanczos3_kernel(pos * (np.float32(1) / ks))
    w = np.where(src < hi[:, None], w, np.float32(0)).astype(np.float32)
    total = np.zeros(n_out, dtype=np.float32)
    for k in range(span):  # TF sums the span's weights one after the other
        total += w[:, k]
    ok = inside & (np.abs(total) >= np.float32(1000) * np.finfo(np.float32).tiny)
    recip = np.float32(1) / np.where(ok, total, np.float32(1))
    w = np.where(ok[:, None], w * recip[:, None], np.float32(0)).astype(np.float32)
    start = np.where(inside, lo, 0)
    start.flags.writeable = False
    w.flags.writeable = False
    return start, w


def _gather(x: np.ndarray, n_out: int) -> np.ndarray:
    """TF's ``GatherRows`` along axis 0 of a float32 array: out = 0, then out += w_k * x[start + k] for each
    tap in order, in float32 (a multiply and an add, each rounded: the kernel is compiled without FMA)."""
    n_in = x.shape[0]
    start, w = _weights(n_in, n_out)
    out = np.zeros((n_out,) + x.shape[1:], dtype=np.float32)
    tmp = np.empty_like(out)
    shape = (-1,) + (1,) * (x.ndim - 1)
    for k in range(w.shape[1]):
        idx = np.minimum(start + k, n_in - 1)  # past the edge: weight 0, adds +0
        np.multiply(w[:, k].reshape(shape), x[idx], out=tmp)
        out += tmp
    return out


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1
                               for s in hw):
        raise ValueError(f"size: expected an int or (height, width) of ints >= 1, found {size!r}")
    return int(hw[0]), int(hw[1])


def resize_lanczos3(image: Any, size: int | tuple[int, int]) -> np.ndarray:
    """HxWxC (any real dtype) -> float32 ``size``: ``tf.image.resize(image, size, "lanczos3", antialias=True)``
    (rows first, then columns). Resizing to the same size still filters, as TF does."""
    a = np.asarray(image)
    if a.ndim != 3 or 0 in a.shape:
        raise ValueError(f"resize_lanczos3: expected an (H, W, C) image, found shape {a.shape}")
    h, w = _size_hw(size)
    rows = _gather(a.astype(np.float32), h)  # [h, W, C]: the height first, as TF
    cols = _gather(np.ascontiguousarray(rows.transpose(1, 0, 2)), w)  # [w, h, C]; the same sums per pixel
    return np.ascontiguousarray(cols.transpose(1, 0, 2))


def resize_uint8(image: Any, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 HxWxC -> uint8 ``size``: dlimp's ``resize_image`` / OFT's ``resize_image_for_policy`` after the
    JPEG: ``cast(clip(round(resize_lanczos3(x)), 0, 255), uint8)``, round half to even. Same size: a copy
    (TF's same-size filter moves no value by 0.5, so rounding gives the input back; tested)."""
    a = _check_image(image)
    h, w = _size_hw(size)
    if a.shape[:2] == (h, w):
        return np.array(a, dtype=np.uint8)
    return np.clip(np.rint(resize_lanczos3(a, (h, w))), 0, 255).astype(np.uint8)


def implementation() -> dict[str, Any]:
    """What encodes, decodes and resizes here, with versions, for a results file."""
    import PIL
    import simplejpeg
    from PIL import features

    libm = _libm_sinf() is not None
    turbo = (f"libjpeg-turbo {features.version('libjpeg_turbo')}" if features.check_feature("libjpeg_turbo")
             else f"libjpeg {features.version('jpg')}")
    return {
        "tf_exact": libm,  # without a C sinf a weight may differ from TF's in its last bit
        "reference": "tf.image.encode_jpeg (defaults) -> tf.io.decode_image(dtype=uint8) -> tf.image.resize("
                     "lanczos3, antialias=True) -> cast(clip(round(x), 0, 255), uint8); checked bit for bit "
                     "against tensorflow-cpu fixtures (tests/test_tfimage.py)",
        "jpeg_encoder": f"Pillow {PIL.__version__} ({turbo}): quality "
                        f"{JPEG_QUALITY} baseline, 4:2:0, accurate DCT, JFIF {TF_JPEG_DPI} dpi",
        "jpeg_decoder": f"simplejpeg {simplejpeg.__version__} (libjpeg-turbo): fast integer IDCT (JDCT_IFAST), "
                        "fancy upsampling",
        "resize": "spatial_forcing.data.tfimage.resize_uint8: TF ScaleAndTranslate lanczos3 antialias in "
                  "float32, rows then columns, round half to even, clip, uint8; kernel sine: "
                  + ("the C library's sinf (as TF)" if libm else "rounded double sine (no C sinf found)"),
    }
