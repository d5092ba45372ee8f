"""Laplace posteriors over a trained classifier (MacKay 1992; Daxberger et al., "Laplace
Redux", 2021): a Gaussian around the trained weights whose precision is the data's curvature
plus a prior's, and the predictive probabilities it gives.

With ``theta*`` the trained params (of the chosen ``subset``: the last layer with params, or
all of them), ``H`` the Gauss-Newton matrix of the summed negative log-likelihood over the
fitting data (:mod:`funnn.curvature`: the hand-written rules) and ``delta`` the prior
precision (prior ``N(0, I / delta)``)::

    p(theta | D) ~ N(theta*, (H + delta I)^-1)

``structure="diag"`` keeps ``diag H`` (:func:`~funnn.curvature.diag_ggn`, exact);
``"kfac"`` keeps per dense or convolution layer ``H ~ kron(A, G)`` over its ``[W; b]``
(:func:`~funnn.curvature.kfac_factors`, the exact-column ``"kflr"`` convention; over the
batches of the data ``A`` is the mean of the inputs' second moments and ``G`` the sum of the
deltas'), held as the eigendecompositions ``A = Q_A diag(a) Q_A^T``, ``G = Q_G diag(g)
Q_G^T``, so ``(kron(A, G) + delta I)^-1 = kron(Q_A, Q_G) diag(1 / (a_i g_j + delta))
kron(Q_A, Q_G)^T``.

Prior precision. Left as ``None`` it maximises the Laplace approximation of the log marginal
likelihood (the evidence; Immer et al. 2021) over ``delta``, with ``e`` the eigenvalues of
``H`` (the diagonal, or the products ``a_i g_j``), ``P`` their number and ``m = ||theta*||^2``::

    log p(D | delta) ~ -NLL(theta*) - delta m / 2 + P/2 log delta - 1/2 sum_k log(e_k + delta)

Its derivative ``-m/2 + 1/2 sum_k e_k / (delta (e_k + delta))`` falls strictly in ``delta``
(the evidence is concave in ``delta``), so the one maximiser is found by bisection on ``log
delta``; it is MacKay's fixed point ``delta = gamma / m`` with ``gamma = sum_k e_k / (e_k +
delta)`` the number of well-determined parameters.

Predictive (the linearised network, "GLM predictive"): ``f(x) ~ N(f*(x), J Sigma J^T)`` with
``J`` the Jacobian of the logits with respect to the subset's params (per example, from the
hand-written backward, one class at a time). ``method="probit"`` gives ``softmax(f* /
sqrt(1 + pi/8 diag(J Sigma J^T)))`` (MacKay's probit approximation, in closed form);
``"samples"`` averages ``softmax`` over ``samples`` draws of the logits. Only the softmax
cross-entropy (classification) is supported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from funnn import curvature, losses
from funnn.core import ConfigError, Layer

__all__ = ["SUBSETS", "STRUCTURES", "METHODS", "KronEig", "Posterior", "laplace",
           "log_marginal_likelihood", "optimal_prior_precision", "logit_moments",
           "predictive", "sample"]

SUBSETS = ("last_layer", "all")
STRUCTURES = ("diag", "kfac")
METHODS = ("probit", "samples")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["qa", "a", "qg", "g"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KronEig:
    """One layer's ``kron(A, G)`` as eigendecompositions: ``A = qa diag(a) qa^T`` over the
    layer's inputs (with the bias row last), ``G = qg diag(g) qg^T`` over its outputs."""

    qa: Any
    a: Any
    qg: Any
    g: Any


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["params", "curvature", "prior_precision", "nll"],
                   meta_fields=["model", "subset", "structure", "paths", "num_data"])
