"""Second-order optimizers as optax transformations: K-FAC and a diagonal-GGN preconditioner.

Curvature needs the batch, which an optax update does not see; these are
``optax.GradientTransformationExtraArgs`` whose ``update`` takes it as extra args::

    updates, state = opt.update(grads, state, params, x=x, y=y)      # context={...} optional

``fit`` and :func:`funnn.train.make_step` pass ``x``, ``y`` and the model's side inputs
(``context``) to every ``GradientTransformationExtraArgs`` (optax's ``chain`` hands extra
args to each member, and members that take none ignore them), so these compose with optax
like any other transformation.

* :func:`scale_by_kfac`: K-FAC's preconditioner (Martens and Grosse 2015; KFC for
  convolutions, Grosse and Martens 2016). Per dense and convolution layer the Kronecker
  factors ``A``, ``G`` of :func:`funnn.curvature.kfac_factors` (sampled Fisher ``"kfac"`` or
  exact ``"kflr"``), exponential moving averages of them, and damped inverses refreshed every
  ``inverse_every`` steps (``count % inverse_every == 0``, under ``lax.cond``). The layer's
  gradient ``V = [dW; db]`` (``W`` as ``(in, out)``, patches for a convolution, the bias as a
  last row) becomes ``(A + a I)^-1 V (G + g I)^-1``, the inverse of ``kron(A + a I, G + g I)``
  applied to it. Factored Tikhonov damping (``pi_damping=True``, sec. 6.3 of the paper):
  ``a = pi sqrt(damping)``, ``g = sqrt(damping) / pi``, ``pi = sqrt((tr A / dim A) / (tr G /
  dim G))``; without it ``a = g = sqrt(damping)``. Inverses by Cholesky.
* :func:`scale_by_diag_ggn`: ``grad / (diag G + damping)``, with the exact diagonal of the
  GGN (:func:`funnn.curvature.diag_ggn`) or a sampled one, and an optional moving average.
* :func:`with_quadratic_model`: the learning-rate and momentum adaptation of sec. 7 of the
  K-FAC paper around any preconditioner ``P``: the step is ``alpha Delta + mu delta_prev``
  with ``Delta = -P g``, ``alpha`` and ``mu`` minimising the quadratic model ``M(d) = g^T d +
  1/2 d^T (G + damping I) d`` on the batch, ``G d`` by :func:`funnn.curvature.ggn_vp` (two
  products, one forward). With no previous step (the first), ``mu = 0``.
* :func:`kfac` and :func:`diag_ggn`: full optimizers (the preconditioner, then the adapted
  step times a learning rate, 1 by default; or with ``adapt=False`` momentum and a learning
  rate), what ``fit(optimizer="kfac")`` and ``funnn train --optimizer kfac`` build.

Layers with parameters but no Kronecker factors (layer norm, embeddings, recurrent and
attention layers) are refused by K-FAC with a :class:`~funnn.core.ConfigError` naming the
layer, unless ``fallback="gradient"``: their gradients then pass through unpreconditioned
(the same learning rate and momentum as the rest). Curvature runs in evaluation mode
(``train=False``: dropout off); stateful models (batch-norm) are refused
(:class:`~funnn.core.StateError`). Sampled quantities draw from ``fold_in(key(seed),
count)``, so a resumed run samples as the uninterrupted one did.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from funnn import curvature
from funnn.core import ConfigError, Layer
from funnn.trees import path_str, tree_paths

__all__ = ["KFACState", "DiagGGNState", "QuadraticModelState", "scale_by_kfac",
           "scale_by_diag_ggn", "with_quadratic_model", "kfac", "diag_ggn", "damped_inverses",
           "quadratic_coefficients", "FALLBACKS"]

FALLBACKS = ("error", "gradient")


class KFACState(NamedTuple):
    """``count``: steps taken; ``factors``: ``{path: {"A", "G"}}``, moving averages;
    ``inverses``: ``{path: {"A", "G"}}``, the damped factors' inverses as of the last refresh."""

    count: Any
    factors: Any
    inverses: Any


