"""Normalisation layers: layer norm, RMS norm and batch norm, each with its hand-written backward.

``layer_norm`` normalises every example over its last axis and is stateless; ``rms_norm``
(Zhang & Sennrich 2019) divides by the root mean square alone, with no centring and no offset.
``batch_norm`` normalises each channel over the batch (and spatial) axes and is the
stateful layer: its running mean and variance travel as an explicit state pytree
``{"mean": (C,), "var": (C,)}`` into ``apply``/``forward`` and back out; nothing is
mutated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.core import (
    ConfigError,
    Layer,
    ShapeError,
    StateError,
    check_features,
    check_floating,
    check_in_shape,
    check_rank,
    upcast,
)
from funnn.layers.per_example import batch_sum, sq_norms

__all__ = ["layer_norm", "rms_norm", "batch_norm"]


def _check_number(value, what: str, layer: str, lo: float, hi: float, lo_open: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    v = float(value) if ok else math.nan
    inside = (lo < v if lo_open else lo <= v) and v <= hi
    if not inside:
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ConfigError(f"{what} must be a number in {span}, got {value!r}", (layer,))
    return v


def _default_dtype(dtype):
    return dtype if dtype is not None else jnp.zeros(()).dtype


# --------------------------------------------------------------------------- layer norm


def layer_norm(eps: float = 1e-5, *, dtype=None) -> Layer:
    """Layer normalisation over the last axis, with learned scale and offset.

    ``xhat = (x - mean(x)) / sqrt(var(x) + eps)`` (mean and biased variance over the
    last axis of each example), ``y = gamma * xhat + beta``.
    Shapes: ``x (..., F) -> y (..., F)``. Params: ``{"gamma": (F,) ones, "beta": (F,) zeros}``.
    Residuals: ``(xhat, inv)`` with ``inv = 1 / sqrt(var + eps)`` of shape ``(..., 1)``.
    Gradients come back in the dtypes of their params and of ``x``, as autodiff's do.
    Derivative (``dxhat = dy * gamma``, ``F`` features):
    ``dx = inv / F * (F dxhat - sum(dxhat) - xhat sum(dxhat xhat))``,
    ``dgamma = sum(dy xhat)``, ``dbeta = sum(dy)`` (sums over every leading axis).
    """
    eps = _check_number(eps, "eps", "layer_norm", 0.0, math.inf, lo_open=True)
    name = "layer_norm" if eps == 1e-5 else f"layer_norm(eps={eps:g})"

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, min_rank=1, allow_none=True)
        f = shape[-1]
        if f is None:
            raise ShapeError(f"init shape {tuple(in_shape)} has no feature size on its last "
                             f"axis; give e.g. (None, features)", (name,))
        dt = _default_dtype(dtype)
        return shape, {"gamma": jnp.ones((f,), dt), "beta": jnp.zeros((f,), dt)}

    def forward(params, x, *, key=None, train=False):
        check_floating(name, x)
        check_rank(name, x, 1, what="(..., features)")
        check_features(name, x, params["gamma"].shape[0])
        xw = upcast(x)                        # bfloat16/float16: the moments in float32
        xc = xw - jnp.mean(xw, axis=-1, keepdims=True)
        inv = lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
        xhat = xc * inv
        y = (xhat * upcast(params["gamma"]) + upcast(params["beta"])).astype(x.dtype)
        return y, (xhat.astype(x.dtype), inv)

    def apply(params, x, *, key=None, train=False):
        return forward(params, x)[0]

    def backward(params, res, dy):
        xhat, inv = res
        x_dt = xhat.dtype                     # xhat has x's dtype; the rest runs in inv's
        f = dy.shape[-1]
        xhat, dy = upcast(xhat), upcast(dy)
        dxhat = dy * upcast(params["gamma"])
        dx = inv * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                    - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
        dgamma = (dy * xhat).reshape(-1, f).sum(0).astype(params["gamma"].dtype)
        dbeta = dy.reshape(-1, f).sum(0).astype(params["beta"].dtype)
        return {"gamma": dgamma, "beta": dbeta}, dx.astype(x_dt)

    def per_example(params, res, dy):
        """dgamma_i = sum_t dy_it xhat_it, dbeta_i = sum_t dy_it: (B, F) each, materialised
        (as small as the input's rows)."""
        xhat, _ = res
        grads = {"gamma": batch_sum(dy * xhat).astype(params["gamma"].dtype),
                 "beta": batch_sum(dy).astype(params["beta"].dtype)}
        return grads, backward(params, res, dy)[1]

    def per_example_norms(params, res, dy):
        g, dx = per_example(params, res, dy)
        return sq_norms(g, dy.shape[0], dy.dtype), dx

    def jvp(params, res, dparams, dx):
        """Tangent: ``dxhat = inv (dx - mean(dx) - xhat mean(xhat dx))`` (the Jacobian of xhat
        is symmetric, so this is the backward's formula), ``dy = gamma dxhat + dgamma xhat +
        dbeta``."""
        xhat, inv = res
        xw, dxw = upcast(xhat), upcast(dx)
        dxhat = inv * (dxw - jnp.mean(dxw, axis=-1, keepdims=True)
                       - xw * jnp.mean(dxw * xw, axis=-1, keepdims=True))
        dy = (dxhat * upcast(params["gamma"]) + xw * upcast(dparams["gamma"])
              + upcast(dparams["beta"]))
        return dy.astype(xhat.dtype)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 per_example=per_example, per_example_norms=per_example_norms, kind="layer_norm",
                 jvp=jvp)