@dataclasses.dataclass(frozen=True)
class Posterior:
    """A fitted Laplace posterior (a pytree: it passes into ``jax.jit``).

    ``params``: the trained params ``theta*`` (all of them; only ``paths``' are random);
    ``curvature``: ``{path: H's diagonal as the layer's params}`` (``"diag"``) or ``{path:
    KronEig}`` (``"kfac"``), the data's curvature without the prior; ``prior_precision``:
    ``delta``; ``nll``: the summed negative log-likelihood of the fitting data at
    ``theta*``; ``paths``: the layers' params paths (as :func:`~funnn.curvature.kfac_factors`
    names them); ``num_data``: the number of fitting examples.
    """

    params: Any
    curvature: dict
    prior_precision: Any
    nll: Any
    model: Layer
    subset: str
    structure: str
    paths: tuple
    num_data: int

    @property
    def log_marginal(self):
        """The log marginal likelihood at this posterior's prior precision."""
        return log_marginal_likelihood(self, self.prior_precision)

    def predictive(self, x, *, method: str = "probit", key=None, samples: int = 100,
                   batch_size: int = 256):
        """:func:`predictive` of this posterior."""
        return predictive(self, x, method=method, key=key, samples=samples,
                          batch_size=batch_size)


# --------------------------------------------------------------------------- layers and paths


def _at(params, path: str):
    """The layer's params at ``path`` (``"2.0"``; ``"<root>"`` is all of them)."""
    if path == "<root>":
        return params
    for part in path.split("."):
        params = params[part] if isinstance(params, dict) else params[int(part)]
    return params


def _replace_at(params, path: str, value):
    if path == "<root>":
        return value
    head, _, rest = path.partition(".")
    if isinstance(params, dict):
        return {**params, head: _replace_at(params[head], rest or "<root>", value)}
    i = int(head)
    return params[:i] + (_replace_at(params[i], rest or "<root>", value),) + params[i + 1:]


def _leaf_paths(model: Layer, params) -> list:
    """Params paths of the leaf layers that hold params, in the model's order."""
    found: list = []

    def visit(layer, prefix):
        if layer.walk is None:
            path = prefix.rstrip(".") or "<root>"
            if jax.tree_util.tree_leaves(_at(params, path)):
                found.append(path)
            return
        for label, child in layer.children:
            visit(child, prefix + (label.strip("[]") + "." if label.startswith("[") else ""))

    visit(model, "")
    return found


def _paths(model: Layer, params, subset: str, structure: str) -> tuple:
    held = _leaf_paths(model, params)
    if not held:
        raise ConfigError(f"model {model.name} has no params to put a posterior on",
                          ("laplace",))
    chosen = held[-1:] if subset == "last_layer" else held
    if structure == "kfac":
        kron = curvature.factor_conventions(model)
        missing = [p for p in chosen if p not in kron]
        if missing:
            raise ConfigError(f"structure='kfac' needs Kronecker factors (dense or convolution "
                              f"layers); the layers at params paths {', '.join(missing)} have "
                              f"none: use structure='diag'", ("laplace",))
    return tuple(chosen)


def _wb(layer_params):
    """A dense or convolution layer's ``[W; b]`` as one ``(in (+1), out)`` matrix."""
    w = layer_params["W"]
    w2 = w.reshape(-1, w.shape[-1])
    if "b" in layer_params:
        w2 = jnp.concatenate([w2, layer_params["b"][None]], 0)
    return w2


def _unwb(like, wb):
    w = like["W"]
    n = math.prod(w.shape[:-1])
    out = {"W": wb[:n].reshape(w.shape)}
    if "b" in like:
        out["b"] = wb[n]
    return out


# --------------------------------------------------------------------------- fitting


def _check_args(loss, subset, structure):
    loss = losses.get(loss) if isinstance(loss, str) else loss
    if getattr(loss, "name", None) != "softmax_cross_entropy":
        raise ConfigError(f"laplace supports the softmax cross-entropy (classification); got "
                          f"{loss!r}", ("laplace",))
    if subset not in SUBSETS:
        raise ConfigError(f"subset must be one of {', '.join(map(repr, SUBSETS))}, got "
                          f"{subset!r}", ("laplace",))
    if structure not in STRUCTURES:
        raise ConfigError(f"structure must be one of {', '.join(map(repr, STRUCTURES))}, got "
                          f"{structure!r}", ("laplace",))
    return loss.with_reduction("sum")