class DiagGGNState(NamedTuple):
    """``count``: steps taken; ``diag``: the (averaged) GGN diagonal, params-shaped."""

    count: Any
    diag: Any


class QuadraticModelState(NamedTuple):
    """``inner``: the preconditioner's state; ``previous``: the last step taken (params-shaped);
    ``alpha``, ``mu``: the coefficients of the last step, for inspection."""

    inner: Any
    previous: Any
    alpha: Any
    mu: Any


# --------------------------------------------------------------------------- checks


def _positive(name: str, value, what: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0 and \
        value < float("inf")
    if not ok:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}", (what,))
    return float(value)


def _check(what: str, *, decay, inverse_every=1, fallback="error") -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ConfigError(f"decay must be a number in [0, 1), got {decay!r}", (what,))
    if isinstance(inverse_every, bool) or not isinstance(inverse_every, int) or \
            inverse_every < 1:
        raise ConfigError(f"inverse_every must be a positive int, got {inverse_every!r}",
                          (what,))
    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback must be one of {', '.join(map(repr, FALLBACKS))}, got "
                          f"{fallback!r}", (what,))


def _batch(what: str, x, y, context) -> dict:
    if x is None or y is None:
        raise ConfigError(f"{what} needs the batch: call update(grads, state, params, x=x, y=y)"
                          f" (fit and make_step pass it)", (what,))
    return dict(context or {})


def _leaf_layers(model: Layer) -> dict:
    """``{path: layer}`` of the leaf layers, paths as :func:`funnn.curvature.kfac_factors`'."""
    found: dict = {}

    def visit(layer, prefix):
        if layer.walk is None:
            found[prefix.rstrip(".") or "<root>"] = layer
            return
        for label, child in layer.children:
            visit(child, prefix + (label.strip("[]") + "." if label.startswith("[") else ""))

    visit(model, "")
    return found


def _owner(leaf_path: str, layers: dict) -> str:
    """The path of the leaf layer a params leaf belongs to (the longest prefix)."""
    if "<root>" in layers:
        return "<root>"
    best = ""
    for p in layers:
        if leaf_path.startswith(p + ".") and len(p) > len(best):
            best = p
    return best or leaf_path


def _leaf_key(path: str, name: str) -> str:
    return name if path == "<root>" else f"{path}.{name}"


def _coverage(model: Layer, params, fallback: str) -> dict:
    """``{path: (W leaf path, b leaf path or None)}`` of the layers K-FAC preconditions; the
    params leaves of other layers raise (``fallback="error"``) or pass through."""
    layers = _leaf_layers(model)
    covered = {p: l for p, l in layers.items() if l.factors is not None}
    leaves = {p for p, _ in tree_paths(params)}
    out = {}
    for p in covered:
        w, b = _leaf_key(p, "W"), _leaf_key(p, "b")
        if w in leaves:
            out[p] = (w, b if b in leaves else None)
    if fallback == "error":
        claimed = {k for pair in out.values() for k in pair if k is not None}
        for leaf in sorted(leaves - claimed):
            owner = _owner(leaf, layers)
            name = layers[owner].name if owner in layers else "?"
            raise ConfigError(f"K-FAC has no Kronecker factors for layer {owner} ({name}), "
                              f"whose params include {leaf}: only dense and convolution "
                              f"layers have them; pass fallback='gradient' to step such "
                              f"layers by their plain gradient", ("kfac",))
    return out


# --------------------------------------------------------------------------- K-FAC


def _spd_inverse(m):
    """The inverse of a symmetric positive definite matrix, by Cholesky."""
    c = jax.scipy.linalg.cho_factor(m)
    return jax.scipy.linalg.cho_solve(c, jnp.eye(m.shape[0], dtype=m.dtype))


