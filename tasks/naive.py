"""Naive forecasts that every forecasting model must beat, on the same masked test targets.

For a window whose last input step is the *origin* ``o`` (targets at ``o+1 … o+H``):

* ``persistence``: the last value at or before ``o`` (forward-filled), for every horizon;
* ``seasonal_naive``: the value one season earlier, from the latest season that ends at or before
  the origin: target ``o+h`` reads ``o+h-m·⌈h/m⌉`` (season ``m`` steps; Hyndman's seasonal naive —
  it never reads a value after the origin, even when ``H > m``), forward-filled;
* ``train_mean``: the client's training-period mean (0 once z-scored).

Where a value does not exist (before the first observation, or before the series starts) the
forecast falls back to the training mean, so every baseline is scored on exactly the targets the
models are scored on. The forecasts are z-scored like the models' outputs and go through the same
:func:`tasks.forecasting.forecast_metrics`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NAIVE_BASELINES", "naive_predictions", "season_back"]

NAIVE_BASELINES = ("persistence", "seasonal_naive", "train_mean")


def season_back(output_len: int, season: int) -> np.ndarray:
    """``[H]`` how many steps before target ``o+h`` the seasonal naive forecast reads:
    ``m·⌈h/m⌉`` for ``h = 1 … H`` (always ≥ h, so never after the origin)."""
    h = np.arange(1, output_len + 1)
    return season * np.ceil(h / season).astype(np.int64)


def naive_predictions(filled: np.ndarray, mean: np.ndarray, std: np.ndarray, starts: np.ndarray,
                      input_len: int, output_len: int, season: int | None) -> dict[str, np.ndarray]:
    """Z-scored naive forecasts ``[n, H, T]`` for the windows starting at ``starts``.

    Args:
        filled: ``[S, T]`` the client's targets, missing values forward-filled (NaN before the
            first observation).
        mean, std: ``[T]`` training-period statistics.
        starts: ``[n]`` window starts (inputs ``[s, s+input_len)``).
        season: steps per season; ``None`` = no seasonal forecast.
    """
    n, t = int(starts.size), filled.shape[1]
    origin = starts.astype(np.int64) + input_len - 1
    z = lambda v: np.where(np.isnan(v), 0.0, (v - mean) / std).astype(np.float32)  # noqa: E731  NaN → train mean
    last = filled[origin] if n else np.zeros((0, t))
    out = {
        "persistence": np.repeat(z(last)[:, None, :], output_len, axis=1),
        "train_mean": np.zeros((n, output_len, t), dtype=np.float32),
    }
    if season is not None and not math.isclose(season, 0):
        idx = origin[:, None] + np.arange(1, output_len + 1)[None, :] - season_back(output_len, season)[None, :]
        values = filled[np.clip(idx, 0, None)]  # [n, H, T]
        values[idx < 0] = np.nan
        out["seasonal_naive"] = z(values)
    return out
