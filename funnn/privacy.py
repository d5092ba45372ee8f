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

Accountants (:func:`epsilon`, ``accountant=``):

* ``"rdp"`` (default): Google's ``dp-accounting`` RDP accountant: Rényi DP (Mironov 2017;
  Mironov, Talwar, Zhang 2019 for the Poisson subsampled Gaussian; Wang, Balle,
  Kasiviswanathan 2019 for sampling without replacement). It handles both samplings above;
  it is an upper bound, a little loose.
* ``"pld"``: the privacy loss distribution (Koskela et al. 2020; Doroshenko et al. 2022),
  funnn's own numpy implementation (:mod:`funnn._pld`): discretised pessimistically
  ("connect the dots", loss interval ``1e-4``) and composed by FFT. The tight figure, what
  Opacus's default PRV accountant (Gopi et al. 2021) also approximates; it agrees with
  dp-accounting's PLD accountant to 1e-4 (tests). Poisson sampling only. At the docs' digits
  setting (N 1437, batch 64, sigma 1, 220 steps, delta 1e-5) RDP gives epsilon 4.98 and PLD
  4.41.

Calibration: :func:`noise_for` inverts either accountant (the smallest noise multiplier
whose epsilon is at most a target). Clipping variants: a threshold per parameter group
(``DP(clip_norm={path: C_k})``, :func:`per_layer_clipped_grad_sum`) and adaptive clipping
(:class:`AdaptiveClip`, :func:`make_adaptive_dp_batch_grad`: the clip follows a quantile of
the per-example norms, Andrew et al. 2021).

The step's randomness comes from its PRNG key, derived as :func:`funnn.train.fit` derives
every key, so a resumed DP run is bit-for-bit the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from funnn import _pld, engines, losses, manual
from funnn._dp_clip import (
    AdaptiveClip,
    AdaptiveClipped,
    AdaptiveClipState,
    _layer_clip,
    _layer_dp_batch_grad,
    adaptive_clip_update,
    adaptive_clipped,
    adaptive_noise,
    make_adaptive_dp_batch_grad,
    per_layer_clipped_grad_sum,
)
from funnn.core import ConfigError, Layer

__all__ = ["DP", "SAMPLINGS", "ACCOUNTANTS", "epsilon", "noise_for", "poisson_capacity",
           "make_dp_grad", "dp_sample", "make_dp_batch_grad", "per_layer_clipped_grad_sum",
           "AdaptiveClip", "adaptive_noise", "adaptive_clip_update", "make_adaptive_dp_batch_grad",
           "AdaptiveClipped", "AdaptiveClipState", "adaptive_clipped"]

SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")


def _number(value, what: str) -> float:
    if isinstance(value, bool):
        value = math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {type(value).__name__} {value!r}",
                          ("DP",)) from None


