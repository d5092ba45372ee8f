"""The per-example fallback: ``vmap`` of a layer's own backward, for a layer without rules.

A layer with no ``per_example`` rule (a custom layer, :func:`funnn.core.layer_from_apply`'s)
still gets per-example gradients inside the per-example engines, from its own backward under
``jax.vmap``; nothing is recomputed (a random mask kept in the residuals is the batch's), but
that layer's per-example gradients are materialised, ``B`` copies of its params. Two ways:

* **sliced** (hand-written backwards): the backward runs on each example's slice of the
  residuals of the batch forward, as a one-example batch. Which axis of each residual leaf
  is the batch? ``jax.eval_shape`` of the layer's forward at batch ``B + 1`` says: a leaf
  whose size changes on one axis, from ``B`` to ``B + 1``, is sliced there; a leaf that does
  not change (a weight the backward needs) is shared. Costs one batch backward.
* **masked** (a derived backward, whose ``jax.vjp`` pullback is fixed to the batch's shapes;
  residuals that mix the batch with another axis, such as rows reshaped to ``(B T, f)``; or
  residuals holding static batch-sized shapes, as a composite's ``InputSpec`` records):
  example ``i``'s gradient is the backward of the whole batch with every other example's
  ``dy`` zeroed (the backward is linear in ``dy`` and examples do not interact). Costs ``B``
  batch backwards: give such a layer rules where it matters.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from funnn.core import InputSpec, Layer, run_forward
from funnn.errors import ConfigError
from funnn.layers.per_example import sq_norms

__all__ = ["vmap_rule", "batch_axes"]


def _structs(spec: InputSpec, batch: int):
    """ShapeDtypeStructs of an input like ``spec`` with ``batch`` examples."""
    shape = spec.shape or ()
    if spec.is_tuple:
        return tuple(None if s.shape is None else _structs(s, batch) for s in shape)
    return jax.ShapeDtypeStruct((batch,) + tuple(shape[1:]), spec.dtype)


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a),
                                                                 jnp.result_type(a)), tree)


def _bigger_residuals(layer: Layer, params, spec: InputSpec, batch: int, tdef):
    """The residual leaves' shapes of ``layer.forward`` at ``batch`` examples, from the mode
    (training with a key, or inference) whose residuals have the tree ``tdef`` of the actual
    ones. A tree with static data that depends on the batch (an ``InputSpec`` of a composite
    inside) never matches: its examples cannot be sliced."""
    x = _structs(spec, batch)
    p = _abstract(params)
    for train, key in ((True, jax.random.key(0)), (False, None)):
        def res(pp, xx, train=train, key=key):
            return run_forward(layer, pp, xx, key=key, train=train)[1]
        try:
            leaves, got = jax.tree_util.tree_flatten(jax.eval_shape(res, p, x))
        except Exception:       # a mode the layer refuses (no key, ...): try the other
            continue
        if got == tdef:
            return leaves
    raise ConfigError(f"layer {layer.name} has no per-example rule, and replaying its forward "
                      f"at another batch size gives residuals of another structure; its "
                      f"examples cannot be sliced", (layer.name,))


def batch_axes(layer: Layer, params, res, spec: InputSpec) -> list:
    """The batch axis (or ``None``: shared) of each leaf of ``res`` (module docstring);
    :class:`~funnn.core.ConfigError` naming the layer where the examples cannot be sliced."""
    leaves, tdef = jax.tree_util.tree_flatten(res)
    batch = _batch_of(spec)
    bigger = _bigger_residuals(layer, params, spec, batch + 1, tdef)
    axes: list[int | None] = []
    for i, (a, b) in enumerate(zip(leaves, bigger)):
        s, t = tuple(jnp.shape(a)), tuple(b.shape)
        moved = [k for k in range(len(s)) if len(s) == len(t) and s[k] != t[k]]
        if len(s) == len(t) and not moved:
            axes.append(None)
        elif len(moved) == 1 and s[moved[0]] == batch and t[moved[0]] == batch + 1:
            axes.append(moved[0])
        else:
            raise ConfigError(f"layer {layer.name} has no per-example rule, and its residual "
                              f"leaf {i} of shape {s} does not keep the batch ({batch}) on an "
                              f"axis of its own, so its examples cannot be sliced",
                              (layer.name,))
    return axes


def _batch_of(spec: InputSpec) -> int:
    shape = spec.shape or ()
    if spec.is_tuple:
        return next(_batch_of(s) for s in shape if s is not None and s.shape is not None)
    return int(shape[0])


def _sliceable(layer: Layer, params, res, spec: InputSpec | None):
    """The batch axes of ``res`` when its examples can be sliced, else ``None``."""
    if layer.derived or spec is None or spec.shape is None:
        return None
    try:
        return batch_axes(layer, params, res, spec)
    except ConfigError:
        return None


def _sliced(layer: Layer, axes: list, params, res, dy):
    leaves, tdef = jax.tree_util.tree_flatten(res)

    def one(flat, d):
        flat = [a if ax is None else jnp.expand_dims(a, ax) for a, ax in zip(flat, axes)]
        g, dx = layer.backward(params, jax.tree_util.tree_unflatten(tdef, flat),
                               jax.tree_util.tree_map(lambda v: v[None], d))
        return g, jax.tree_util.tree_map(lambda v: v[0], dx)

    return jax.vmap(one, in_axes=(axes, 0))(leaves, dy)


def _masked(layer: Layer, params, res, dy):
    b = jnp.shape(jax.tree_util.tree_leaves(dy)[0])[0]

    def one(i):
        keep = jnp.arange(b) == i
        d = jax.tree_util.tree_map(
            lambda v: jnp.where(keep.reshape((b,) + (1,) * (v.ndim - 1)), v, 0), dy)
        return layer.backward(params, res, d)[0]

    return jax.vmap(one)(jnp.arange(b)), layer.backward(params, res, dy)[1]


def vmap_rule(layer: Layer, field: str, spec: InputSpec | None) -> Callable:
    """``layer``'s ``per_example`` (``field == "per_example"``) or ``per_example_norms`` rule
    by ``vmap`` of its backward (module docstring: sliced where ``spec``, the layer's input
    (:func:`funnn.core.input_spec`), lets the residuals be sliced, else masked)."""

    def per_example(params, res, dy):
        axes = _sliceable(layer, params, res, spec)
        if axes is None:
            return _masked(layer, params, res, dy)
        return _sliced(layer, axes, params, res, dy)

    def per_example_norms(params, res, dy):
        g, dx = per_example(params, res, dy)
        b = jnp.shape(jax.tree_util.tree_leaves(dy)[0])[0]
        return sq_norms(g, b, jnp.result_type(*jax.tree_util.tree_leaves(dy))), dx

    return per_example if field == "per_example" else per_example_norms