def _batches(n: int, batch_size: int):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}",
                          ("laplace",))
    return [(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


@functools.lru_cache(maxsize=32)
def _batch_curvature(model: Layer, loss, structure: str):
    """A jitted ``f(params, x, y) -> (curvature, summed NLL)`` for one batch: the diagonal
    GGN as the params, or ``{path: {"A": A * batch, "G": G}}``; cached per model, so refits,
    other subsets and equal batches reuse one compile."""
    if structure == "diag":
        rule = curvature.diag_ggn(model, loss)
    else:
        rule = curvature.kfac_factors(model, loss, convention="kflr")

    def f(params, x, y):
        c = rule(params, x, y)
        if structure == "kfac":
            c = {p: {"A": v["A"] * x.shape[0], "G": v["G"]} for p, v in c.items()}
        return c, loss.value(model.apply(params, x), y)

    return jax.jit(f)


def _accumulate(model, loss, params, x, y, structure, paths, batch_size):
    """``(curvature by path, summed NLL)`` over the data, a batch at a time."""
    step = _batch_curvature(model, loss, structure)
    total: Any = None
    nll: Any = 0.0
    for lo, hi in _batches(x.shape[0], batch_size):
        c, value = step(params, x[lo:hi], y[lo:hi])
        c = {p: _at(c, p) if structure == "diag" else c[p] for p in paths}
        total = c if total is None else jax.tree.map(jnp.add, total, c)
        nll = nll + value
    if structure == "kfac":
        total = {p: _eig(v["A"] / x.shape[0], v["G"]) for p, v in total.items()}
    return total, nll


def _positive(value) -> float:
    try:
        ok = not isinstance(value, bool) and float(value) > 0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"prior_precision must be a positive number or None, got {value!r}",
                          ("laplace",))
    return float(value)


def _eig(a, g):
    la, qa = jnp.linalg.eigh(a)
    lg, qg = jnp.linalg.eigh(g)
    return KronEig(qa, jnp.maximum(la, 0.0), qg, jnp.maximum(lg, 0.0))


def laplace(model: Layer, loss, params, data, *, subset: str = "last_layer",
            structure: str = "diag", prior_precision=None, batch_size: int = 256) -> Posterior:
    """Fit a Laplace posterior around the trained ``params`` of ``model`` (module docstring).

    ``loss``: the softmax cross-entropy the model was trained with (its reduction does not
    matter: the posterior uses the data's sum). ``data``: ``(x, y)``, the training set,
    passed ``batch_size`` examples at a time. ``subset``: ``"last_layer"`` (the last layer
    that holds params) or ``"all"``; ``structure``: ``"diag"`` or ``"kfac"`` (dense and
    convolution layers only). ``prior_precision``: a positive number, or ``None`` to choose
    it by maximising the log marginal likelihood (:func:`optimal_prior_precision`).
    """
    loss = _check_args(loss, subset, structure)
    x, y = data
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"data must be (x, y) with the same, non-zero number of examples; "
                          f"got {x.shape[0]} and {y.shape[0]}", ("laplace",))
    given = None if prior_precision is None else _positive(prior_precision)
    paths = _paths(model, params, subset, structure)
    curv, nll = _accumulate(model, loss, params, x, y, structure, paths, batch_size)
    post = Posterior(params, curv, jnp.asarray(1.0, nll.dtype), nll, model, subset, structure,
                     paths, int(x.shape[0]))
    delta = optimal_prior_precision(post) if given is None else jnp.asarray(given, nll.dtype)
    return dataclasses.replace(post, prior_precision=delta)


# --------------------------------------------------------------------------- the evidence