# --------------------------------------------------------------------------- rms norm


def rms_norm(eps: float = 1e-6, *, dtype=None) -> Layer:
    """Root-mean-square normalisation over the last axis, with a learned scale (no offset).

    ``r = 1 / sqrt(mean(x^2) + eps)`` over the last axis of each example, ``xhat = x r``,
    ``y = gamma * xhat`` (Zhang & Sennrich 2019; LLaMA's and T5's norm). PyTorch's
    ``nn.RMSNorm(F, eps=eps)`` is the same layer with ``weight = gamma``; its default ``eps``
    is the dtype's machine epsilon, funnn's ``1e-6``.
    Shapes: ``x (..., F) -> y (..., F)``. Params: ``{"gamma": (F,) ones}``.
    Residuals: ``(xhat, r)`` with ``r`` of shape ``(..., 1)``.
    Gradients come back in the dtypes of their params and of ``x``, as autodiff's do.
    Derivative (``dxhat = dy * gamma``): ``dx = r * (dxhat - xhat * mean(dxhat xhat))``,
    ``dgamma = sum(dy xhat)`` (summed over every leading axis).
    """
    eps = _check_number(eps, "eps", "rms_norm", 0.0, math.inf, lo_open=True)
    name = "rms_norm" if eps == 1e-6 else f"rms_norm(eps={eps:g})"

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, min_rank=1, allow_none=True)
        f = shape[-1]
        if f is None:
            raise ShapeError(f"init shape {tuple(in_shape)} has no feature size on its last "
                             f"axis; give e.g. (None, features)", (name,))
        return shape, {"gamma": jnp.ones((f,), _default_dtype(dtype))}

    def forward(params, x, *, key=None, train=False):
        check_floating(name, x)
        check_rank(name, x, 1, what="(..., features)")
        check_features(name, x, params["gamma"].shape[0])
        xw = upcast(x)                        # bfloat16/float16: the mean square in float32
        r = lax.rsqrt(jnp.mean(xw * xw, axis=-1, keepdims=True) + eps)
        xhat = xw * r
        y = (xhat * upcast(params["gamma"])).astype(x.dtype)
        return y, (xhat.astype(x.dtype), r)

    def apply(params, x, *, key=None, train=False):
        return forward(params, x)[0]

    def backward(params, res, dy):
        xhat, r = res
        x_dt = xhat.dtype
        f = dy.shape[-1]
        xhat, dy = upcast(xhat), upcast(dy)
        dxhat = dy * upcast(params["gamma"])
        dx = r * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
        dgamma = (dy * xhat).reshape(-1, f).sum(0).astype(params["gamma"].dtype)
        return {"gamma": dgamma}, dx.astype(x_dt)

    def per_example(params, res, dy):
        """dgamma_i = sum_t dy_it xhat_it: ``(B, F)``, materialised (as small as a row)."""
        xhat, _ = res
        grads = {"gamma": batch_sum(upcast(dy) * upcast(xhat)).astype(params["gamma"].dtype)}
        return grads, backward(params, res, dy)[1]

    def per_example_norms(params, res, dy):
        g, dx = per_example(params, res, dy)
        return sq_norms(g, dy.shape[0], dy.dtype), dx

    def jvp(params, res, dparams, dx):
        """Tangent: ``dxhat = r (dx - xhat mean(xhat dx))`` (a symmetric Jacobian, so the
        backward's formula), ``dy = gamma dxhat + dgamma xhat``."""
        xhat, r = res
        xw, dxw = upcast(xhat), upcast(dx)
        dxhat = r * (dxw - xw * jnp.mean(dxw * xw, axis=-1, keepdims=True))
        dy = dxhat * upcast(params["gamma"]) + xw * upcast(dparams["gamma"])
        return dy.astype(xhat.dtype)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 per_example=per_example, per_example_norms=per_example_norms, kind="rms_norm",
                 jvp=jvp)


