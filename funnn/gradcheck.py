"""Gradient checks: manual vs autodiff vs central finite differences, in float64.

``compare`` computes the loss gradient of a model three ways and reports, leaf by
leaf (named by tree path), the largest absolute and relative disagreement::

    report = compare(model, loss, params, x, y)
    print(report)          # one row per parameter leaf
    assert report.ok

Relative error of two arrays ``a`` and ``b`` is ``max|a - b| / max(max|a|, max|b|, floor)``:
scaled by the leaf's magnitude, so entries near zero do not blow it up. The floor
is a small fraction of the largest gradient entry of the whole model (``1e-4`` of it
between engines, ``1e-3`` against finite differences, whose absolute error is about
``1e-10`` of the loss): a leaf whose true gradient is zero (a conv bias just before a
batch-norm) is then judged by its absolute error, not by the ratio of two roundings.

``compare_per_example`` checks the per-example engine (each layer's per-example rule, or
``vmap`` of its own backward where it has none, which the report names) against autodiff's
per-example gradients, and the per-example norms against theirs.

``compare_jvp`` does the same for the hand-written forward mode (``Layer.jvp``): per parameter
leaf (and the input), the output tangent along a random direction in that leaf alone, by
:func:`funnn.manual.jvp`, by ``jax.jvp`` of ``apply`` and by central differences of ``apply``.

Full finite differences cost two loss evaluations per parameter; past
``max_fd_params`` parameters ``compare`` switches to random directions: for a
random unit direction ``v`` it checks ``<grad, v>`` against
``(L(p + eps v) - L(p - eps v)) / (2 eps)`` (see :func:`directional`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.tree_util import PyTreeDef

from funnn import autodiff, losses, manual
from funnn.core import ConfigError, Layer, ShapeError, check_context, run_apply
from funnn.summary import derived_layers, vmapped_layers
from funnn.trees import path_str, tree_paths

__all__ = ["compare", "compare_per_example", "compare_jvp", "directional", "Report",
           "LeafCheck"]


@dataclasses.dataclass(frozen=True)
class LeafCheck:
    """One parameter leaf: errors between each pair of gradients and whether they pass."""

    path: str
    shape: tuple
    abs_err: dict      # pair name -> max absolute difference
    rel_err: dict      # pair name -> relative difference (see module docstring)
    ok: bool


@dataclasses.dataclass(frozen=True)
class Report:
    """The result of :func:`compare`: rows per leaf, tolerances, and the loss value."""

    leaves: tuple
    loss: float
    rtol: dict
    method: str            # "full" finite differences, "directional", or "none"
    directional: tuple = ()  # (pair, abs_err, rel_err, ok) rows for directional checks
    derived: tuple = ()    # layers whose backward is jax.vjp's (layer_from_apply), by path
    what: str = "loss"     # what ``loss`` holds: the loss, or "max |y|" for compare_jvp
    vmapped: tuple = ()    # compare_per_example: layers without a per-example rule, by path

    @property
    def ok(self) -> bool:
        return all(l.ok for l in self.leaves) and all(d[3] for d in self.directional)

    def failures(self) -> list:
        """The leaves (and directional rows) that disagree."""
        return [l for l in self.leaves if not l.ok] + [d for d in self.directional if not d[3]]

    def to_dict(self) -> dict:
        """A JSON-ready dict of the whole report."""
        return {
            "ok": self.ok, "loss": self.loss, "rtol": dict(self.rtol), "method": self.method,
            "leaves": [{"path": l.path, "shape": list(l.shape), "abs_err": l.abs_err,
                        "rel_err": l.rel_err, "ok": l.ok} for l in self.leaves],
            "directional": [{"pair": d[0], "abs_err": d[1], "rel_err": d[2], "ok": d[3]}
                            for d in self.directional],
            "derived": list(self.derived), "vmapped": list(self.vmapped),
        }

    def __str__(self) -> str:
        pairs = list(self.leaves[0].rel_err) if self.leaves else []
        head = ["leaf", "shape"] + [f"rel {p}" for p in pairs] + ["ok"]
        rows = [[l.path, str(l.shape)] + [f"{l.rel_err[p]:.2e}" for p in pairs]
                + ["yes" if l.ok else "NO"] for l in self.leaves]
        for pair, _a, r, ok in self.directional:
            rows.append([f"<directional {pair}>", "", *([""] * (len(pairs) - 1)),
                         f"{r:.2e}", "yes" if ok else "NO"][: len(head)])
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
        tol = ", ".join(f"{k} {v:g}" for k, v in self.rtol.items())
        out = [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
        verdict = "all leaves agree" if self.ok else f"{len(self.failures())} disagree"
        out.append(f"{self.what} {self.loss:.6g}; finite differences: {self.method}; rtol: "
                   f"{tol}; {verdict}")
        if self.derived:
            out.append("not hand-written: the 'manual' gradient of " + ", ".join(self.derived)
                       + " is derived by jax.vjp (layer_from_apply), so manual~autodiff "
                       "checks nothing there")
        if self.vmapped:
            out.append("no per-example rule: " + ", ".join(self.vmapped) + " use vmap of "
                       "their own backward (per-example gradients materialised)")
        return "\n".join(out)


def _rel(a, b, floor: float = 0.0) -> tuple[float, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0, 0.0
    diff = float(np.max(np.abs(a - b)))
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), floor)
    return diff, (diff / scale if scale > 0 else diff)


def _largest(tree) -> float:
    leaves = [np.max(np.abs(np.asarray(l))) for l in jax.tree_util.tree_leaves(tree)
              if np.size(l)]
    return float(max(leaves)) if leaves else 0.0


def _to64(tree):
    def cast(v):
        v = jnp.asarray(v)
        return v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v
    return jax.tree_util.tree_map(cast, tree)


def _scalar_loss(model, loss, x, y, key, state, train, context=None):
    objective = autodiff.loss_fn(model, loss, train=train)
    return lambda p: objective(p, x, y, key, state, context)[0]


def _side(model: Layer, loss, side) -> tuple:
    """``(loss with side["weights"] bound, the model's side inputs)``, in float64."""
    if side is None:
        return loss, {}
    if not isinstance(side, dict):
        raise ConfigError(f"side must be a dict of side inputs with the batch axis first, such "
                          f"as {{'mask': mask}}, got {type(side).__name__}", ("gradcheck",))
    loss_weights, context = losses.split_side(_to64(side))
    check_context(model, context)
    return losses.weighted(loss, loss_weights), context


def _full_fd(f, params, eps):
    """Central differences of scalar ``f`` for every parameter entry (one compiled loop)."""
    flat, unravel = ravel_pytree(params)

    def central(i):
        return (f(unravel(flat.at[i].add(eps))) - f(unravel(flat.at[i].add(-eps)))) / (2 * eps)

    return unravel(jax.jit(lambda: jax.lax.map(central, jnp.arange(flat.size)))())


def directional(model: Layer, loss, params, x, y, *, key=None, state=None, train=True,
                grads=None, num_directions: int = 4, eps: float = 1e-6, rtol: float = 1e-6,
                seed: int = 0, side: dict | None = None) -> tuple:
    """Check gradients along random unit directions against central differences.

    ``grads`` maps a name to a gradient pytree (default: manual and autodiff). Returns
    rows ``(name, abs_err, rel_err, ok)``; the relative error compares the vector of
    directional derivatives over all ``num_directions`` directions. ``side`` as in
    :func:`compare`.
    """
    with jax.enable_x64(True):
        params, x = _to64(params), _to64(x)
        loss, context = _side(model, loss, side)
        f = jax.jit(_scalar_loss(model, loss, x, y, key, state, train, context))
        if grads is None:
            grads = _both(model, loss, params, x, y, key, state, train, context)[1]
        leaves, treedef = jax.tree_util.tree_flatten(params)
        fd: list[float] = []
        dots: dict[str, list[float]] = {name: [] for name in grads}
        for k in jax.random.split(jax.random.key(seed), num_directions):
            ks = jax.random.split(k, max(len(leaves), 1))
            v = [jax.random.normal(kk, l.shape, l.dtype) for kk, l in zip(ks, leaves)]
            norm = math.sqrt(sum(float(jnp.sum(a * a)) for a in v)) or 1.0
            v = [a / norm for a in v]
            plus = jax.tree_util.tree_unflatten(treedef, [l + eps * a for l, a in zip(leaves, v)])
            minus = jax.tree_util.tree_unflatten(treedef, [l - eps * a for l, a in zip(leaves, v)])
            fd.append((float(f(plus)) - float(f(minus))) / (2 * eps))
            for name, g in grads.items():
                gl = jax.tree_util.tree_leaves(g)
                dots[name].append(sum(float(jnp.sum(a * b)) for a, b in zip(gl, v)))
        rows = []
        for name in grads:
            a, r = _rel(dots[name], fd)
            rows.append((f"{name}~fd", a, r, r <= rtol))
        return tuple(rows)


def _both(model, loss, params, x, y, key, state, train, context=None):
    def vg(engine):
        value, g = jax.jit(lambda p: engine.value_and_grad(model, loss, train=train)(
            p, x, y, key=key, state=state, **(context or {})))(params)
        return (value[0] if model.stateful else value), g

    value, g_auto = vg(autodiff)
    _, g_man = vg(manual)
    _same_tree(g_man, g_auto, params)
    return float(value), {"manual": g_man, "autodiff": g_auto}


def _same_tree(g_man, g_auto, params) -> None:
    """The manual gradient must have exactly the params' structure, shapes and dtypes."""
    want = dict(tree_paths_shapes(g_auto))
    got = dict(tree_paths_shapes(g_man))
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    s_man: PyTreeDef = jax.tree_util.tree_structure(g_man)
    s_auto: PyTreeDef = jax.tree_util.tree_structure(g_auto)
    if missing or extra or wrong or s_man != s_auto:
        parts = ([f"missing leaves {missing}"] if missing else []) + (
            [f"unexpected leaves {extra}"] if extra else []) + [
            f"{k}: manual {got[k]}, autodiff {want[k]}" for k in wrong]
        raise ShapeError("the manual gradient does not match the params tree: "
                         + ("; ".join(parts) or "different tree structure"), ("gradcheck",))


def tree_paths_shapes(tree) -> list:
    """``[(path, (shape, dtype)), ...]`` of a gradient tree."""
    return [(p, (tuple(np.shape(v)), str(jnp.result_type(v)))) for p, v in tree_paths(tree)]


def compare(model: Layer, loss, params, x, y, *, key=None, state=None, train: bool = True,
            fd: str = "auto", eps: float = 1e-6, rtol_engines: float = 1e-10,
            rtol_fd: float = 1e-6, max_fd_params: int = 5000, num_directions: int = 4,
            side: dict | None = None) -> Report:
    """Compare manual, autodiff and finite-difference gradients of ``loss(model(x), y)``.

    ``x`` is an array or a tuple of arrays; ``side`` a dict of side inputs with the batch axis
    first, as in :func:`funnn.train.fit`'s ``(x, y, side)``: ``mask``/``lengths`` go to the
    model, ``weights`` weigh the loss's terms (:func:`funnn.losses.weighted`).
    Everything runs in float64 (params, x and floating side inputs are cast). ``fd`` is ``"full"``,
    ``"directional"``, ``"none"``, or ``"auto"`` (full up to ``max_fd_params``
    parameters, directional beyond). A leaf passes when manual and autodiff agree to
    ``rtol_engines`` and both agree with finite differences to ``rtol_fd``.
    """
    if fd not in ("auto", "full", "directional", "none"):
        raise ValueError(f"gradcheck.compare: fd must be 'auto', 'full', 'directional' or "
                         f"'none', got {fd!r}")
    with jax.enable_x64(True):
        params, x, state = _to64(params), _to64(x), _to64(state)
        bound, context = _side(model, loss, side)
        loss_value, grads = _both(model, bound, params, x, y, key, state, train, context)
        n_params = sum(int(np.prod(np.shape(l))) for l in jax.tree_util.tree_leaves(params))
        method = fd if fd != "auto" else ("full" if n_params <= max_fd_params else "directional")
        g_fd = None
        if method == "full":
            g_fd = _full_fd(_scalar_loss(model, bound, x, y, key, state, train, context), params,
                            eps)

        flat_a, _ = jax.tree_util.tree_flatten_with_path(grads["autodiff"])
        flat_m = jax.tree_util.tree_leaves(grads["manual"])
        flat_f = jax.tree_util.tree_leaves(g_fd) if g_fd is not None else [None] * len(flat_m)
        rows = []
        big = _largest(grads["autodiff"])
        for (path, a), m, f in zip(flat_a, flat_m, flat_f):
            errs = {"manual~autodiff": _rel(m, a, 1e-4 * big)}
            if f is not None:
                errs["manual~fd"] = _rel(m, f, 1e-3 * big)
                errs["autodiff~fd"] = _rel(a, f, 1e-3 * big)
            ok = all(r <= (rtol_engines if k == "manual~autodiff" else rtol_fd)
                     for k, (_, r) in errs.items())
            rows.append(LeafCheck(path_str(path), tuple(np.shape(a)),
                                  {k: v[0] for k, v in errs.items()},
                                  {k: v[1] for k, v in errs.items()}, ok))
        dirs = ()
        if method == "directional":
            dirs = directional(model, loss, params, x, y, key=key, state=state, train=train,
                               grads=grads, num_directions=num_directions, eps=eps, rtol=rtol_fd,
                               side=side)
        return Report(tuple(rows), loss_value,
                      {"engines": rtol_engines, "finite differences": rtol_fd}, method, dirs,
                      tuple(derived_layers(model)))


def compare_per_example(model: Layer, loss, params, x, y, *, key=None, train: bool = True,
                        rtol: float = 1e-10, side: dict | None = None) -> Report:
    """Per-example gradients and norms by :func:`funnn.manual.per_example_value_and_grad` and
    :func:`~funnn.manual.per_example_grad_norms` against autodiff, in float64: ``jax.jacrev``
    of the vector of per-example losses of ``model.apply`` on the batch (the same random masks
    for ``key``), i.e. ``vmap`` of ``jax.grad`` of each example's loss. One row per parameter
    leaf (``rules~autodiff``, all examples) and one ``<norms>`` row; ``Report.vmapped`` names
    the layers without a per-example rule, whose gradients come from ``vmap`` of their own
    backward. ``side`` holds the model's side inputs (``mask``/``lengths``)."""
    with jax.enable_x64(True):
        params, x, y = _to64(params), _to64(x), y
        _, context = _side(model, loss, side)

        def values(p):
            out = model.apply(p, x, key=key, train=train, **context)
            return manual.per_example_loss(loss, out, y)[0]

        @jax.jit
        def both(p):
            got = manual.per_example_value_and_grad(model, loss, train=train)(
                p, x, y, key=key, **context)[1]
            norms = manual.per_example_grad_norms(model, loss, train=train)(
                p, x, y, key=key, **context)[1]
            return values(p), got, norms, jax.jacrev(values)(p)

        vals, got, norms, ref = both(params)
        b = vals.shape[0]
        ref_norms = jnp.sqrt(sum(jnp.sum(jnp.square(g).reshape(b, -1), 1)
                                 for g in jax.tree_util.tree_leaves(ref)))
        big = _largest(ref)
        rows = []
        for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(ref)[0],
                                jax.tree_util.tree_leaves(got)):
            a, e = _rel(g, r, 1e-4 * big)
            rows.append(LeafCheck(path_str(path), tuple(np.shape(r)), {"rules~autodiff": a},
                                  {"rules~autodiff": e}, e <= rtol))
        a, e = _rel(norms, ref_norms)
        rows.append(LeafCheck("<norms>", (b,), {"rules~autodiff": a}, {"rules~autodiff": e},
                              e <= rtol))
        return Report(tuple(rows), float(jnp.mean(vals)), {"per example": rtol}, "none",
                      derived=tuple(derived_layers(model)),
                      vmapped=tuple(vmapped_layers(model)))


