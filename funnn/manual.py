"""The manual gradient engine: the model's ``forward``, the loss's hand-written
gradient, and the model's hand-written ``backward`` — the delta rule, no autodiff.

Forward mode: :func:`jvp` runs every layer's hand-written tangent rule (``Layer.jvp``) on the
residuals of one ``forward``, Pearlmutter's R-operator written out layer by layer.

Also :func:`bridge`, which wraps a layer's hand-written backward as a
``jax.custom_vjp`` rule so autodiff can use it inside larger programs, and the
per-example engines (:func:`per_example_value_and_grad`, :func:`per_example_grad_norms`,
:func:`clipped_value_and_grad`) built on every layer's batched per-example rules
(``Layer.per_example`` / ``Layer.per_example_norms``), or, for a layer without them, ``vmap``
of its own backward (:mod:`funnn.layers._vmap_rule`).

Per-example semantics: the loss of example ``i`` is the loss of the batch ``x[i:i+1]``,
i.e. ``loss.value(out[i:i+1], y[i:i+1])`` (with a masked loss: the mean over that example's
valid tokens). For a ``"mean"`` loss that is the mean over
that one example's terms (its time steps for a per-example loss on ``(B, T, K)`` outputs,
its elements for a per-element loss such as :data:`~funnn.losses.mse`), not the batch
mean: so ``mean_i(values_i)`` is the batch loss, and ``mean_i(grads_i)`` its gradient,
for "mean" losses whose terms per example are equal in number (all of funnn's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funnn.compile import jit_reusing  # moved to funnn.compile; importable from here too
from funnn.core import (
    ConfigError,
    Layer,
    ShapeError,
    StateError,
    check_backward,
    check_context,
    input_spec,
    run_forward,
)
from funnn.layers.walk import rule, tangent

__all__ = ["value_and_grad", "jvp", "bridge", "per_example_value_and_grad",
           "per_example_grad_norms", "clipped_value_and_grad", "per_example_loss", "jit_reusing"]


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


def _zero_tangent(v):
    """A zero tangent like ``v`` (``None`` for integer inputs, which have none)."""
    def zero(a):
        a = jnp.asarray(a)
        return jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact) else None
    return jax.tree_util.tree_map(zero, v)


def jvp(model: Layer, *, train: bool = False):
    """``f(params, x, dparams, dx, *, key=None, **context) -> (y, dy)`` by the hand-written
    tangent rules: the Jacobian-vector product of ``model.apply`` at ``(params, x)`` along
    ``(dparams, dx)``, with no autodiff.

    One ``forward`` keeps the residuals, then ``model.jvp`` (``Layer.jvp``; combinators chain,
    fan out and add their children's) pushes the tangents through: ``dy = J_params dparams +
    J_x dx``. ``dparams`` has the params' tree, ``dx`` the input's shape; either may be
    ``None`` (zero; integer inputs such as embedding ids have no tangent). ``train`` is fixed
    here, as in :func:`value_and_grad` (default ``False``: dropout is the identity; with
    ``train=True`` and a ``key`` the tangent uses the forward's mask). Side inputs (``mask=``,
    ``lengths=``) pass to the layers that read them. A layer without a tangent rule raises
    :class:`~funnn.core.ConfigError` naming it (no fallback to ``jax.jvp``: the result is
    always the hand-written one). Stateful models (batch-norm) take ``state=`` and return
    ``((y, new_state), dy)``, as :func:`value_and_grad` returns ``((loss, new_state),
    grads)``; the state gets no tangent (in training the tangent flows through the batch
    statistics, as the backward's gradient does).
    """
    rule_ = tangent(model)

    def f(params, x, dparams, dx, *, key=None, state=None, **context):
        check_context(model, context)
        y, res, new_state = run_forward(model, params, x, state=state, key=key, train=train,
                                        **context)
        dp = _zero_tangent(params) if dparams is None else dparams
        d = _zero_tangent(x) if dx is None else dx
        dy = rule_(params, res, dp, d)
        return ((y, new_state) if model.stateful else y), dy

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
                 context=model.context, derived=model.derived,
                 per_example=model.per_example, per_example_norms=model.per_example_norms,
                 kind="bridge", jvp=model.jvp, walk=model.walk,
                 factors=model.factors)


# --------------------------------------------------------------------------- per example


def per_example_loss(loss, out, y):
    """``(values (B,), deltas)``: example ``i``'s loss ``loss.value(out[i:i+1], y[i:i+1])``
    and its gradient with respect to ``out[i]``, for all ``i`` at once (``deltas`` has
    ``out``'s shape). The reduction's ``1/N`` is that of a one-example batch; a masked or
    weighted loss (``ignore_index``, :func:`funnn.losses.weighted`) divides each example by
    its own number of valid tokens (:meth:`funnn.losses.Loss.per_example`)."""
    out = jnp.asarray(out)
    if out.ndim < 2:
        raise ShapeError(f"per-example losses need a batch axis: the model output has shape "
                         f"{out.shape}; give x as (batch, ...)", (getattr(loss, "name", "loss"),))
    if not callable(getattr(loss, "per_example", None)):
        raise ConfigError(f"per-example gradients need a funnn Loss (with the unreduced f and "
                          f"its derivative df), got {loss!r}", ("per_example",))
    return loss.per_example(out, y)


def _reject_stateful(model: Layer, what: str) -> None:
    if model.stateful:
        raise StateError(f"{what} is undefined for a stateful model: batch_norm in training "
                         f"mode normalises each example by statistics of the whole batch, so "
                         f"example i's output (and gradient) depends on the other examples and "
                         f"the per-example gradients do not sum to the batch gradient; use "
                         f"layer_norm instead of batch_norm", (model.name,))


def _rules(model: Layer, field: str, what: str):
    """``of(x) -> rule``: the model's rule, or vmap of its backward for ``x``'s shape."""
    _reject_stateful(model, what)
    return lambda x: rule(model, field, input_spec(x))


def _forward_deltas(model: Layer, loss, train: bool, params, x, y, key, context):
    """One forward, each example's loss and output delta: ``(values, delta, res)``."""
    check_context(model, context)
    out, res = model.forward(params, x, key=key, train=train, **context)
    values, delta = per_example_loss(loss, out, y)
    return values, delta, res


def per_example_value_and_grad(model: Layer, loss, *, train: bool = True):
    """``f(params, x, y, *, key=None) -> (values (B,), grads)``, every leaf of ``grads`` with a
    leading batch axis: example ``i``'s loss (that of the batch ``x[i:i+1]``) and gradient.

    One forward, each example's own output delta (:func:`per_example_loss`) and the
    layers' batched per-example rules (``dW_i = sum_t x_it^T delta_it`` as one einsum over
    the batch), never ``vmap`` over single examples. A layer without a rule (a custom layer,
    :func:`~funnn.core.layer_from_apply`'s) falls back to ``vmap`` of its own backward over
    its residuals, in the same pass (:mod:`funnn.layers._vmap_rule`; its per-example
    gradients are materialised; :func:`funnn.summary.summary` marks it ``[vmap]``). Stateful
    models (batch-norm) raise :class:`~funnn.core.StateError`. Other keyword arguments (side
    inputs such as ``mask=``/``lengths=``) go to ``model.forward``, as in
    :func:`value_and_grad`.
    """
    per_ex = _rules(model, "per_example", "a per-example gradient")

    def f(params, x, y, *, key=None, **context):
        values, delta, res = _forward_deltas(model, loss, train, params, x, y, key, context)
        grads, _ = per_ex(x)(params, res, delta)
        return values, grads

    return f


def per_example_grad_norms(model: Layer, loss, *, train: bool = True):
    """``f(params, x, y, *, key=None) -> (values (B,), norms (B,))``: the L2 norm of each
    example's whole gradient (all leaves together), without materialising per-example weight
    gradients where a cheaper rule exists (``||x_i|| ||delta_i||`` for a dense layer without
    positions, the Gram form with them; see :mod:`funnn.layers.per_example`)."""
    norms_rule = _rules(model, "per_example_norms", "a per-example gradient norm")

    def f(params, x, y, *, key=None, **context):
        values, delta, res = _forward_deltas(model, loss, train, params, x, y, key, context)
        sq, _ = norms_rule(x)(params, res, delta)
        return values, jnp.sqrt(jnp.maximum(sq, 0))

    return f


def clip_factors(norms, clip_norm):
    """``min(1, C / ||g_i||)``: the factor that brings a gradient of norm ``||g_i||`` to at most
    ``C`` (1 for a zero gradient)."""
    c = jnp.asarray(clip_norm, norms.dtype)
    return jnp.where(norms > c, c / jnp.where(norms > c, norms, 1), 1).astype(norms.dtype)


def _check_clip(clip_norm) -> float:
    try:
        c = float(clip_norm)
    except (TypeError, ValueError):
        c = float("nan")
    if isinstance(clip_norm, bool) or not c > 0 or c == float("inf"):
        raise ConfigError(f"clip_norm must be a positive finite number, got {clip_norm!r}",
                          ("clipped_value_and_grad",))
    return c


def clipped_grad_sum(model: Layer, loss, clip_norm, *, train: bool = True):
    """``f(params, x, y, weights, *, key=None) -> (values (B,), norms (B,), sum_grads)`` with
    ``sum_grads = sum_i weights_i min(1, C/||g_i||) g_i``: the norms first, then one batch
    backward with each example's delta scaled by its weight and clip factor (the backward is
    linear in each example's delta). ``weights`` (B,) masks padded rows (DP-SGD's Poisson
    batches); it is a plain array, so this traces once per batch shape."""
    c = _check_clip(clip_norm)
    norms_rule = _rules(model, "per_example_norms", "per-example clipping")

    def f(params, x, y, weights, *, key=None, **context):
        values, delta, res = _forward_deltas(model, loss, train, params, x, y, key, context)
        sq, _ = norms_rule(x)(params, res, delta)
        norms = jnp.sqrt(jnp.maximum(sq, 0))
        scale = (clip_factors(norms, c) * jnp.asarray(weights, norms.dtype)).astype(delta.dtype)
        grads, dx = model.backward(params, res, delta * scale.reshape((-1,) + (1,) * (
            delta.ndim - 1)))
        check_backward(model.name, params, grads, input_spec(x), dx)
        return values, norms, grads

    return f


def clipped_value_and_grad(model: Layer, loss, clip_norm, *, train: bool = True):
    """``f(params, x, y, *, key=None) -> (mean value, mean of clipped per-example grads)``.

    Each example's gradient ``g_i`` is clipped to norm ``<= clip_norm``:
    ``g_i min(1, C / ||g_i||)``; the result is their mean over the batch, with the params'
    tree. Norms first (:func:`per_example_grad_norms`' rules), then one more batch backward
    with each example's output delta scaled by its clip factor / B. ``clip_norm <= 0`` raises
    :class:`~funnn.core.ConfigError`.
    """
    g = clipped_grad_sum(model, loss, clip_norm, train=train)

    def f(params, x, y, *, key=None, **context):
        b = jnp.shape(x[0] if isinstance(x, (tuple, list)) else x)[0]
        values, _, grads = g(params, x, y, jnp.full((b,), 1.0 / b), key=key, **context)
        return jnp.mean(values), grads

    return f
