"""Per-dataset standardisation applied by the readers before statistics and chunking.

"libero" (OFT, DATA.md A.6): proprio = `concat(state[:, :6], state[:, -2:])` (the 8-D LIBERO state
unchanged), gripper `g' = 1 - clip(g, 0, 1)`: raw -1 open / +1 close becomes 1 open / 0 closed.
The action mask keeps the gripper out of normalisation.
"""

from __future__ import annotations

import numpy as np

STANDARDIZATIONS = ("libero", None)
ACTION_MASKS = {"libero": [True] * 6 + [False]}


def check(name: str | None) -> str | None:
    if name not in STANDARDIZATIONS:
        raise ValueError(f"standardize must be one of {STANDARDIZATIONS}, got {name!r}")
    return name


def libero_state(state: np.ndarray) -> np.ndarray:
    return np.concatenate([state[..., :6], state[..., -2:]], axis=-1).astype(np.float32)


def libero_action(action: np.ndarray) -> np.ndarray:
    act = np.array(action, dtype=np.float32, copy=True)
    act[..., 6] = 1.0 - np.clip(act[..., 6], 0.0, 1.0)
    return act


def standardize_libero(state: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return libero_state(state), libero_action(action)
