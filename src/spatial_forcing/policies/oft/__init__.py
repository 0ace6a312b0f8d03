"""OpenVLA-OFT student, weight-compatible with the published checkpoints.

Read in order: `config.py` (presets), `heads.py`, `model.py` (the network and its token layout),
`processor.py` (images, prompt, tokenizer).
"""

from .config import PRESETS, OFTConfig
from .model import OFTModel

__all__ = ["PRESETS", "OFTConfig", "OFTModel"]
