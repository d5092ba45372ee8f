"""Curvature and gradient statistics from the hand-written layer rules (no autodiff, except
:func:`hvp`, see there).

One forward keeps every layer's residuals; the layers' rules then give, from their inputs and
output deltas, what BackPACK computes by extending PyTorch's backward:

* :func:`batch_stats`: the mean, the sum of squares and the variance of the per-example
  gradients in one pass, without materialising them where the layer's factors allow it
  (a dense layer without positions: ``sum_i (x_i^T d_i)^2 = (x^2)^T (d^2)``);
* :func:`ggn_vp`: Gauss-Newton-vector products ``G v = J^T H_L J v``: the hand-written forward
  mode (``Layer.jvp``) for ``J v``, the loss's closed-form Hessian, the hand-written backward
  for ``J^T``; :func:`fisher_vp` with sampled targets in place of ``H_L``; :func:`hvp`;
* :func:`diag_ggn`: the exact diagonal of ``G``, from the symmetric factorisation of the loss
  Hessian ``H_L = S S^T`` propagated backward one column at a time (``diag G = sum_{i,c}
  (J_i^T s_ic)^2``, each column's squared per-example gradients); :func:`diag_ggn_mc` with
  sampled columns;
* :func:`kfac_factors`: per dense and convolution layer the Kronecker factors ``A`` (input
  second moment, with the bias column) and ``G`` (output delta second moment).

The GGN is that of the batch loss (the loss's reduction included: ``"mean"`` divides by the
number of terms). Loss Hessians per term, and their factors ``S`` with ``H = S S^T``
(``p = softmax(z)``, ``s = sigmoid(z)``, ``m = sum_k t_k``, 1 for labels and distributions):

* ``squared_error``: ``H = I``, ``S = I``;
* ``mse``: ``H = 2`` per element, ``S = sqrt 2``;
* ``softmax_cross_entropy``: ``H = m (diag p - p p^T)``, columns ``S_c = sqrt(m p_c) (e_c - p)``;
* ``binary_cross_entropy``: ``H = s (1 - s)`` per element, ``S = sqrt(s (1 - s))``.

Sampled targets (K-FAC, MC, Fisher) draw
the pseudo-gradient ``d`` with ``E[d d^T] = H``: ``p - onehot(y)`` with ``y ~ Cat(p)``; ``o -
y`` with ``y ~ N(o, I)``; ``s - y`` with ``y ~ Bernoulli(s)``.

Composites route a per-leaf rule through their children with ``Layer.walk``; leaves use
``Layer.factors`` (dense, convolution) or their per-example rules. A layer without the rule a
quantity needs raises :class:`~funnn.core.ConfigError` naming it. Every function here returns
a function that runs under ``jax.jit``; stateful models (batch-norm) raise
:class:`~funnn.core.StateError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from funnn import manual
from funnn.core import ConfigError, Layer, ShapeError, StateError, check_context
from funnn.layers.walk import tangent

__all__ = ["BatchStats", "batch_stats", "ggn_vp", "fisher_vp", "hvp", "diag_ggn",
           "diag_ggn_mc", "kfac_factors", "factor_conventions", "CONVENTIONS"]

CONVENTIONS = ("kfac", "kflr")

# Per-example weight gradients held at once (elements) by the sums of squares over positions:
# past it they are formed a chunk of examples at a time and squared into one accumulator.
_SQ_BUDGET = 1 << 22


# --------------------------------------------------------------------------- loss curvature


class _LossCurv(NamedTuple):
    per_element: bool
    hvp: Callable        # (pred, target, v) -> H v per term, unscaled
    sqrt: Callable       # (pred, target) -> S (B, P, u, C) for pred as (B, P, u)
    sample: Callable     # (key, pred, target, n) -> (n,) + pred.shape


def _mass(z, t):
    """``sum_k t_k`` per example (1 for integer labels), with a trailing axis."""
    if t.ndim == z.ndim:
        return jnp.sum(t, axis=-1, keepdims=True)
    return jnp.ones(z.shape[:-1] + (1,), z.dtype)


def _ce_hvp(z, t, v):
    p = jax.nn.softmax(z, axis=-1)
    return _mass(z, t) * (p * v - p * jnp.sum(p * v, axis=-1, keepdims=True))


def _ce_sqrt(z, t):
    p = jax.nn.softmax(z, axis=-1)
    eye = jnp.eye(z.shape[-1], dtype=z.dtype)
    s = jnp.sqrt(p)[..., None, :] * (eye - p[..., :, None])    # [..., k, c]
    return s * jnp.sqrt(_mass(z, t))[..., None]


def _ce_sample(key, z, t, n):
    p = jax.nn.softmax(z, axis=-1)
    ys = jax.random.categorical(key, z, axis=-1, shape=(n,) + z.shape[:-1])
    return (p - jax.nn.one_hot(ys, z.shape[-1], dtype=z.dtype)) * jnp.sqrt(_mass(z, t))


def _sig_h(z):
    s = jax.nn.sigmoid(z)
    return s * (1 - s)


_LOSSES = {
    "squared_error": _LossCurv(
        False, lambda o, t, v: v,
        lambda o, t: jnp.broadcast_to(jnp.eye(o.shape[-1], dtype=o.dtype), o.shape + o.shape[-1:]),
        lambda key, o, t, n: jax.random.normal(key, (n,) + o.shape, o.dtype)),
    "mse": _LossCurv(
        True, lambda o, t, v: 2 * v,
        lambda o, t: jnp.full(o.shape + (1,), math.sqrt(2.0), o.dtype),
        lambda key, o, t, n: math.sqrt(2.0) * jax.random.normal(key, (n,) + o.shape, o.dtype)),
    "softmax_cross_entropy": _LossCurv(False, _ce_hvp, _ce_sqrt, _ce_sample),
    "binary_cross_entropy": _LossCurv(
        True, lambda z, t, v: _sig_h(z) * v,
        lambda z, t: jnp.sqrt(_sig_h(z))[..., None],
        lambda key, z, t, n: jax.nn.sigmoid(z) - jax.random.bernoulli(
            key, jax.nn.sigmoid(z), (n,) + z.shape).astype(z.dtype)),
}


def _loss_curv(loss) -> _LossCurv:
    curv = _LOSSES.get(str(getattr(loss, "name", "")))
    if curv is None:
        raise ConfigError(f"no closed-form Hessian for the loss {loss!r}; curvature supports "
                          f"{', '.join(_LOSSES)}", ("curvature",))
    return curv


def _scale(loss, pred) -> float:
    return float(loss._scale(pred.shape))


def loss_hvp(loss, pred, target, v):
    """``H_L v``: the batch loss's Hessian with respect to ``pred`` times ``v`` (closed form,
    the reduction's ``1/N`` included); ``v`` and the result have ``pred``'s shape."""
    curv = _loss_curv(loss)
    pred, target = loss.check(loss.name, pred, target)
    return curv.hvp(pred, target, v) * jnp.asarray(_scale(loss, pred), pred.dtype)


def loss_sqrt(loss, pred, target):
    """The columns of ``S`` with ``H_L = S S^T`` (block-diagonal per example): ``(V,) +
    pred.shape``, one pseudo-delta per column, ``V`` = (positions per example) x (columns per
    term). An example's terms (its positions, or its elements for a per-element loss) get
    columns of their own, so per-example gradients of one column have no cross terms."""
    curv = _loss_curv(loss)
    pred, target = loss.check(loss.name, pred, target)
    if pred.ndim < 2:
        raise ShapeError(f"curvature needs a batch axis: the model output has shape "
                         f"{pred.shape}", (loss.name,))
    b = pred.shape[0]
    s = curv.sqrt(pred, target)                               # pred.shape + (C,)
    if curv.per_element:
        s = s.reshape(b, -1, 1, s.shape[-1])
    else:
        s = s.reshape(b, -1, pred.shape[-1], s.shape[-1])     # (B, P, u, C)
    p = s.shape[1]
    cols = jnp.einsum("bpuc,pq->qcbpu", s, jnp.eye(p, dtype=s.dtype))
    cols = cols.reshape((-1,) + pred.shape)
    return cols * jnp.asarray(math.sqrt(_scale(loss, pred)), pred.dtype)


def loss_samples(loss, pred, target, key, samples: int):
    """``samples`` pseudo-deltas ``(samples,) + pred.shape`` with ``E[sum_s d_s d_s^T] = H_L``
    (sampled targets; each scaled by ``sqrt(scale / samples)``)."""
    curv = _loss_curv(loss)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"samples must be a positive int, got {samples!r}", ("curvature",))
    if key is None:
        raise ConfigError("sampled targets need a PRNG key: pass key=jax.random.key(seed)",
                          ("curvature",))
    pred, target = loss.check(loss.name, pred, target)
    d = curv.sample(key, pred, target, samples)
    return d * jnp.asarray(math.sqrt(_scale(loss, pred) / samples), pred.dtype)


# --------------------------------------------------------------------------- the walk


def _check_model(model: Layer, what: str) -> None:
    if model.stateful:
        raise StateError(f"{what} has no rule for stateful layers (batch_norm in training mode "
                         f"mixes the examples of a batch); use layer_norm", (model.name,))


def _forward(model, train, params, x, key, context):
    check_context(model, context)
    return model.forward(params, x, key=key, train=train, **context)


def walk_leaves(model: Layer, params, res, dy, leaf: Callable):
    """Run ``leaf(layer, params, res, dy, path) -> (out, dx)`` at every leaf layer, last to
    first, composites routing it through their children (``Layer.walk``); ``path`` is the
    layer's params path (``"2.0"``; ``"<root>"`` for a model that is one layer). Returns
    ``(outs, dx)`` with ``outs`` laid out like the params, one entry per leaf layer."""

    def visit(layer, p, r, d, prefix):
        if layer.walk is not None:
            def step(child, dd):
                return visit(child.layer, child.params, child.res, dd, prefix + child.prefix)
            return layer.walk(p, r, d, step)
        return leaf(layer, p, r, d, prefix.rstrip(".") or "<root>")

    return visit(model, params, res, dy, "")


class _Pair(NamedTuple):
    total: Any
    sq: Any


def _per_example_rule(layer: Layer):
    if layer.per_example is None:
        raise ConfigError(f"layer {layer.name} has no per-example gradient rule (nor Kronecker "
                          f"factors); gradient statistics and the diagonal GGN need one in "
                          f"every layer", (layer.name,))
    return layer.per_example


def sum_sq_outer(a, d):
    """``sum_i (sum_t a_it^T d_it)^2`` elementwise: ``a (B, T, m)``, ``d (B, T, n)`` ->
    ``(m, n)``.

    Without positions (``T = 1``) no per-example gradient is formed: ``(a^2)^T (d^2)``. With
    positions each example's ``dW_i`` is needed; up to ``_SQ_BUDGET`` elements they are one
    einsum over the batch, past it a ``lax.scan`` over chunks of examples squares each chunk's
    into one ``(m, n)`` accumulator, so memory stays at a chunk whatever the batch.
    """
    b, t, m = a.shape
    n = d.shape[-1]
    if t == 1:
        return jnp.square(a[:, 0]).T @ jnp.square(d[:, 0])
    chunk = max(1, min(b, _SQ_BUDGET // (m * n)))
    if chunk >= b:
        return jnp.sum(jnp.square(jnp.einsum("btm,btn->bmn", a, d)), 0)
    pad = (-b) % chunk                      # zero examples add nothing
    a = jnp.pad(a, ((0, pad), (0, 0), (0, 0))).reshape(-1, chunk, t, m)
    d = jnp.pad(d, ((0, pad), (0, 0), (0, 0))).reshape(-1, chunk, t, n)

    def body(acc, ad):
        g = jnp.einsum("ctm,ctn->cmn", *ad)
        return acc + jnp.sum(g * g, 0), None

    acc, _ = lax.scan(body, jnp.zeros((m, n), jnp.result_type(a, d)), (a, d))
    return acc


def _sq_leaf(layer, params, res, dy, path):
    """``(sum_i g_i, sum_i g_i^2)`` per param leaf, and dx. Dense/conv: from the factors
    (:func:`sum_sq_outer`); others: the per-example rule."""
    if layer.factors is not None:
        a, d = layer.factors(params, res, dy)
        w = params["W"]
        sq_w = sum_sq_outer(a, d)
        out = {"W": _Pair(jnp.einsum("btm,btn->mn", a, d).reshape(w.shape).astype(w.dtype),
                          sq_w.reshape(w.shape).astype(w.dtype))}
        if "b" in params:
            gb = d.sum(1)
            out["b"] = _Pair(gb.sum(0).astype(params["b"].dtype),
                             jnp.sum(jnp.square(gb), 0).astype(params["b"].dtype))
        return out, layer.backward(params, res, dy)[1]
    g, dx = _per_example_rule(layer)(params, res, dy)
    return jax.tree_util.tree_map(lambda v: _Pair(v.sum(0), jnp.sum(jnp.square(v), 0)), g), dx


def _split(tree):
    def is_pair(v):
        return isinstance(v, _Pair)

    first = jax.tree_util.tree_map(lambda p: p.total, tree, is_leaf=is_pair)
    second = jax.tree_util.tree_map(lambda p: p.sq, tree, is_leaf=is_pair)
    return first, second


class BatchStats(NamedTuple):
    """Per-example gradient statistics, each (but ``values``) shaped like the params.

    ``values`` (B,): each example's loss; ``mean``: ``1/B sum_i g_i``; ``sum_sq``:
    ``sum_i g_i * g_i`` (elementwise); ``variance``: ``1/B sum_i (g_i - mean)^2``.
    """

    values: Any
    mean: Any
    sum_sq: Any
    variance: Any


def batch_stats(model: Layer, loss, *, train: bool = False):
    """``f(params, x, y, *, key=None, **context) -> BatchStats``: the mean, sum of squares and
    variance of the per-example gradients ``g_i`` (example ``i``'s loss as a one-example
    batch, as in :func:`funnn.manual.per_example_value_and_grad`), in one forward and one
    backward pass.

    Dense layers without positions never form ``g_i``: ``sum_i (x_i^T d_i)^2 = (x^2)^T
    (d^2)`` elementwise; dense layers over positions and convolutions form ``dW_i = sum_t
    a_it^T d_it`` from their factors (patches for a convolution) a bounded chunk of examples
    at a time (:func:`sum_sq_outer`); other layers use their per-example rules. ``variance =
    sum_sq / B - mean^2``.
    """
    _check_model(model, "batch_stats")

    def f(params, x, y, *, key=None, **context):
        out, res = _forward(model, train, params, x, key, context)
        values, delta = manual.per_example_loss(loss, out, y)
        pairs, _ = walk_leaves(model, params, res, delta, _sq_leaf)
        total, sq = _split(pairs)
        b = delta.shape[0]
        mean = jax.tree_util.tree_map(lambda t: t / b, total)
        var = jax.tree_util.tree_map(lambda s, m: s / b - m * m, sq, mean)
        return BatchStats(values, mean, sq, var)

    return f


# --------------------------------------------------------------------------- products


# first layers whose tangent rule takes dx=None as "no input tangent" and skips that term
_NO_DX = ("dense", "conv1d", "conv2d", "embedding")


def _input_tangent(model: Layer, x):
    """The input's tangent for ``J v`` (params only): ``None`` when the first layer (through
    ``serial``'s first children) skips a ``None`` term, saving a product with zeros that XLA
    does not fold (a convolution of zeros); zeros like ``x`` otherwise."""
    first = model
    while first.kind == "serial" and first.children:
        first = first.children[0][1]
    return None if first.kind in _NO_DX else manual._zero_tangent(x)


def _jv(model, params, res, v, x):
    return tangent(model)(params, res, v, _input_tangent(model, x))


def _backward(model, params, res, dy):
    grads, _ = model.backward(params, res, dy)
    return grads


def ggn_vp(model: Layer, loss, *, train: bool = False):
    """``f(params, x, y, v, *, key=None, **context) -> G v``, params-shaped, with ``G = J^T H_L
    J`` the generalised Gauss-Newton matrix of the batch loss: one forward, the hand-written
    tangent rules for ``J v`` (:func:`funnn.manual.jvp`), the loss's closed-form Hessian
    (module docstring), the hand-written backward for ``J^T``, all on the same residuals."""
    _check_model(model, "ggn_vp")
    _loss_curv(loss)
    tangent(model)

    def f(params, x, y, v, *, key=None, **context):
        out, res = _forward(model, train, params, x, key, context)
        jv = _jv(model, params, res, v, x)
        return _backward(model, params, res, loss_hvp(loss, out, y, jv))

    return f


def fisher_vp(model: Layer, loss, *, samples: int = 1, train: bool = False):
    """``f(params, x, y, v, *, key, **context) -> F v``: the Fisher with sampled targets,
    ``F = sum_s J^T d_s d_s^T J`` over ``samples`` draws (:func:`loss_samples`; ``E[F] =
    G``), each ``d_s d_s^T`` block-diagonal per loss term; one ``J v``, one backward."""
    _check_model(model, "fisher_vp")
    curv = _loss_curv(loss)
    tangent(model)

    def f(params, x, y, v, *, key=None, **context):
        out, res = _forward(model, train, params, x, key, context)
        jv = _jv(model, params, res, v, x)
        d = loss_samples(loss, out, y, key, samples)
        proj = d * jv if curv.per_element else jnp.sum(d * jv, -1, keepdims=True)
        return _backward(model, params, res, jnp.sum(d * proj, 0))

    return f


def hvp(model: Layer, loss, *, train: bool = False):
    """``f(params, x, y, v, *, key=None, **context) -> H v``, params-shaped: the full Hessian of
    the batch loss times ``v``, as ``jax.jvp`` of the hand-written gradient
    (:func:`funnn.manual.value_and_grad`: forward mode over the manual backward). The layers
    carry no second-order rules, so this one product uses autodiff over them; ``H v -
    ggn_vp`` is the curvature of the network itself."""
    _check_model(model, "hvp")
    vg = manual.value_and_grad(model, loss, train=train)

    def f(params, x, y, v, *, key=None, **context):
        return jax.jvp(lambda p: vg(p, x, y, key=key, **context)[1], (params,), (v,))[1]

    return f


# --------------------------------------------------------------------------- diagonals


class _Rows(NamedTuple):
    """A dense weight's squared-gradient factors for one column: the layer's input rows ``a
    (B, m)`` (the same for every column) and the column's deltas ``d (B, n)``."""
    a: Any
    d: Any


