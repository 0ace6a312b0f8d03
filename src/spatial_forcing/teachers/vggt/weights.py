"""Reading VGGT weights (upstream `model.pt`, safetensors, or a folder) with strict key checks."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from spatial_forcing.errors import unpickling_reason

WEIGHT_FILES = ("model.safetensors", "model.pt", "pytorch_model.bin")


def resolve_weights(path: str | Path) -> tuple[Path, Path | None]:
    """`(weights file, config.json or None)` for a file or a folder holding one of WEIGHT_FILES."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                cfg = path / "config.json"
                return path / name, cfg if cfg.is_file() else None
        raise FileNotFoundError(f"{path}: no VGGT weights found; expected one of {list(WEIGHT_FILES)} in the folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (expected model.pt, a .safetensors file, or a folder)")
    cfg = path.parent / "config.json"
    return path, cfg if cfg.is_file() else None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a flat `{name: tensor}` dict from `.safetensors` or a torch pickle (weights only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:  # the weights-only unpickler refused something: never load it otherwise
        raise ValueError(f"{path}: expected a state dict of tensors, found a pickle with other objects; it is not "
                         f"loaded, because unpickling them could run code ({unpickling_reason(exc)})") from exc
    except Exception as exc:  # any other unpickling failure means: not a state dict file
        raise ValueError(f"{path}: not a torch state dict file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of name -> tensor), found a {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        hint = ""
        if any(k in obj for k in ("model", "state_dict", "module")):
            hint = " (it looks like a training checkpoint: save its model state dict on its own)"
        raise ValueError(f"{path}: expected a flat state dict of name -> tensor, but {len(bad)} entries are not "
                         f"tensors, e.g. {bad[:5]}{hint}")
    return obj


@dataclass
class LoadReport:
    loaded: int
    skipped: dict[str, int] = field(default_factory=dict)  # prefix -> number of keys skipped on purpose

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        if self.skipped:
            parts.append("skipped on purpose: " + ", ".join(f"{p}* ({n})" for p, n in self.skipped.items()))
        return "; ".join(parts)


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], skip_prefixes: tuple[str, ...] = (),
                source: str = "state dict") -> LoadReport:
    """Copy `sd` into `module`, failing on any missing, unexpected or mis-shaped key.

    Only keys under `skip_prefixes` (the heads a config does not build) may be left out; they are
    counted in the report. Nothing else is ignored.
    """
    expected = module.state_dict()
    skipped: dict[str, int] = {}
    kept: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        prefix = next((p for p in skip_prefixes if key.startswith(p)), None)
        if prefix is not None and key not in expected:
            skipped[prefix] = skipped.get(prefix, 0) + 1
        else:
            kept[key] = value
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    wrong = [f"{k}: file {tuple(kept[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in kept and kept[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_listing(wrong)}")
    if problems:
        raise ValueError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(kept, strict=True)
    return LoadReport(loaded=len(kept), skipped=skipped)