def _check_accountant(accountant, sampling: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}, got "
                          f"{accountant!r}", ("DP",))
    if accountant == "pld" and sampling != "poisson":
        raise ConfigError("accountant 'pld' accounts Poisson sampling only (its dominating "
                          "pair is the Poisson-subsampled Gaussian's); use accountant 'rdp' "
                          "with sampling 'fixed'", ("DP",))


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
    ``sampling`` ``"poisson"`` or ``"fixed"``; ``accountant`` ``"rdp"`` or ``"pld"``
    (module docstring). Bad values raise :class:`~funnn.core.ConfigError`.

    Per-layer clipping: ``clip_norm`` a mapping ``{parameter path: C_k}`` (or ``layer_clip``
    that mapping): each group's part of an example's gradient is clipped to its own
    threshold (:func:`per_layer_clipped_grad_sum`). ``clip_norm`` then becomes the
    sensitivity ``sqrt(sum_k C_k^2)``, the largest norm of one example's clipped gradient and
    the noise's scale, and ``layer_clip`` holds the thresholds as sorted ``(path, C_k)`` pairs
    (a dict through :attr:`layer_clips`).

    Adaptive clipping: ``adaptive`` an :class:`AdaptiveClip`; ``clip_norm`` is then where the
    clip starts, ``fit`` carries it in the optimizer state (:func:`adaptive_clipped`), and
    the count it releases each step is paid from ``noise_multiplier``
    (:func:`adaptive_noise`), so :meth:`epsilon` accounts the whole step unchanged.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    sampling: str = "poisson"
    accountant: str = "rdp"
    layer_clip: tuple | None = None
    adaptive: AdaptiveClip | None = None

    def __post_init__(self):
        layer = _layer_clip(self.clip_norm)
        if layer is None and self.layer_clip is not None:
            try:
                layer = _layer_clip(dict(self.layer_clip))
            except (TypeError, ValueError):
                raise ConfigError(f"layer_clip must map parameter paths to thresholds, got "
                                  f"{self.layer_clip!r}", ("DP",)) from None
        total = None if layer is None else math.sqrt(sum(t * t for _, t in layer))
        c = (total if total is not None and isinstance(self.clip_norm, Mapping)
             else _number(self.clip_norm, "clip_norm"))
        if not (c > 0 and math.isfinite(c)):
            raise ConfigError(f"clip_norm must be a positive finite number (the largest "
                              f"per-example gradient norm kept), got {self.clip_norm!r}",
                              ("DP",))
        if total is not None and not math.isclose(c, total, rel_tol=1e-9):
            raise ConfigError(f"with per-layer thresholds clip_norm is their root sum of "
                              f"squares {total!r}, got {self.clip_norm!r}", ("DP",))
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
        _check_accountant(self.accountant, self.sampling)
        if self.adaptive is not None and not isinstance(self.adaptive, AdaptiveClip):
            raise ConfigError(f"adaptive must be a privacy.AdaptiveClip(target_quantile, "
                              f"learning_rate, count_noise) or None, got "
                              f"{type(self.adaptive).__name__}", ("DP",))
        if self.adaptive is not None and layer is not None:
            raise ConfigError("adaptive clipping tracks one clip norm; give DP a number as "
                              "clip_norm, not per-layer thresholds", ("AdaptiveClip",))
        _check_fits_float32(c, s)
        object.__setattr__(self, "clip_norm", c)
        object.__setattr__(self, "noise_multiplier", s)
        object.__setattr__(self, "delta", d)
        object.__setattr__(self, "layer_clip", layer)

    @property
    def layer_clips(self) -> dict | None:
        """``{parameter path: threshold}`` for per-layer clipping, else None."""
        return None if self.layer_clip is None else dict(self.layer_clip)

    def config(self) -> dict:
        """The settings as a run config records them (``metrics.json``, resume checks);
        per-layer thresholds ride in ``dp_layer_clip``."""
        out = {"dp_clip": self.clip_norm, "dp_noise": self.noise_multiplier,
               "dp_delta": self.delta, "dp_sampling": self.sampling}
        if self.layer_clip is not None:
            out["dp_layer_clip"] = self.layer_clips
        if self.accountant != "rdp":
            out["dp_accountant"] = self.accountant
        if self.adaptive is not None:
            out["dp_adaptive"] = self.adaptive.config()
        return out

    def epsilon(self, steps: int, batch_size: int, num_examples: int) -> float:
        """Epsilon after ``steps`` steps at this ``delta`` (:func:`epsilon`)."""
        return epsilon(self.noise_multiplier, batch_size, num_examples, steps, self.delta,
                       self.sampling, self.accountant)


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
            delta: float = 1e-5, sampling: str = "poisson", accountant: str = "rdp") -> float:
    """The (epsilon, delta)-DP epsilon of ``steps`` DP-SGD steps: Poisson sampling at rate
    ``batch_size / num_examples`` (add/remove-one), or fixed-size batches without
    replacement (replace-one, sensitivity ``2C``: module doc), by dp-accounting's RDP
    accountant (``accountant="rdp"``, default) or funnn's PLD accountant (``"pld"``,
    Poisson only; :mod:`funnn._pld`).

    ``steps == 0`` gives 0; ``noise_multiplier == 0`` gives ``inf``.
    """
    return _epsilon(noise_multiplier, batch_size, num_examples, steps, delta, sampling,
                    accountant, PLD_INTERVAL)


def _epsilon(noise_multiplier: float, batch_size: int, num_examples: int, steps: int,
             delta: float, sampling: str, accountant: str, interval: float) -> float:
    DP(1.0, noise_multiplier, delta, sampling, accountant)    # the same checks as the settings
    if steps < 0 or batch_size < 1 or num_examples < batch_size:
        raise ConfigError(f"need steps >= 0 and 1 <= batch_size <= num_examples, got steps "
                          f"{steps}, batch_size {batch_size}, num_examples {num_examples}",
                          ("epsilon",))
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if accountant == "pld":
        return _pld.poisson_gaussian_epsilon(float(noise_multiplier), batch_size / num_examples,
                                             int(steps), float(delta), interval)
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


PLD_INTERVAL = 1e-4     # the PLD's loss grid (dp-accounting's default too): epsilon to ~1e-4
_NOISE_RANGE = (1e-2, 1e4)


