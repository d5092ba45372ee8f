"""The manual gradient engine: the model's ``forward``, the loss's hand-written
gradient, and the model's hand-written ``backward`` — the delta rule, no autodiff.

Also :func:`bridge`, which wraps a layer's hand-written backward as a
``jax.custom_vjp`` rule so autodiff can use it inside larger programs.
"""

from __future__ import annotations

import jax

from funnn.core import Layer, check_backward, check_context, input_spec, run_forward

__all__ = ["value_and_grad", "bridge"]


def value_and_grad(model: Layer, loss, *, train: bool = True):
    """``f(params, x, y, *, key=None, state=None) -> (loss, grads)`` by the hand-written backward.

    Same signature and result structure as :func:`funnn.autodiff.value_and_grad`:
    ``forward`` keeps the residuals, ``loss.grad`` gives ``dL/dout``, ``backward``
    pushes it back through every layer. A gradient tree or input gradient that does not match
    the params or ``x`` raises :class:`~funnn.core.ShapeError` naming the layer (combinators
    check each child; this checks the model itself), and ``state`` given to a stateless model
    raises :class:`~funnn.core.StateError`; both while tracing. Side inputs (``mask=``,
    ``lengths=``) pass to the layers that read them.
    """

    def f(params, x, y, *, key=None, state=None, **context):
        check_context(model, context)
        out, res, new_state = run_forward(model, params, x, state=state, key=key, train=train,
                                          **context)
        value = loss.value(out, y)
        grads, dx = model.backward(params, res, loss.grad(out, y))
        check_backward(model.name, params, grads, input_spec(x), dx)
        return ((value, new_state) if model.stateful else value), grads

    return f


def bridge(model: Layer) -> Layer:
    """The same layer, whose ``apply`` differentiates through its hand-written backward.

    ``apply`` becomes a ``jax.custom_vjp`` function: the forward pass is
    ``model.forward`` (keeping its residuals) and the reverse pass is
    ``model.backward``. ``jax.grad`` of anything built on the bridged layer uses the
    manual gradients. Side inputs (``mask=``, ``lengths=``) pass through and get no gradient.
    Forward-mode (``jax.jvp``) is not available through it.
    """

    def _fwd(params, x, key, state, ctx, train):
        y, res, new_state = run_forward(model, params, x, state=state, key=key, train=train,
                                        **ctx)
        return (y, new_state), (params, res, input_spec(x))

    def _bwd(saved, cotangents):
        params, res, spec = saved
        dy, _ = cotangents
        dparams, dx = model.backward(params, res, dy)
        check_backward(model.name, params, dparams, spec, dx)
        return dparams, dx, None, None, None

    def apply_stateful(params, x, *, state=None, key=None, train=False, **ctx):
        return _dispatch(params, x, key, state, train, ctx)

    def apply(params, x, *, key=None, train=False, **ctx):
        return _dispatch(params, x, key, None, train, ctx)[0]

    def _dispatch(params, x, key, state, train, ctx):
        # `train` is a Python bool fixed per call site; close over it so custom_vjp
        # never sees it as an array.
        return _apply_static[bool(train)](params, x, key, state, ctx)

    def _make(train):
        @jax.custom_vjp
        def g(params, x, key, state, ctx):
            return _fwd(params, x, key, state, ctx, train)[0]

        def g_fwd(params, x, key, state, ctx):
            return _fwd(params, x, key, state, ctx, train)

        g.defvjp(g_fwd, _bwd)
        return g

    _apply_static = {False: _make(False), True: _make(True)}

    return Layer(name=f"bridge({model.name})", init=model.init,
                 apply=apply_stateful if model.stateful else apply,
                 forward=model.forward, backward=model.backward,
                 init_state=model.init_state, children=model.children,
                 context=model.context, derived=model.derived)
