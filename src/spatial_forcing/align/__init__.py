"""Spatial Forcing, model-agnostic: depends only on torch.

A newcomer reads these files in order: `config.py` (settings), `pos_embed.py` (UV sin-cos),
`resample.py` (teacher grid -> student grid, masks), `projector.py`, `loss.py`, `module.py`.
"""

from .config import AlignConfig
from .loss import masked_cosine_loss
from .module import SpatialForcing
from .pos_embed import add_uv_pos_embed, uv_grid, uv_sincos_embedding
from .projector import AlignProjector
from .resample import combine_masks, grid_side, resample_features, resample_mask

__all__ = ["AlignConfig", "AlignProjector", "SpatialForcing", "add_uv_pos_embed", "combine_masks", "grid_side",
           "masked_cosine_loss", "resample_features", "resample_mask", "uv_grid", "uv_sincos_embedding"]