# --------------------------------------------------------------------------- batch norm


class _TrainRes(NamedTuple):
    """Batch-norm residuals in training mode: ``xhat`` (input shape) and ``inv`` ``(C,)``."""
    xhat: jnp.ndarray
    inv: jnp.ndarray


class _InferRes(NamedTuple):
    """Batch-norm residuals in inference mode: ``xhat`` (input shape), ``inv`` ``(C,)`` and
    ``x0``, an empty array of ``x``'s dtype (``xhat`` is kept in it too)."""
    xhat: jnp.ndarray
    inv: jnp.ndarray
    x0: jnp.ndarray


def _check_bn_state(name: str, state, c: int) -> None:
    """batch_norm's running statistics: a dict of ``mean`` and ``var``, both ``(C,)``."""
    hint = "make one with layer.init_state(in_shape) and pass the returned state back in"
    if state is None:
        raise StateError(f"needs its running statistics: pass state={{'mean': ({c},), "
                         f"'var': ({c},)}}; {hint}", (name,))
    if not isinstance(state, Mapping) or set(state) != {"mean", "var"}:
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise StateError(f"expected a state dict with keys ['mean', 'var'], got {got}; {hint}",
                         (name,))
    shapes = (jnp.shape(state["mean"]), jnp.shape(state["var"]))
    if shapes != ((c,), (c,)):
        raise StateError(f"expected state shapes mean ({c},), var ({c},), got mean "
                         f"{shapes[0]}, var {shapes[1]}; {hint}", (name,))


def _bn_batch_stats(name: str, x, red: tuple, bshape: tuple, state, momentum: float,
                    eps: float):
    """Training mode: ``(xhat, inv, new_state)`` from the batch mean and biased variance over
    ``red`` (in float32 for bfloat16/float16), the running statistics moved by ``momentum``."""
    n = math.prod(x.shape[i] for i in red)
    if n <= 1:
        raise ShapeError(
            f"needs more than 1 value per channel in training mode, got {n} (input shape "
            f"{tuple(x.shape)}): the batch statistics would normalise every value to 0, "
            f"giving beta and zero gradients for every earlier layer; use a batch of more "
            f"than one (per-example gradients: train=False), or layer_norm", (name,))
    xw = upcast(x)
    mu = jnp.mean(xw, axis=red)
    xc = xw - mu.reshape(bshape)
    var = jnp.mean(xc * xc, axis=red)
    inv = lax.rsqrt(var + eps)
    new_state = {k: (momentum * state[k] + (1 - momentum) * lax.stop_gradient(v))
                 .astype(jnp.result_type(state[k]))   # same dtype: a lax.scan carry
                 for k, v in (("mean", mu), ("var", var))}
    return xc * inv.reshape(bshape), inv, new_state


