"""Shared machinery of the forecasting tasks (``traffic`` in :mod:`tasks.traffic`, ``weather`` in
:mod:`tasks.weather`, ``timeseries`` in :mod:`tasks.timeseries`): chronological splits, sliding
windows, per-client normalisation, missing values, seasonal lag inputs, masked loss and metrics,
naive baselines, and the :class:`ForecastTask` every one of them returns.

Data layout of one client split — the ``Split`` tuple the engines pass around::

    x      [n, input_len, F]   model input (z-scored continuous features + bounded extras)
    y      [n, output_len, T]  z-scored targets, 0 where missing
    mask   [n, output_len, T]  1.0 = observed target, 0.0 = missing
    scale  [n, 2, T]           per-target (std, mean) of the client's TRAIN period, to de-normalise

With regular window starts these tensors are strided views of the client's series (a window
costs no memory); treat them as read-only.

Pipeline for one client (:func:`prepare_client`), on a series of S time steps:

1. **Split first, window second.** The time axis is cut 70/10/20 (``round`` for train and val,
   the rest to test) and windows are cut inside each part, so no window crosses a split boundary
   and no test time step ever appears in a training window (input or target).
2. **Missing values** are NaN (and, where the caller says so, zeros: a traffic speed of 0 is a
   sensor dropout in METR-LA/PEMS-BAY; a temperature of 0 °C or a passenger count of 0 is not).
   Targets: masked (y = 0, mask = 0), so a missing target changes neither the loss nor any metric.
   Inputs: forward-filled along time (last observation carried forward — causal, so nothing leaks
   from the future), and the leading gap before the first observation filled with the train mean
   (0 after z-scoring).
3. **Normalisation**: per client and per feature, mean/std of the observed values of the TRAIN
   period only (std < 1e-8 → 1). Bounded features (time of day, wind-direction sin/cos) are left
   as they are.
4. **Seasonal lag inputs** (optional, :func:`add_seasonal_lags`): the targets one season (e.g.
   one day, one week) before each forecast slot, as extra z-scored inputs.

Metrics (:meth:`ForecastTask.metrics` → sums, :meth:`ForecastTask.finalize` → values) are in
original units (mph, °C): ``mae``, ``rmse``, ``mse``, ``wape`` (Σ|error| / Σ|target|: relative
error that stays meaningful when targets are at or near 0), ``mape`` only where the task says it is
meaningful (a fraction, over observed non-zero targets only: speeds with zeros masked), and the
same at horizons 3, 6 and 12 (``mae_h3`` … — horizon h is output step h-1; only horizons ≤
``output_len``). ``loss`` is the masked MSE on z-scored values, i.e. exactly the training loss
pooled over every observed target. Pooled values are Σ/Σ over all given samples; averaging per
client is the engine's job. :meth:`ForecastTask.naive_baselines` gives the same metrics for the
naive forecasts of :mod:`tasks.naive` on the same masked test targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tasks.base import ClientData
from tasks.client_graph import haversine_km, knn_adjacency, symmetrize_adjacency
from tasks.forecast_models import FORECAST_MODELS, make_forecaster
from tasks.naive import NAIVE_BASELINES, naive_predictions
from tasks.options import check_choice, check_fractions, check_int, check_path, shown_path, width_for  # noqa: F401  (re-exported)
from tasks.tables import TableError, read_numeric_columns, read_text, refuse_unstandardisable, split_header  # noqa: F401

__all__ = [
    "ForecastDataError",
    "ForecastTask",
    "ClientSeries",
    "PreparedClient",
    "HORIZONS",
    "split_bounds",
    "window_starts",
    "forward_fill",
    "prepare_client",
    "add_seasonal_lags",
    "forecast_loss",
    "forecast_metrics",
    "forecast_finalize",
    "haversine_km",
    "knn_adjacency",
    "symmetrize_adjacency",
    "validate_split_options",
]

HORIZONS = (3, 6, 12)
_STD_FLOOR = 1e-8


# A forecasting data file is missing or malformed (a DataError: exit code 2 from the CLI).
ForecastDataError = TableError


# -- splits and windows -----------------------------------------------------------------------

def split_bounds(num_steps: int, fractions: Sequence[float]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Chronological ``(start, stop)`` of train, val and test on a time axis of ``num_steps``.

    ``train = round(S·f_train)``, ``val = round(S·f_val)``, test gets the rest.
    """
    f_train, f_val, _ = (float(f) for f in fractions)
    n_train = int(round(num_steps * f_train))
    n_val = int(round(num_steps * f_val))
    n_train = min(n_train, num_steps)
    n_val = min(n_val, num_steps - n_train)
    return (0, n_train), (n_train, n_train + n_val), (n_train + n_val, num_steps)