def _diag_leaf(layer, params, res, dy, path):
    """:func:`_sq_leaf`, but a dense layer without positions keeps its factors (``_Rows``) so
    that :func:`_diag` sums the squared deltas over the columns before the one product."""
    if layer.kind != "dense" or layer.factors is None:
        return _sq_leaf(layer, params, res, dy, path)
    a, d = layer.factors(params, res, dy)
    if a.shape[1] != 1:
        return _sq_leaf(layer, params, res, dy, path)
    out: dict = {"W": _Rows(a[:, 0], d[:, 0])}
    if "b" in params:
        out["b"] = jnp.sum(jnp.square(d[:, 0]), 0).astype(params["b"].dtype)
    return out, layer.backward(params, res, dy)[1]


def _diag(model, params, res, cols):
    """``sum_{i,c} (J_i^T s_ic)^2``: one backward per column (vectorised), squared per example;
    for a dense layer without positions ``sum_c (a^2)^T (d_c^2) = (a^2)^T (sum_c d_c^2)``,
    one product for all columns."""
    def is_rows(v):
        return isinstance(v, _Rows)

    def one(d):
        outs, _ = walk_leaves(model, params, res, d, _diag_leaf)
        return jax.tree_util.tree_map(lambda v: v if is_rows(v) else
                                      (v.sq if isinstance(v, _Pair) else v), outs,
                                      is_leaf=lambda v: is_rows(v) or isinstance(v, _Pair))

    def total(v):
        if is_rows(v):      # a: the same rows under every column (vmap broadcasts them)
            return jnp.square(v.a[0]).T @ jnp.sum(jnp.square(v.d), 0)
        return jnp.sum(v, 0)

    return jax.tree_util.tree_map(total, jax.vmap(one)(cols), is_leaf=is_rows)