def _through_xhat(d, xhat, inv, red: tuple, train: bool):
    """``d`` (a delta or a tangent) through ``xhat = (x - mu) inv``: ``d inv`` at inference
    (an affine map); in training, through the batch statistics too,
    ``inv (d - mean(d) - xhat mean(xhat d))`` over each channel's positions ``red``."""
    if not train:
        return d * inv
    return inv * (d - jnp.mean(d, axis=red, keepdims=True)
                  - xhat * jnp.mean(d * xhat, axis=red, keepdims=True))


def batch_norm(momentum: float = 0.9, eps: float = 1e-5, axis: int = -1, *, dtype=None) -> Layer:
    """Batch normalisation of each channel (``axis``, default last) over all other axes.

    Works for ``(batch, C)``, ``(batch, H, W, C)`` and any rank >= 2. ``axis`` may not be
    the batch axis.

    Training: ``mu``, ``var`` are the batch mean and BIASED variance over every axis but
    ``axis`` (``N`` values per channel); ``xhat = (x - mu) / sqrt(var + eps)``,
    ``y = gamma * xhat + beta``. The running statistics become
    ``mean' = momentum * mean + (1 - momentum) * mu`` and
    ``var' = momentum * var + (1 - momentum) * var_batch`` with the same biased ``var``
    (as Flax, Haiku and Keras do; PyTorch stores the unbiased ``N/(N-1)`` estimate instead).
    Training needs ``N > 1`` (a batch of one with no spatial axes is a :class:`ShapeError`,
    as in PyTorch: it would give ``y = beta`` and zero gradients to every earlier layer).
    Inference: ``xhat = (x - mean) / sqrt(var + eps)`` with the running statistics; the
    state comes back unchanged.

    State: ``init_state(in_shape) -> {"mean": (C,) zeros, "var": (C,) ones}``.
    Params: ``{"gamma": (C,) ones, "beta": (C,) zeros}``.
    Residuals: ``xhat`` and ``inv = 1 / sqrt(var + eps)``, tagged training or inference.
    Gradients come back in the dtypes of their params and of ``x``, as autodiff's do.
    Derivative (``dxhat = dy * gamma``, sums over the ``N`` positions of each channel):
    training ``dx = inv / N * (N dxhat - sum(dxhat) - xhat sum(dxhat xhat))`` (the gradient
    also flows through the batch mean and variance); inference ``dx = dxhat * inv`` (an
    affine map). Both: ``dgamma = sum(dy xhat)``, ``dbeta = sum(dy)``.
    """
    momentum = _check_number(momentum, "momentum", "batch_norm", 0.0, 1.0, lo_open=False)
    eps = _check_number(eps, "eps", "batch_norm", 0.0, math.inf, lo_open=True)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis == 0:
        raise ConfigError(f"axis must be a non-zero int (the channel axis; axis 0 is the batch), "
                          f"got {axis!r}", ("batch_norm",))
    axis = int(axis)
    opts = [f"{k}={v:g}" for k, v, default in
            (("momentum", momentum, 0.9), ("eps", eps, 1e-5), ("axis", axis, -1)) if v != default]
    name = f"batch_norm({', '.join(opts)})" if opts else "batch_norm"

    def _axes(ndim: int, shape) -> tuple:
        """(channel axis, reduced axes, broadcast shape of a (C,) vector)."""
        if not -ndim <= axis < ndim or axis % ndim == 0:
            raise ShapeError(f"channel axis {axis} is out of range or the batch axis for an "
                             f"input of rank {ndim} (shape {tuple(shape)}); batch_norm needs "
                             f"(batch, ..., C)", (name,))
        ax = axis % ndim
        red = tuple(i for i in range(ndim) if i != ax)
        bshape = tuple(shape[ax] if i == ax else 1 for i in range(ndim))
        return ax, red, bshape

    def _channels(in_shape) -> tuple:
        shape = check_in_shape(name, in_shape, min_rank=2, allow_none=True)
        c = shape[_axes(len(shape), shape)[0]]
        if c is None:
            raise ShapeError(f"init shape {tuple(in_shape)} has no channel size on axis {axis}; "
                             f"give e.g. (None, ..., channels)", (name,))
        return shape, c

    def init(key, in_shape):
        shape, c = _channels(in_shape)
        dt = _default_dtype(dtype)
        return shape, {"gamma": jnp.ones((c,), dt), "beta": jnp.zeros((c,), dt)}

    def init_state(in_shape):
        _, c = _channels(in_shape)
        dt = _default_dtype(dtype)
        return {"mean": jnp.zeros((c,), dt), "var": jnp.ones((c,), dt)}

    def forward(params, x, *, state=None, key=None, train=False):
        check_floating(name, x)
        check_rank(name, x, 2, what="(batch, ..., channels)")
        ax, red, bshape = _axes(x.ndim, x.shape)
        c = params["gamma"].shape[0]
        check_features(name, x, c, axis=ax, what="channels")
        _check_bn_state(name, state, c)
        res: _TrainRes | _InferRes
        if train:
            xhat, inv, new_state = _bn_batch_stats(name, x, red, bshape, state, momentum, eps)
            res = _TrainRes(xhat.astype(x.dtype), inv)
        else:
            inv = lax.rsqrt(upcast(state["var"]) + eps)
            xhat = (upcast(x) - upcast(state["mean"]).reshape(bshape)) * inv.reshape(bshape)
            new_state = state
            res = _InferRes(xhat.astype(x.dtype), inv, jnp.zeros((0,), x.dtype))
        # the output keeps x's dtype: float32 statistics do not promote a bfloat16 layer
        y = (xhat * upcast(params["gamma"]).reshape(bshape)
             + upcast(params["beta"]).reshape(bshape)).astype(x.dtype)
        return y, res, new_state

    def apply(params, x, *, state=None, key=None, train=False):
        y, _, new_state = forward(params, x, state=state, train=train)
        return y, new_state

    def backward(params, res, dy):
        _, red, bshape = _axes(dy.ndim, dy.shape)
        xhat, inv = res[0], res[1]
        x_dt = xhat.dtype                                # xhat has x's dtype
        xhat, dy = upcast(xhat), upcast(dy)
        dgamma = jnp.sum(dy * xhat, axis=red).astype(params["gamma"].dtype)
        dbeta = jnp.sum(dy, axis=red).astype(params["beta"].dtype)
        dxhat = dy * upcast(params["gamma"]).reshape(bshape)
        infer = isinstance(res, _InferRes)
        dx = _through_xhat(dxhat, xhat, inv.reshape(bshape), red, not infer)
        return {"gamma": dgamma, "beta": dbeta}, dx.astype(res.x0.dtype if infer else x_dt)

    def jvp(params, res, dparams, dx):
        """Tangent: ``dxhat`` by :func:`_through_xhat` (xhat's Jacobian is symmetric, so the
        backward's formula); ``dy = gamma dxhat + dgamma xhat + dbeta``."""
        _, red, bshape = _axes(dx.ndim, dx.shape)
        xhat = upcast(res[0])
        dxhat = _through_xhat(upcast(dx), xhat, res[1].reshape(bshape), red,
                              not isinstance(res, _InferRes))
        dy = (dxhat * upcast(params["gamma"]).reshape(bshape)
              + xhat * upcast(dparams["gamma"]).reshape(bshape)
              + upcast(dparams["beta"]).reshape(bshape))
        return dy.astype(res[0].dtype)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 init_state=init_state, kind="batch_norm", jvp=jvp)