def damped_inverses(factors: dict, damping: float, pi_damping: bool = True) -> dict:
    """``{path: {"A": (A + a I)^-1, "G": (G + g I)^-1}}`` with the factored damping of the
    module docstring (``a = g = sqrt(damping)`` without ``pi_damping``)."""
    out = {}
    for p, f in factors.items():
        a, g = f["A"], f["G"]
        root = jnp.sqrt(jnp.asarray(damping, a.dtype))
        pi = jnp.ones((), a.dtype)
        if pi_damping:
            ta, tg = jnp.trace(a) / a.shape[0], jnp.trace(g) / g.shape[0]
            ok = (ta > 0) & (tg > 0)
            pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / jnp.where(ok, tg, 1), 1)), 1)
        out[p] = {"A": _spd_inverse(a + pi * root * jnp.eye(a.shape[0], dtype=a.dtype)),
                  "G": _spd_inverse(g + root / pi * jnp.eye(g.shape[0], dtype=g.dtype))}
    return out


def _precondition(flat: dict, layers: dict, inverses: dict) -> dict:
    """``flat`` (``{leaf path: gradient}``) with each covered layer's ``[dW; db]`` replaced by
    ``A^-1 [dW; db] G^-1``."""
    out = dict(flat)
    for p, (wk, bk) in layers.items():
        w = flat[wk]
        n = w.shape[-1]
        v = w.reshape(-1, n)
        m = v.shape[0]
        if bk is not None:
            v = jnp.concatenate([v, flat[bk].reshape(1, n)], axis=0)
        inv = inverses[p]
        u = inv["A"].astype(v.dtype) @ v @ inv["G"].astype(v.dtype)
        out[wk] = u[:m].reshape(w.shape)
        if bk is not None:
            out[bk] = u[m]
    return out


def _as_flat(tree) -> tuple[dict, Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): v for p, v in leaves}, treedef


def _from_flat(flat: dict, like_tree, treedef):
    leaves, _ = jax.tree_util.tree_flatten_with_path(like_tree)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in leaves])


def _average(old, new, count, decay):
    """``decay old + (1 - decay) new``, or ``new`` at the first step."""
    w = jnp.where(count == 0, 0.0, decay)
    return jax.tree_util.tree_map(lambda o, n: (w * o + (1 - w) * n).astype(o.dtype), old, new)


def _sample_key(seed: int, count):
    return jax.random.fold_in(jax.random.key(seed), count)


