"""DP-SGD's clipping variants (re-exported by :mod:`funnn.privacy`): a threshold per parameter
group, and adaptive clipping.

Per-layer clipping splits each example's gradient into parameter groups (``{path: C_k}``)
and clips each group to its own threshold, so one example moves the clipped sum by at most
``sqrt(sum_k C_k^2)``: that is the sensitivity, and the noise's scale
(:class:`funnn.privacy.DP` with a mapping as ``clip_norm``). Adaptive clipping (Andrew,
Thakkar, McMahan, Ramaswamy 2021) moves one clip norm toward a quantile of the per-example
norms, paying for the noisy count of unclipped examples out of the step's noise multiplier.
Both materialise per-example gradients (the manual engine's batched rules, or
``vmap(jax.grad)``): ghost clipping gives each example one factor, at a fixed clip.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from funnn import engines, manual, trees
from funnn.core import ConfigError, Layer

__all__ = ["per_layer_clipped_grad_sum", "AdaptiveClip", "adaptive_noise",
           "adaptive_clip_update", "make_adaptive_dp_batch_grad", "AdaptiveClipState",
           "AdaptiveClipped", "adaptive_clipped"]


def _number(value, what: str) -> float:
    if isinstance(value, bool):
        value = math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {type(value).__name__} {value!r}",
                          ("DP",)) from None


def _layer_clip(value) -> tuple | None:
    """A per-group ``clip_norm`` mapping as sorted ``(group, threshold)`` pairs (hashable, so
    the settings stay a frozen value), or None for one number."""
    if not isinstance(value, Mapping):
        return None
    if not value:
        raise ConfigError("clip_norm as a mapping needs at least one parameter group, got {}",
                          ("DP",))
    pairs = []
    for k, v in value.items():
        c = _number(v, f"clip_norm[{k!r}]")
        if not isinstance(k, str) or not (c > 0 and math.isfinite(c)):
            raise ConfigError(f"clip_norm maps parameter paths (strings such as '0' or "
                              f"'0.W') to positive finite thresholds, got {k!r}: {v!r}",
                              ("DP",))
        pairs.append((k, c))
    return tuple(sorted(pairs))



# --------------------------------------------------------------------------- per-layer clipping


def _per_example(model: Layer, loss, engine: str):
    """``f(params, x, y, *, key=None) -> (values (B,), grads)`` with per-example gradients
    materialised: the layers' batched rules (manual engine) or ``vmap(jax.grad)`` over
    one-example batches (example ``i`` keyed by ``fold_in(key, i)``)."""
    if engines.get(engine).clips_by_rules:
        return manual.per_example_value_and_grad(model, loss, train=True)

    def f(params, x, y, *, key=None):
        b = jnp.shape(jax.tree_util.tree_leaves(x)[0])[0]
        keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(
            jnp.arange(b))

        def one(xi, yi, ki):
            def value(p):
                out = model.apply(p, jax.tree_util.tree_map(lambda a: a[None], xi), key=ki,
                                  train=True)
                return loss.value(out, yi[None])
            return jax.value_and_grad(value)(params)

        return jax.vmap(one)(x, y, keys)

    return f


def _group_of_leaves(params, clip_norms: Mapping[str, float]) -> list[str]:
    """Each leaf's group: the longest key of ``clip_norms`` equal to its path or a prefix
    of it at a ``.`` (paths as :func:`funnn.trees.path_str` writes them: ``0.W``)."""
    paths = [p for p, _ in trees.tree_paths(params)]
    groups = []
    for p in paths:
        hits = [k for k in clip_norms if p == k or p.startswith(k + ".")]
        if not hits:
            tops = sorted({q.split(".")[0] for q in paths})
            raise ConfigError(f"per-layer clip_norm has no threshold for parameter {p!r}; "
                              f"give one for each parameter group (top-level groups: "
                              f"{', '.join(tops)}), got {sorted(clip_norms)}", ("DP",))
        groups.append(max(hits, key=len))
    unused = sorted(set(clip_norms) - set(groups))
    if unused:
        raise ConfigError(f"per-layer clip_norm names {unused}, which match no parameter "
                          f"(parameter paths: {', '.join(paths)})", ("DP",))
    return groups


def per_layer_clipped_grad_sum(model: Layer, loss, clip_norms: Mapping[str, float],
                               engine: str = "manual"):
    """``f(params, x, y, weights, *, key=None) -> (values (B,), norms (B, G), sum_grads)``:
    per-layer clipping. Each example's gradient is split into the parameter groups of
    ``clip_norms`` (``{path: C_k}``; a leaf belongs to the longest path equal to its own or
    a prefix of it, e.g. ``{"0": 1.0, "2": 0.5}`` for the first and third layers of a
    ``serial``) and group ``k`` is clipped to ``C_k``::

        sum_grads_k = sum_i weights_i min(1, C_k / ||g_ik||) g_ik

    so an example moves the sum by at most ``sqrt(sum_k C_k^2)`` (what :class:`DP` makes
    its ``clip_norm``, the noise's scale). ``norms[:, k]`` are the unclipped group norms
    (groups in sorted key order). Per-example gradients are materialised (the manual
    engine's batched rules, or ``vmap(jax.grad)``): ghost clipping scales each example's
    output delta once, which cannot give each group its own factor. A missing or unknown
    group raises :class:`~funnn.core.ConfigError` at the first call.
    """
    thresholds = dict(_layer_clip(dict(clip_norms)) or ())
    per_example = _per_example(model, loss, engine)
    names = sorted(thresholds)

    def f(params, x, y, weights, *, key=None):
        group = _group_of_leaves(params, thresholds)
        values, grads = per_example(params, x, y, key=key)
        leaves, tdef = jax.tree_util.tree_flatten(grads)
        b = values.shape[0]
        sq = {k: jnp.zeros((b,), values.dtype) for k in names}
        for g, k in zip(leaves, group):
            sq[k] = sq[k] + jnp.sum(jnp.square(g).reshape(b, -1), 1).astype(values.dtype)
        norms = {k: jnp.sqrt(v) for k, v in sq.items()}
        w = jnp.asarray(weights, values.dtype)
        scale = {k: manual.clip_factors(norms[k], thresholds[k]) * w for k in names}
        summed = [jnp.tensordot(scale[k].astype(g.dtype), g, axes=1)
                  for g, k in zip(leaves, group)]
        return (values, jnp.stack([norms[k] for k in names], 1),
                jax.tree_util.tree_unflatten(tdef, summed))

    return f


def _layer_dp_batch_grad(model: Layer, loss, dp, engine: str, batch_size: int):
    """:func:`make_dp_batch_grad` with per-layer thresholds: the same keys, noise of
    standard deviation ``noise_multiplier * clip_norm`` (``clip_norm`` the root sum of
    squares of the thresholds) and mean loss; the clipped sum by
    :func:`per_layer_clipped_grad_sum`. Side inputs (``side``, a dict of per-row arrays)
    are not taken yet: a non-empty one raises :class:`~funnn.core.ConfigError`."""
    clipped = per_layer_clipped_grad_sum(model, loss, dp.layer_clips or {}, engine)
    std = dp.noise_multiplier * dp.clip_norm

    def g(params, xb, yb, weights, key, side=None):
        if side:
            raise ConfigError(f"per-layer clipping takes no side inputs yet (got "
                              f"{sorted(side)}); give DP one clip_norm", ("DP",))
        _, k_noise, k_model = jax.random.split(key, 3)
        values, _, summed = clipped(params, xb, yb, weights, key=k_model)
        leaves, tdef = jax.tree_util.tree_flatten(summed)
        noise_keys = jax.random.split(k_noise, max(len(leaves), 1))
        noisy = [(v + std * jax.random.normal(k, v.shape, v.dtype)) / batch_size
                 for v, k in zip(leaves, noise_keys)]
        w = weights.astype(values.dtype)
        value = jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1)
        return value, jax.tree_util.tree_unflatten(tdef, noisy)

    return g


# --------------------------------------------------------------------------- adaptive clipping


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially private
    learning with adaptive clipping"): the clip norm ``C`` follows the ``target_quantile``
    ``gamma`` of the per-example gradient norms by the geometric update::

        b = (sum_i w_i ([||g_i|| <= C] - 1/2) + N(0, count_noise^2)) / B + 1/2
        C <- C exp(-learning_rate (b - gamma))

    ``b`` is the noisy fraction of unclipped examples (``B`` the expected batch size); the
    centred count has sensitivity 1/2. ``count_noise`` (``sigma_b``; None: ``B / 20``, the
    paper's choice) is paid for out of the step's noise multiplier :func:`adaptive_noise`.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float | None = None

    def __post_init__(self):
        g = _number(self.target_quantile, "target_quantile")
        if not 0 < g < 1:
            raise ConfigError(f"target_quantile must lie in (0, 1), got "
                              f"{self.target_quantile!r}", ("AdaptiveClip",))
        eta = _number(self.learning_rate, "learning_rate")
        if not (eta > 0 and math.isfinite(eta)):
            raise ConfigError(f"learning_rate must be a positive finite number, got "
                              f"{self.learning_rate!r}", ("AdaptiveClip",))
        if self.count_noise is not None:
            s = _number(self.count_noise, "count_noise")
            if not (s > 0 and math.isfinite(s)):
                raise ConfigError(f"count_noise must be a positive finite number (or None for "
                                  f"batch_size / 20), got {self.count_noise!r}",
                                  ("AdaptiveClip",))

    def sigma_b(self, batch_size: int) -> float:
        """The count's noise standard deviation at this expected batch size."""
        return batch_size / 20 if self.count_noise is None else float(self.count_noise)

    def config(self) -> dict:
        """The settings as a run config records them (``dp_adaptive``)."""
        return {"target_quantile": float(self.target_quantile),
                "learning_rate": float(self.learning_rate),
                "count_noise": None if self.count_noise is None else float(self.count_noise)}


def adaptive_noise(noise_multiplier: float, count_noise: float) -> float:
    """The gradient's noise multiplier ``z_grad`` when the count of unclipped examples is
    released with noise ``count_noise`` (``sigma_b``) and the step as a whole must be a
    Gaussian mechanism of multiplier ``z = noise_multiplier`` (Andrew et al. 2021,
    Theorem 1)::

        z^-2 = z_grad^-2 + (2 sigma_b)^-2,   so   z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2)

    The accountant sees ``z``; ``z_grad > z`` is the price of the private quantile. Needs
    ``2 sigma_b > z`` (else :class:`~funnn.core.ConfigError`); ``z == 0`` gives 0.
    """
    z, sb = float(noise_multiplier), float(count_noise)
    if z == 0:
        return 0.0
    rest = z ** -2 - (2 * sb) ** -2
    if not rest > 0:
        raise ConfigError(f"count_noise {sb:g} leaves no privacy for the gradient at "
                          f"noise_multiplier {z:g}: need 2 * count_noise > noise_multiplier",
                          ("AdaptiveClip",))
    return rest ** -0.5


def adaptive_clip_update(clip, norms, weights, adaptive: AdaptiveClip, batch_size: int,
                         key):
    """The next clip norm (:class:`AdaptiveClip`'s update) from this step's clip, the
    per-example ``norms`` (B,), the rows' ``weights`` (B,; 0 for padding) and a key for
    the count's noise. Pure and jittable; ``clip`` may be traced."""
    w = jnp.asarray(weights, jnp.float32)
    below = (jnp.asarray(norms, jnp.float32) <= clip).astype(jnp.float32) - 0.5
    count = jnp.sum(w * below) + adaptive.sigma_b(batch_size) * jax.random.normal(key, ())
    unclipped = count / batch_size + 0.5
    return clip * jnp.exp(-adaptive.learning_rate * (unclipped - adaptive.target_quantile))


def make_adaptive_dp_batch_grad(model: Layer, loss, dp, adaptive: AdaptiveClip,
                                engine: str, batch_size: int):
    """``g(params, xb, yb, weights, key, clip) -> (loss, noisy_grad, next_clip)``: DP-SGD
    with adaptive clipping on rows already sampled (:func:`dp_sample`). Each example's
    gradient is clipped to the current ``clip`` (traced; start from ``dp.clip_norm``), the
    weighted sum gets noise ``adaptive_noise(dp.noise_multiplier, sigma_b) * clip`` and is
    divided by ``batch_size``; the clip moves toward the target quantile
    (:func:`adaptive_clip_update`). ``dp.epsilon(...)`` accounts the whole step (gradient
    and count) at ``dp.noise_multiplier``. The step's ``key`` splits as in
    :func:`make_dp_batch_grad` (sampling, noise, model); the count's noise comes from
    ``fold_in`` of the noise key. Per-example gradients are materialised (as in
    :func:`per_layer_clipped_grad_sum`).
    """
    if dp.layer_clip is not None:
        raise ConfigError("adaptive clipping tracks one clip norm; give DP a number as "
                          "clip_norm, not per-layer thresholds", ("AdaptiveClip",))
    z_grad = adaptive_noise(dp.noise_multiplier, adaptive.sigma_b(batch_size))
    per_example = _per_example(model, loss, engine)

    def g(params, xb, yb, weights, key, clip):
        _, k_noise, k_model = jax.random.split(key, 3)
        values, grads = per_example(params, xb, yb, key=k_model)
        leaves, tdef = jax.tree_util.tree_flatten(grads)
        b = values.shape[0]
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(v).reshape(b, -1), 1) for v in leaves))
        w = jnp.asarray(weights, values.dtype)
        scale = manual.clip_factors(norms, clip) * w
        noise_keys = jax.random.split(k_noise, max(len(leaves), 1))
        noisy = [(jnp.tensordot(scale.astype(v.dtype), v, axes=1)
                  + (z_grad * clip) * jax.random.normal(k, v.shape[1:], v.dtype)) / batch_size
                 for v, k in zip(leaves, noise_keys)]
        nxt = adaptive_clip_update(clip, norms, weights, adaptive, batch_size,
                                   jax.random.fold_in(k_noise, 1 << 30))
        value = jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1)
        return value, jax.tree_util.tree_unflatten(tdef, noisy), nxt

    return g


# --------------------------------------------------------------------------- the clip in fit


class AdaptiveClipState(NamedTuple):
    """The optimizer state of :func:`adaptive_clipped`: the inner optimizer's and the current
    clip norm (a float32 scalar, so checkpoints and resume carry it)."""

    inner: Any
    clip: jax.Array


class AdaptiveClipped(NamedTuple):
    """An optax-style transformation (``init``, ``update``) whose state carries the adaptive
    clip norm; ``fit``'s step sees the type, clips at ``state.clip`` and stores the next one
    (:func:`funnn.train.step.make_update`)."""

    init: Any
    update: Any


def adaptive_clipped(optimizer: optax.GradientTransformation, clip_norm: float):
    """``optimizer`` with the adaptive clip norm in its state, starting at ``clip_norm``;
    ``update`` is the inner optimizer's (the step alone knows the per-example norms)."""

    def init(params):
        return AdaptiveClipState(optimizer.init(params), jnp.asarray(clip_norm, jnp.float32))

    def update(grads, state, params=None):
        updates, inner = optimizer.update(grads, state.inner, params)
        return updates, state._replace(inner=inner)

    return AdaptiveClipped(init, update)
