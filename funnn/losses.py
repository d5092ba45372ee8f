"""Losses with hand-written gradients with respect to the prediction.

A :class:`Loss` is plain data: a name, a reduction, the unreduced loss ``f`` and
its closed-form derivative ``df``, as an activation carries ``f`` and ``df``::

    loss.value(pred, target) -> scalar            # loss(pred, target) is the same
    loss.grad(pred, target)  -> dL/dpred          # pred's shape and dtype, reduction included

Shapes: the last axis of ``pred`` is the feature (or class) axis and every
leading axis is a batch axis, so ``(batch, K)``, ``(batch, time, K)`` and a single
example ``(K,)`` all work, and ``jax.vmap(loss.grad)`` gives per-example
gradients. ``pred`` and ``target`` must have the same shape (integer class labels
for :data:`softmax_cross_entropy` drop the class axis); nothing is broadcast.

Each loss sums over one *unit* and then reduces over the units:
``per="example"`` losses (:data:`squared_error`, :data:`softmax_cross_entropy`)
have one term per example, ``prod(pred.shape[:-1])`` of them; ``per="element"``
losses (:data:`mse`, :data:`binary_cross_entropy`) have one term per element,
``pred.size`` of them. ``reduction="sum"`` adds the terms; ``"mean"`` divides
the sum by their number ``N``, and ``grad`` carries that same ``1/N``.

Masks and weights (padded sequences, per-example or per-token weights)::

    loss.value(pred, target, weights=w)        # sum_u w_u f_u  ("sum")  or  / sum_u w_u  ("mean")
    loss.grad(pred, target, weights=w)         # w_u df_u, divided by the same sum_u w_u
    ce = softmax_cross_entropy.with_ignore_index(-100)   # labels == -100 get weight 0

``weights`` has the terms' shape (``pred.shape[:-1]`` for a per-example loss,
``pred.shape`` for a per-element one) or a leading part of it (``(batch,)`` per example,
``(batch, time)`` per token), and multiplies each term. ``ignore_index`` (integer class
labels only) gives every term whose label equals it weight 0. With either, ``"mean"``
averages over the *valid* terms only: it divides by ``sum_u w_u`` (the number of
unmasked tokens for a 0/1 mask), a traced count rather than the static ``N``; a batch with
no valid term has loss 0 and gradient 0. Zero-weight terms contribute exactly 0 even when
their value is not finite. :meth:`Loss.per_example` reduces each example by its own
valid count. :func:`weighted` binds weights to a loss for code that calls
``loss.value(pred, target)`` (the engines).

Only ``jax.numpy``/``lax`` here, no autodiff. Everything traces under
``jit``/``vmap``; shape checks run while tracing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.core import ConfigError, DataError, DTypeError, ShapeError, check_floating

__all__ = [
    "Loss", "REDUCTIONS", "squared_error", "mse", "softmax_cross_entropy",
    "binary_cross_entropy", "ALL", "get", "accuracy", "weighted", "split_side",
    "IGNORE_INDEX", "LOSS_SIDE",
]

REDUCTIONS = ("sum", "mean")
IGNORE_INDEX = -100          # PyTorch's default ignore_index, a label no class can have
LOSS_SIDE = "weights"        # the side input (fit's (x, y, side)) that goes to the loss


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss: ``value = reduce(f(pred, target))``, ``grad = reduce'(df(pred, target))``.

    ``f(pred, target)`` gives the unreduced terms (one per example or per element,
    see ``per``); ``df(pred, target)`` gives ``d sum(f) / d pred`` with pred's shape.
    ``check(name, pred, target)`` validates the pair and returns them as arrays
    (``pred`` floating, ``target`` ready for ``f``/``df``). ``ignore_index`` (None, or
    an int; see :meth:`with_ignore_index`) masks integer labels. Frozen and hashable,
    so a loss can be a static argument of ``jax.jit``.
    """

    name: str
    reduction: str
    per: str                                  # "example" or "element": what one term covers
    formula: str
    f: Callable = dataclasses.field(repr=False)
    df: Callable = dataclasses.field(repr=False)
    check: Callable = dataclasses.field(repr=False)
    ignore_index: int | None = None

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {self.reduction!r}; expected one of "
                              f"{', '.join(map(repr, REDUCTIONS))}", (self.name,))
        if self.per not in ("example", "element"):
            raise ConfigError(f"per must be 'example' or 'element', got {self.per!r}", (self.name,))

    def _scale(self, shape) -> float:
        """1 for "sum"; 1/N for "mean", N the static number of terms for ``pred.shape``."""
        if self.reduction == "sum":
            return 1.0
        n = math.prod(shape[:-1] if self.per == "example" else shape)
        if n == 0:
            raise ShapeError(f"cannot take the mean over an empty batch (prediction shape "
                             f"{tuple(shape)}); use reduction='sum' or a non-empty batch",
                             (self.name,))
        return 1.0 / n

    def _prepare(self, pred, target, weights):
        """``(pred, target, w)``: the checked pair (ignored labels replaced by class 0) and the
        terms' weights (None when there are neither weights nor ignored labels)."""
        valid = None
        if self.ignore_index is not None:
            target = jnp.asarray(target)
            if jnp.issubdtype(target.dtype, jnp.integer) and target.ndim == jnp.ndim(pred) - 1:
                valid = target != self.ignore_index
                target = jnp.where(valid, target, jnp.zeros((), target.dtype))
        pred, target = self.check(self.name, pred, target)
        if weights is None and valid is None:
            return pred, target, None
        return pred, target, _term_weights(self, pred, weights, valid)

    def value(self, pred, target, weights=None):
        """The reduced loss, a scalar of pred's dtype; ``weights`` as in the module docstring."""
        pred, target, w = self._prepare(pred, target, weights)
        if w is None:
            return _reduced_value(self.f, self._scale(pred.shape), pred, target)
        return _weighted_value(self.f, self.reduction == "mean", pred, target, w)

    def grad(self, pred, target, weights=None):
        """dL/dpred, pred's shape and dtype; the "mean" reduction's 1/N (or 1/sum(w)) included."""
        pred, target, w = self._prepare(pred, target, weights)
        if w is None:
            return _scaled_grad(self.df, self._scale(pred.shape), pred, target)
        return _weighted_grad(self.df, self.reduction == "mean", pred, target, w)

    def per_example(self, pred, target, weights=None):
        """``(values (B,), deltas)``: example ``i``'s loss, that of the one-example batch
        ``pred[i:i+1]`` (with ``weights[i:i+1]``), and its gradient with respect to
        ``pred[i]``, for all ``i`` at once (``deltas`` has pred's shape). With weights or
        ignored labels a "mean" loss divides example ``i`` by its own ``sum_u w_iu`` (its
        valid tokens), so clipping a per-example gradient counts only that example's tokens."""
        pred, target, w = self._prepare(pred, target, weights)
        if pred.ndim < 1 + (self.per == "example"):
            raise ShapeError(f"per-example losses need a batch axis: the prediction has shape "
                             f"{pred.shape}", (self.name,))
        if w is None:
            scale = self._scale((1,) + pred.shape[1:])
            return _unweighted_per_example(self.f, self.df, scale, pred, target)
        return _weighted_per_example(self.f, self.df, self.reduction == "mean", pred, target, w)

    __call__ = value

    def with_reduction(self, reduction: str) -> Loss:
        """The same loss with ``reduction`` "sum" or "mean"."""
        return dataclasses.replace(self, reduction=reduction)

    def with_ignore_index(self, ignore_index: int | None = IGNORE_INDEX) -> Loss:
        """The same loss ignoring integer labels equal to ``ignore_index`` (default -100, as
        PyTorch's): their terms get weight 0 and "mean" averages over the other labels. For
        losses over integer class labels (:data:`softmax_cross_entropy`); with one-hot or
        probability targets it has no effect (as in PyTorch). None removes it."""
        if ignore_index is not None:
            if self.check is not _check_labels:
                raise ConfigError(f"ignore_index needs integer class labels; {self.name} takes "
                                  f"no labels (use weights= to mask its terms)", (self.name,))
            try:
                if isinstance(ignore_index, bool):
                    raise TypeError
                ignore_index = operator.index(ignore_index)
            except TypeError:
                raise ConfigError(f"ignore_index must be an int, got {ignore_index!r}",
                                  (self.name,)) from None
        return dataclasses.replace(self, ignore_index=ignore_index)

    def __repr__(self) -> str:
        ignore = "" if self.ignore_index is None else f", ignore_index={self.ignore_index}"
        return f"Loss({self.name}, reduction={self.reduction!r}{ignore})"