def scale_by_kfac(model: Layer, loss, *, damping: float = 1e-3, decay: float = 0.95,
                  inverse_every: int = 10, convention: str = "kfac", samples: int = 1,
                  pi_damping: bool = True, fallback: str = "error",
                  seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """K-FAC's preconditioner: ``update(grads, state, params, *, x, y, context=None)`` returns
    the gradients with every dense and convolution layer's ``[dW; db]`` replaced by ``(A + a
    I)^-1 [dW; db] (G + g I)^-1`` (module docstring), a :class:`KFACState` carrying the
    factors' moving averages (``decay``) and inverses refreshed every ``inverse_every`` steps.

    ``convention``: ``"kfac"`` (``samples`` sampled targets, the Fisher) or ``"kflr"`` (the
    exact GGN's factors, one backward per class). ``fallback``: ``"error"`` refuses a layer
    with params but no factors, ``"gradient"`` passes its gradient through.
    """
    what = "scale_by_kfac"
    damping = _positive("damping", damping, what)
    _check(what, decay=decay, inverse_every=inverse_every, fallback=fallback)
    factors_of = curvature.kfac_factors(model, loss, convention=convention, samples=samples)

    def init(params):
        layers = _coverage(model, params, fallback)
        flat, _ = _as_flat(params)
        facs = {}
        for p, (wk, bk) in layers.items():
            w = flat[wk]
            m = w.size // w.shape[-1] + (bk is not None)
            dt = w.dtype
            facs[p] = {"A": jnp.zeros((m, m), dt), "G": jnp.zeros((w.shape[-1],) * 2, dt)}
        eye = {p: {k: jnp.eye(v.shape[0], dtype=v.dtype) for k, v in f.items()}
               for p, f in facs.items()}
        return KFACState(jnp.zeros((), jnp.int32), facs, eye)

    def update(grads, state, params=None, *, x=None, y=None, context=None, **extra):
        del extra
        context = _batch("kfac", x, y, context)
        if params is None:
            raise ConfigError("kfac needs params in update(grads, state, params, ...)", (what,))
        layers = _coverage(model, params, fallback)
        fresh = factors_of(params, x, y, key=_sample_key(seed, state.count), **context)
        fresh = {p: {k: v.astype(state.factors[p][k].dtype) for k, v in fresh[p].items()}
                 for p in state.factors}
        factors = _average(state.factors, fresh, state.count, decay)
        inverses = lax.cond(state.count % inverse_every == 0,
                            lambda f: damped_inverses(f, damping, pi_damping),
                            lambda f: state.inverses, factors)
        flat, treedef = _as_flat(grads)
        out = _precondition(flat, layers, inverses)
        return (_from_flat(out, grads, treedef),
                KFACState(state.count + 1, factors, inverses))

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------- diagonal GGN


def scale_by_diag_ggn(model: Layer, loss, *, damping: float = 1e-3, decay: float = 0.0,
                      samples: int | None = None,
                      seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """``update(grads, state, params, *, x, y, context=None)`` -> ``grads / (D + damping)``,
    ``D`` the GGN diagonal on the batch: exact (:func:`funnn.curvature.diag_ggn`, one
    backward per class) or, with ``samples``, from sampled targets
    (:func:`~funnn.curvature.diag_ggn_mc`); averaged over steps with ``decay`` (0: this
    batch's alone). Every layer needs a per-example rule or Kronecker factors."""
    what = "scale_by_diag_ggn"
    damping = _positive("damping", damping, what)
    _check(what, decay=decay)
    exact = samples is None
    diag_of = curvature.diag_ggn(model, loss) if samples is None else \
        curvature.diag_ggn_mc(model, loss, samples=samples)

    def init(params):
        return DiagGGNState(jnp.zeros((), jnp.int32),
                            jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None, *, x=None, y=None, context=None, **extra):
        del extra
        context = _batch("diag_ggn", x, y, context)
        key = None if exact else _sample_key(seed, state.count)
        diag = _average(state.diag, diag_of(params, x, y, key=key, **context), state.count,
                        decay)
        out = jax.tree_util.tree_map(lambda g, d: g / (d + damping).astype(g.dtype), grads,
                                     diag)
        return out, DiagGGNState(state.count + 1, diag)

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------- adaptation


def _vdot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree_util.tree_leaves(a),
                                              jax.tree_util.tree_leaves(b)))


def quadratic_coefficients(g, delta, previous, c_delta, c_previous):
    """``(alpha, mu)`` minimising ``M(alpha delta + mu previous)`` for ``M(d) = g^T d + 1/2 d^T
    C d``, given ``C delta`` and ``C previous`` (the 2x2 system of sec. 7 of the K-FAC paper);
    ``mu = 0`` and ``alpha = -g^T delta / delta^T C delta`` when ``previous`` is zero or the
    system is singular."""
    m11, m12, m22 = _vdot(delta, c_delta), _vdot(delta, c_previous), _vdot(previous, c_previous)
    b1, b2 = _vdot(g, delta), _vdot(g, previous)
    det = m11 * m22 - m12 * m12
    one = (m22 <= 0) | (det <= 1e-12 * jnp.abs(m11 * m22))
    safe = jnp.where(one, 1.0, det)
    alpha = jnp.where(one, -b1 / jnp.where(m11 > 0, m11, 1.0), (-b1 * m22 + b2 * m12) / safe)
    mu = jnp.where(one, 0.0, (-b2 * m11 + b1 * m12) / safe)
    return alpha, mu