def diag_ggn(model: Layer, loss, *, train: bool = False):
    """``f(params, x, y, *, key=None, **context) -> diag(G)``, params-shaped, exact: ``sum_{i,c}
    (J_i^T s_ic)^2`` over the columns of the loss Hessian's factor ``S`` (:func:`loss_sqrt`),
    each column pushed back through the hand-written backward (vectorised over the columns)
    and squared per example by the layers' factors or per-example rules, as in
    :func:`batch_stats`. Costs one backward per column (classes x positions)."""
    _check_model(model, "diag_ggn")
    _loss_curv(loss)

    def f(params, x, y, *, key=None, **context):
        out, res = _forward(model, train, params, x, key, context)
        return _diag(model, params, res, loss_sqrt(loss, out, y))

    return f


def diag_ggn_mc(model: Layer, loss, *, samples: int = 1, train: bool = False):
    """``f(params, x, y, *, key, **context) -> ~diag(G)``: :func:`diag_ggn` with ``samples``
    sampled pseudo-deltas (:func:`loss_samples`) in place of the factor's columns; unbiased,
    one backward per sample whatever the number of classes."""
    _check_model(model, "diag_ggn_mc")
    _loss_curv(loss)

    def f(params, x, y, *, key=None, **context):
        out, res = _forward(model, train, params, x, key, context)
        return _diag(model, params, res, loss_samples(loss, out, y, key, samples))

    return f


