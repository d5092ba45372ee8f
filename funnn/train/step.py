"""One training step, built from two pieces: a gradient function and an optimizer update.

A *gradient function* ``grad(ts, x, y, weights, key) -> (loss, grads, model_state)`` is
an engine's (:func:`engine_grad`) or DP-SGD's (:func:`dp_grad`); :func:`make_update`
turns one into ``update(ts, x, y, weights, key) -> (ts, loss)``, adding dynamic loss
scaling under a :func:`funnn.precision.loss_scaled` optimizer. ``weights`` are per-row
weights of the batch (DP's Poisson padding) or None. ``x`` is the batch's
:class:`~funnn.train.inputs.Inputs` ``(x, side)`` (a bare array or tuple is taken as ``x``
without side inputs): the side inputs go to the model as keywords, their ``"weights"`` to
the loss (:func:`funnn.losses.weighted`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jmp
import optax

from funnn import engines, losses, privacy
from funnn.core import ConfigError, DataError, Layer
from funnn.precision import LossScaled, scaled_loss
from funnn.train.inputs import Inputs

__all__ = ["TrainState", "make_step", "engine_grad", "dp_grad", "make_update", "as_loss",
           "get_engine", "ENGINES"]

ENGINES = engines.names()


def get_engine(name: str) -> Callable:
    """``value_and_grad(model, loss, train=...)`` for an engine name."""
    return engines.get(name).value_and_grad


class TrainState(NamedTuple):
    """Everything a step changes: parameters, optimizer state, layer state (batch-norm)."""

    params: Any
    opt_state: Any
    model_state: Any


def _unpack(x) -> tuple:
    """``(x, loss weights, model side inputs)`` of a batch's inputs."""
    x, side = x if isinstance(x, Inputs) else (x, {})
    loss_weights, context = losses.split_side(side)
    return x, loss_weights, context


def engine_grad(model: Layer, loss, engine: str):
    """``grad(ts, x, y, weights, key, scale=None)`` by an engine; ``weights`` must be None.

    ``scale`` (a traced loss scale) differentiates ``scale * loss`` instead (float16).
    """
    vg_of = get_engine(engine)
    plain = vg_of(model, loss, train=True)

    def grad(ts: TrainState, x, y, weights, key, scale=None):
        x, loss_weights, context = _unpack(x)
        used = losses.weighted(loss, loss_weights)
        used = used if scale is None else scaled_loss(used, scale)
        vg = plain if used is loss else vg_of(model, used, train=True)
        if model.stateful:
            (value, state), grads = vg(ts.params, x, y, key=key, state=ts.model_state,
                                       **context)
            return value, grads, state
        value, grads = vg(ts.params, x, y, key=key, **context)
        return value, grads, ts.model_state

    return grad


def dp_grad(model: Layer, loss, engine: str, batch_size: int, dp: privacy.DP):
    """DP-SGD's ``grad(ts, xb, yb, weights, key)`` on rows :func:`privacy.dp_sample` drew.
    With adaptive clipping (``dp.adaptive``) it clips at the clip norm the optimizer state
    carries (:func:`funnn.privacy.adaptive_clipped`) and returns the next one as well."""
    if dp.adaptive is not None:
        return _adaptive_dp_grad(model, loss, engine, batch_size, dp)
    g = privacy.make_dp_batch_grad(model, loss, dp, engine, batch_size)

    def grad(ts: TrainState, x, y, weights, key):
        x, side = x if isinstance(x, Inputs) else (x, {})
        value, grads = g(ts.params, x, y, weights, key, side=side)
        return value, grads, ts.model_state

    return grad


def _adaptive_dp_grad(model: Layer, loss, engine: str, batch_size: int, dp: privacy.DP):
    """``grad(ts, xb, yb, weights, key) -> (loss, grads, model_state, next_clip)``."""
    assert dp.adaptive is not None
    g = privacy.make_adaptive_dp_batch_grad(model, loss, dp, dp.adaptive, engine, batch_size)

    def grad(ts: TrainState, x, y, weights, key):
        x, side = x if isinstance(x, Inputs) else (x, {})
        if side:
            raise ConfigError(f"adaptive clipping takes no side inputs yet (got "
                              f"{sorted(side)}); give DP no adaptive=", ("fit",))
        value, grads, clip = g(ts.params, x, y, weights, key, ts.opt_state.clip)
        return value, grads, ts.model_state, clip

    return grad


