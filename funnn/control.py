"""Differentiable control flow: loops that reverse-differentiate, fixed points, checkpointing.

"Any code that is differentiable can be seen as a model that can be fitted by back
propagation." JAX differentiates Python ``if``/``for``/recursion on concrete values,
and ``lax.cond``/``lax.switch``/``lax.scan``/``lax.fori_loop`` under ``jit``. Two gaps
remain, and this module fills them:

- ``lax.while_loop`` has no reverse mode. :func:`bounded_while` runs the same loop as a
  ``scan`` of ``max_steps`` guarded steps and says whether it was cut off.
- Differentiating through every iteration of a solver is slow and memory hungry.
  :func:`fixed_point` solves ``x = f(params, x)`` and differentiates the solution by the
  implicit function theorem (one adjoint fixed point), reporting non-convergence.

:func:`checkpointed_scan` is ``lax.scan`` whose reverse-mode memory grows like
``sqrt(length)``; :func:`memory_report` reads XLA's compiled memory figures.

Nothing here is silently wrong: a truncated loop sets ``hit_max``, an unconverged
fixed point sets ``converged=False`` and its gradient is NaN, and ``strict=True``
raises :class:`~funnn.core.ConfigError` on concrete values. Under ``jit`` the check
runs on the device through ``jax.debug.callback``: the call then fails with JAX's
``JaxRuntimeError`` whose text carries the ConfigError message (JAX also logs the
callback's traceback); it cannot surface as a ConfigError itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import PyTreeDef

from funnn.core import ConfigError, DTypeError, ShapeError, tree_paths

__all__ = ["WhileResult", "FixedPointResult", "bounded_while", "fixed_point",
           "checkpointed_scan", "memory_report"]

_tmap = jax.tree_util.tree_map


# --------------------------------------------------------------------------- helpers


def _check_steps(name: str, n, what: str) -> int:
    """``n`` as a Python int >= 1, or a ConfigError naming ``what``."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ConfigError(f"{what} must be a static Python int >= 1, got {n!r} "
                          f"(type {type(n).__name__}); loop lengths are fixed at trace time",
                          (name,))
    if n < 1:
        raise ConfigError(f"{what} must be >= 1, got {n}; a loop needs at least one step",
                          (name,))
    return int(n)


def _strong(tree):
    """Leaves as arrays with a definite (not weak) dtype, so loop carries type-check."""
    return _tmap(lambda a: jnp.array(a, dtype=jnp.result_type(a)), tree)


def _check_same_tree(name: str, what: str, got, want) -> None:
    """Raise ShapeError unless ``got`` has the tree structure, shapes and dtypes of ``want``."""
    gs: PyTreeDef = jax.tree_util.tree_structure(got)
    ws: PyTreeDef = jax.tree_util.tree_structure(want)
    if gs != ws:
        raise ShapeError(f"{what} returned a tree of structure {gs}, expected the structure "
                         f"of its input {ws}; return the state in the same containers",
                         (name,))
    for (p, g), (_, w) in zip(tree_paths(got), tree_paths(want), strict=True):
        gsh, wsh = jnp.shape(g), jnp.shape(w)
        gdt, wdt = jnp.result_type(g), jnp.result_type(w)
        if gsh != wsh or gdt != wdt:
            raise ShapeError(f"{what}: leaf {p} came out as {gdt}{list(gsh)}, expected "
                             f"{wdt}{list(wsh)} as it went in; a loop state keeps its shapes "
                             f"and dtypes (cast with .astype or fix the initial value)", (name,))


def _check_scalar_bool(name: str, what: str, out) -> None:
    if jnp.shape(out) != ():
        raise ShapeError(f"{what} must return a scalar bool, got shape {jnp.shape(out)}; "
                         f"reduce it with jnp.all/jnp.any", (name,))
    if jnp.result_type(out) != jnp.bool_:
        raise DTypeError(f"{what} must return a scalar bool, got dtype {jnp.result_type(out)}; "
                         f"compare, e.g. err > tol", (name,))


def _raise_if(bad, error: Exception) -> None:
    """Raise ``error`` when ``bad`` is True: now if concrete, at run time if traced."""
    try:
        now = bool(np.any(np.asarray(bad)))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        now = None
    if now:
        raise error
    if now is None:
        def callback(b):
            if np.any(b):
                raise error
        jax.debug.callback(callback, bad)


def _maxabs(tree):
    leaves = [jnp.max(jnp.abs(a)) for a in jax.tree_util.tree_leaves(tree) if jnp.size(a)]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros(())


