"""Mixed precision: a policy of three dtypes, a model wrapper that applies it on both
gradient paths, and dynamic loss scaling for float16.

A :class:`Policy` names the dtype of the parameters (the float32 master weights the optimizer
updates), of the computation, and of the model's output::

    Policy(param="float32", compute="bfloat16", output="float32")      # = get_policy("bf16")

:func:`apply_policy` wraps a model so that every layer computes in the compute dtype: the
parameters and the (floating) input are cast once, at the model boundary, and each layer
keeps the dtype it is given. Inside the layers, what needs the range or the precision runs in
float32 (:func:`wide`): softmax and its statistics, layer- and batch-norm moments, and the
accumulation of every weight gradient (``x^T dy`` with ``preferred_element_type``), bias sum
and embedding scatter; batch-norm running statistics stay float32 and do not promote the
layer's output. The output is cast to the output dtype, so the loss runs in float32.

On the manual path the wrapper's backward casts ``dy`` to the compute dtype, runs the
hand-written backward there, and returns each gradient in its master parameter's dtype; on the
autodiff path the same casts sit inside the differentiated function, so ``jax.grad`` does the
same. Both paths therefore see the same numbers up to rounding.

float16 has a narrow exponent range: small gradients underflow to zero. With a float16 compute
dtype, training uses dynamic loss scaling (:func:`loss_scaled`): the loss is multiplied by a
scale ``S`` before the backward pass and the gradients divided by ``S`` after it (in float32);
a step whose gradients are not finite is skipped and ``S`` halved; after ``period`` finite
steps in a row ``S`` doubles. The scale bookkeeping is DeepMind's ``jmp`` (its
``DynamicLossScale``: a small pytree that lives in the optimizer state, so checkpoints and
resume carry it). bfloat16 has float32's exponent range and needs no scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jmp
import optax

from funnn.core import ConfigError, Layer, run_apply, run_forward, upcast, wide

__all__ = ["Policy", "POLICIES", "get_policy", "apply_policy", "unwrap", "wide", "upcast",
           "loss_scaled", "LossScaled", "LossScaleState"]

def _dtype(value, what: str) -> jnp.dtype:
    try:
        dt = jnp.dtype(value)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ConfigError(f"{what} dtype must be a floating dtype (float32, bfloat16, float16, "
                          f"float64), got {value!r}", ("precision",))
    return dt


def _cast_tree(tree, dtype):
    def cast(a):
        if isinstance(a, jax.Array) or hasattr(a, "dtype"):
            if jnp.issubdtype(jnp.result_type(a), jnp.floating):
                return jnp.asarray(a).astype(dtype)
        return a
    return jax.tree_util.tree_map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Three dtypes: ``param`` (master weights), ``compute`` (the layers), ``output``."""

    param: Any = "float32"
    compute: Any = "float32"
    output: Any = "float32"

    def __post_init__(self):
        for field in ("param", "compute", "output"):
            object.__setattr__(self, field, _dtype(getattr(self, field), field))

    @property
    def name(self) -> str:
        """The short name (``"bf16"``) of a named policy, else the three dtypes spelled out."""
        for n, p in POLICIES.items():
            if p == self:
                return n
        return f"param={self.param.name},compute={self.compute.name},output={self.output.name}"

    @property
    def needs_loss_scaling(self) -> bool:
        """``True`` for a float16 compute dtype (gradients would underflow unscaled)."""
        return self.compute == jnp.dtype(jnp.float16)

    def cast_to_compute(self, tree):
        return _cast_tree(tree, self.compute)

    def cast_to_param(self, tree):
        return _cast_tree(tree, self.param)

    def cast_to_output(self, tree):
        return _cast_tree(tree, self.output)


POLICIES = {
    "f32": Policy(),
    "bf16": Policy(compute="bfloat16"),
    "f16": Policy(compute="float16"),
}