def make_update(grad, optimizer: optax.GradientTransformation):
    """``update(ts, x, y, weights, key) -> (ts, loss)``: a gradient, then one optimizer step.

    Under a loss-scaled optimizer the loss is multiplied by the scale in the optimizer
    state before the backward pass, the gradients are divided by it, and a step with
    non-finite gradients changes nothing but the scale. Under an adaptively clipped one
    (:func:`funnn.privacy.adaptive_clipped`) ``grad`` also returns the next clip norm, kept
    in the optimizer state.
    """
    def update(ts: TrainState, x, y, weights, key):
        value, grads, state = grad(ts, x, y, weights, key)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        return TrainState(optax.apply_updates(ts.params, updates), opt_state, state), value

    def scaled_update(ts: TrainState, x, y, weights, key):
        scale = optimizer.loss_scale(ts.opt_state)
        value, grads, state = grad(ts, x, y, weights, key, scale=scale.loss_scale)
        grads = scale.unscale(grads)
        finite = jmp.all_finite(grads)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        new = TrainState(optax.apply_updates(ts.params, updates), opt_state, state)
        new = jmp.select_tree(finite, new, ts)
        opt = optimizer.with_loss_scale(new.opt_state, scale.adjust(finite))
        return new._replace(opt_state=opt), value / scale.loss_scale.astype(value.dtype)

    def clip_update(ts: TrainState, x, y, weights, key):
        value, grads, state, clip = grad(ts, x, y, weights, key)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        return TrainState(optax.apply_updates(ts.params, updates),
                          opt_state._replace(clip=clip.astype(opt_state.clip.dtype)), state), value

    if isinstance(optimizer, privacy.AdaptiveClipped):
        return clip_update
    return scaled_update if isinstance(optimizer, LossScaled) else update


def make_step(model: Layer, loss, optimizer: optax.GradientTransformation,
              engine: str = "autodiff"):
    """``step(ts, x, y, key, side=None) -> (ts, loss)``: one optimizer update, pure and jit-able.

    ``x`` is an array or a tuple of arrays (a multi-part input); ``side`` a dict of side
    inputs with the batch axis first, as in :func:`~funnn.train.fit`'s ``(x, y, side)``:
    ``mask``/``lengths`` go to the model, ``weights`` weigh the loss's terms (a masked loss
    averages over the valid tokens; or use a loss ``with_ignore_index``).

    Jit it with :func:`funnn.jit` (``funnn.jit(step, donate_argnums=0)``) to get the XLA
    options funnn tunes per backend (:func:`funnn.core.compiler_options`), as :func:`fit` does.

    Under a :func:`funnn.precision.loss_scaled` optimizer (float16 training) the loss is
    multiplied by the scale in the optimizer state before the backward pass, the gradients are
    divided by it, and a step with non-finite gradients changes nothing but the scale.
    """
    update = make_update(engine_grad(model, loss, engine), optimizer)

    def step(ts: TrainState, x, y, key, side=None):
        if side is not None and not isinstance(side, dict):
            raise DataError(f"side must be a dict of side inputs such as {{'mask': mask}}, got "
                            f"{type(side).__name__}", ("make_step",))
        return update(ts, Inputs(x, dict(side or {})), y, None, key)

    return step


@dataclasses.dataclass(frozen=True)
class _PlainLoss:
    """A plain ``loss(pred, y) -> scalar`` callable dressed as a Loss without ``.grad``."""

    fn: Callable
    name: str

    def value(self, pred, y):
        return self.fn(pred, y)


def as_loss(loss, engine: str = "autodiff"):
    """A Loss from a Loss, a loss name (``"mse"``) or a plain ``loss(pred, y)`` callable.

    The autodiff and bridge engines differentiate ``loss.value``; the manual engine
    needs the hand-written ``loss.grad`` too, so a plain callable is refused there.
    """
    hand_written = engines.get(engine).hand_written
    if isinstance(loss, str):
        return losses.get(loss)
    if hasattr(loss, "value"):
        if hand_written and not callable(getattr(loss, "grad", None)):
            raise ConfigError(f"the manual engine needs a loss with a hand-written gradient "
                              f"(.grad); {loss!r} has none; use engine='autodiff'", ("fit",))
        return loss
    if callable(loss):
        if hand_written:
            raise ConfigError("the manual engine needs a loss with a hand-written gradient "
                              "(.grad), got a plain callable; use a funnn.losses Loss (or its "
                              "name), or engine='autodiff' or 'bridge'", ("fit",))
        return _PlainLoss(loss, getattr(loss, "__name__", type(loss).__name__))
    raise ConfigError(f"loss must be a funnn Loss, a loss name or a callable loss(pred, y), "
                      f"got {type(loss).__name__}", ("fit",))
