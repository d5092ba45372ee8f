"""Layers whose backward is derived by ``jax.vjp``: :func:`layer_from_apply`, for a layer one
has no hand-written backward for (yet)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from funnn.core import Layer
from funnn.errors import ConfigError

__all__ = ["layer_from_apply"]


def layer_from_apply(init: Callable, apply: Callable, *, name: str = "custom",
                     context: Sequence[str] = ()) -> Layer:
    """A layer from ``init`` and ``apply`` alone: ``forward``/``backward`` come from ``jax.vjp``.

    For a layer one has no hand-written backward for (yet). ``init(key, in_shape) ->
    (out_shape, params)``; ``apply(params, x, *, key=None, train=False, **side_inputs) -> y``
    written with ``jax.numpy``/``lax``. ``forward`` runs ``jax.vjp`` of ``apply`` and keeps the
    returned pullback (a pytree of the residual arrays autodiff chose) as the residuals;
    ``backward`` calls it. The dx of an integer input is ``None``. Such a layer works with
    every engine and combinator, but its "manual" gradient is autodiff's: ``gradcheck`` and
    :func:`summary` mark it derived, so a comparison never passes it off as hand-written.
    ``context`` names side inputs (``"mask"``) that ``apply`` reads as keyword arguments.
    Stateless only.
    """
    if not (callable(init) and callable(apply)):
        raise ConfigError(f"layer_from_apply needs callables init and apply, got "
                          f"{type(init).__name__} and {type(apply).__name__}", (str(name),))

    def forward(params, x, *, key=None, train=False, **ctx):
        floating = jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        if floating:
            y, pullback = jax.vjp(lambda p, v: apply(p, v, key=key, train=train, **ctx),
                                  params, x)
        else:                                   # integer ids: no input gradient
            y, pullback = jax.vjp(lambda p: (apply(p, x, key=key, train=train, **ctx)),
                                  params)
        return y, pullback

    def backward(params, pullback, dy):
        grads = pullback(dy)
        return grads[0], (grads[1] if len(grads) == 2 else None)

    def apply_(params, x, *, key=None, train=False, **ctx):
        return apply(params, x, key=key, train=train, **ctx)

    return Layer(name=str(name), init=init, apply=apply_, forward=forward, backward=backward,
                 context=tuple(context), derived=True)