def get_policy(spec) -> Policy:
    """A :class:`Policy` from a name (``"f32"``, ``"bf16"``, ``"f16"``), a policy, or ``None``
    (``"f32"``)."""
    if spec is None:
        return POLICIES["f32"]
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str) and spec in POLICIES:
        return POLICIES[spec]
    raise ConfigError(f"unknown precision {spec!r}; valid: {', '.join(POLICIES)} or a "
                      f"precision.Policy(param=, compute=, output=)", ("precision",))


# --------------------------------------------------------------------------- the model wrapper


def _like(tree, template):
    """Cast each floating leaf of ``tree`` to the dtype of the matching ``template`` leaf
    (``None`` entries of ``tree``, such as the dx of integer ids, stay ``None``)."""
    if tree is None:
        return None
    if isinstance(tree, (tuple, list)) and isinstance(template, (tuple, list)):
        return type(tree)(_like(a, b) for a, b in zip(tree, template))
    if isinstance(tree, dict):
        return {k: _like(v, template[k]) for k, v in tree.items()}
    if hasattr(tree, "dtype") and jnp.issubdtype(tree.dtype, jnp.floating):
        return tree.astype(template.dtype)
    return tree


def _dtype_marks(x):
    """A residual that remembers the input's dtypes and costs nothing: a 0-size array per
    floating leaf."""
    return jax.tree_util.tree_map(
        lambda a: jnp.zeros((0,), jnp.result_type(a)) if hasattr(a, "dtype") else None, x)


def apply_policy(model: Layer, policy) -> Layer:
    """``model`` computing under ``policy`` (a :class:`Policy` or a name), on both paths.

    ``apply``/``forward``: params and floating inputs cast to ``policy.compute``, the output
    to ``policy.output``; model state (batch-norm statistics) is left as it is. ``backward``:
    ``dy`` cast to the compute dtype, the model's hand-written backward, then each gradient
    cast to its parameter's dtype and ``dx`` to the input's. The per-example rules
    (``per_example``, ``per_example_norms``) are kept and run the same way; the squared norms
    come back in float32 (accumulated there: :mod:`funnn.layers.per_example`), so DP-SGD
    clips by float32 norms. The float32 policy returns ``model`` itself.
    """
    policy = get_policy(policy)
    if policy == POLICIES["f32"]:
        return model
    pc, xc, out = policy.cast_to_compute, policy.cast_to_compute, policy.cast_to_output

    def apply(params, x, *, state=None, key=None, train=False, **ctx):
        y, s = run_apply(model, pc(params), xc(x), state=state, key=key, train=train, **ctx)
        return (out(y), s) if model.stateful else out(y)

    def forward(params, x, *, state=None, key=None, train=False, **ctx):
        y, res, s = run_forward(model, pc(params), xc(x), state=state, key=key, train=train,
                                **ctx)
        res = (res, _dtype_marks(y), _dtype_marks(x))
        return (out(y), res, s) if model.stateful else (out(y), res)

    def backward(params, res, dy):
        res, y_marks, x_marks = res
        grads, dx = model.backward(pc(params), res, _like(dy, y_marks))
        return _like(grads, params), _like(dx, x_marks)

    per_example, per_example_norms = _policy_rules(model, pc)
    if not model.stateful:
        def apply_(params, x, *, key=None, train=False, **ctx):
            return apply(params, x, key=key, train=train, **ctx)

        def forward_(params, x, *, key=None, train=False, **ctx):
            return forward(params, x, key=key, train=train, **ctx)
    wrapped = Layer(name=f"{model.name}@{policy.name}", init=model.init,
                    apply=apply if model.stateful else apply_,
                    forward=forward if model.stateful else forward_, backward=backward,
                    init_state=model.init_state, children=(("", model),),
                    context=model.context, derived=False, kind="policy",
                    per_example=per_example, per_example_norms=per_example_norms)
    object.__setattr__(wrapped, "_funnn_policy", (model, policy))   # for unwrap()
    return wrapped