def window_starts(start: int, stop: int, input_len: int, output_len: int, stride: int = 1,
                  max_windows: int | None = None) -> np.ndarray:
    """Start indices of the windows inside ``[start, stop)``: window ``s`` reads inputs
    ``[s, s+input_len)`` and targets ``[s+input_len, s+input_len+output_len)``, all ``< stop``.

    Count: ``floor((stop-start-input_len-output_len)/stride) + 1`` (0 if the part is too short).
    ``max_windows`` keeps that many, evenly spaced over the part (deterministic).
    """
    last = stop - input_len - output_len
    if last < start:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(start, last + 1, stride, dtype=np.int64)
    if max_windows is not None and starts.size > max_windows:
        keep = np.unique(np.linspace(0, starts.size - 1, max_windows).round().astype(np.int64))
        starts = starts[keep]
    return starts


def forward_fill(values: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs along axis 0 of ``values [S, F]``; leading NaNs stay NaN."""
    valid = ~np.isnan(values)
    idx = np.where(valid, np.arange(values.shape[0])[:, None], 0)
    np.maximum.accumulate(idx, axis=0, out=idx)
    filled = np.take_along_axis(values, idx, axis=0)
    return filled  # rows before a column's first observation read row 0, which is NaN there


# -- one client's tensors ---------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSeries:
    """One client's raw series on the common time axis.

    Attributes:
        inputs: ``[S, F]`` float, NaN = missing.
        normalize: ``[F]`` bool: z-score this input feature (False for bounded extras such as time
            of day or wind-direction sin/cos).
        targets: ``[S, T]`` float, NaN = missing (raw units).
        input_names, target_names: for reports.
        zero_is_missing: ``[F]`` bool for inputs and ``[T]`` for targets: treat 0 as missing too.
    """

    inputs: np.ndarray
    normalize: np.ndarray
    targets: np.ndarray
    input_names: tuple[str, ...]
    target_names: tuple[str, ...]
    input_zero_is_missing: np.ndarray | None = None
    target_zero_is_missing: np.ndarray | None = None


@dataclass(frozen=True)
class PreparedClient:
    data: ClientData
    input_mean: np.ndarray
    input_std: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray
    input_names: tuple[str, ...]
    # naive forecasts' metric sums on the test split (tasks.naive): name → forecast_metrics sums
    baseline_sums: dict[str, dict[str, float]] = field(default_factory=dict)


def _with_missing(values: np.ndarray, zero_is_missing: np.ndarray | None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).copy()
    values[~np.isfinite(values)] = np.nan
    if zero_is_missing is not None and np.any(zero_is_missing):
        cols = np.asarray(zero_is_missing, dtype=bool)
        sub = values[:, cols]
        sub[sub == 0] = np.nan
        values[:, cols] = sub
    return values


def _train_stats(values: np.ndarray, train: tuple[int, int], names: Sequence[str], what: str) -> tuple[np.ndarray, np.ndarray]:
    part = values[train[0]:train[1]]
    observed = (~np.isnan(part)).sum(0)
    if np.any(observed == 0):
        bad = [names[i] for i in np.flatnonzero(observed == 0)]
        raise ForecastDataError(f"{what} {bad} has no observed value in the training period")
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing data is refused by prepare_client
        mean = np.nanmean(part, axis=0)
        std = np.nanstd(part, axis=0)
    std = np.where(std < _STD_FLOOR, 1.0, std)
    return mean, std


def prepare_client(series: ClientSeries, bounds: Sequence[tuple[int, int]], input_len: int, output_len: int,
                   stride: int = 1, max_windows: int | None = None, *, season: int | None = None,
                   mape: bool = True) -> PreparedClient:
    """Windows, normalises and masks one client's series (see the module docstring), and scores
    the naive forecasts (:mod:`tasks.naive`, seasonal with ``season`` steps) on its test split.

    ``bounds``: ``(start, stop)`` of train, val, test on the series' time axis (:func:`split_bounds`).
    """
    inputs = _with_missing(series.inputs, series.input_zero_is_missing)
    targets = _with_missing(series.targets, series.target_zero_is_missing)
    train = bounds[0]
    normalize = np.asarray(series.normalize, dtype=bool)

    in_mean, in_std = _train_stats(inputs, train, series.input_names, "input feature")
    in_mean = np.where(normalize, in_mean, 0.0)
    in_std = np.where(normalize, in_std, 1.0)
    t_mean, t_std = _train_stats(targets, train, series.target_names, "target")

    # Inputs: forward-fill (causal), then the leading gap gets the train mean (0 once z-scored;
    # 0 for the bounded features).
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.nan_to_num((forward_fill(inputs) - in_mean) / in_std, nan=0.0, posinf=np.inf, neginf=-np.inf)
        observed = ~np.isnan(targets)
        y = np.where(observed, (np.nan_to_num(targets) - t_mean) / t_std, 0.0)
    refuse_unstandardisable("input column(s)", series.input_names, inputs, x, in_mean, in_std)
    refuse_unstandardisable("target column(s)", series.target_names, targets, y, t_mean, t_std)
    x, y = x.astype(np.float32), y.astype(np.float32)
    m = observed.astype(np.float32)
    scale = np.stack([t_std, t_mean]).astype(np.float32)  # [2, T]

    x_t, y_t, m_t, s_t = (torch.from_numpy(a) for a in (x, y, m, scale))
    in_off = np.arange(input_len)
    out_off = np.arange(input_len, input_len + output_len)

    def split(start: int, stop: int) -> tuple[Tensor, ...]:
        s = window_starts(start, stop, input_len, output_len, stride, max_windows)
        n = int(s.size)
        if n and np.all(np.diff(s) == stride):
            # Regular starts: strided views of the client's series (no copy: a window costs no
            # memory, which matters for 30k+ steps). Read-only by convention.
            first = int(s[0])
            xi = x_t[first:first + (n - 1) * stride + input_len].unfold(0, input_len, stride).transpose(1, 2)
            lo = first + input_len
            yi = y_t[lo:lo + (n - 1) * stride + output_len].unfold(0, output_len, stride).transpose(1, 2)
            mi = m_t[lo:lo + (n - 1) * stride + output_len].unfold(0, output_len, stride).transpose(1, 2)
            return xi, yi, mi, s_t.unsqueeze(0).expand(n, -1, -1)
        # Irregular starts (max_windows subsampling) or none: gather copies.
        yi = s[:, None] + out_off
        parts = (x[s[:, None] + in_off], y[yi], m[yi], np.broadcast_to(scale, (n, *scale.shape)))
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in parts)

    data = ClientData(*(split(*b) for b in bounds))
    test_starts = window_starts(*bounds[2], input_len, output_len, stride, max_windows)
    horizons = tuple(h for h in HORIZONS if h <= output_len)
    baselines = {}
    for name, pred in naive_predictions(forward_fill(targets), t_mean, t_std, test_starts, input_len, output_len,
                                        season).items():
        sums = forecast_metrics(torch.from_numpy(pred), *data.test[1:], horizons=horizons, mape=mape)
        baselines[name] = {k: float(v) for k, v in sums.items()}
    return PreparedClient(data, in_mean, in_std, t_mean, t_std, tuple(series.input_names), baselines)


def add_seasonal_lags(series: ClientSeries, lags: Sequence[int], output_len: int) -> ClientSeries:
    """``series`` with one extra input per target and lag ``L`` (steps): the target ``L`` steps
    before the slot ``output_len`` steps ahead, i.e. the input at step ``t`` is the target at
    ``t + output_len − L``. The window's last ``output_len`` inputs then hold the targets' values
    one season before the forecast slots. Needs ``L ≥ output_len`` (else it would read the future)."""
    if not lags:
        return series
    cols, names = [], []
    s = series.targets.shape[0]
    for lag in lags:
        if lag < output_len:
            raise ValueError(f"task option seasonal_lags: a lag of {lag} steps is shorter than output_len = {output_len}, "
                             "so it would read values after the forecast origin; use lags of at least output_len steps")
        shift = lag - output_len
        shifted = np.full_like(series.targets, np.nan, dtype=np.float64)
        if shift < s:
            shifted[shift:] = series.targets[: s - shift]
        cols.append(shifted)
        names.extend(f"{t}_lag{lag}" for t in series.target_names)
    extra = np.concatenate(cols, axis=1)
    zero = series.target_zero_is_missing
    n_in = series.inputs.shape[1]
    in_zero = series.input_zero_is_missing if series.input_zero_is_missing is not None else np.zeros(n_in, bool)
    t_zero = zero if zero is not None else np.zeros(len(series.target_names), bool)
    return replace(
        series,
        inputs=np.concatenate([series.inputs, extra], axis=1),
        normalize=np.concatenate([np.asarray(series.normalize, bool), np.ones(extra.shape[1], bool)]),
        input_names=tuple(series.input_names) + tuple(names),
        input_zero_is_missing=np.concatenate([np.asarray(in_zero, bool), np.tile(np.asarray(t_zero, bool), len(lags))]),
    )


def validate_split_options(num_steps: int, bounds, input_len: int, output_len: int, what: str) -> None:
    """Error (naming the options to change) when a split is too short for one window."""
    need = input_len + output_len
    for name, (start, stop) in zip(("train", "val", "test"), bounds):
        if stop - start < need:
            raise ValueError(
                f"{what}: the {name} part has {stop - start} of {num_steps} time steps, fewer than "
                f"input_len + output_len = {need}; use a longer series or shorter input_len/output_len"
            )


# -- loss and metrics (vmap-safe) --------------------------------------------------------------

def forecast_loss(output: Tensor, y: Tensor, mask: Tensor, scale: Tensor | None = None) -> Tensor:
    """Masked MSE on z-scored values: Σ mask·(output−y)² / max(Σ mask, 1). ``output``, ``y``,
    ``mask`` ``[B, output_len, T]``; ``scale`` is unused (accepted so the engines can pass every
    target tensor)."""
    sq = (output - y).square() * mask
    return sq.sum() / mask.sum().clamp_min(1.0)


def forecast_metrics(output: Tensor, y: Tensor, mask: Tensor, scale: Tensor,
                     horizons: Sequence[int] = HORIZONS, mape: bool = True) -> dict[str, Tensor]:
    """Sums over the batch in original units (de-normalised with ``scale [B, 2, T]`` = (std,
    mean)): ``abs_err``, ``sq_err``, ``count``, ``abs_true`` (for WAPE), with ``mape``
    ``ape``/``ape_count`` (targets ≠ 0 only), ``zsq_err`` (z-scored squared error, for ``loss``),
    and each of these per horizon (suffix ``_h3`` …)."""
    output = output.detach()
    std, mean = scale[:, 0:1, :], scale[:, 1:2, :]
    pred = output * std + mean
    true = y * std + mean
    err = (pred - true) * mask
    abs_err = err.abs()
    sq_err = err.square()
    zsq = (output - y).square() * mask
    nonzero = mask * (true.abs() > 1e-6).to(mask.dtype)
    ape = torch.where(nonzero > 0, abs_err / torch.where(nonzero > 0, true.abs(), torch.ones_like(true)),
                      torch.zeros_like(true))

    abs_true = true.abs() * mask

    def sums(sl) -> dict[str, Tensor]:
        out = {"abs_err": abs_err[:, sl].sum(), "sq_err": sq_err[:, sl].sum(), "count": mask[:, sl].sum(),
               "abs_true": abs_true[:, sl].sum()}
        if mape:
            out.update(ape=ape[:, sl].sum(), ape_count=nonzero[:, sl].sum())
        return out

    out = sums(slice(None))
    out["zsq_err"] = zsq.sum()
    for h in horizons:
        if h <= output.shape[1]:
            out.update({f"{k}_h{h}": v for k, v in sums(slice(h - 1, h)).items()})
    return out


def forecast_finalize(sums: Mapping[str, float], horizons: Sequence[int] = HORIZONS) -> dict[str, float]:
    """``mae``, ``rmse``, ``mse``, ``wape`` (Σ|error| / Σ|target|, a fraction), ``mape`` (fraction;
    only when ``sums`` has it), ``loss`` (z-scored MSE) and the same per horizon (``mae_h{h}`` …)
    for the horizons present in ``sums``. NaN when nothing was observed."""

    def ratio(num: str, den: str) -> float:
        d = float(sums[den])
        return float(sums[num]) / d if d > 0 else float("nan")

    def block(suffix: str) -> dict[str, float]:
        mse = ratio("sq_err" + suffix, "count" + suffix)
        out = {
            "mae" + suffix: ratio("abs_err" + suffix, "count" + suffix),
            "rmse" + suffix: math.sqrt(mse) if mse == mse else mse,
            "mse" + suffix: mse,
        }
        if "abs_true" + suffix in sums:
            out["wape" + suffix] = ratio("abs_err" + suffix, "abs_true" + suffix)
        if "ape" + suffix in sums:
            out["mape" + suffix] = ratio("ape" + suffix, "ape_count" + suffix)
        return out

    result = block("")
    result["loss"] = ratio("zsq_err", "count")
    for h in horizons:
        if f"count_h{h}" in sums:
            result.update(block(f"_h{h}"))
    return result


# -- the task -----------------------------------------------------------------------------------

class ForecastTask:
    """A federated forecasting task: one client per sensor/station, each with windowed train /
    val / test splits ``(x, y, mask, scale)`` (see the module docstring).

    Extra per-client attributes: :meth:`input_sizes`, :meth:`relation_adjacency` (the a-priori
    graph, aligned with the client order), :meth:`coordinates` (lat/lon), :meth:`client_names`,
    :meth:`feature_names`; ``window_starts[split]`` holds the start index of every window on the
    common time axis (the same for all clients). ``primary_metric`` (model selection on the
    validation split) is ``("mse", "min")``: MSE in original units, pooled.
    :meth:`naive_baselines` scores the naive forecasts (:mod:`tasks.naive`) on the test split;
    ``mape`` says whether MAPE is reported (only where targets are bounded away from 0).
    """

    primary_metric = ("mse", "min")

    def __init__(self, name: str, prepared: Sequence[PreparedClient], *, target_names: Sequence[str],
                 input_len: int, output_len: int, model: str, hidden: int, seed: int,
                 adjacency: Tensor | None, coordinates: np.ndarray | None, client_names: Sequence[str],
                 window_starts: Mapping[str, np.ndarray], bounds, num_steps: int, mape: bool = True,
                 season_steps: int | None = None, widths: Sequence[float] = (),
                 client_widths: Sequence[float] | None = None):
        if model not in FORECAST_MODELS:
            raise ValueError(f"task option model={model!r} is not allowed; choose one of {', '.join(FORECAST_MODELS)}")
        self.name = name
        self._prepared = list(prepared)
        self._clients = [p.data for p in self._prepared]
        self.num_clients = len(self._clients)
        self.target_names = tuple(target_names)
        self.input_len, self.output_len = int(input_len), int(output_len)
        self.model_name, self.hidden, self.seed = model, int(hidden), int(seed)
        self.horizons = tuple(h for h in HORIZONS if h <= self.output_len)
        self._adjacency = adjacency
        self._coordinates = None if coordinates is None else np.asarray(coordinates, dtype=np.float64)
        self._client_names = list(client_names)
        self.window_starts = dict(window_starts)
        self.bounds = tuple(bounds)
        self.num_steps = int(num_steps)
        self.mape = bool(mape)
        self.season_steps = season_steps
        self.widths, self.client_widths = tuple(widths), None if client_widths is None else tuple(client_widths)
        if self.client_widths is not None and len(self.client_widths) != self.num_clients:
            raise ValueError(f"task option client_widths has {len(self.client_widths)} entries, expected one per "
                             f"client ({self.num_clients} clients)")

    # -- Task protocol ------------------------------------------------------------------------

    def client_data(self, client: int) -> ClientData:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} out of range [0, {self.num_clients})")
        return self._clients[client]

    def input_sizes(self) -> list[int]:
        """Number of input features of every client (they differ when stations lack variables)."""
        return [int(c.train[0].shape[-1]) for c in self._clients]

    @property
    def nested_architectures(self) -> bool:
        """Whether clients run width-scaled forecasters whose tensors nest (``widths``)."""
        return len({self.width_of(c) for c in range(self.num_clients)}) > 1

    def width_of(self, client: int | None) -> float:
        """Client ``client``'s width multiplier (``None``: the widest, the server's)."""
        return width_for(client, self.widths, self.client_widths)

    def make_model(self, client: int | None = None) -> nn.Module:
        """The forecaster for ``client``'s input size and width; ``None`` = the shared (widest)
        architecture, which exists only when every client has the same input size. Initial
        weights depend only on the task seed and the layer (see
        :func:`tasks.forecast_models.seeded_init_`)."""
        sizes = self.input_sizes()
        if client is None:
            if len(set(sizes)) > 1:
                raise ValueError(
                    f"task {self.name!r}: clients have different input sizes {sorted(set(sizes))}, so there is no "
                    "single shared model; use method \"decoupled\" (personal input_proj layer per client), a "
                    "hypernetwork method with hypernetwork.personal_input = true, or "
                    "give every client the same input variables"
                )
            in_features = sizes[0]
        else:
            if not 0 <= client < self.num_clients:
                raise IndexError(f"client {client} out of range [0, {self.num_clients})")
            in_features = sizes[client]
        hidden = max(1, int(round(self.hidden * self.width_of(client))))
        return make_forecaster(self.model_name, in_features, self.input_len, len(self.target_names),
                               self.output_len, hidden, seed=self.seed)

    def loss(self, output: Tensor, *targets: Tensor) -> Tensor:
        return forecast_loss(output, *targets)

    def metrics(self, output: Tensor, *targets: Tensor) -> dict[str, Tensor]:
        return forecast_metrics(output, *targets, horizons=self.horizons, mape=self.mape)

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        return forecast_finalize(sums, self.horizons)

    def naive_baselines(self) -> dict[str, dict[str, float]]:
        """Test metrics of the naive forecasts (``persistence``, ``seasonal_naive`` when the task
        has a season, ``train_mean``), each metric averaged over clients as the engines average the
        methods' ``test_*`` metrics: ``{"persistence": {"test_mse": …, …}, …}``."""
        out = {}
        for name in NAIVE_BASELINES:
            rows = [self.finalize(p.baseline_sums[name]) for p in self._prepared if name in p.baseline_sums]
            if rows:
                out[name] = {f"test_{k}": float(np.mean(v)) if (v := [r[k] for r in rows if math.isfinite(r[k])]) else float("nan")
                             for k in rows[0]}
        return out

    # -- per-client attributes ------------------------------------------------------------------

    def relation_adjacency(self) -> Tensor | None:
        """The a-priori client graph ``[N, N]`` (dense, symmetric, zero diagonal, client order)."""
        return None if self._adjacency is None else self._adjacency.clone()

    def coordinates(self) -> np.ndarray | None:
        """``[N, 2]`` (latitude, longitude) in degrees, client order; ``None`` if unknown."""
        return None if self._coordinates is None else self._coordinates.copy()

    def client_names(self) -> list[str]:
        return list(self._client_names)

    def feature_names(self, client: int) -> tuple[str, ...]:
        return self._prepared[client].input_names

    def normalization(self, client: int) -> dict[str, np.ndarray]:
        """The client's train-period statistics: input/target mean and std."""
        p = self._prepared[client]
        return {"input_mean": p.input_mean, "input_std": p.input_std,
                "target_mean": p.target_mean, "target_std": p.target_std}

    def __repr__(self) -> str:
        sizes = sorted(set(self.input_sizes()))
        n = [c.num_train for c in self._clients]
        return (f"ForecastTask({self.name!r}, clients={self.num_clients}, steps={self.num_steps}, "
                f"input_len={self.input_len}, output_len={self.output_len}, input_sizes={sizes}, "
                f"targets={list(self.target_names)}, train windows/client={min(n)}..{max(n)})")


