"""Steadier mouths: a One-Euro filter on crop boxes and landmarks.

A detector's box wobbles by a few pixels from frame to frame even on a still face; pasted back,
the regenerated mouth then shimmers. A plain moving average removes the wobble but drags behind
real head motion. The One-Euro filter (Casiez, Roussel and Vogel, CHI 2012) is a low-pass filter
whose cut-off frequency rises with the signal's speed: heavy smoothing while the face is still,
little while it moves.

The whole track is known before the render starts, so the filter runs forward and backward and
the two passes are averaged: the forward pass lags behind a motion by as much as the backward one
leads it, so their mean has (close to) no lag. Values are divided by the face's size first, so one
set of parameters fits any resolution and face size (speeds are in face heights per second).
bench/bench_jitter.py measures jitter and lag for these defaults against the old moving average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OneEuro:
    """One-Euro parameters, in face heights and seconds."""

    min_cutoff: float = 0.5  # Hz: the cut-off while the face is still (lower: steadier, laggier)
    beta: float = 4.0  # Hz per (face height / s): how fast the cut-off rises with speed
    d_cutoff: float = 1.0  # Hz: the low-pass on the speed estimate itself
    zero_phase: bool = True  # average a forward and a backward pass (offline: no lag)


def _alpha(cutoff: np.ndarray | float, rate: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * np.pi * cutoff)
    return 1.0 / (1.0 + tau * rate)


def one_euro(values: np.ndarray, rate: float, params: OneEuro = OneEuro(), *, causal: bool | None = None
             ) -> np.ndarray:
    """Filter ``values`` ``(N, D)`` sampled at ``rate`` Hz, each column on its own.

    ``causal=True`` runs the forward pass only (what a live filter could do); the default follows
    ``params.zero_phase``. NaN inputs are not allowed (filter each run of valid frames).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, D) values, got shape {x.shape}")
    if len(x) < 2:
        return x.copy()
    forward = _one_euro_pass(x, float(rate), params)
    if causal or (causal is None and not params.zero_phase):
        return forward
    backward = _one_euro_pass(x[::-1], float(rate), params)[::-1]
    return (forward + backward) / 2.0


def _one_euro_pass(x: np.ndarray, rate: float, p: OneEuro) -> np.ndarray:
    out = np.empty_like(x)
    a_d = _alpha(p.d_cutoff, rate)
    prev_raw = x[0]
    prev = x[0].copy()
    dx = np.zeros(x.shape[1])
    out[0] = prev
    for i in range(1, len(x)):
        dx = a_d * (x[i] - prev_raw) * rate + (1.0 - a_d) * dx
        a = _alpha(p.min_cutoff + p.beta * np.abs(dx), rate)
        prev = a * x[i] + (1.0 - a) * prev
        prev_raw = x[i]
        out[i] = prev
    return out


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True values."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    d = np.diff(m.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def smooth_runs(values: np.ndarray, present: np.ndarray, scale: np.ndarray, rate: float,
                params: OneEuro = OneEuro()) -> np.ndarray:
    """One-Euro filter ``values`` ``(N, ...)`` within each run of ``present`` frames.

    A run never mixes with frames across an absence (the person left, or someone hid them).
    ``scale`` ``(N,)`` is the face size per frame (crop box height): values are filtered in units
    of the run's median size, so the parameters hold for any resolution. Rows outside runs, and
    rows holding NaN (a landmark-less frame), are returned unchanged.
    """
    out = np.array(values, dtype=np.float64, copy=True)
    flat = out.reshape(len(out), -1)
    for a, b in runs(present):
        seg = flat[a:b]
        ok = np.isfinite(seg).all(axis=1)
        for c, d in runs(ok):  # a landmark-less stretch splits the run for the landmarks only
            s = float(np.median(scale[a + c : a + d]))
            s = s if np.isfinite(s) and s > 0 else 1.0
            seg[c:d] = one_euro(seg[c:d] / s, rate, params) * s
    return out


def jitter(values: np.ndarray) -> float:
    """Mean absolute frame-to-frame change of ``values`` ``(N, D)`` (pixels per frame)."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.abs(np.diff(v, axis=0)).mean()) if len(v) > 1 else 0.0