# --------------------------------------------------------------------------- Kronecker factors


def _kfac_leaf(layer, params, res, dy, path):
    dx = layer.backward(params, res, dy)[1]
    if layer.factors is None:
        return {}, dx
    a, d = layer.factors(params, res, dy)
    b, t = a.shape[0], a.shape[1]
    a2 = a.reshape(-1, a.shape[-1])
    aa = a2.T @ a2
    if "b" in params:           # [a, 1]^T [a, 1] by blocks, without copying the rows
        col = jnp.sum(a2, 0)[:, None]
        n = jnp.full((1, 1), a2.shape[0], aa.dtype)
        aa = jnp.block([[aa, col], [col.T, n]])
    d2 = d.reshape(-1, d.shape[-1])
    return {path: {"A": aa / b, "G": d2.T @ d2 / t}}, dx


def _merge(outs, into: dict) -> dict:
    """The leaves' ``{path: factors}`` dicts (``{}`` for layers without factors), nested in
    the composites' tuples, as one dict."""
    if isinstance(outs, dict):
        into.update(outs)
    elif isinstance(outs, (tuple, list)):
        for o in outs:
            _merge(o, into)
    return into


def kfac_factors(model: Layer, loss, *, convention: str = "kflr", samples: int = 1,
                 train: bool = False):
    """``f(params, x, y, *, key=None, **context) -> {path: {"A": A, "G": G}}`` for every dense
    and (ungrouped) convolution layer, keyed by its params path (``"0"``, ``"2.1"``).

    ``A = 1/B sum_{i,t} a_it a_it^T`` over the layer's input rows (dense) or patches
    (convolution), with a column of ones appended when the layer has a bias; ``G = 1/T
    sum_{i,t,v} d_itv d_itv^T`` over the output deltas of the loss Hessian's columns
    (``convention="kflr"``: exact, :func:`loss_sqrt`) or of ``samples`` sampled targets
    (``"kfac"``: Martens and Grosse's, :func:`loss_samples`; needs ``key``). ``T`` is the
    number of positions (1 for a dense layer on ``(B, in)``; convolutions: KFC, Grosse and
    Martens 2016, spatial homogeneity). Then ``kron(A, G)`` approximates the GGN block of the
    layer's ``[W; b]`` (``W`` flattened row-major as ``(in, out)``, ``b`` as its last row),
    exactly for a single example without positions. Layers with params but no factors
    (layer_norm, embedding, ...) are left out; :func:`factor_conventions` lists the layers
    and names each one's convention.
    """
    _check_model(model, "kfac_factors")
    _loss_curv(loss)
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {', '.join(map(repr, CONVENTIONS))}, got "
                          f"{convention!r}", ("kfac_factors",))

    def f(params, x, y, *, key=None, **context):
        out, res = _forward(model, train, params, x, key, context)
        cols = (loss_sqrt(loss, out, y) if convention == "kflr"
                else loss_samples(loss, out, y, key, samples))
        outs = jax.vmap(lambda d: _merge(walk_leaves(model, params, res, d, _kfac_leaf)[0],
                                         {}))(cols)
        return {p: {"A": v["A"][0], "G": jnp.sum(v["G"], 0)} for p, v in outs.items()}

    return f


def factor_conventions(model: Layer, convention: str = "kflr") -> dict:
    """``{path: name}``: the layers :func:`kfac_factors` returns factors for, each with the
    convention its factors follow: ``"kflr"`` or ``"kfac"`` for dense layers (Martens and
    Grosse 2015; over positions ``G`` is divided by their number, as for convolutions), and
    ``"kflr/kfc"`` or ``"kfac/kfc"`` for convolutions (Grosse and Martens 2016). Read from the
    model alone (no params, nothing traced)."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {', '.join(map(repr, CONVENTIONS))}, got "
                          f"{convention!r}", ("factor_conventions",))
    found: dict = {}

    def visit(layer, prefix):
        if layer.walk is None:
            if layer.factors is not None:
                conv = layer.kind.startswith("conv")
                found[prefix.rstrip(".") or "<root>"] = convention + ("/kfc" if conv else "")
            return
        for label, child in layer.children:
            visit(child, prefix + (label.strip("[]") + "." if label.startswith("[") else ""))

    visit(model, "")
    return found

