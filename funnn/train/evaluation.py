"""Loss and accuracy in inference mode, one compiled function per ``(model, loss)``."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from funnn import core, losses
from funnn.core import Layer

__all__ = ["make_evaluate", "evaluate"]


@functools.lru_cache(maxsize=64)
def make_evaluate(model: Layer, loss):
    """A jitted ``evaluate(params, model_state, x, y) -> (loss, accuracy)`` in inference mode.

    Cached per ``(model, loss)`` (both are hashable frozen dataclasses), so repeated
    calls reuse one compiled function.
    """

    def evaluate(params, model_state, x, y):
        if model.stateful:
            pred, _ = model.apply(params, x, state=model_state, train=False)
        else:
            pred = model.apply(params, x, train=False)
        acc = losses.accuracy(pred, y) if pred.shape[-1] > 1 else jnp.nan
        return loss.value(pred, y), acc

    return core.jit(evaluate)


def evaluate(model: Layer, loss, params, x, y, model_state=None):
    """Loss and accuracy of ``model`` on ``(x, y)`` in inference mode, as Python floats."""
    value, acc = make_evaluate(model, loss)(params, model_state, x, y)
    return float(value), float(acc)
