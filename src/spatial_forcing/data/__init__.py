"""Datasets on disk, the canonical sample schema, statistics and the training pipeline.

Read in order: `schema.py` (the sample schema and the episode-source protocol), `spatial_forcing/normalize.py`
(statistics and the formulas, shared with `policies/`), the readers (`rlds.py`, the `lerobot/` package), `stats.py`,
`augment.py`, `dataset.py` (chunked training samples), `sampler.py` (deterministic, resumable).
"""