def _maxabs_diff(a, b):
    return _maxabs(_tmap(jnp.subtract, a, b))


# --------------------------------------------------------------------------- bounded while


class WhileResult(NamedTuple):
    """``state``: the final loop state; ``hit_max``: True when the loop was cut off."""

    state: Any
    hit_max: jax.Array


def bounded_while(cond: Callable, body: Callable, init, max_steps: int, *,
                  strict: bool = False) -> WhileResult:
    """``while cond(s): s = body(s)``, at most ``max_steps`` times, reverse-differentiable.

    Formula: step ``k`` applies ``s <- body(s)`` only while ``cond(s)`` held at every
    step so far (a done-mask); later steps pass the state through unchanged. It runs
    as a ``lax.scan`` of ``max_steps`` steps each guarded by ``lax.cond``, so ``jit``,
    ``vmap``, ``jax.grad`` and ``jax.jvp`` all work (``lax.while_loop`` has no reverse
    mode).

    Shapes: ``init`` is any pytree; ``body`` must return the same structure, shapes
    and dtypes (else :class:`ShapeError`); ``cond`` returns a scalar bool.

    Derivative: exactly that of the iterations that ran; the number of iterations is
    piecewise constant in the inputs, so it contributes nothing (as in any program).

    Returns ``WhileResult(state, hit_max)``. ``hit_max`` is True when ``cond`` still
    held after ``max_steps`` iterations: the result is then that of ``max_steps``
    iterations, not of the full loop. ``strict=True`` raises :class:`ConfigError`
    instead (under ``jit``: a ``JaxRuntimeError`` carrying that message, see the module
    docstring). Memory for reverse mode is ``O(max_steps)``.
    """
    name = "bounded_while"
    max_steps = _check_steps(name, max_steps, "max_steps")
    init = _strong(init)
    _check_scalar_bool(name, "cond", jax.eval_shape(cond, init))
    _check_same_tree(name, "body", jax.eval_shape(body, init), init)

    def guarded_body(s):
        return _tmap(lambda new, old: new.astype(old.dtype), body(s), s)

    def step(carry, _):
        s, done = carry
        active = jnp.logical_and(jnp.logical_not(done), cond(s))
        s = lax.cond(active, guarded_body, lambda t: t, s)
        return (s, jnp.logical_not(active)), None

    (state, _), _ = lax.scan(step, (init, jnp.zeros((), bool)), None, length=max_steps)
    hit_max = lax.stop_gradient(jnp.asarray(cond(state)))
    # cond(state) is False exactly when the loop stopped by itself (the done flag
    # latches the first False, and the state does not change after it).
    if strict:
        _raise_if(hit_max, ConfigError(
            f"the loop was still running after max_steps={max_steps} iterations; raise "
            f"max_steps or check the stopping condition", (name,)))
    return WhileResult(state, hit_max)


# --------------------------------------------------------------------------- fixed point


class FixedPointResult(NamedTuple):
    """``x`` with ``f(params, x) ~= x``; ``converged``; ``iterations`` (calls of f); ``residual``.

    ``x`` is the last iterate ``f(params, x_k)``; ``residual`` is the last step's size
    ``max|f(x_k) - x_k|``: for a contraction of rate ``L``, ``x`` is within
    ``L / (1 - L) * residual`` of the exact fixed point.
    """

    x: Any
    converged: jax.Array
    iterations: jax.Array
    residual: jax.Array


def _default_tol(x) -> float:
    eps = max(float(jnp.finfo(jnp.result_type(a)).eps) for a in jax.tree_util.tree_leaves(x))
    return 1e-10 if eps < 1e-10 else 1e-5


def _iterate(g, x0, tol: float, max_iter: int):
    """Iterate ``x <- g(x)`` until max|g(x) - x| <= tol (1 + max|x|).

    Returns ``(g(x), ok, k, max|g(x) - x|)``: the last iterate, whether it met the
    test, the number ``k <= max_iter`` of applications of ``g``, the last step's size.
    """
    def err(x, gx):
        return _maxabs_diff(gx, x), tol * (1 + _maxabs(x))

    def loop_cond(c):
        _, _, k, e, lim = c
        return jnp.logical_and(k < max_iter, e > lim)       # NaN stops the loop too

    def loop_body(c):
        _, gx, k, _, _ = c
        ggx = g(gx)
        return (gx, ggx, k + 1, *err(gx, ggx))

    gx0 = g(x0)
    _, gx, k, e, lim = lax.while_loop(loop_cond, loop_body, (x0, gx0, jnp.ones((), jnp.int32),
                                                             *err(x0, gx0)))
    return gx, e <= lim, k, e


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _solve(f, cfg, params, x0, consts):
    x, ok, k, e = _iterate(lambda z: f(params, z, *consts), x0, cfg[0], cfg[1])
    return FixedPointResult(x, ok, k, e)


