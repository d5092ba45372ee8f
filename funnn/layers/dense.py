"""Dense (fully connected) layer: ``y = x @ W + b``, with its hand-written backward.

Row-vector convention: ``x`` is ``(..., in)`` and ``W`` has shape ``(in, out)``, a column per
unit. Texts that write ``y = W x + b`` for a column vector ``x`` (seed notes 001 and 003)
use ``W`` of shape ``(out, in)``, a row per unit: the same layer, with their ``W`` the
transpose of funnn's (``W_funnn = W_text.T``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from funnn.core import (
    ConfigError,
    Layer,
    ShapeError,
    check_features,
    check_floating,
    check_in_shape,
    matmul_wide,
    wide,
)
from funnn.layers.per_example import batch_outer, batch_sum, outer_sq_norm, rows

__all__ = ["dense", "get_initializer", "INITIALIZERS"]

# jax.nn.initializers already implements these (variance scaling with the right
# fan modes; the "normal" ones draw from a truncated normal); we only name them, and
# compile each one whole per (shape, dtype): run eagerly, its dozen small random ops
# would each compile on first use (seconds for a small network).
_INITIALIZERS = {
    "lecun_normal": jax.nn.initializers.lecun_normal(),
    "lecun_uniform": jax.nn.initializers.lecun_uniform(),
    "glorot_normal": jax.nn.initializers.glorot_normal(),
    "glorot_uniform": jax.nn.initializers.glorot_uniform(),
    "he_normal": jax.nn.initializers.he_normal(),
    "he_uniform": jax.nn.initializers.he_uniform(),
    "normal": jax.nn.initializers.normal(1.0),
    "zeros": jax.nn.initializers.zeros,
    "ones": jax.nn.initializers.ones,
}
INITIALIZERS = {name: jax.jit(fn, static_argnums=(1, 2)) for name, fn in _INITIALIZERS.items()}


def get_initializer(spec, what: str, layer_name: str):
    """An ``init(key, shape, dtype) -> array`` from a name, a callable, or an explicit array.

    An explicit array (numpy or jax) is used as given; its shape is checked at init.
    """
    if isinstance(spec, str):
        if spec not in INITIALIZERS:
            raise ConfigError(f"unknown {what} initializer {spec!r}; valid: "
                              f"{', '.join(sorted(INITIALIZERS))}", (layer_name,))
        return INITIALIZERS[spec]
    if callable(spec):
        return spec
    try:
        value = np.asarray(spec)
    except Exception:
        value = None
    if value is None or value.dtype == object:
        raise ConfigError(f"{what} initializer must be a name, a callable (key, shape, dtype) "
                          f"or an array, got {type(spec).__name__}", (layer_name,))

    def explicit(key, shape, dtype=None):
        if tuple(value.shape) != tuple(shape):
            raise ShapeError(f"explicit {what} has shape {tuple(value.shape)}, expected "
                             f"{tuple(shape)}", (layer_name,))
        return jnp.asarray(value, dtype=dtype if dtype is not None else _float_dtype(value))

    return explicit


def _float_dtype(value):
    return value.dtype if np.issubdtype(value.dtype, np.floating) else jnp.zeros(()).dtype


def dense(out: int, *, w_init="glorot_uniform", b_init="zeros", use_bias: bool = True,
          dtype=None) -> Layer:
    """A fully connected layer ``y = x @ W + b``.

    Shapes: ``x (..., in) -> y (..., out)``; any number of leading axes, none included.
    Params: ``{"W": (in, out), "b": (out,)}`` (no ``"b"`` when ``use_bias=False``).
    Derivative: ``dW = x^T dy`` (summed over the batch), ``db = sum(dy)``, ``dx = dy W^T``;
    the seeds' delta rule ``dE/dW_jk = O_j delta_k``.
    Initialisers: a name from :data:`INITIALIZERS`, a callable ``(key, shape, dtype)``,
    or an explicit array of the right shape.
    """
    if not isinstance(out, (int, np.integer)) or isinstance(out, bool) or out < 1:
        raise ConfigError(f"output size must be a positive int, got {out!r}", ("dense",))
    name = f"dense({out})"
    w_fn = get_initializer(w_init, "weight", name)
    b_fn = get_initializer(b_init, "bias", name) if use_bias else None

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, min_rank=1, allow_none=True)
        n_in = shape[-1]
        if n_in is None:
            raise ShapeError(f"init shape {tuple(in_shape)} has no feature size on its last axis",
                             (name,))
        kw, kb = jax.random.split(key)
        dt = jnp.dtype(dtype if dtype is not None else jnp.zeros(()).dtype)
        params = {"W": w_fn(kw, (n_in, out), dt)}
        if b_fn is not None:        # use_bias
            params["b"] = b_fn(kb, (out,), dt)
        return shape[:-1] + (out,), params

    def _check(params, x):
        check_floating(name, x)
        w_shape = tuple(jnp.shape(params["W"]))
        b_shape = tuple(jnp.shape(params["b"])) if use_bias else (out,)
        if len(w_shape) != 2 or w_shape[1] != out or b_shape != (out,):
            got = f"W {w_shape}" + (f", b {b_shape}" if use_bias else "")
            want = f"W (in, {out})" + (f", b ({out},)" if use_bias else "")
            raise ShapeError(f"expected params {want}, got {got}; were these params made by "
                             f"this layer's init?", (name,))
        check_features(name, x, w_shape[0])

    def apply(params, x, *, key=None, train=False):
        _check(params, x)
        y = x @ params["W"]
        return y + params["b"] if use_bias else y

    def forward(params, x, *, key=None, train=False):
        return apply(params, x), x

    def backward(params, x, dy):
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        w = params["W"]
        # cotangents in their primals' dtypes; accumulated in float32 for bfloat16/float16
        grads = {"W": matmul_wide(x2.T, dy2).astype(w.dtype)}
        if use_bias:
            grads["b"] = dy2.sum(0, dtype=wide(dy2.dtype)).astype(params["b"].dtype)
        return grads, (dy @ w.T).astype(x.dtype)

    def per_example(params, x, dy):
        """dW_i = sum_t x_it^T dy_it (B, in, out), db_i = sum_t dy_it (B, out)."""
        w = params["W"]
        grads = {"W": batch_outer(x, dy).astype(w.dtype)}
        if use_bias:
            grads["b"] = batch_sum(dy).astype(params["b"].dtype)
        return grads, (dy @ w.T).astype(x.dtype)

    def per_example_norms(params, x, dy):
        """||dW_i||^2 = ||x_i||^2 ||dy_i||^2 without positions, else the cheaper of the Gram
        form and materialising (:mod:`funnn.layers.per_example`); plus ||db_i||^2."""
        sq = outer_sq_norm(x, dy)
        if use_bias:
            sq = sq + jnp.sum(jnp.square(batch_sum(dy)), -1)
        return sq, (dy @ params["W"].T).astype(x.dtype)

    def jvp(params, x, dparams, dx):
        """Tangent: ``dy = dx @ W + x @ dW + db`` (the layer is bilinear in x and W); ``dx``
        ``None``: no input tangent (the term is skipped, not a product with zeros)."""
        dy = x @ dparams["W"] if dx is None else dx @ params["W"] + x @ dparams["W"]
        return dy + dparams["b"] if use_bias else dy

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 per_example=per_example, per_example_norms=per_example_norms, kind="dense",
                 jvp=jvp, factors=lambda params, x, dy: (rows(x, name), rows(dy, name)))
