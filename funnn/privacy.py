"""Differentially private SGD: settings, the noisy clipped gradient, and the accountant.

DP-SGD (Abadi et al. 2016) replaces a step's gradient by::

    g = (sum_{i in batch} clip(g_i, C) + N(0, sigma^2 C^2 I)) / B

where ``clip(g_i, C) = g_i min(1, C / ||g_i||)`` and ``B`` is the (expected) batch size.
With the manual engine the clipped sum is ghost clipping
(:func:`funnn.manual.clipped_grad_sum`): per-example norms from the layers' norm rules, then
one batch backward with each example's delta scaled by its clip factor. With the autodiff
(or bridge) engine it falls back to ``vmap(jax.grad)`` over single examples (per-example
gradients materialised: correct, much slower; labelled so in the README).

Sampling (``DP.sampling``):

* ``"poisson"`` (default): every step includes each of the ``N`` training examples
  independently with probability ``q = batch_size / N``, so batches vary in size (mean
  ``batch_size``). Under ``jit`` shapes are fixed: the step takes the first ``cap`` selected
  examples (:func:`poisson_capacity`, ``batch_size + 8 sqrt(batch_size) + 8``), padding with
  zero-weight rows. A draw beyond ``cap`` (probability below 1e-12 for these caps) would drop
  the excess examples, which only removes examples from a batch. Accounted as a Poisson
  subsampled Gaussian under add/remove-one adjacency; noise is ``sigma C``.
* ``"fixed"``: every step draws exactly ``batch_size`` distinct examples uniformly
  (without replacement, independently per step). Accounted as sampling without replacement
  under replace-one adjacency, where one example's change moves the clipped sum by up to
  ``2C``: the accountant is given ``sigma / 2``. Expect a larger epsilon than Poisson.

Accountant: Google's ``dp-accounting`` RDP accountant (:func:`epsilon`). RDP because it
handles both samplings above (its PLD accountant has no sampling-without-replacement
event) and is the accountant Opacus and TF Privacy report by default; it is an upper bound,
a little above the tighter PLD figure (the tests compare the two).

The step's randomness comes from its PRNG key, derived as :func:`funnn.train.fit` derives
every key, so a resumed DP run is bit-for-bit the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from funnn import engines, losses, manual
from funnn.core import ConfigError, Layer

__all__ = ["DP", "SAMPLINGS", "epsilon", "poisson_capacity", "make_dp_grad", "dp_sample",
           "make_dp_batch_grad"]

SAMPLINGS = ("poisson", "fixed")


def _number(value, what: str) -> float:
    if isinstance(value, bool):
        value = math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {type(value).__name__} {value!r}",
                          ("DP",)) from None


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def _check_fits_float32(clip_norm: float, noise_multiplier: float) -> None:
    """DP-SGD trains in float32: the clip norm and the noise's standard deviation
    (``noise_multiplier * clip_norm``) must be finite there, as a learning rate must be
    finite in the parameters' dtype."""
    if clip_norm > _F32_MAX:
        raise ConfigError(f"clip_norm {clip_norm!r} is not finite in float32, the dtype DP-SGD "
                          f"trains in (largest: {_F32_MAX:.3g})", ("DP",))
    if noise_multiplier * clip_norm > _F32_MAX:
        raise ConfigError(f"the noise standard deviation noise_multiplier * clip_norm = "
                          f"{noise_multiplier * clip_norm:.3g} is not finite in float32, the "
                          f"dtype DP-SGD trains in (largest: {_F32_MAX:.3g})", ("DP",))


