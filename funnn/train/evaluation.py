"""Loss and accuracy in inference mode, one compiled function per ``(model, loss)``."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from funnn import core, losses
from funnn.core import Layer
from funnn.train import inputs

__all__ = ["make_evaluate", "evaluate"]


@functools.lru_cache(maxsize=64)
def make_evaluate(model: Layer, loss):
    """A jitted ``evaluate(params, model_state, x, y, side=None) -> (loss, accuracy)`` in
    inference mode.

    ``x`` an array or a tuple of arrays, ``side`` a dict of side inputs (``mask``/``lengths``
    to the model, ``weights`` to the loss and the accuracy), as in :func:`fit`'s data. The
    accuracy leaves out labels equal to the loss's ``ignore_index`` and weighs examples by
    ``weights``. Cached per ``(model, loss)`` (both are hashable frozen dataclasses), so
    repeated calls reuse one compiled function.
    """

    def evaluate(params, model_state, x, y, side=None):
        loss_weights, context = losses.split_side(side)
        if model.stateful:
            pred, _ = model.apply(params, x, state=model_state, train=False, **context)
        else:
            pred = model.apply(params, x, train=False, **context)
        acc = losses.accuracy(pred, y, loss_weights, getattr(loss, "ignore_index", None)) \
            if pred.shape[-1] > 1 else jnp.nan
        return losses.weighted(loss, loss_weights).value(pred, y), acc

    return core.jit(evaluate)


def evaluate(model: Layer, loss, params, x, y, model_state=None, side=None):
    """Loss and accuracy of ``model`` on ``(x, y)`` in inference mode, as Python floats.

    ``loss``: a funnn Loss (or its name), or a loss-like object with ``.value``.
    ``x``: an array or a tuple of arrays; ``side``: a dict of side inputs with the batch axis
    first (``{"mask": mask}``; ``"weights"`` weigh the loss), as in :func:`fit`'s
    ``(x, y, side)``."""
    x, y, side = inputs.split((x, y, side), "evaluation", "evaluate")
    loss = losses.get(loss) if isinstance(loss, str) else loss
    value, acc = make_evaluate(model, loss)(params, model_state, x, y, side)
    return float(value), float(acc)