def _eigenvalues(post: Posterior):
    """``H``'s eigenvalues over the subset, one flat array."""
    if post.structure == "diag":
        return jnp.concatenate([v.ravel() for v in jax.tree.leaves(post.curvature)])
    return jnp.concatenate([jnp.outer(k.a, k.g).ravel() for k in post.curvature.values()])


def _sq_norm(post: Posterior):
    leaves = jax.tree.leaves([_at(post.params, p) for p in post.paths])
    return sum(jnp.sum(jnp.square(v)) for v in leaves)


def log_marginal_likelihood(post: Posterior, prior_precision):
    """``-NLL - delta m/2 + P/2 log delta - 1/2 sum_k log(e_k + delta)`` (module docstring)
    at ``prior_precision`` (a scalar, or an array of them: one value each)."""
    e = _eigenvalues(post)
    delta = jnp.asarray(prior_precision, e.dtype)
    logdet = jnp.sum(jnp.log(e + delta[..., None]), -1)
    return (-post.nll - delta * _sq_norm(post) / 2 + e.size / 2 * jnp.log(delta)
            - logdet / 2)


def optimal_prior_precision(post: Posterior, *, lo: float = 1e-8, hi: float = 1e8):
    """The ``delta`` in ``[lo, hi]`` maximising :func:`log_marginal_likelihood`: bisection on
    ``log delta`` of its derivative ``-m/2 + 1/2 sum_k e_k / (delta (e_k + delta))``, which
    falls strictly (100 halvings: to about 1e-28 in ``log delta``); an end of the interval
    when the maximum lies past it."""
    e = _eigenvalues(post)
    m = _sq_norm(post)

    def slope(log_d):
        d = jnp.exp(log_d)
        return jnp.sum(e / (d * (e + d))) - m

    def halve(_, ab):
        a, b = ab
        mid = (a + b) / 2
        up = slope(mid) > 0
        return jnp.where(up, mid, a), jnp.where(up, b, mid)

    a, b = jax.lax.fori_loop(0, 100, halve, (jnp.log(jnp.asarray(lo, e.dtype)),
                                              jnp.log(jnp.asarray(hi, e.dtype))))
    return jnp.exp((a + b) / 2)


# --------------------------------------------------------------------------- the predictive


def _jacobians(model, params, x, paths):
    """``(logits (B, C), {path: J})``, ``J`` the logits' Jacobian with respect to the layer's
    params, laid out as the layer's params with leading ``(B, C)``: one forward per example,
    one hand-written backward per class."""

    def one(xi):
        out, res = model.forward(params, xi[None], train=False)
        eye = jnp.eye(out.shape[-1], dtype=out.dtype)

        def back(e):
            grads, _ = model.backward(params, res, e[None])
            return {p: _at(grads, p) for p in paths}

        return out[0], jax.vmap(back)(eye)

    return jax.vmap(one)(x)


def _logit_cov(post: Posterior, jac):
    """``J Sigma J^T`` per example: ``(B, C, C)``."""
    delta = post.prior_precision
    cov: Any = 0.0
    for p in post.paths:
        c = post.curvature[p]
        if post.structure == "diag":
            for j, h in zip(jax.tree.leaves(jac[p]), jax.tree.leaves(c)):
                j2 = j.reshape(j.shape[:2] + (-1,))
                cov = cov + jnp.einsum("bck,bdk,k->bcd", j2, j2, 1.0 / (h.ravel() + delta))
        else:
            wb = jax.vmap(jax.vmap(_wb))(jac[p])                   # (B, C, in+1, out)
            t = jnp.einsum("ia,bcij,jg->bcag", c.qa, wb, c.qg)
            cov = cov + jnp.einsum("bcag,bdag,ag->bcd", t, t, 1.0 / (jnp.outer(c.a, c.g) + delta))
    return cov


@jax.jit
def _moments(post: Posterior, x):
    logits, jac = _jacobians(post.model, post.params, x, post.paths)
    return logits, _logit_cov(post, jac)