def _policy_rules(model: Layer, pc):
    """The wrapper's per-example rules: the model's, run as its backward is (params and ``dy``
    in the compute dtype), the gradients returned in the master params' dtypes and the squared
    norms in float32 at least (:func:`wide`); ``(None, None)`` for a model without them (the
    engines then take ``vmap`` of the wrapper's backward)."""
    if model.per_example is None or model.per_example_norms is None:
        return None, None
    inner_grads, inner_norms = model.per_example, model.per_example_norms

    def per_example(params, res, dy):
        res, y_marks, x_marks = res
        grads, dx = inner_grads(pc(params), res, _like(dy, y_marks))
        return _like(grads, params), _like(dx, x_marks)

    def per_example_norms(params, res, dy):
        res, y_marks, x_marks = res
        sq, dx = inner_norms(pc(params), res, _like(dy, y_marks))
        return upcast(sq), _like(dx, x_marks)

    return per_example, per_example_norms


def unwrap(layer: Layer):
    """``(model, policy)`` when ``layer`` was made by :func:`apply_policy`, else ``None`` (for
    tools that walk the layers inside, such as ``check_numerics``'s replay)."""
    return getattr(layer, "_funnn_policy", None)


# --------------------------------------------------------------------------- loss scaling


class LossScaleState(NamedTuple):
    """The optimizer state of :func:`loss_scaled`: the inner optimizer's, the current scale
    and the count of finite steps since it last changed (plain arrays, so checkpoints hold
    them)."""

    inner: Any
    scale: jax.Array
    counter: jax.Array


class LossScaled(NamedTuple):
    """An optax-style transformation (``init``, ``update``) whose state carries a dynamic loss
    scale; ``fit``'s step sees the type, scales the loss, unscales the gradients and skips
    non-finite steps. ``period`` and ``factor`` are ``jmp.DynamicLossScale``'s."""

    init: Any
    update: Any
    period: int
    factor: int

    def loss_scale(self, state: LossScaleState) -> jmp.DynamicLossScale:
        """The scale of ``state`` as ``jmp``'s object (``scale``, ``unscale``, ``adjust``)."""
        return jmp.DynamicLossScale(state.scale, state.counter, self.period, self.factor)

    def with_loss_scale(self, state: LossScaleState, ls: jmp.DynamicLossScale):
        return state._replace(scale=ls.loss_scale, counter=ls.counter)


def loss_scaled(optimizer: optax.GradientTransformation, initial_scale: float = 2.0 ** 15,
                period: int = 2000, factor: int = 2) -> LossScaled:
    """``optimizer`` with a dynamic loss scale in its state (see the module docstring).

    ``update`` is the inner optimizer's; scaling, the finiteness check and the skip happen in
    the training step, which alone knows the loss (:func:`funnn.train.make_step`).
    """
    if not initial_scale > 0:
        raise ConfigError(f"initial_scale must be positive, got {initial_scale!r}",
                          ("loss_scaled",))

    def init(params):
        return LossScaleState(optimizer.init(params), jnp.asarray(initial_scale, jnp.float32),
                              jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        updates, inner = optimizer.update(grads, state.inner, params)
        return updates, state._replace(inner=inner)

    return LossScaled(init, update, int(period), int(factor))


class _Scaled(NamedTuple):
    """A loss multiplied by ``scale`` (value and hand-written gradient alike)."""

    loss: Any
    scale: Any

    @property
    def name(self):
        return getattr(self.loss, "name", "loss")

    def value(self, pred, y):
        return self.loss.value(pred, y) * self.scale.astype(jnp.result_type(pred))

    def grad(self, pred, y):
        return self.loss.grad(pred, y) * self.scale.astype(jnp.result_type(pred))


def scaled_loss(loss, scale) -> _Scaled:
    """``loss`` times ``scale`` (used by the training step under a loss-scaled optimizer)."""
    return _Scaled(loss, jnp.asarray(scale))
