"""Dtypes of mixed precision: the wide dtype to accumulate, normalise or take a softmax in."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["wide", "upcast", "matmul_wide"]
_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def wide(dtype) -> jnp.dtype:
    """The dtype to accumulate, normalise or take a softmax in: float32 for bfloat16 and
    float16 (mixed precision, :mod:`funnn.precision`), else ``dtype`` itself."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype in _LOW_PRECISION else dtype


def upcast(x):
    """``x`` in :func:`wide` of its dtype: unchanged for float32, float64 and integers."""
    dt = jnp.result_type(x)
    return x.astype(wide(dt)) if jnp.issubdtype(dt, jnp.floating) else x


def matmul_wide(a, b):
    """``a @ b`` accumulated in :func:`wide` of the operands' dtype (float32 for bfloat16), as
    the hand-written weight gradients ``x^T dy`` need; the result is in that wide dtype."""
    return jnp.matmul(a, b, preferred_element_type=wide(jnp.result_type(a, b)))
