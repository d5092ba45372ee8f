"""Pooling layers (channels-last), with the hand-written backward beside the forward.

``x (N, *spatial, C) -> (N, *out, C)``; each channel is pooled on its own. Along a spatial
axis with input size ``n``, window ``k``, stride ``s`` (default ``k``) and padding
``(lo, hi)``: ``m = floor((n + lo + hi - k) / s) + 1`` windows, window ``o`` covering the
padded positions ``o s .. o s + k - 1``. Padding is ``"VALID"``, ``"SAME"`` (``m = ceil(n/s)``,
extra on the high side), an int or explicit ``(lo, hi)`` pairs, as for convolutions; an
explicit pad must be smaller than the window, so no window is made of padding only.

Spatial rank ``ndim``, fixed when the layer is built: the ``ndim`` keyword if given, else
the length of a tuple window (or stride, or padding pairs), else 2. So ``max_pool(2)`` and
``max_pool((2, 2))`` pool 2-D NHWC ``(N, H, W, C)``; ``max_pool((2,))`` and
``max_pool(2, ndim=1)`` pool 1-D ``(N, W, C)``. An input of another rank is a
:class:`ShapeError` (an unbatched ``(H, W, C)`` image is never read as a batch of 1-D signals).

- ``max_pool``: ``y[o] = max_{k} xpad[o s + k]`` with ``-inf`` padding. Derivative: the whole
  of ``dy[o]`` goes to the arg-max of window ``o``; on ties the first maximum in row-major
  window order gets all of it (the same choice as JAX's autodiff of ``lax.reduce_window``).
  Computed as a select among the window views, not ``reduce_window``, whose gradient
  (``select_and_scatter``) is slow on CPU (see :func:`max_pool`).
- ``avg_pool``: ``y[o] = sum_k xpad[o s + k] / count[o]``. ``count_include_pad=False`` (the
  default, as TensorFlow/Keras "SAME" pooling) counts only real inputs, so padded zeros do not
  dilute border averages; ``True`` divides by the window size ``prod(k)`` (PyTorch's default).
  Derivative: ``dx[i] = sum_{o: i in window o} dy[o] / count[o]``.
- ``global_avg_pool``: ``y[n, c] = mean_{spatial} x[n, ..., c]``; ``dx = dy / (#positions)``
  broadcast over the spatial axes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.core import ConfigError, Layer, ShapeError, check_floating, check_in_shape, check_rank
from funnn.layers.conv import (
    _SPATIAL,
    _fmt,
    _fmt_padding,
    _is_int,
    _ntuple,
    _out_sizes,
    _padding_spec,
    _pads,
)
from funnn.layers.per_example import paramless

__all__ = ["max_pool", "avg_pool", "global_avg_pool"]


def _geometry(kind: str, window, stride, padding, ndim):
    """Validate the options at construction (:class:`ConfigError`).

    Returns ``(nd, window, stride, padding spec)``: ``nd`` is ``ndim`` if given, else the
    length of a tuple window (or stride, or padding pairs), else 2.
    """
    if ndim is not None:
        if not _is_int(ndim) or ndim < 1:
            raise ConfigError(f"ndim (the number of spatial axes) must be a positive int or "
                              f"None, got {ndim!r}", (kind,))
        nd = int(ndim)
    else:
        guess: int | None = None
        for v in (window, stride):
            if v is not None and not _is_int(v):
                try:
                    guess = len(v)
                except TypeError:
                    pass
                break
        if guess is None and not isinstance(padding, str) and not _is_int(padding):
            try:
                guess = len(padding)
            except TypeError:
                pass
        nd = guess or 2
    k = _ntuple(kind, window, nd, "window")
    s = k if stride is None else _ntuple(kind, stride, nd, "stride")
    spec = _padding_spec(kind, padding, nd)
    if not isinstance(spec, str) and any(lo >= ki or hi >= ki for (lo, hi), ki in zip(spec, k)):
        raise ConfigError(f"explicit padding {spec} must be smaller than the window {k} on "
                          f"each side (otherwise a window can hold padding only)", (kind,))
    return nd, k, s, spec


def _pool(kind: str, window, stride, padding, ndim, extra_names=()):
    """The shared frame of max_pool / avg_pool: name, init, the static shape checks (of an
    input, ``check``; of a shape, ``geometry``)."""
    nd, k, s, spec = _geometry(kind, window, stride, padding, ndim)
    extras = [f"stride={_fmt(s)}" if stride is not None else "",
              f"padding={_fmt_padding(spec)}" if spec != "VALID" else "", *extra_names]
    name = f"{kind}({', '.join(['x'.join(map(str, k))] + [e for e in extras if e])})"
    layout = f"(batch, {_SPATIAL.get(nd, 'spatial...')}, channels)"

    def rank_hint(rank: int, batch_hint: str = "add a batch axis: x[None]") -> str:
        hint = f"; for a single example {batch_hint}" if rank == nd + 1 else ""
        if rank >= 3:
            hint += (f"; to pool {rank - 2}-D inputs build the layer with a {rank - 2}-tuple "
                     f"window or ndim={rank - 2}")
        return hint

    def init(key, in_shape):
        if isinstance(in_shape, (tuple, list)) and len(in_shape) != nd + 2:
            raise ShapeError(f"init shape {tuple(in_shape)} has rank {len(in_shape)}, expected "
                             f"rank {nd + 2} {layout}"
                             f"{rank_hint(len(in_shape), 'put None first for the batch')}",
                             (name,))
        shape = check_in_shape(name, in_shape, nd + 2, nd + 2)
        out = _out_sizes(name, shape[1:-1], k, s, _pads(spec, shape[1:-1], k, s), "window")
        return (shape[0],) + out + (shape[-1],), {}

    def geometry(shape):
        """(k, s, pads, out sizes) for an input of this (static) shape."""
        if len(shape) != nd + 2:
            raise ShapeError(f"expected input of rank {nd + 2} {layout}, got shape {shape} "
                             f"(rank {len(shape)}){rank_hint(len(shape))}", (name,))
        pads = _pads(spec, shape[1:-1], k, s)
        return k, s, pads, _out_sizes(name, shape[1:-1], k, s, pads, "window")

    def check(x):
        """Static checks; returns (k, s, pads, out sizes) for this input."""
        check_floating(name, x)
        return geometry(tuple(jnp.shape(x)))

    return name, init, check, geometry


def _full(t: tuple) -> tuple:
    """Spatial tuple -> (1, *t, 1) for the batch and channel axes."""
    return (1,) + tuple(t) + (1,)


def _pad_config(pads, interior=None) -> list:
    interior = interior or (0,) * len(pads)
    return [(0, 0, 0)] + [(lo, hi, i) for (lo, hi), i in zip(pads, interior)] + [(0, 0, 0)]


def _crop(xp, pads, sizes):
    """Undo the padding: xp[:, lo:lo+n, ..., :]."""
    start = (0,) + tuple(lo for lo, _ in pads) + (0,)
    limit = (xp.shape[0],) + tuple(lo + n for (lo, _), n in zip(pads, sizes)) + (xp.shape[-1],)
    return lax.slice(xp, start, limit)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["first"],
                   meta_fields=["shape", "dtype"])
@dataclasses.dataclass(frozen=True)
class _MaxPoolResiduals:
    """What max_pool's backward needs: the window offset of each window's first maximum
    (int8 for up to 127 offsets: a 2x2 pool keeps 1/16 of ``x``'s float32 bytes), and x's
    static shape and dtype."""

    first: jax.Array
    shape: tuple
    dtype: np.dtype


def _window_views(x, k, s, pads, m, fill=-np.inf) -> list:
    """``xpad[:, off + o s, :]`` for each window offset ``off`` in row-major order, each
    ``(N, *m, C)``: one strided slice of the ``fill``-padded (default ``-inf``) input per
    offset."""
    xp = lax.pad(x, np.array(fill, x.dtype), _pad_config(pads))
    n_b, n_c = x.shape[0], x.shape[-1]
    views = []
    for off in itertools.product(*(range(ki) for ki in k)):
        end = tuple(o + (mi - 1) * si + 1 for o, mi, si in zip(off, m, s))
        views.append(lax.slice(xp, (0,) + off + (0,), (n_b,) + end + (n_c,), _full(s)))
    return views


def _first_max(views):
    """``(y, first)``: each window's maximum and the offset index of its first occurrence.

    ``first = argmax`` over the stacked views (ties: the lowest offset, i.e. the first in
    row-major window order; a NaN counts as the maximum), computed on values autodiff does not
    see, as int8 (int32 beyond 127 offsets); ``y = select_n(first, *views)``. So ``jax.grad``
    of ``y`` sends ``dy[o]`` to the first arg-max alone, and keeps only ``first`` as its
    residual, as the hand-written backward does. (``first`` comes from a reduction, which XLA
    computes once, rather than from a chain of ``where``s it would recompute from ``x``.)
    """
    stacked = lax.stop_gradient(jnp.stack(views))
    first = lax.argmax(stacked, 0, jnp.int8 if len(views) <= 127 else jnp.int32)
    return lax.select_n(first, *views), first


def max_pool(window, stride=None, padding="VALID", *, ndim: int | None = None) -> Layer:
    """Max pooling: ``y[o] = max_{k in window} xpad[o s + k]`` per channel, ``-inf`` padding.

    Shapes: ``(N, *spatial, C) -> (N, *out, C)`` with ``ndim`` spatial axes (default: a tuple
    window's length, else 2; see the module docstring); no params. ``stride`` defaults to
    ``window``.
    Derivative: ``dx`` gets ``dy[o]`` at the arg-max of window ``o`` (first maximum in
    row-major window order on ties, as JAX's autodiff does), summed over overlapping windows.

    ``apply`` selects among one strided slice per window offset (:func:`_first_max`) rather
    than calling ``lax.reduce_window``: autodiff of ``reduce_window`` max is XLA's
    ``select_and_scatter``, which on CPU (2-core EPYC, jax 0.10.2) cost 60 ms of CPU time for
    a 2x2 pool of (128, 28, 28, 32) float32 with its gradient, and a 67 MB temp buffer; the
    select form: 3.3 ms, 0.8 MB, the same gradient. The manual path keeps the int8 offsets.
    """
    name, init, check, geometry = _pool("max_pool", window, stride, padding, ndim)

    def apply(params, x, *, key=None, train=False):
        k, s, pads, m = check(x)
        return _first_max(_window_views(x, k, s, pads, m))[0]

    def forward(params, x, *, key=None, train=False):
        k, s, pads, m = check(x)
        y, first = _first_max(_window_views(x, k, s, pads, m))
        return y, _MaxPoolResiduals(first, tuple(x.shape), x.dtype)

    def backward(params, res, dy):
        """Each window's first arg-max takes dy; one strided pad per window offset."""
        k, s, pads, m = geometry(res.shape)
        padded = [n + lo + hi for n, (lo, hi) in zip(res.shape[1:-1], pads)]
        dy = dy.astype(jnp.result_type(res.dtype, dy))
        zero = jnp.zeros((), dy.dtype)
        parts = []
        for j, off in enumerate(itertools.product(*(range(ki) for ki in k))):
            g = jnp.where(res.first == j, dy, zero)       # place g[o] at padded off + o s
            parts.append(lax.pad(g, zero, _pad_config(
                [(o, p - o - (mi - 1) * si - 1) for o, p, mi, si in zip(off, padded, m, s)],
                [si - 1 for si in s])))
        dxp = functools.reduce(lax.add, parts)
        return {}, _crop(dxp, pads, res.shape[1:-1]).astype(res.dtype)

    def jvp(params, res, dparams, dx):
        """Tangent: each window's ``dx`` at its first arg-max (the forward's offsets)."""
        k, s, pads, m = geometry(res.shape)
        return lax.select_n(res.first, *_window_views(dx, k, s, pads, m, 0))

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 **paramless(backward), kind="max_pool", jvp=jvp)


def _counts(sizes, k, s, pads, m) -> np.ndarray:
    """Real (non-padding) inputs per window, shape (1, *m, 1); separable over the axes."""
    c = np.ones(())
    for n, ki, si, (lo, _), mi in zip(sizes, k, s, pads, m):
        start = np.arange(mi) * si - lo
        c = np.multiply.outer(c, np.minimum(start + ki, n) - np.maximum(start, 0))
    return c.reshape(_full(m))


def avg_pool(window, stride=None, padding="VALID", count_include_pad: bool = False, *,
             ndim: int | None = None) -> Layer:
    """Average pooling: ``y[o] = sum_{k in window} xpad[o s + k] / count[o]`` per channel.

    Shapes: ``(N, *spatial, C) -> (N, *out, C)`` with ``ndim`` spatial axes (as
    :func:`max_pool`); no params. ``stride`` defaults to ``window``.
    ``count[o]`` = real inputs in window ``o`` (default) or ``prod(window)`` with
    ``count_include_pad=True``. Derivative: ``dx[i] = sum_{o: i in window o} dy[o] / count[o]``.
    """
    extra = ("count_include_pad",) if count_include_pad else ()
    name, init, check, _ = _pool("avg_pool", window, stride, padding, ndim, extra)

    def count(x, k, s, pads, m):
        if count_include_pad:
            return float(math.prod(k))
        return jnp.asarray(_counts(x.shape[1:-1], k, s, pads, m), x.dtype)

    def apply(params, x, *, key=None, train=False):
        k, s, pads, m = check(x)
        total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, _full(k), _full(s),
                                  ((0, 0),) + pads + ((0, 0),))
        return total / count(x, k, s, pads, m)

    def forward(params, x, *, key=None, train=False):
        return apply(params, x), x

    def backward(params, x, dy):
        """dx: a window sum (stride 1) over dy / count dilated by the stride."""
        k, s, pads, m = check(x)
        g = dy / count(x, k, s, pads, m)
        padded = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads)]
        # g[o] sits at position (k-1) + o s; a length-k window sum ending there reaches every
        # padded input position that window o covers.
        gp = lax.pad(g, jnp.zeros((), g.dtype), _pad_config(
            [(ki - 1, p - (mi - 1) * si - 1) for ki, p, mi, si in zip(k, padded, m, s)],
            [si - 1 for si in s]))
        dxp = lax.reduce_window(gp, np.array(0, g.dtype), lax.add, _full(k), _full((1,) * len(k)),
                                "VALID")
        return {}, _crop(dxp, pads, x.shape[1:-1]).astype(x.dtype)

    def jvp(params, x, dparams, dx):
        """Tangent: the same average of ``dx`` (the layer is linear)."""
        return apply(params, dx)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 **paramless(backward), kind="avg_pool", jvp=jvp)


