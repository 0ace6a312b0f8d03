"""Frozen feature sources behind one protocol (`base.py`). Add a teacher: write a `Teacher`
subclass and one entry in `TEACHERS` below."""

from __future__ import annotations

from collections.abc import Callable

from .base import Teacher, TeacherGrid
from .geometry import GeometryConfig, GeometryTeacher
from .vggt import VGGTTeacher


def _vggt(weights: str | None = None, **options) -> Teacher:
    if weights is None:
        raise ValueError("the vggt teacher needs weights: model.pt of facebook/VGGT-1B, a .safetensors file or a folder")
    return VGGTTeacher.from_pretrained(weights, **options)


def _geometry(weights: str | None = None, **options) -> Teacher:
    if weights is not None:
        raise ValueError(f"the geometry teacher has no weights, but weights={weights!r} was given")
    return GeometryTeacher(GeometryConfig(**options))


TEACHERS: dict[str, Callable[..., Teacher]] = {"vggt": _vggt, "geometry": _geometry}


def build_teacher(name: str, weights: str | None = None, **options) -> Teacher:
    """Build a registered teacher by name; `options` go to its constructor."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; registered teachers: {sorted(TEACHERS)}")
    return TEACHERS[name](weights, **options)


__all__ = ["TEACHERS", "GeometryConfig", "GeometryTeacher", "Teacher", "TeacherGrid", "VGGTTeacher", "build_teacher"]