# Checks run in Python (on concrete values when there are some); the arithmetic is
# one compiled program per shape, so eager calls do not dispatch op by op.


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reduced_value(f, scale, pred, target):
    return jnp.sum(f(pred, target)) * jnp.asarray(scale, pred.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scaled_grad(df, scale, pred, target):
    return df(pred, target) * jnp.asarray(scale, pred.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _unweighted_per_example(f, df, scale, pred, target):
    b, s = pred.shape[0], jnp.asarray(scale, pred.dtype)
    return jnp.sum(f(pred, target).reshape(b, -1), 1) * s, df(pred, target) * s


def _to_pred(w, pred):
    """Term weights ``w`` (``pred.shape[:-1]`` or ``pred.shape``) broadcast against pred."""
    return w[..., None] if w.ndim < pred.ndim else w


def _nonzero(total):
    """The normaliser ``sum w``, with 1 in place of 0 (nothing valid: loss and gradient 0)."""
    return jnp.where(total != 0, total, jnp.ones_like(total))


def _weighted_terms(f, pred, target, w):
    """``w_u f_u``, exactly 0 where ``w_u == 0`` (a masked term may be NaN or inf)."""
    return jnp.where(w != 0, w * f(pred, target), jnp.zeros_like(w))


def _weighted_delta(df, pred, target, w, scale):
    """``w_u df_u / Z`` with pred's shape (``scale = w / Z``), exactly 0 where ``w_u == 0``."""
    return jnp.where(_to_pred(w, pred) != 0, df(pred, target) * _to_pred(scale, pred),
                     jnp.zeros((), pred.dtype))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _weighted_value(f, mean, pred, target, w):
    total = jnp.sum(_weighted_terms(f, pred, target, w))
    return total / _nonzero(jnp.sum(w)) if mean else total


@functools.partial(jax.jit, static_argnums=(0, 1))
def _weighted_grad(df, mean, pred, target, w):
    scale = w / _nonzero(jnp.sum(w)) if mean else w
    return _weighted_delta(df, pred, target, w, scale)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _weighted_per_example(f, df, mean, pred, target, w):
    b = pred.shape[0]
    values = jnp.sum(_weighted_terms(f, pred, target, w).reshape(b, -1), 1)
    if not mean:
        return values, _weighted_delta(df, pred, target, w, w)
    count = _nonzero(jnp.sum(w.reshape(b, -1), 1))
    scale = w / count.reshape((b,) + (1,) * (w.ndim - 1))
    return values / count, _weighted_delta(df, pred, target, w, scale)


def _term_weights(loss: Loss, pred, weights, valid):
    """The weight of every term (the terms' shape, pred's dtype): ``weights`` broadcast from
    a leading part of the terms' shape, times the valid-label mask."""
    terms = pred.shape[:-1] if loss.per == "example" else pred.shape
    w = None
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != terms[:weights.ndim]:
            raise ShapeError(f"weights of shape {weights.shape} must have the loss terms' shape "
                             f"{terms} or a leading part of it (per example {terms[:1]}, per "
                             f"token {terms[:2]}); prediction shape {pred.shape}", (loss.name,))
        if not (jnp.issubdtype(weights.dtype, jnp.number) or weights.dtype == jnp.bool_) \
                or jnp.issubdtype(weights.dtype, jnp.complexfloating):
            raise DTypeError(f"weights must be real numbers or booleans, got dtype "
                             f"{weights.dtype}", (loss.name,))
        concrete = _concrete(weights)
        if concrete is not None and concrete.size and concrete.min() < 0:
            raise DataError(f"weights must be >= 0, got min {concrete.min()}", (loss.name,))
        w = jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (len(terms) - weights.ndim)),
                             terms).astype(pred.dtype)
    if valid is not None:
        v = valid.astype(pred.dtype)
        w = v if w is None else w * v
    return w