def _solve_fwd(f, cfg, params, x0, consts):
    out = _solve(f, cfg, params, x0, consts)
    return out, (params, consts, out.x, out.converged, x0)


def _solve_bwd(f, cfg, res, ct):
    params, consts, x, ok, x0 = res
    _, vjp_x = jax.vjp(lambda z: f(params, z, *consts), x)
    v = ct.x
    # adjoint fixed point u = v + (df/dx)^T u, solved by the same iteration
    u, adj_ok, _, _ = _iterate(lambda w: _tmap(jnp.add, v, vjp_x(w)[0]), v, cfg[2], cfg[3])
    _, vjp_p = jax.vjp(lambda p, c: f(p, x, *c), params, consts)
    dparams, dconsts = vjp_p(u)
    bad = jnp.logical_not(jnp.logical_and(ok, adj_ok))

    def poison(t):      # an unconverged solve gives NaN gradients, never wrong numbers
        if t.dtype == jax.dtypes.float0:
            return t
        return jnp.where(bad, jnp.nan, t)

    dx0 = _tmap(jnp.zeros_like, x0)          # the fixed point does not depend on x0
    return _tmap(poison, dparams), dx0, _tmap(poison, dconsts)


_solve.defvjp(_solve_fwd, _solve_bwd)


def fixed_point(f: Callable, params, x0, *, tol: float | None = None, max_iter: int = 200,
                adjoint_tol: float | None = None, adjoint_max_iter: int | None = None,
                strict: bool = False) -> FixedPointResult:
    """Solve ``x = f(params, x)`` by iteration; differentiate ``x*`` implicitly (IFT).

    Formula: ``x_{k+1} = f(params, x_k)`` from ``x0`` until the step
    ``max|x_{k+1} - x_k| <= tol * (1 + max|x_k|)`` (``tol`` defaults to 1e-10 in
    float64, 1e-5 in float32), at most ``max_iter`` times; ``x_{k+1}`` is returned.
    It converges when ``f`` is a contraction in ``x``. Gradients are as accurate as
    the solves, about ``tol / (1 - L)`` for a contraction of rate ``L``.

    Shapes: ``params`` and ``x0`` are pytrees; ``f(params, x)`` has the structure,
    shapes and dtypes of ``x0`` (else :class:`ShapeError`).

    Derivative (reverse mode, a custom VJP): with ``J = df/dx`` at ``x*`` and incoming
    ``v = dL/dx*``, solve the adjoint fixed point ``u = v + J^T u`` by the same
    iteration, then ``dL/dparams = (df/dparams)^T u``; ``dL/dx0 = 0``. Values ``f``
    closes over are differentiated too (``jax.closure_convert``). Forward mode
    (``jax.jvp``, ``jacfwd``) is not defined.

    Returns ``FixedPointResult(x, converged, iterations, residual)`` (no gradient flows
    through the last three). If the forward or the adjoint solve does not converge,
    ``converged`` says so and every gradient is NaN; ``strict=True`` raises
    :class:`ConfigError` instead (under ``jit``: a ``JaxRuntimeError`` carrying that
    message, see the module docstring).
    """
    name = "fixed_point"
    max_iter = _check_steps(name, max_iter, "max_iter")
    adjoint_max_iter = _check_steps(name, max_iter if adjoint_max_iter is None
                                    else adjoint_max_iter, "adjoint_max_iter")
    x0 = _strong(x0)
    if not jax.tree_util.tree_leaves(x0):
        raise ShapeError("x0 has no array leaves; give a starting point", (name,))
    for p, leaf in tree_paths(x0):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise DTypeError(f"x0 leaf {p} has dtype {leaf.dtype}; a fixed point needs "
                             f"floating-point values", (name,))
    _check_same_tree(name, "f(params, x)", jax.eval_shape(f, params, x0), x0)
    tol = _default_tol(x0) if tol is None else float(tol)
    adjoint_tol = tol if adjoint_tol is None else float(adjoint_tol)
    if not (tol > 0 and adjoint_tol > 0):
        raise ConfigError(f"tol and adjoint_tol must be > 0, got {tol}, {adjoint_tol}", (name,))
    conv_f, consts = jax.closure_convert(f, params, x0)
    out = _solve(conv_f, (tol, max_iter, adjoint_tol, adjoint_max_iter), params, x0, consts)
    out = out._replace(**{k: lax.stop_gradient(getattr(out, k))      # plain data, no tangents
                          for k in ("converged", "iterations", "residual")})
    if strict:
        _raise_if(jnp.logical_not(out.converged), ConfigError(
            f"no fixed point within max_iter={max_iter} iterations at tol={tol:g}; is f a "
            f"contraction in x? raise max_iter, loosen tol or start closer", (name,)))
    return out


