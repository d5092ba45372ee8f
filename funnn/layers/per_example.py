"""The helpers to write per-example rules with (``Layer.per_example`` / ``per_example_norms``).

Every layer of the catalogue builds its two rules from these; a custom layer can too (the
tutorial "Write your own layer" writes one). A layer without rules still works in the
per-example engines: they fall back to ``vmap`` of its own backward
(:mod:`funnn.layers._vmap_rule`), which materialises its per-example gradients.

Every weight gradient of the catalogue is a sum of outer products of an input and a delta:
``dW = sum_{i,t} x_it^T d_it`` over examples ``i`` and positions ``t`` (time steps, spatial
positions or patches). Per example it is ``dW_i = sum_t x_it^T d_it``, one ``einsum``
over the batch (:func:`batch_outer`). Its squared Frobenius norm (:func:`outer_sq_norm`)
needs no ``dW_i`` at all:

* no position axis (``T = 1``): ``||x_i^T d_i||^2 = ||x_i||^2 ||d_i||^2`` (Goodfellow 2015);
* with positions, the Gram form ``||dW_i||^2 = sum_{t,s} (x_it . x_is)(d_it . d_is)``
  costs ``T^2 (m + n)`` per example against ``T m n`` for materialising ``dW_i`` and
  summing its squares; the cheaper is taken (decided from the static shapes while
  tracing). Long sequences with narrow layers (``T > m n / (m + n)``) materialise; short
  ones with wide layers use the Gram form ("ghost clipping", Li et al. 2022).

All functions take batch-first arrays ``(B, ..., features)``; the middle axes are the
positions. Only ``jax.numpy``: no ``vmap``, no autodiff. Per-example gradients come back in
the inputs' dtype; norms and bias sums accumulate in :func:`funnn.dtypes.wide` of it (float32
under a bfloat16 or float16 policy, so DP clips by float32 norms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funnn.core import ShapeError
from funnn.dtypes import upcast, wide

__all__ = ["batch_outer", "outer_sq_norm", "batch_sum", "sq_norms", "gram_cheaper",
           "paramless", "rows"]


def rows(a, name: str = "per_example"):
    """``a (B, ..., f)`` as ``(B, T, f)``; a :class:`ShapeError` without a batch axis."""
    if jnp.ndim(a) < 2:
        raise ShapeError(f"per-example gradients need a leading batch axis, got an array of "
                         f"shape {jnp.shape(a)}; give a batch as (batch, ..., features)", (name,))
    return a.reshape(a.shape[0], -1, a.shape[-1])


def batch_outer(x, d):
    """``dW_i = sum_t x_it^T d_it``: ``x (B, ..., m)``, ``d (B, ..., n)`` -> ``(B, m, n)``,
    accumulated in the wide dtype."""
    return jnp.einsum("btm,btn->bmn", rows(x), rows(d),
                      preferred_element_type=wide(jnp.result_type(x, d)))


def gram_cheaper(t: int, m: int, n: int) -> bool:
    """Whether the Gram form (``t^2 (m + n)``) costs less than materialising (``t m n``)."""
    return t * t * (m + n) < t * m * n


def outer_sq_norm(x, d):
    """``||sum_t x_it^T d_it||_F^2`` per example, ``(B,)``, by the cheaper rule (module doc),
    in the wide dtype."""
    x3, d3 = upcast(rows(x)), upcast(rows(d))
    t, m, n = x3.shape[1], x3.shape[2], d3.shape[2]
    if t == 1:
        return jnp.sum(x3 * x3, (1, 2)) * jnp.sum(d3 * d3, (1, 2))
    if gram_cheaper(t, m, n):
        gx = jnp.einsum("btm,bsm->bts", x3, x3)
        gd = jnp.einsum("btn,bsn->bts", d3, d3)
        return jnp.sum(gx * gd, (1, 2))
    w = jnp.einsum("btm,btn->bmn", x3, d3)
    return jnp.sum(w * w, (1, 2))


def batch_sum(d):
    """A bias gradient per example: ``d (B, ..., n)`` summed over the positions -> ``(B, n)``,
    in the wide dtype."""
    d3 = rows(d)
    return d3.sum(1, dtype=wide(d3.dtype))


def sq_norms(tree, batch: int, dtype=None):
    """Squared norm per example of a tree whose leaves have a leading batch axis -> ``(B,)``,
    in :func:`~funnn.dtypes.wide` of ``dtype`` (default: the default float dtype)."""
    leaves = jax.tree_util.tree_leaves(tree)
    total = jnp.zeros((batch,), wide(dtype if dtype is not None else jnp.zeros(()).dtype))
    for leaf in leaves:
        leaf = jnp.asarray(leaf).astype(jnp.promote_types(leaf.dtype, total.dtype))
        total = total + jnp.sum(jnp.square(leaf).reshape(batch, -1), 1).astype(total.dtype)
    return total


def paramless(backward) -> dict:
    """Per-example rules for a layer without params: its backward, and zero norms.

    ``dparams`` is the empty tree the backward returns (``{}``), so there is nothing per
    example to stack; ``dx`` is the backward's, which acts on each example's rows alone.
    """

    def per_example(params, res, dy):
        return backward(params, res, dy)

    def per_example_norms(params, res, dy):
        _, dx = backward(params, res, dy)
        return jnp.zeros((jnp.shape(dy)[0],), wide(jnp.result_type(dy))), dx

    return {"per_example": per_example, "per_example_norms": per_example_norms}

