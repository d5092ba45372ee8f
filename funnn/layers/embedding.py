"""Embedding: look up rows of a learned table by integer id, with its hand-written backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from funnn.core import ConfigError, DTypeError, Layer, ShapeError, check_in_shape, upcast, wide

__all__ = ["embedding"]


def _check_size(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}", ("embedding",))
    return int(value)


def _concrete(ids):
    """``ids`` as a numpy array when their values are known now, else ``None`` (a tracer).

    Concrete ids closed over by a jitted function are read here with numpy: calling jax's
    ``min`` on them would be traced and could not be turned into a Python int.
    """
    if isinstance(ids, jax.core.Tracer):
        return None
    try:
        return np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def embedding(num_embeddings: int, features: int, *, dtype=None) -> Layer:
    """A lookup table: ``y[..., :] = table[ids[...], :]``.

    Shapes: integer ``ids (...) -> y (..., features)``; any shape of ids, none included.
    Params: ``{"table": (num_embeddings, features)}``, drawn from ``N(0, 1/features)``
    (Flax's default; PyTorch draws ``N(0, 1)``).
    Residuals: the ids.
    Derivative: ``dtable = scatter_add(zeros, ids, dy)`` (a row gets the sum of ``dy`` over
    every position holding its id); ``dx`` is ``None``, since integer ids have no gradient
    (combinators pass ``None`` through).
    Ids outside ``[0, num_embeddings)`` raise :class:`ShapeError` when they are concrete;
    under ``jit``/``vmap`` they cannot be checked and give NaN rows (and no gradient)
    instead of being silently clamped or wrapped.
    """
    n = _check_size(num_embeddings, "num_embeddings")
    f = _check_size(features, "features")
    name = f"embedding({n}, {f})"

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, min_rank=1, allow_none=True)  # any id shape
        dt = dtype if dtype is not None else jnp.zeros(()).dtype
        table = jax.random.normal(key, (n, f), dt) / jnp.sqrt(jnp.asarray(f, dt))
        return shape + (f,), {"table": table}

    def _ids(params, ids):
        """Validate ``ids``; return them with negatives moved out of range (so they read NaN)."""
        values = _concrete(ids)
        ids = jnp.asarray(ids)
        dt = ids.dtype
        if not jnp.issubdtype(dt, jnp.integer):
            raise DTypeError(f"expected integer ids, got dtype {dt}; cast with ids.astype(int) "
                             f"if the values are whole numbers", (name,))
        rows = params["table"].shape
        if rows != (n, f):
            raise ShapeError(f"expected a table of shape {(n, f)}, got {rows}", (name,))
        if values is not None and values.size:
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= n:
                bad = lo if lo < 0 else hi
                raise ShapeError(f"id {bad} is out of range for {n} embeddings (valid ids "
                                 f"0..{n - 1}; got ids in {lo}..{hi})", (name,))
        if jnp.issubdtype(dt, jnp.unsignedinteger):
            return ids
        ids = ids.astype(jnp.promote_types(dt, jnp.int32))  # room for the out-of-range id n
        return jnp.where(ids < 0, n, ids)

    def apply(params, x, *, key=None, train=False):
        ids = _ids(params, x)
        return jnp.take(params["table"], ids, axis=0, mode="fill", fill_value=jnp.nan)

    def forward(params, x, *, key=None, train=False):
        ids = _ids(params, x)
        return jnp.take(params["table"], ids, axis=0, mode="fill", fill_value=jnp.nan), ids

    def backward(params, res, dy):
        table = params["table"]
        acc = wide(table.dtype)                  # scatter-add in float32 for bfloat16/float16
        dy2 = dy.reshape(-1, f).astype(acc)
        dtable = jnp.zeros(table.shape, acc).at[res.reshape(-1)].add(dy2, mode="drop")
        return {"table": dtable.astype(table.dtype)}, None

    def per_example(params, res, dy):
        """dtable_i = scatter_add(zeros, ids_i, dy_i): (B, num_embeddings, features)."""
        table = params["table"]
        b = dy.shape[0]
        ids = res.reshape(b, -1)
        dy3 = dy.reshape(b, -1, f).astype(table.dtype)
        rows_ = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
        dtable = jnp.zeros((b,) + table.shape, table.dtype).at[rows_, ids].add(dy3, mode="drop")
        return {"table": dtable}, None

    def per_example_norms(params, res, dy):
        """||dtable_i||^2 = sum_{t,s} [id_t = id_s] (dy_t . dy_s) (T^2 F per example), or the
        materialised table (n F) when that is cheaper."""
        b = dy.shape[0]
        ids = res.reshape(b, -1)
        t = ids.shape[1]
        if t * t * f <= n * f:
            dy3 = upcast(dy.reshape(b, -1, f))        # norms in float32 under bfloat16
            same = (ids[:, :, None] == ids[:, None, :]) & (ids < n)[:, :, None]
            gram = jnp.einsum("btf,bsf->bts", dy3, dy3)
            return jnp.sum(jnp.where(same, gram, 0), (1, 2)), None
        g, _ = per_example(params, res, dy)
        return jnp.sum(jnp.square(upcast(g["table"])), (1, 2)), None

    def jvp(params, res, dparams, dx):
        """Tangent: the rows of ``dtable`` at the ids (integer ids have no tangent: ``dx`` is
        ignored); out-of-range ids give NaN, as the forward does."""
        return jnp.take(dparams["table"], res, axis=0, mode="fill", fill_value=jnp.nan)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 per_example=per_example, per_example_norms=per_example_norms, kind="embedding",
                 jvp=jvp)