# --------------------------------------------------------------------------- checkpointing


def checkpointed_scan(f: Callable, init, xs=None, length: int | None = None, *,
                      segments: int | None = None):
    """``lax.scan(f, init, xs, length)`` whose reverse-mode memory grows like ``sqrt(length)``.

    Formula: the ``n`` steps are split into segments of ``k = ceil(n / segments)``
    steps (``segments`` defaults to ``round(sqrt(n))``); an outer scan runs the
    segments, each an inner scan wrapped in ``jax.checkpoint``. Reverse mode stores
    only the carry at segment boundaries (``n/k`` of them) and recomputes one segment
    at a time (``k`` steps of residuals): memory ``O(n/k + k) = O(sqrt n)`` for one
    extra forward pass of compute.

    Shapes: as ``lax.scan``: ``f(carry, x) -> (carry, y)``; returns ``(carry, ys)``
    with ``ys`` stacked over ``n`` steps. Derivative: identical to ``lax.scan``'s.
    """
    name = "checkpointed_scan"
    leaves = jax.tree_util.tree_leaves(xs)
    if length is None:
        if not leaves:
            raise ConfigError("give xs or length; the number of steps is unknown", (name,))
        length = jnp.shape(leaves[0])[0]
    n = _check_steps(name, length, "length")
    for p, leaf in tree_paths(xs):
        if not jnp.shape(leaf) or jnp.shape(leaf)[0] != n:
            raise ShapeError(f"xs leaf {p} has shape {jnp.shape(leaf)}, expected leading "
                             f"axis {n} (the number of steps)", (name,))
    segments = max(1, round(math.sqrt(n))) if segments is None else _check_steps(
        name, segments, "segments")
    k = -(-n // min(segments, n))
    full, rest = n // k, n % k

    def segment(carry, xs_seg, steps):
        return lax.scan(f, carry, xs_seg, length=steps)

    def run(carry, xs_part, count, steps):
        seg = jax.checkpoint(partial(segment, steps=steps), prevent_cse=False)
        if xs_part is None:
            carry, ys = lax.scan(lambda c, _: seg(c, None), carry, None, length=count)
        else:
            shaped = _tmap(lambda a: a.reshape((count, steps) + a.shape[1:]), xs_part)
            carry, ys = lax.scan(seg, carry, shaped)
        return carry, _tmap(lambda a: a.reshape((count * steps,) + a.shape[2:]), ys)

    head = None if xs is None else _tmap(lambda a: a[:full * k], xs)
    carry, ys = run(init, head, full, k)
    if rest:
        tail = None if xs is None else _tmap(lambda a: a[full * k:], xs)
        carry, ys_tail = run(carry, tail, 1, rest)
        ys = _tmap(lambda a, b: jnp.concatenate([a, b]), ys, ys_tail)
    return carry, ys


def memory_report(fn: Callable, *args, **kwargs) -> dict | None:
    """XLA's memory figures for ``jax.jit(fn)(*args)``, in bytes; ``None`` where unavailable.

    Keys: ``temp`` (scratch, where a loop's saved residuals live), ``argument``,
    ``output``, ``alias``, ``peak`` (``None`` if the backend does not report it).
    ``kwargs`` are static (passed through ``functools.partial``).
    """
    compiled = jax.jit(partial(fn, **kwargs)).lower(*args).compile()   # errors here are real
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):       # backend without it
        return None
    if stats is None:
        return None
    get = lambda k: getattr(stats, k, None)
    return {"temp": get("temp_size_in_bytes"), "argument": get("argument_size_in_bytes"),
            "output": get("output_size_in_bytes"), "alias": get("alias_size_in_bytes"),
            "peak": get("peak_memory_in_bytes")}
