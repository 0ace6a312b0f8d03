"""Statistics of a two-arm comparison of success rates (Spatial Forcing against its baseline).

Outcomes are boolean arrays `[seeds, episodes]`: row s holds seed s's evaluation episodes in order. Both
arms are evaluated on the same episodes (the same init states), and a seed gives both arms the same
initialisation and data, so the arms are *paired* by seed and by episode.

    rate_summary(x) -> mean over seeds, per-seed rates, pooled count, 95 % Wilson interval of the pooled
                       episodes (seeds treated as exchangeable draws of one policy)
    paired_difference(a, b) -> mean(a) - mean(b) and its 95 % bootstrap interval: resample seeds with
                       replacement, then episodes within each drawn seed with replacement (the same episode
                       indices for both arms), percentile interval
    steps_to_reach(steps, curve, target) -> first step whose success is >= target (None if never)
    training_efficiency / data_efficiency -> the paper's two claims at this scale (SPATIAL_FORCING.md §11)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from spatial_forcing.eval.protocol import wilson_interval


def _outcomes(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=bool)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{what}: expected outcomes [seeds, episodes], found shape {a.shape}")
    return a


def rate_summary(outcomes: Any) -> dict[str, Any]:
    x = _outcomes(outcomes, "rate_summary")
    successes, n = int(x.sum()), int(x.size)
    return {"mean": float(x.mean(axis=1).mean()), "per_seed": [float(r) for r in x.mean(axis=1)],
            "successes": successes, "episodes": n, "ci95": list(wilson_interval(successes, n))}


def paired_difference(a: Any, b: Any, iterations: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """mean(a) - mean(b) over seeds and episodes, with a 95 % paired bootstrap interval (see module doc)."""
    x, y = _outcomes(a, "paired_difference a"), _outcomes(b, "paired_difference b")
    if x.shape != y.shape:
        raise ValueError(f"paired_difference: both arms need the same seeds and episodes, found {x.shape} and {y.shape}")
    if iterations < 1:
        raise ValueError(f"paired_difference: iterations must be >= 1, found {iterations}")
    d = x.astype(np.float64) - y.astype(np.float64)  # [S, E]
    s, e = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, s, size=(iterations, s))
    episodes = rng.integers(0, e, size=(iterations, s, e))
    draws = d[seeds[:, :, None], episodes].mean(axis=(1, 2))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"difference": float(d.mean()), "ci95": [float(lo), float(hi)], "iterations": int(iterations),
            "bootstrap_seed": int(seed)}


def steps_to_reach(steps: Sequence[int], curve: Sequence[float], target: float) -> int | None:
    """The first evaluated step whose success is at least `target` (None if none is)."""
    for step, value in zip(steps, curve):
        if value >= target - 1e-12:
            return int(step)
    return None


def training_efficiency(steps: Sequence[int], sf: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """How many training steps SF needs to reach the baseline's final success ("the same success in
    3.8x fewer steps"). Undefined when the baseline never succeeds."""
    target = float(base[-1])
    if target <= 0:
        return {"baseline_final": target, "sf_steps": None, "baseline_steps": int(steps[-1]), "ratio": None,
                "note": "the baseline never succeeded: nothing to reach"}
    reached = steps_to_reach(steps, sf, target)
    return {"baseline_final": target, "sf_steps": reached, "baseline_steps": int(steps[-1]),
            "ratio": float(steps[-1]) / reached if reached else None,
            "note": "" if reached else "SF did not reach the baseline's final success within the run"}


def data_efficiency(fractions: Sequence[float], sf: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """The smallest data fraction at which SF's final success reaches the baseline's success with the most
    data ("5.9x data efficiency"). Undefined when the baseline never succeeds."""
    order = np.argsort(fractions)
    fr = [float(fractions[i]) for i in order]
    sf_sorted, base_sorted = [float(sf[i]) for i in order], [float(base[i]) for i in order]
    target = base_sorted[-1]
    out: dict[str, Any] = {"baseline_at_most_data": target, "most_data": fr[-1],
                           "success_at_equal_data": {str(f): {"sf": s, "baseline": b}
                                                     for f, s, b in zip(fr, sf_sorted, base_sorted)}}
    if target <= 0:
        return {**out, "sf_fraction": None, "ratio": None, "note": "the baseline never succeeded: nothing to reach"}
    reached = next((f for f, s in zip(fr, sf_sorted) if s >= target - 1e-12), None)
    return {**out, "sf_fraction": reached, "ratio": fr[-1] / reached if reached else None,
            "note": "" if reached else "SF did not reach the baseline's success with the most data"}
