"""The policy registry: every student family by name, so that no loop names a model family.

    FAMILIES["oft"] = "spatial_forcing.policies.oft.policy:OFTPolicy"      # one entry per family folder
    create_policy("mini", stats)          -> a preset, randomly initialised (any family's preset name)
    load_policy("runs/x/step-N/policy")   -> a checkpoint, of the family its config.json names
    policy_spec("mini") / describe_checkpoint(folder) -> PolicySpec without building weights

Presets are unique across families (a name picks its family). A checkpoint's `config.json`
`model_type` picks the family whose `MODEL_TYPES` holds it (OFT also loads upstream "openvla"
folders). A hub id is downloaded with huggingface_hub first. Adding a student = writing
`policies/<family>/` with a `Policy` subclass and one line here.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from .base import Policy, PolicySpec

FAMILIES: dict[str, str] = {
    "oft": "spatial_forcing.policies.oft.policy:OFTPolicy",
    "cnn": "spatial_forcing.policies.cnn.policy:CNNPolicy",
    "pi0": "spatial_forcing.policies.pi0.policy:Pi0Policy",
}


def family_class(name: str) -> type[Policy]:
    if name not in FAMILIES:
        raise ValueError(f"unknown policy family {name!r}; known families: {sorted(FAMILIES)}")
    module, attr = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def presets() -> dict[str, str]:
    """Every random-initialisation preset -> its family."""
    out: dict[str, str] = {}
    for name in FAMILIES:
        for preset in family_class(name).PRESETS:
            if preset in out:
                raise RuntimeError(f"preset {preset!r} is defined by both {out[preset]} and {name}")
            out[preset] = name
    return out


def preset_family(preset: str) -> str | None:
    return presets().get(preset)


def family_preset(family: str) -> str:
    """The small preset a family runs on a CPU (`--policy-family` of `sf quickstart` and `sf study`)."""
    recipe = family_class(family).CPU_RECIPE
    if "policy" not in recipe:
        raise ValueError(f"policy family {family!r} names no CPU preset (its CPU_RECIPE has no 'policy')")
    return recipe["policy"]


def training_fields(preset: str) -> dict[str, Any]:
    """The training fields a preset's family needs besides the preset (its `CPU_RECIPE` without "policy"),
    e.g. π0's raw actions; {} for a preset of no family."""
    family = preset_family(preset)
    if family is None:
        return {}
    return {k: v for k, v in family_class(family).CPU_RECIPE.items() if k != "policy"}


def resolve_checkpoint(path_or_id: str | Path, allow_download: bool = True) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded with huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: expected a checkpoint folder, found a file")
        return path
    text = str(path_or_id)
    if not allow_download or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id}: no such checkpoint folder (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text))
    except Exception as exc:  # offline, gated, missing repo: say what was tried
        raise FileNotFoundError(f"{text}: not a local folder, and downloading it from the Hugging Face hub failed "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from exc


def checkpoint_family(folder: str | Path) -> str:
    """The family that loads a checkpoint folder, from its config.json `model_type`."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder}: missing config.json (not a policy checkpoint)")
    try:
        config = json.loads(cfg_file.read_text())
        model_type = config.get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{cfg_file}: not a JSON object ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, found {type(config).__name__}")
    claimed = [name for name in FAMILIES if family_class(name).claims(config)]
    if not claimed:
        known = sorted(mt for name in FAMILIES for mt in family_class(name).MODEL_TYPES)
        raise ValueError(f"{cfg_file}: model_type {model_type!r} is not one this project loads "
                         f"(known: {known}, and openpi / lerobot / transformers π0 folders)")
    return claimed[0]


def create_policy(preset: str, stats: Any, overrides: dict | None = None, stats_key: str = "train") -> Policy:
    """A randomly initialised policy of any family's preset."""
    family = preset_family(preset)
    if family is None:
        raise ValueError(f"unknown policy preset {preset!r}; presets: {sorted(presets())}")
    return family_class(family).create(preset, stats, overrides or {}, stats_key=stats_key)


def load_policy(path_or_id: str | Path, **kwargs: Any) -> Policy:
    """Load a checkpoint folder or hub id; `kwargs` go to the family's `from_pretrained`
    (unnorm_key, dtype, device, upstream overrides)."""
    folder = resolve_checkpoint(path_or_id)
    return family_class(checkpoint_family(folder)).from_pretrained(folder, **kwargs)


def describe_checkpoint(path_or_id: str | Path) -> tuple[PolicySpec, list[str], Path]:
    """(spec, statistics keys, local folder) of a checkpoint, from its files."""
    folder = resolve_checkpoint(path_or_id)
    spec, keys = family_class(checkpoint_family(folder)).describe(folder)
    return spec, keys, folder


def policy_spec(policy: str, overrides: dict | None = None) -> PolicySpec | None:
    """The spec of a preset or a local checkpoint folder, without building weights; None for a hub id
    (not downloaded just to check a configuration)."""
    family = preset_family(policy)
    if family is not None:
        return family_class(family).preset_spec(policy, overrides or {})
    folder = Path(policy).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        return family_class(checkpoint_family(folder)).describe(folder)[0]
    return None