def global_avg_pool() -> Layer:
    """Mean over the spatial axes: ``y[n, c] = mean_p x[n, p, c]``.

    Shapes: ``(N, *spatial, C) -> (N, C)`` (rank >= 3); no params.
    Derivative: ``dx[n, p, c] = dy[n, c] / (#spatial positions)``.
    """
    name = "global_avg_pool"

    def init(key, in_shape):
        rank = len(in_shape) if isinstance(in_shape, (tuple, list)) else 0
        # the spatial axes are averaged away: they may be None, the channels may not
        shape = check_in_shape(name, in_shape, 3, allow_none=range(rank - 1))
        return (shape[0], shape[-1]), {}

    def apply(params, x, *, key=None, train=False):
        check_floating(name, x)
        check_rank(name, x, 3, what="(batch, spatial..., channels)")
        return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))

    def forward(params, x, *, key=None, train=False):
        return apply(params, x), x

    def backward(params, x, dy):
        n = math.prod(x.shape[1:-1])
        spatial = (dy.shape[0],) + (1,) * (x.ndim - 2) + (dy.shape[-1],)
        return {}, jnp.broadcast_to((dy / n).reshape(spatial), x.shape).astype(x.dtype)

    def jvp(params, x, dparams, dx):
        """Tangent: the mean of ``dx`` over the spatial axes (the layer is linear)."""
        return apply(params, dx)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 **paramless(backward), kind="global_avg_pool", jvp=jvp)