def noise_for(target_epsilon: float, batch_size: int, num_examples: int, steps: int,
              delta: float = 1e-5, sampling: str = "poisson", accountant: str = "rdp", *,
              rtol: float = 1e-3) -> float:
    """The smallest noise multiplier ``sigma`` with ``epsilon(sigma, ...) <= target_epsilon``
    (:func:`epsilon`'s arguments and accountant), found to ``rtol``: the result's epsilon
    lies in ``[target (1 - rtol), target]`` (Opacus's ``get_noise_multiplier`` stops at an
    absolute 0.01).

    Epsilon falls as sigma grows, so the search brackets the target by doubling or halving
    from 1, then narrows the bracket by regula falsi on ``log epsilon`` against
    ``log sigma`` (Illinois variant), keeping the end whose epsilon meets the target. Sigma
    is searched in ``[0.01, 1e4]``: a target that needs more noise raises
    :class:`~funnn.core.ConfigError`; a target met already at 0.01 returns 0.01. ``steps ==
    0`` returns 0 (no step spends privacy).
    """
    t = _number(target_epsilon, "target_epsilon")
    if not t > 0:
        raise ConfigError(f"target_epsilon must be a positive number, got {target_epsilon!r}",
                          ("noise_for",))
    r = _number(rtol, "rtol")
    if not 0 < r < 1:
        raise ConfigError(f"rtol must lie in (0, 1), got {rtol!r}", ("noise_for",))
    epsilon(1.0, batch_size, num_examples, steps, delta, sampling, accountant)   # checks
    if steps == 0 or math.isinf(t):
        return 0.0

    def eps_at(interval: float):
        cache: dict = {}

        def eps(s: float) -> float:
            if s not in cache:
                cache[s] = _epsilon(s, batch_size, num_examples, steps, delta, sampling,
                                    accountant, interval)
            return cache[s]
        return eps

    start = 1.0
    if accountant == "pld":     # search at a 10x coarser discretisation first (10x faster)
        start = _search(eps_at(10 * PLD_INTERVAL), 1.0, 2.0, t, r, steps)
    return _search(eps_at(PLD_INTERVAL), start, 2.0 if start == 1.0 else 1.01, t, r, steps)


def _search(eps, start: float, factor: float, t: float, rtol: float, steps: int) -> float:
    """Bracket ``t`` from ``start`` by steps of ``factor`` within :data:`_NOISE_RANGE`, then
    :func:`_narrow` it."""
    lo_s, hi_s = _NOISE_RANGE
    hi = start
    while eps(hi) > t:                          # more noise until the target is met
        if hi >= hi_s:
            raise ConfigError(f"target_epsilon {t:g} is out of reach: noise_multiplier "
                              f"{hi_s:g} still gives epsilon {eps(hi):.4g} after {steps} "
                              f"steps; train fewer steps or on more examples", ("noise_for",))
        hi = min(factor * hi, hi_s)
    lo = hi / factor
    while eps(lo) <= t:                         # less noise until the target is missed
        if lo <= lo_s:
            return lo_s
        hi, lo = lo, max(lo / factor, lo_s)
    return _narrow(eps, lo, hi, t, rtol)


def _narrow(eps, lo: float, hi: float, t: float, rtol: float) -> float:
    """Regula falsi (Illinois) on ``f(s) = log eps(s) - log t`` over ``log s`` with
    ``eps(lo) > t >= eps(hi)``: the returned ``hi`` always meets the target."""
    f_lo, f_hi = math.log(eps(lo) / t), math.log(eps(hi) / t)
    side = 0
    for _ in range(100):
        if eps(hi) >= t * (1 - rtol) or hi / lo - 1 < 1e-9:
            break
        a, b = math.log(lo), math.log(hi)
        x = b - f_hi * (b - a) / (f_hi - f_lo) if math.isfinite(f_lo) else (a + b) / 2
        if not a < x < b:
            x = (a + b) / 2
        s = math.exp(x)
        f = math.log(eps(s) / t) if eps(s) > 0 else -math.inf
        if f > 0:
            lo, f_lo = s, f
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            hi, f_hi = s, f
            if side == 1:
                f_lo /= 2
            side = 1
    return hi


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


def dp_sample(dp: DP, batch_size: int, num_examples: int, multiple: int = 1):
    """``sample(key) -> (idx, weights)``: the rows one DP-SGD step trains on.

    ``key`` is the step's key; its first third (``split(key, 3)[0]``) draws the batch:
    Poisson (``cap`` rows, :func:`poisson_capacity`, weights 1 for the chosen rows and 0
    for the padding) or fixed-size (``batch_size`` distinct rows, weights 1). ``multiple``
    rounds ``cap`` up to a multiple of it (a mesh's data degree, so the rows split evenly):
    more zero-weight padding, the same chosen rows, the same privacy.
    """
    cap = -(-poisson_capacity(batch_size, num_examples) // multiple) * multiple
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
    if dp.layer_clip is not None:       # per-layer thresholds: per_layer_clipped_grad_sum
        return _layer_dp_batch_grad(model, loss, dp, engine, batch_size)
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