def with_quadratic_model(precondition: optax.GradientTransformationExtraArgs, model: Layer,
                         loss, *, damping: float = 1e-3) -> optax.GradientTransformationExtraArgs:
    """The learning-rate and momentum adaptation of Martens and Grosse (2015, sec. 7) around a
    preconditioner (module docstring): the returned update is the step itself (``params +
    update``), ``alpha Delta + mu previous`` with ``Delta = -precondition(g)``.
    ``G v`` by :func:`funnn.curvature.ggn_vp` on the batch, damped by ``damping``."""
    damping = _positive("damping", damping, "with_quadratic_model")
    gvp = curvature.ggn_vp(model, loss)

    def init(params):
        dt = jnp.result_type(*jax.tree_util.tree_leaves(params))
        return QuadraticModelState(precondition.init(params),
                                   jax.tree_util.tree_map(jnp.zeros_like, params),
                                   jnp.zeros((), dt), jnp.zeros((), dt))

    def update(grads, state, params=None, *, x=None, y=None, context=None, **extra):
        context = _batch("with_quadratic_model", x, y, context)
        p, inner = precondition.update(grads, state.inner, params, x=x, y=y, context=context,
                                       **extra)
        delta = jax.tree_util.tree_map(jnp.negative, p)
        both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), delta, state.previous)
        cv = jax.vmap(lambda v: gvp(params, x, y, v, **context))(both)
        cv = jax.tree_util.tree_map(lambda c, v: c + damping * v, cv, both)
        c_delta = jax.tree_util.tree_map(lambda c: c[0], cv)
        c_prev = jax.tree_util.tree_map(lambda c: c[1], cv)
        alpha, mu = quadratic_coefficients(grads, delta, state.previous, c_delta, c_prev)
        step = jax.tree_util.tree_map(lambda d, q: (alpha * d + mu * q).astype(d.dtype), delta,
                                      state.previous)
        return step, QuadraticModelState(inner, step, alpha.astype(state.alpha.dtype),
                                         mu.astype(state.mu.dtype))

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------- optimizers


def _finish(precondition, model, loss, learning_rate, momentum, adapt, damping):
    if not callable(learning_rate):
        _positive("learning_rate", learning_rate, "kfac")
    if adapt:
        return optax.chain(with_quadratic_model(precondition, model, loss, damping=damping),
                           optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or \
            not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be a number in [0, 1), got {momentum!r}", ("kfac",))
    parts = [precondition]
    if momentum:
        parts.append(optax.trace(decay=momentum))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def kfac(model: Layer, loss, learning_rate=1.0, *, adapt: bool = True,
         momentum: float = 0.9, damping: float = 0.1, decay: float = 0.95,
         inverse_every: int = 10, convention: str = "kfac", samples: int = 1,
         pi_damping: bool = True, fallback: str = "error",
         seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """K-FAC: :func:`scale_by_kfac`, then the step of :func:`with_quadratic_model` (the
    paper's rate and momentum, chosen every step) times ``learning_rate`` (a number or an
    optax schedule; 1 is the paper's rule). With ``adapt=False``: heavy-ball ``momentum``
    over the preconditioned gradients, times ``learning_rate`` (pick one: about 0.3 without
    momentum on the digits MLP). ``update`` needs the batch (``x=``, ``y=``; ``fit`` passes
    it). The state is optax's ``chain`` of the pieces' states."""
    pre = scale_by_kfac(model, loss, damping=damping, decay=decay, inverse_every=inverse_every,
                        convention=convention, samples=samples, pi_damping=pi_damping,
                        fallback=fallback, seed=seed)
    return _finish(pre, model, loss, learning_rate, momentum, adapt, damping)


def diag_ggn(model: Layer, loss, learning_rate=1.0, *, adapt: bool = True,
             momentum: float = 0.9, damping: float = 0.1, decay: float = 0.95,
             samples: int | None = None, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """The diagonal-GGN preconditioner (:func:`scale_by_diag_ggn`), then the adapted step
    times ``learning_rate``, or with ``adapt=False`` heavy-ball ``momentum`` and
    ``learning_rate``, as for :func:`kfac`."""
    pre = scale_by_diag_ggn(model, loss, damping=damping, decay=decay, samples=samples,
                            seed=seed)
    return _finish(pre, model, loss, learning_rate, momentum, adapt, damping)
