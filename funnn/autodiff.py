"""The autodiff gradient engine: ``jax.value_and_grad`` of the model's ``apply``.

Same signature as :func:`funnn.manual.value_and_grad`, so the two swap freely::

    loss_value, grads = value_and_grad(model, loss)(params, x, y, key=None)
    (loss_value, new_state), grads = value_and_grad(model, loss)(params, x, y, state=s)  # stateful

Both are pure: ``jax.jit`` them, or ``jax.vmap`` them over examples for
per-example gradients.
"""

from __future__ import annotations

import jax

from funnn.core import Layer, check_context, run_apply

__all__ = ["value_and_grad", "loss_fn"]


def loss_fn(model: Layer, loss, *, train: bool = True):
    """``objective(params, x, y, key, state) -> (loss, new_state)``: the scalar autodiff sees."""

    def objective(params, x, y, key, state, context=None):
        out, new_state = run_apply(model, params, x, state=state, key=key, train=train,
                                   **(context or {}))
        return loss.value(out, y), new_state

    return objective


def value_and_grad(model: Layer, loss, *, train: bool = True):
    """``f(params, x, y, *, key=None, state=None) -> (loss, grads)`` by reverse-mode autodiff.

    For a stateful model (batch-norm) the value is ``(loss, new_state)``. ``train``
    selects training behaviour (dropout on, batch statistics) and is fixed here so
    the returned function has no Python branching per call. ``state`` given to a stateless
    model raises :class:`~funnn.core.StateError`. Side inputs (``mask=``, ``lengths=``) pass
    to the layers that read them.
    """
    vg = jax.value_and_grad(loss_fn(model, loss, train=train), has_aux=True)

    if model.stateful:
        def f(params, x, y, *, key=None, state=None, **context):
            check_context(model, context)
            (value, new_state), grads = vg(params, x, y, key, state, context)
            return (value, new_state), grads
    else:
        def f(params, x, y, *, key=None, state=None, **context):
            check_context(model, context)
            (value, _), grads = vg(params, x, y, key, state, context)  # a state: StateError
            return value, grads
    return f