def logit_moments(post: Posterior, x, *, batch_size: int = 256):
    """``(f* (N, C), J Sigma J^T (N, C, C))``: the linearised network's logits at ``x`` and
    their covariance under the posterior."""
    x = jnp.asarray(x)
    parts = [_moments(post, x[lo:hi]) for lo, hi in _batches(x.shape[0], batch_size)]
    return tuple(jnp.concatenate(v, 0) for v in zip(*parts))


@jax.jit
def _probit(mean, cov):
    var = jnp.diagonal(cov, axis1=-2, axis2=-1)
    return jax.nn.softmax(mean / jnp.sqrt(1.0 + jnp.pi / 8.0 * var), axis=-1)


@functools.partial(jax.jit, static_argnames="samples")
def _sampled(mean, cov, key, samples):
    vals, vecs = jnp.linalg.eigh(cov)
    root = vecs * jnp.sqrt(jnp.maximum(vals, 0.0))[..., None, :]        # cov = root root^T
    eps = jax.random.normal(key, (samples,) + mean.shape, mean.dtype)
    f = mean + jnp.einsum("bcd,sbd->sbc", root, eps)
    return jnp.mean(jax.nn.softmax(f, axis=-1), 0)


def predictive(post: Posterior, x, *, method: str = "probit", key=None, samples: int = 100,
               batch_size: int = 256):
    """Predictive class probabilities ``(N, C)`` at ``x`` under the linearised network
    (module docstring): ``method="probit"`` in closed form, ``"samples"`` as the mean of
    ``softmax`` over ``samples`` draws of the logits (needs ``key``)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(map(repr, METHODS))}, got "
                          f"{method!r}", ("laplace",))
    if method == "samples":
        if key is None:
            raise ConfigError("method='samples' needs a PRNG key: key=jax.random.key(seed)",
                              ("laplace",))
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ConfigError(f"samples must be a positive int, got {samples!r}", ("laplace",))
    mean, cov = logit_moments(post, x, batch_size=batch_size)
    if method == "probit":
        return _probit(mean, cov)
    return _sampled(mean, cov, key, samples)


def sample(post: Posterior, key, samples: int):
    """``samples`` params drawn from the posterior, stacked on a leading axis (the layers
    outside ``paths`` repeat ``theta*``): diag ``theta* + eps / sqrt(h + delta)``; kfac
    ``[W; b] + Q_A (eps / sqrt(a g^T + delta)) Q_G^T``."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"samples must be a positive int, got {samples!r}", ("laplace",))
    return _sample(post, key, samples)


@functools.partial(jax.jit, static_argnames="samples")
def _sample(post: Posterior, key, samples: int):
    keys = jax.random.split(key, len(post.paths))
    out = jax.tree.map(lambda v: jnp.broadcast_to(v, (samples,) + v.shape), post.params)
    delta = post.prior_precision
    for k, p in zip(keys, post.paths):
        mean, c = _at(post.params, p), post.curvature[p]
        if post.structure == "diag":
            leaves, tree = jax.tree.flatten(mean)
            ks = jax.random.split(k, len(leaves))
            drawn = [m + jax.random.normal(kk, (samples,) + m.shape, m.dtype)
                     / jnp.sqrt(h + delta) for kk, m, h in zip(ks, leaves, jax.tree.leaves(c))]
            layer = jax.tree.unflatten(tree, drawn)
        else:
            layer = _draw_kron(mean, c, delta, k, samples)
        out = _replace_at(out, p, layer)
    return out


def _draw_kron(mean, c: KronEig, delta, key, samples: int):
    wb = _wb(mean)
    eps = jax.random.normal(key, (samples,) + wb.shape, wb.dtype)
    eps = eps / jnp.sqrt(jnp.outer(c.a, c.g) + delta)
    return jax.vmap(lambda d: _unwb(mean, wb + c.qa @ d @ c.qg.T))(eps)