# --------------------------------------------------------------------------- checks


def _as_pred(name: str, pred, min_rank: int):
    pred = jnp.asarray(pred)
    check_floating(name, pred, "prediction")
    if pred.ndim < min_rank:
        raise ShapeError(f"expected a prediction with a feature axis (rank >= {min_rank}), got "
                         f"shape {pred.shape}; give one example as (K,) or a batch as "
                         f"(batch, K)", (name,))
    return pred


def _check_same(name: str, pred, target, *, min_rank: int = 0):
    """pred and target of one shape; target cast to pred's dtype."""
    pred = _as_pred(name, pred, min_rank)
    target = jnp.asarray(target)
    if target.shape != pred.shape:
        raise ShapeError(f"prediction shape {pred.shape} and target shape {target.shape} "
                         f"differ; they must match exactly (no broadcasting)", (name,))
    return pred, target.astype(pred.dtype)


def _check_same_rank1(name: str, pred, target):
    """As :func:`_check_same`, for per-example losses that need a feature axis."""
    return _check_same(name, pred, target, min_rank=1)


def _concrete(x):
    """``x`` as a numpy array, or ``None`` when it is traced (under jit/vmap/grad)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_labels(name: str, pred, target):
    """CE/accuracy targets: integer labels (...,) or one-hot/probabilities (..., C).

    Returns ``(pred, target)`` with integer labels as given and probabilities
    cast to pred's dtype. Concrete labels outside ``[0, C)`` raise
    :class:`DataError`; traced ones cannot be checked (see softmax_cross_entropy).
    """
    pred = _as_pred(name, pred, 1)
    target = jnp.asarray(target)
    c = pred.shape[-1]
    if target.shape == pred.shape:
        return pred, target.astype(pred.dtype)
    if target.shape != pred.shape[:-1]:
        raise ShapeError(f"prediction shape {pred.shape} needs a target of shape {pred.shape} "
                         f"(one-hot or probabilities) or integer labels of shape "
                         f"{pred.shape[:-1]}, got shape {target.shape}", (name,))
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise DTypeError(f"class labels of shape {target.shape} must be integers, got dtype "
                         f"{target.dtype}; convert with target.astype(int)", (name,))
    y = _concrete(target)
    if y is not None and y.size and (y.min() < 0 or y.max() >= c):
        raise DataError(f"labels must lie in [0, {c}) for {c} classes; got min {y.min()}, "
                        f"max {y.max()}", (name,))
    return pred, target


# --------------------------------------------------------------------------- losses


def _squared_error_f(o, t):
    """E = 1/2 sum_k (o_k - t_k)^2 per example: (..., K) -> (...)."""
    return 0.5 * jnp.sum(jnp.square(o - t), axis=-1)


def _squared_error_df(o, t):
    """dE/do = o - t (the delta rule's output error)."""
    return o - t


squared_error = Loss(
    name="squared_error", reduction="sum", per="example",
    formula="1/2 sum_k (o_k - t_k)^2 per example; grad o - t",
    f=_squared_error_f, df=_squared_error_df, check=_check_same_rank1)
"""The seed notes' ``E = 1/2 sum_k (o_k - t_k)^2``, one term per example.

pred, target: ``(..., K)``, same shape. Default reduction "sum": the total over
the batch, whose gradient is exactly the delta rule's ``o - t``. With "mean":
the mean over the ``prod(shape[:-1])`` examples of the per-example ``1/2 sum``,
gradient ``(o - t) / N``.
"""


def _mse_f(o, t):
    """(o - t)^2 per element."""
    return jnp.square(o - t)


def _mse_df(o, t):
    """d/do (o - t)^2 = 2 (o - t)."""
    return 2.0 * (o - t)


mse = Loss(
    name="mse", reduction="mean", per="element",
    formula="(o - t)^2 per element; grad 2 (o - t)",
    f=_mse_f, df=_mse_df, check=_check_same)
"""Mean squared error, one term ``(o - t)^2`` per *element* (PyTorch's MSELoss).

pred, target: any shape, the same. Default "mean": ``mean((o - t)^2)`` over every
element (batch and feature axes alike), gradient ``2 (o - t) / pred.size``. With
"sum": ``sum((o - t)^2)``, gradient ``2 (o - t)``. No 1/2: that is
:data:`squared_error`.
"""


def _log_softmax(z):
    """log softmax(z) along the last axis, stable: z - max - log sum exp(z - max)."""
    s = z - lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return s - jnp.log(jnp.sum(jnp.exp(s), axis=-1, keepdims=True))


def _labels_to_probs(z, y):
    """One-hot of integer labels ``y`` in z's dtype, and a mask of labels inside [0, C)."""
    c = z.shape[-1]
    y = y.astype(jnp.promote_types(y.dtype, jnp.int32))   # uint8 labels vs C = 300
    onehot = (y[..., None] == jnp.arange(c)).astype(z.dtype)
    return onehot, (y >= 0) & (y < c)


def _ce_f(z, t):
    """-sum_k t_k log softmax(z)_k per example: (..., C) -> (...)."""
    logp = _log_softmax(z)
    if t.ndim == z.ndim:
        return -jnp.sum(jnp.where(t != 0, t * logp, 0.0), axis=-1)
    onehot, ok = _labels_to_probs(z, t)
    loss = -jnp.sum(jnp.where(onehot != 0, onehot * logp, 0.0), axis=-1)
    return jnp.where(ok, loss, jnp.nan)


def _ce_df(z, t):
    """d/dz = softmax(z) sum_k t_k - t, which is softmax(z) - t for a distribution t."""
    p = jnp.exp(_log_softmax(z))
    if t.ndim == z.ndim:
        return p * jnp.sum(t, axis=-1, keepdims=True) - t
    onehot, ok = _labels_to_probs(z, t)
    return jnp.where(ok[..., None], p - onehot, jnp.nan)


softmax_cross_entropy = Loss(
    name="softmax_cross_entropy", reduction="mean", per="example",
    formula="-sum_k t_k log softmax(z)_k per example; grad softmax(z) - t",
    f=_ce_f, df=_ce_df, check=_check_labels)
"""Cross-entropy of softmax(logits) against class targets, one term per example.

logits ``z``: ``(..., C)``. The target is chosen by its shape:
integer labels of shape ``(...)`` (``z.shape[:-1]``, any integer dtype), or one-hot
/ probability vectors of shape ``(..., C)`` (cast to z's dtype). Labels of another
shape, or float labels of shape ``(...)``, raise ShapeError / DTypeError.
Value ``-sum_k t_k log softmax(z)_k`` with a stable log-softmax (max subtracted),
finite for logits of any size. Gradient ``softmax(z) sum_k t_k - t``, i.e.
``softmax(z) - onehot`` for labels. Default reduction "mean" over the examples.

Labels outside ``[0, C)`` raise :class:`~funnn.core.DataError` when they are
concrete (eager calls). Under ``jit``/``vmap`` labels are traced and cannot be
checked; such examples then give a NaN loss and NaN gradient row, never a
silently clamped or zero one.
"""


def _bce_f(z, t):
    """max(z, 0) - z t + log1p(exp(-|z|)) per element, = -t log s(z) - (1-t) log(1-s(z))."""
    return jnp.maximum(z, 0.0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _bce_df(z, t):
    """d/dz = sigmoid(z) - t."""
    return lax.logistic(z) - t


binary_cross_entropy = Loss(
    name="binary_cross_entropy", reduction="mean", per="element",
    formula="max(z,0) - z t + log1p(exp(-|z|)) per element; grad sigmoid(z) - t",
    f=_bce_f, df=_bce_df, check=_check_same)
"""Binary cross-entropy from logits, one term per *element* (PyTorch's BCEWithLogitsLoss).

logits ``z`` and targets ``t`` in [0, 1]: any shape, the same (``t`` is cast to
z's dtype; 0/1 integers work). Value ``-t log sigmoid(z) - (1-t) log(1-sigmoid(z))``
in the stable form ``max(z, 0) - z t + log1p(exp(-|z|))``; gradient
``sigmoid(z) - t``. Default "mean" over every element; "sum" adds them.
Targets outside [0, 1] are not checked.
"""


ALL = (squared_error, mse, softmax_cross_entropy, binary_cross_entropy)
_BY_NAME = {loss.name: loss for loss in ALL}


def get(name, reduction: str | None = None) -> Loss:
    """The loss called ``name`` (a Loss passes through), optionally with another reduction."""
    if isinstance(name, Loss):
        loss = name
    elif isinstance(name, str) and name in _BY_NAME:
        loss = _BY_NAME[name]
    else:
        raise ConfigError(f"unknown loss {name!r}; expected one of "
                          f"{', '.join(map(repr, _BY_NAME))}", ("losses.get",))
    return loss if reduction is None else loss.with_reduction(reduction)


class _Weighted(NamedTuple):
    """A loss with its term weights bound (:func:`weighted`)."""

    loss: Any
    weights: Any

    @property
    def name(self) -> str:
        return self.loss.name

    @property
    def ignore_index(self):
        return self.loss.ignore_index

    def value(self, pred, target):
        return self.loss.value(pred, target, weights=self.weights)

    def grad(self, pred, target):
        return self.loss.grad(pred, target, weights=self.weights)

    def per_example(self, pred, target):
        return self.loss.per_example(pred, target, weights=self.weights)


def weighted(loss, weights):
    """``loss`` with term weights bound: ``.value(pred, y)``, ``.grad(pred, y)`` and
    ``.per_example(pred, y)`` weigh the terms by ``weights`` (module docstring), so the
    engines, which call ``loss.value(out, y)``, train on a masked or weighted loss::

        vg = funnn.manual.value_and_grad(model, losses.weighted(loss, mask))
        value, grads = vg(params, x, y, mask=mask)     # the model masks its keys too

    ``weights=None`` returns ``loss`` itself. Needs a funnn :class:`Loss`."""
    if weights is None:
        return loss
    if not isinstance(loss, Loss):
        raise ConfigError(f"loss weights (side input {LOSS_SIDE!r}) need a funnn Loss, which "
                          f"weighs its terms; got {loss!r}", ("losses.weighted",))
    return _Weighted(loss, weights)


def split_side(side) -> tuple:
    """``(weights, context)`` of a side-input dict: its ``"weights"`` (:data:`LOSS_SIDE`)
    belong to the loss, every other entry (``mask``, ``lengths``) to the model."""
    side = dict(side or {})
    return side.pop(LOSS_SIDE, None), side


# --------------------------------------------------------------------------- metrics


def accuracy(pred, target, weights=None, ignore_index: int | None = None):
    """Fraction of examples whose ``argmax(pred, -1)`` is the target class.

    pred ``(..., C)``; target integer labels ``(...)`` or one-hot/probabilities
    ``(..., C)`` (class = argmax). Mean over every batch axis; a single example
    gives 0.0 or 1.0. Concrete labels outside [0, C) raise DataError; under jit
    they count as wrong. With ``weights`` (``pred.shape[:-1]`` or a leading part) or
    ``ignore_index`` (integer labels equal to it are left out) it is the weighted mean
    over the valid examples (0 when none is valid). Not differentiable; not a Loss.
    """
    if weights is None and ignore_index is None:
        pred, target = _check_labels("accuracy", pred, target)
        return _accuracy(pred, target)
    ce = softmax_cross_entropy.with_ignore_index(ignore_index)
    pred, target, w = dataclasses.replace(ce, name="accuracy")._prepare(pred, target, weights)
    if w is None:
        return _accuracy(pred, target)
    return _weighted_accuracy(pred, target, w)


def _correct(pred, target):
    y = jnp.argmax(target, axis=-1) if target.ndim == pred.ndim else target
    return jnp.argmax(pred, axis=-1) == y


@jax.jit
def _accuracy(pred, target):
    return jnp.mean(_correct(pred, target), dtype=pred.dtype)


@jax.jit
def _weighted_accuracy(pred, target, w):
    return jnp.sum(jnp.where(_correct(pred, target), w, 0)) / _nonzero(jnp.sum(w))