def _jvp_rows(tangents, directions, rtol_engines, rtol_fd) -> tuple:
    """One :class:`LeafCheck` per direction from ``tangents[name] -> [dy per direction]``."""
    big = max((_largest(t) for t in tangents["autodiff"]), default=0.0)
    rows = []
    for i, (path, shape) in enumerate(directions):
        m, a, f = (tangents[k][i] for k in ("manual", "autodiff", "fd"))
        errs = {"manual~autodiff": _rel(m, a, 1e-4 * big), "manual~fd": _rel(m, f, 1e-3 * big),
                "autodiff~fd": _rel(a, f, 1e-3 * big)}
        ok = all(r <= (rtol_engines if k == "manual~autodiff" else rtol_fd)
                 for k, (_, r) in errs.items())
        rows.append(LeafCheck(path, shape, {k: v[0] for k, v in errs.items()},
                              {k: v[1] for k, v in errs.items()}, ok))
    return tuple(rows)


def compare_jvp(model: Layer, params, x, *, key=None, state=None, train: bool = False,
                eps: float = 1e-6, rtol_engines: float = 1e-10, rtol_fd: float = 1e-6,
                seed: int = 0, **context) -> Report:
    """Compare the hand-written forward mode with ``jax.jvp`` and central differences.

    For every parameter leaf (rows named by tree path) and for the input (``<input>``, when it
    is floating), a random direction in that leaf alone, the others zero: the output tangent
    ``J v`` by :func:`funnn.manual.jvp`, by ``jax.jvp`` of ``model.apply`` and by
    ``(apply(p + eps v) - apply(p - eps v)) / (2 eps)``, in float64. A row passes when manual
    and autodiff agree to ``rtol_engines`` and both agree with finite differences to
    ``rtol_fd`` (relative errors as in :func:`compare`). ``context`` holds side inputs;
    ``state`` the running statistics of a stateful model (the output is compared, not the
    new state).
    """
    with jax.enable_x64(True):
        params, x, state = _to64(params), _to64(x), _to64(state)
        floating = jnp.issubdtype(jnp.result_type(x), jnp.inexact)

        def f(p, xx):
            return run_apply(model, p, xx, state=state, key=key, train=train, **context)[0]

        def plus(p, dp, s):
            return jax.tree_util.tree_map(lambda a, b: a + s * b, p, dp)

        def three(dp, dx):
            y, man = manual.jvp(model, train=train)(params, x, dp, dx, key=key, state=state,
                                                     **context)
            y = y[0] if model.stateful else y
            if floating:
                _, auto = jax.jvp(f, (params, x), (dp, dx))
                fd = (f(plus(params, dp, eps), x + eps * dx)
                      - f(plus(params, dp, -eps), x - eps * dx)) / (2 * eps)
            else:
                _, auto = jax.jvp(lambda p: f(p, x), (params,), (dp,))
                fd = (f(plus(params, dp, eps), x) - f(plus(params, dp, -eps), x)) / (2 * eps)
            return y, (man, auto, fd)

        # a check, compiled once and run a few times: XLA's backend optimisations cost more
        # than they save here; the directions are numpy draws (no compile per shape)
        run = jax.jit(three, compiler_options={"xla_backend_optimization_level": 0})
        rng = np.random.default_rng(seed)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        zeros = [np.zeros(np.shape(l), jnp.result_type(l)) for _, l in flat]
        dx0 = np.zeros(np.shape(x), np.float64) if floating else None
        out: dict = {"manual": [], "autodiff": [], "fd": []}
        directions = []
        y = None
        for i, (path, leaf) in enumerate(flat):
            leaves = list(zeros)
            leaves[i] = rng.normal(size=np.shape(leaf)).astype(jnp.result_type(leaf))
            y, ts = run(jax.tree_util.tree_unflatten(treedef, leaves), dx0)
            for name, t in zip(out, ts):
                out[name].append(t)
            directions.append((path_str(path), tuple(np.shape(leaf))))
        if floating:
            y, ts = run(jax.tree_util.tree_unflatten(treedef, zeros),
                        rng.normal(size=np.shape(x)))
            for name, t in zip(out, ts):
                out[name].append(t)
            directions.append(("<input>", tuple(np.shape(x))))
        return Report(_jvp_rows(out, directions, rtol_engines, rtol_fd), _largest(y),
                      {"engines": rtol_engines, "finite differences": rtol_fd}, "full", (),
                      tuple(derived_layers(model)), what="max |y|")
