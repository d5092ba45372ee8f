"""Calibration of predicted class probabilities: expected calibration error, negative
log-likelihood and the reliability diagram's bins.

A classifier is calibrated when, among the examples it predicts with confidence ``c`` (its
largest probability), a fraction ``c`` is right. :func:`reliability` sorts the examples into
equal-width confidence bins ``(k/n, (k+1)/n]`` (the first bin also takes 0), and
:func:`expected_calibration_error` (Guo et al., 2017) weighs each bin's gap between accuracy
and mean confidence by its share of the examples::

    ECE = sum_k |B_k| / N * |acc(B_k) - conf(B_k)|

:func:`nll` is the mean ``-log p(y_i | x_i)`` of the true labels. All take probabilities
``(N, C)`` (rows summing to one; :func:`funnn.laplace.predictive` gives them, or
``jax.nn.softmax`` of logits) and integer labels ``(N,)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from funnn.core import ConfigError, ShapeError

__all__ = ["Reliability", "reliability", "expected_calibration_error", "nll"]


class Reliability(NamedTuple):
    """Per confidence bin (``bins`` of them, equal width on ``[0, 1]``): ``edges`` (bins + 1,),
    ``confidence`` (mean confidence, NaN when empty), ``accuracy`` (NaN when empty), ``counts``."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray


def _check(probs, labels, bins=None):
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ShapeError(f"calibration needs probabilities (N, C) and labels (N,), got "
                         f"{probs.shape} and {labels.shape}", ("calibration",))
    if not np.issubdtype(labels.dtype, np.integer):
        raise ShapeError(f"labels must be integers, got dtype {labels.dtype}", ("calibration",))
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ShapeError(f"labels must lie in [0, {probs.shape[1]}), got "
                         f"[{labels.min()}, {labels.max()}]", ("calibration",))
    if bins is not None and (not isinstance(bins, int) or isinstance(bins, bool) or bins < 1):
        raise ConfigError(f"bins must be a positive int, got {bins!r}", ("calibration",))
    return probs, labels


def reliability(probs, labels, bins: int = 15) -> Reliability:
    """The reliability diagram's bins (module docstring): confidence ``max_c p_c`` in bin
    ``k`` when ``k/bins < conf <= (k+1)/bins``."""
    probs, labels = _check(probs, labels, bins)
    conf = probs.max(1)
    right = (probs.argmax(1) == labels).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, minlength=bins) / count
        acc = np.bincount(idx, right, minlength=bins) / count
    return Reliability(np.linspace(0.0, 1.0, bins + 1), mean_conf, acc, count)


def expected_calibration_error(probs, labels, bins: int = 15) -> float:
    """``sum_k |B_k| / N |acc(B_k) - conf(B_k)|`` over ``bins`` equal-width confidence bins."""
    r = reliability(probs, labels, bins)
    full = r.counts > 0
    return float(np.sum(r.counts[full] * np.abs(r.accuracy[full] - r.confidence[full]))
                 / max(1, int(r.counts.sum())))


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-1/N sum_i log p_i[y_i]`` (``p`` clipped below at
    ``eps``, so a confident mistake costs ``-log eps`` rather than infinity)."""
    probs, labels = _check(probs, labels)
    picked = jnp.take_along_axis(jnp.asarray(probs), jnp.asarray(labels)[:, None], axis=1)
    return float(-jnp.mean(jnp.log(jnp.maximum(picked, eps))))