def build_task(name: str, series: Sequence[ClientSeries], *, num_steps: int, fractions, input_len: int,
               output_len: int, stride: int, max_windows: int | None, model: str, hidden: int, seed: int,
               adjacency: Tensor | None, coordinates: np.ndarray | None, client_names: Sequence[str],
               season: int | None = None, seasonal_lags: Sequence[int] = (), mape: bool = True,
               sources: Sequence[str] | None = None, widths: Sequence[float] = (),
               client_widths: Sequence[float] | None = None) -> ForecastTask:
    """Split the common time axis, add the seasonal lag inputs (:func:`add_seasonal_lags`), prepare
    every client (naive baselines with ``season`` steps), and wrap them in a :class:`ForecastTask`.
    ``sources``: each client's data file, named in its data errors."""
    bounds = split_bounds(num_steps, fractions)
    validate_split_options(num_steps, bounds, input_len, output_len, f"task {name!r}")
    prepared = []
    for k, (cname, s) in enumerate(zip(client_names, series)):
        s = add_seasonal_lags(s, seasonal_lags, output_len)
        try:
            prepared.append(prepare_client(s, bounds, input_len, output_len, stride, max_windows,
                                           season=season, mape=mape))
        except ForecastDataError as exc:
            where = f"{sources[k]}: " if sources is not None else ""
            raise ForecastDataError(f"{where}task {name!r}, client {cname!r}: {exc}") from None
    starts = {k: window_starts(*b, input_len, output_len, stride, max_windows)
              for k, b in zip(("train", "val", "test"), bounds)}
    return ForecastTask(name, prepared, target_names=series[0].target_names, input_len=input_len,
                        output_len=output_len, model=model, hidden=hidden, seed=seed, adjacency=adjacency,
                        coordinates=coordinates, client_names=client_names, window_starts=starts,
                        bounds=bounds, num_steps=num_steps, mape=mape, season_steps=season, widths=widths,
                        client_widths=client_widths)


def require_data_dir(options, task: str) -> Path:
    if options is None or options.data_dir is None:
        raise ValueError(f"task {task!r} needs the option data_dir (folder with the data files); it is not set")
    path = Path(options.data_dir).expanduser()
    if not path.is_dir():
        raise ForecastDataError(f"task {task!r}: data_dir {shown_path(path)} is not a directory")
    return path
