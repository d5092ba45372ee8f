"""Elementwise layers: an activation, a learnable PReLU, and flatten.

Each follows the stateless Layer contract of :mod:`funnn.core`::

    init(key, in_shape)                          -> (out_shape, params)
    apply(params, x, *, key=None, train=False)   -> y
    forward(params, x, *, key=None, train=False) -> (y, res)
    backward(params, res, dy)                    -> (dparams, dx)

``activation`` and ``prelu`` accept any number of leading axes (a single example
works too); ``flatten`` keeps axis 0 as the batch axis.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from funnn import activations as A
from funnn.core import (
    ConfigError,
    Layer,
    ShapeError,
    check_features,
    check_floating,
    check_in_shape,
    check_rank,
)
from funnn.layers.per_example import batch_sum, paramless, sq_norms

__all__ = ["activation", "prelu", "flatten"]


# --------------------------------------------------------------------------- activation


def activation(act) -> Layer:
    """A layer applying ``act`` (an :class:`~funnn.activations.Activation` or a name).

    y = act(x), any shape (softmax/log_softmax act on the last axis).
    Residual: x. Backward: dx = act.backprop(x, dy) (= dy * act.df(x) elementwise).
    No parameters: params and dparams are ``{}``.
    """
    try:
        act = A.get(act)
    except ConfigError as err:
        raise err.under(f"activation({act})") from None
    name = f"activation({act.name})"
    min_rank = 1 if act.elementwise else 2

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, min_rank=min_rank, allow_none=True)  # any shape
        return shape, {}

    def _check(x):
        check_floating(name, x)
        if not act.elementwise:
            check_rank(name, x, 1, what=f"({act.name} acts on the last axis)")

    def apply(params, x, *, key=None, train=False):
        _check(x)
        return act.f(x)

    def forward(params, x, *, key=None, train=False):
        _check(x)
        return act.f(x), x

    def backward(params, res, dy):
        return {}, act.backprop(res, dy)

    def jvp(params, res, dparams, dx):
        """Tangent: ``dx * f'(x)`` elementwise; ``J dx`` with the Jacobian ``df`` (softmax)."""
        if act.elementwise:
            return dx * act.df(res)
        return jnp.einsum("...ij,...j->...i", act.df(res), dx)

    return Layer(name, init, apply, forward, backward, **paramless(backward), kind="activation",
                 jvp=jvp)


# --------------------------------------------------------------------------- prelu


def prelu(init_alpha: float = 0.25) -> Layer:
    """PReLU with a learnable slope per feature (last axis).

    y = x for x > 0, alpha * x for x <= 0.  x: (..., F), alpha: (F,).
    Backward (at x = 0 the left side, as ``activations.prelu``):
    dx = dy * (1 if x > 0 else alpha);  dalpha = sum over leading axes of dy * min(x, 0).
    """
    try:
        a0 = float(init_alpha)
    except (TypeError, ValueError):
        a0 = math.nan
    if not math.isfinite(a0):
        raise ConfigError(f"init_alpha must be a finite number, got {init_alpha!r}", ("prelu",))
    name = f"prelu(init_alpha={a0!r})"

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, min_rank=2, allow_none=True)
        if shape[-1] is None:
            raise ShapeError(f"init shape {shape} has no feature size on its last axis (alpha "
                             f"has one slope per feature); give e.g. (None, features)", (name,))
        return shape, {"alpha": jnp.full((shape[-1],), a0, dtype=float)}

    def _check(params, x):
        check_floating(name, x)
        check_features(name, x, params["alpha"].shape[0])

    def apply(params, x, *, key=None, train=False):
        _check(params, x)
        return jnp.where(x > 0, x, params["alpha"] * x)

    def forward(params, x, *, key=None, train=False):
        return apply(params, x), x

    def backward(params, res, dy):
        x, alpha = res, params["alpha"]
        pos = x > 0
        dx = jnp.where(pos, dy, alpha * dy).astype(x.dtype)
        da = jnp.where(pos, jnp.zeros_like(dy), dy * x).reshape(-1, alpha.shape[0]).sum(0)
        return {"alpha": da.astype(alpha.dtype)}, dx

    def per_example(params, res, dy):
        """dalpha_i = sum over example i's positions of dy * min(x, 0)."""
        x, alpha = res, params["alpha"]
        pos = x > 0
        da = batch_sum(jnp.where(pos, jnp.zeros_like(dy), dy * x))
        return ({"alpha": da.astype(alpha.dtype)},
                jnp.where(pos, dy, alpha * dy).astype(x.dtype))

    def per_example_norms(params, res, dy):
        g, dx = per_example(params, res, dy)
        return sq_norms(g, dy.shape[0], dy.dtype), dx

    def jvp(params, res, dparams, dx):
        """Tangent: ``dx`` where x > 0, else ``alpha dx + dalpha x``."""
        return jnp.where(res > 0, dx, params["alpha"] * dx + dparams["alpha"] * res)

    return Layer(name, init, apply, forward, backward, per_example=per_example,
                 per_example_norms=per_example_norms, kind="prelu", jvp=jvp)


# --------------------------------------------------------------------------- flatten


def flatten() -> Layer:
    """Flatten all but the batch axis: (batch, d1, ..., dk) -> (batch, d1 * ... * dk).

    Residual: x (only its shape is read; under jit XLA keeps no copy).
    Backward: dx = dy reshaped to x's shape. Any dtype. No parameters.
    Under ``jax.vmap`` axis 0 of each mapped example is its "batch" axis.
    """
    name = "flatten"

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, min_rank=2)
        return (shape[0], math.prod(shape[1:])), {}

    def apply(params, x, *, key=None, train=False):
        x = jnp.asarray(x)
        check_rank(name, x, 2, what="(batch, ...)")
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))

    def forward(params, x, *, key=None, train=False):
        return apply(params, x), jnp.asarray(x)

    def backward(params, res, dy):
        return {}, dy.reshape(res.shape)

    def jvp(params, res, dparams, dx):
        """Tangent: ``dx`` flattened like x."""
        return dx.reshape(dx.shape[0], -1)

    return Layer(name, init, apply, forward, backward, **paramless(backward), kind="flatten",
                 jvp=jvp)
