"""Weight-compatible VGGT (facebook/VGGT-1B) and its Spatial Forcing teacher wrapper.

Read in order: `config.py`, `layers.py` (blocks, 2-D RoPE), `aggregator.py`, `heads.py`,
`weights.py` (strict loading), `model.py` (VGGT), `teacher.py` (resize + grid + validity).
"""

from .config import PRESETS, VGGTConfig, config_from_state_dict
from .model import VGGT
from .teacher import VGGTTeacher, prepare_images, working_size

__all__ = ["PRESETS", "VGGT", "VGGTConfig", "VGGTTeacher", "config_from_state_dict", "prepare_images", "working_size"]