@dataclasses.dataclass(frozen=True)
class DP:
    """DP-SGD settings: clip each example's gradient to ``clip_norm``, add Gaussian noise of
    standard deviation ``noise_multiplier * clip_norm`` to the sum, account at ``delta``.

    ``clip_norm > 0`` and finite; ``noise_multiplier >= 0`` (0: clipping without privacy,
    epsilon infinite); ``0 < delta < 1`` (take it below ``1 / num_examples``);
    ``sampling`` ``"poisson"`` or ``"fixed"`` (module docstring). Bad values raise
    :class:`~funnn.core.ConfigError`.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    sampling: str = "poisson"

    def __post_init__(self):
        c = _number(self.clip_norm, "clip_norm")
        if not (c > 0 and math.isfinite(c)):
            raise ConfigError(f"clip_norm must be a positive finite number (the largest "
                              f"per-example gradient norm kept), got {self.clip_norm!r}",
                              ("DP",))
        s = _number(self.noise_multiplier, "noise_multiplier")
        if not (s >= 0 and math.isfinite(s)):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0 (noise standard "
                              f"deviation / clip_norm), got {self.noise_multiplier!r}", ("DP",))
        d = _number(self.delta, "delta")
        if not 0 < d < 1:
            raise ConfigError(f"delta must lie in (0, 1) (the probability the epsilon bound may "
                              f"fail; usually below 1 / number of examples), got "
                              f"{self.delta!r}", ("DP",))
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling must be one of {', '.join(map(repr, SAMPLINGS))}, got "
                              f"{self.sampling!r}", ("DP",))
        _check_fits_float32(c, s)
        object.__setattr__(self, "clip_norm", c)
        object.__setattr__(self, "noise_multiplier", s)
        object.__setattr__(self, "delta", d)

    def config(self) -> dict:
        """The settings as a run config records them (``metrics.json``, resume checks)."""
        return {"dp_clip": self.clip_norm, "dp_noise": self.noise_multiplier,
                "dp_delta": self.delta, "dp_sampling": self.sampling}

    def epsilon(self, steps: int, batch_size: int, num_examples: int) -> float:
        """Epsilon after ``steps`` steps at this ``delta`` (:func:`epsilon`)."""
        return epsilon(self.noise_multiplier, batch_size, num_examples, steps, self.delta,
                       self.sampling)


def _event(noise_multiplier: float, batch_size: int, num_examples: int, steps: int,
           sampling: str):
    import dp_accounting as dpa

    if sampling == "poisson":
        one = dpa.PoissonSampledDpEvent(batch_size / num_examples,
                                        dpa.GaussianDpEvent(noise_multiplier))
    else:
        one = dpa.SampledWithoutReplacementDpEvent(num_examples, batch_size,
                                                   dpa.GaussianDpEvent(noise_multiplier / 2))
    return dpa.SelfComposedDpEvent(one, steps)


def epsilon(noise_multiplier: float, batch_size: int, num_examples: int, steps: int,
            delta: float = 1e-5, sampling: str = "poisson") -> float:
    """The (epsilon, delta)-DP epsilon of ``steps`` DP-SGD steps, by dp-accounting's RDP
    accountant: Poisson sampling at rate ``batch_size / num_examples`` (add/remove-one), or
    fixed-size batches without replacement (replace-one, sensitivity ``2C``: module doc).

    ``steps == 0`` gives 0; ``noise_multiplier == 0`` gives ``inf``.
    """
    DP(1.0, noise_multiplier, delta, sampling)          # the same checks as the settings
    if steps < 0 or batch_size < 1 or num_examples < batch_size:
        raise ConfigError(f"need steps >= 0 and 1 <= batch_size <= num_examples, got steps "
                          f"{steps}, batch_size {batch_size}, num_examples {num_examples}",
                          ("epsilon",))
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from dp_accounting import NeighboringRelation, rdp

    relation = (NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson"
                else NeighboringRelation.REPLACE_ONE)
    acc = rdp.RdpAccountant(neighboring_relation=relation)
    # For small sigma a few fractional RDP orders fail to converge; dp-accounting then logs a
    # warning per order and leaves them out of the minimum (the bound stays valid). Quiet it.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(_event(noise_multiplier, batch_size, num_examples, int(steps), sampling))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def poisson_capacity(batch_size: int, num_examples: int) -> int:
    """Rows a Poisson batch is padded to: ``batch_size + 8 sqrt(batch_size) + 8`` (at most
    ``num_examples``); the binomial count exceeds it with probability below 1e-12."""
    return int(min(num_examples, batch_size + math.ceil(8 * math.sqrt(batch_size)) + 8))


def _autodiff_clipped_sum(model: Layer, loss, clip_norm: float):
    """The clipped sum by ``vmap(jax.grad)`` over one-example batches (the autodiff engine's
    fallback; per-example gradients materialised). Example ``i`` draws its random masks from
    ``fold_in(key, i)``; ``loss_weights`` and the side inputs ``context`` are sliced per
    example with ``x`` and ``y``."""

    def f(params, x, y, weights, *, key=None, loss_weights=None, **context):
        b = jnp.shape(jax.tree_util.tree_leaves(x)[0])[0]
        keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(
            jnp.arange(b))

        def one(xi, yi, ki, wi, ci):
            def value(p):
                one_row = functools.partial(jax.tree_util.tree_map, lambda a: a[None])
                out = model.apply(p, one_row(xi), key=ki, train=True, **one_row(ci))
                return losses.weighted(loss, one_row(wi)).value(out, yi[None])
            return jax.value_and_grad(value)(params)

        values, grads = jax.vmap(one)(x, y, keys, loss_weights, context)
        sq = sum(jnp.sum(jnp.square(g).reshape(b, -1), 1)
                 for g in jax.tree_util.tree_leaves(grads))
        norms = jnp.sqrt(sq)
        scale = manual.clip_factors(norms, clip_norm) * weights
        summed = jax.tree_util.tree_map(
            lambda g: jnp.tensordot(scale.astype(g.dtype), g, axes=1), grads)
        return values, norms, summed

    return f


def dp_sample(dp: DP, batch_size: int, num_examples: int):
    """``sample(key) -> (idx, weights)``: the rows one DP-SGD step trains on.

    ``key`` is the step's key; its first third (``split(key, 3)[0]``) draws the batch:
    Poisson (``cap`` rows, :func:`poisson_capacity`, weights 1 for the chosen rows and 0
    for the padding) or fixed-size (``batch_size`` distinct rows, weights 1).
    """
    cap = poisson_capacity(batch_size, num_examples)
    q = batch_size / num_examples

    def sample(key):
        k_sample = jax.random.split(key, 3)[0]
        if dp.sampling == "poisson":
            chosen = jax.random.bernoulli(k_sample, q, (num_examples,))
            idx = jnp.nonzero(chosen, size=cap, fill_value=0)[0]
            return idx, (jnp.arange(cap) < jnp.sum(chosen)).astype(jnp.float32)
        idx = jax.random.choice(k_sample, num_examples, (batch_size,), replace=False)
        return idx, jnp.ones((batch_size,), jnp.float32)

    return sample


def make_dp_batch_grad(model: Layer, loss, dp: DP, engine: str, batch_size: int):
    """``g(params, xb, yb, weights, key, side=None) -> (loss, noisy_grad)`` on rows already
    sampled (:func:`dp_sample`): each example's gradient clipped, the weighted sum noised from
    the second third of the step's ``key`` and divided by ``batch_size``; the last third keys
    the model (dropout). ``loss`` is the weighted mean of the examples' losses. ``side``: the
    rows' side inputs (``mask``/``lengths`` to the model; ``"weights"`` to the loss, so with
    them or a loss ``with_ignore_index`` each example's gradient is that of the mean over its
    own valid tokens before it is clipped)."""
    by_rules = engines.get(engine).clips_by_rules
    clipped = (manual.clipped_grad_sum(model, loss, dp.clip_norm, train=True) if by_rules
               else _autodiff_clipped_sum(model, loss, dp.clip_norm))

    def g(params, xb, yb, weights, key, side=None):
        _, k_noise, k_model = jax.random.split(key, 3)
        loss_weights, context = losses.split_side(side)
        if not by_rules:
            values, _, summed = clipped(params, xb, yb, weights, key=k_model,
                                        loss_weights=loss_weights, **context)
        else:
            run = clipped if loss_weights is None else manual.clipped_grad_sum(
                model, losses.weighted(loss, loss_weights), dp.clip_norm, train=True)
            values, _, summed = run(params, xb, yb, weights, key=k_model, **context)
        leaves, tdef = jax.tree_util.tree_flatten(summed)
        noise_keys = jax.random.split(k_noise, max(len(leaves), 1))
        std = dp.noise_multiplier * dp.clip_norm
        noisy = [(v + std * jax.random.normal(k, v.shape, v.dtype)) / batch_size
                 for v, k in zip(leaves, noise_keys)]
        w = weights.astype(values.dtype)
        value = jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1)
        return value, jax.tree_util.tree_unflatten(tdef, noisy)

    return g


def make_dp_grad(model: Layer, loss, dp: DP, engine: str, batch_size: int, num_examples: int):
    """``f(params, x, y, key, side=None) -> (loss, noisy_grad)``: one DP-SGD gradient from the
    whole training set ``x, y`` (and its side inputs ``side``, a dict of arrays with the batch
    axis first; the step samples its own batch, :func:`dp_sample`, taking the same rows of
    every part) and the step's ``key`` (split into sampling, noise and model keys). ``loss``
    is the mean of the sampled examples' losses; ``noisy_grad`` has the params' tree.
    """
    sample = dp_sample(dp, batch_size, num_examples)
    grad = make_dp_batch_grad(model, loss, dp, engine, batch_size)

    def f(params, x, y, key, side=None):
        idx, weights = sample(key)
        xb, sb = jax.tree_util.tree_map(lambda a: a[idx], (x, side or {}))
        return grad(params, xb, y[idx], weights, key, side=sb)

    return f
