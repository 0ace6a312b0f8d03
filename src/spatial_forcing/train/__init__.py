"""Training: `TrainConfig` + presets (config.py), the loop (loop.py), checkpoints (checkpoint.py),
logs (logging.py) and the `sf train` options (cli.py)."""
