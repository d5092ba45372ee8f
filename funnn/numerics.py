"""Find where a training step first went non-finite: which layer, output or gradient.

Used by ``fit(..., check_numerics=True)`` after a step produced a NaN or inf. The
step is replayed eagerly on the same batch, parameters and PRNG key, layer by
layer down the ``serial`` stacks of the network (other combinators are treated
as one unit), forward first and then the hand-written backward, and the first
place whose value is non-finite is named by its layer path, as errors are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funnn import precision
from funnn.core import Layer, ShapeError, children_params, run_forward, split_key
from funnn.layers.walk import Child, walk_back
from funnn.trees import tree_paths

__all__ = ["all_finite", "locate"]


def all_finite(tree) -> jax.Array:
    """A scalar bool: every floating leaf of ``tree`` is finite (jit-able)."""
    leaves = [jnp.all(jnp.isfinite(l)) for l in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(l), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _ok(tree) -> bool:
    return bool(all_finite(tree))


def _is_serial(layer: Layer) -> bool:
    return layer.kind == "serial" and bool(layer.children)


def _children(layer: Layer, params) -> list:
    pairs = children_params(layer, params)
    if pairs is None:
        raise ShapeError(f"params do not match the model: expected a tuple of "
                         f"{len(layer.children)} entries (one per layer)", (layer.name,))
    return pairs


def _forward(layer: Layer, params, x, state, key, path: str, context=None):
    """``(y, res, new_state, bad)``: run ``layer`` keeping residuals; ``bad`` names the
    first layer whose output is non-finite (None if all are finite)."""
    if _is_serial(layer):
        n = len(layer.children)
        states = tuple(state) if layer.stateful else (None,) * n
        res, new = [], []
        for (label, child, p), s, k in zip(_children(layer, params), states,
                                           split_key(key, n)):
            x, r, s, bad = _forward(child, p, x, s, k, path + label, context)
            if bad is not None:
                return x, None, None, bad
            res.append(r)
            new.append(s)
        return x, tuple(res), tuple(new) if layer.stateful else None, None
    y, r, s = run_forward(layer, params, x, state=state, key=key, train=True,
                          **(context or {}))
    return y, r, s, None if _ok(y) else f"{path} {layer.name}".strip()


class _NonFinite(Exception):
    """Stops the backward replay at the first non-finite place (``where``)."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def _backward(layer: Layer, params, res, dy, path: str):
    """``dx``: the hand-written backward, a serial stack's children in reverse order through
    the composites' walk; raises :class:`_NonFinite` naming the first layer (in backward order)
    whose parameter or input gradient is non-finite."""
    if _is_serial(layer):
        children = [Child(None, child, p, r, prefix=path + label)
                    for (label, child, p), r in zip(_children(layer, params), res)]
        _, dx = walk_back(children, dy, lambda c, d: (None, _backward(c.layer, c.params, c.res,
                                                                      d, c.prefix)))
        return dx
    grads, dx = layer.backward(params, res, dy)
    where = f"{path} {layer.name}".strip()
    if not _ok(grads):
        bad = [k for k, v in tree_paths(grads) if not _ok(v)]
        raise _NonFinite(f"the gradient of {where} (parameter {bad[0] if bad else '?'})")
    if dx is not None and not _ok(dx):
        raise _NonFinite(f"the input gradient of {where}")
    return dx


def locate(model: Layer, loss, params, x, y, *, key=None, state=None, **context) -> str:
    """Say where the training step on ``(x, y)`` first becomes non-finite.

    ``context``: the model's side inputs (``mask=``, ``lengths=``), as the engines take them.

    Returns a phrase such as ``"the output of serial[2] dense(10)"``, ``"the loss (on
    finite outputs)"``, ``"the gradient of serial[0] dense(64) (parameter W)"`` or,
    when everything the step computes is finite, ``"the optimizer update"``.
    """
    if not _ok(params):
        return "the parameters (already non-finite before this step)"
    inner = precision.unwrap(model)          # a mixed-precision model: replay its layers
    if inner is not None:
        model, policy = inner
        params, x = policy.cast_to_compute(params), policy.cast_to_compute(x)
    root = "serial" if _is_serial(model) else ""
    out, res, _, bad = _forward(model, params, x, state, key, root, context)
    if bad is not None:
        return f"the output of {bad}"
    if inner is not None:
        out = policy.cast_to_output(out)
    value = loss.value(out, y)
    if not _ok(value):
        return "the loss (on finite outputs: e.g. a log of 0 or an overflow in the loss)"
    grad = getattr(loss, "grad", None)
    dout = grad(out, y) if grad is not None else jax.grad(lambda o: loss.value(o, y))(out)
    if not _ok(dout):
        return "the gradient of the loss with respect to the outputs"
    if inner is not None:
        dout = policy.cast_to_compute(dout)
    try:
        _backward(model, params, res, dout, root)
    except _NonFinite as found:
        return found.where
    return "the optimizer update (outputs, loss and gradients were finite: the step is too large)"
