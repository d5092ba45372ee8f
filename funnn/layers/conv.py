"""Convolution layers (channels-last), with the hand-written backward beside the forward.

Layouts: ``conv1d`` takes ``x (N, W, C_in)``, ``conv2d`` takes ``x (N, H, W, C_in)`` (NHWC);
the kernel is ``W (*kernel_size, C_in/groups, C_out)`` (WIO / HWIO), the bias ``b (C_out,)``.

Along each spatial axis, with input size ``n``, kernel ``k``, stride ``s``, dilation ``d``
and padding ``(lo, hi)``::

    e = d (k - 1) + 1                      effective (dilated) kernel extent
    m = floor((n + lo + hi - e) / s) + 1   output size
    y[o, co] = b[co] + sum_{k, ci in group(co)} xpad[o s + k d, ci] W[k, ci, co]

``xpad`` is ``x`` with ``lo``/``hi`` zeros. The map is linear in ``x`` and in ``W``; the
backward is its two transposes, each again a convolution::

    dW[k, ci, co] = sum_{n, o} xpad[n, o s + k d, ci] dy[n, o, co]   (x "convolved" with dy:
                                                                     window stride d, dilation s)
    dx = conv(dy dilated by s and padded (e-1-lo, n+lo-(m-1)s-1), W flipped, in/out swapped)
    db = sum_{n, o} dy[n, o]

Padding: ``"VALID"`` (none); ``"SAME"`` (``m = ceil(n / s)``; the total padding
``max((m-1) s + e - n, 0)`` is split with the odd one on the high side, as lax and
TensorFlow do); an int ``p`` (``(p, p)`` on every axis); or explicit pairs ``((lo, hi), ...)``,
one per spatial axis.

Lowerings (``lowering=``, fixed when the layer is built, applied when it is traced):

- ``"native"``: ``lax.conv_general_dilated`` for the forward; the manual backward is the two
  transposed convolutions above, with the paddings and the stride dilation of ``dy`` passed to
  the convolutions (no padded copies of ``x`` or ``dy``).
- ``"patches"`` (im2col): ``P[(n, o), (kk, ci)] = xpad[n, o s + kk d, ci]``, shape
  ``(N prod(m), K C_in)`` for the ``K = prod(k)`` kernel offsets, and one matrix product
  ``y = P @ W.reshape(K C_in, C_out) + b``. Manual backward: ``dW = P^T dy`` and
  ``dx = col2im(dy @ W^T)``, where col2im adds column block ``kk`` back at ``xpad[o s + kk d]``
  (one zero pad with interior ``s - 1`` per offset, summed, cropped). With ``groups > 1`` it
  runs natively (a block-diagonal ``W`` would do ``groups`` times the work).
- ``"auto"`` (the default): native, on every backend.

Why native on CPU as well (issue 9, ``benchmarks/cnn_cpu.py``: conv 1->32 and 32->64, 3x3 SAME,
28x28, batch 128, float32, Adam; 2-core AMD EPYC VM, jax 0.10.2). The patch matrix is
``K = 9`` times the input (29 MB for the 32->64 layer), and memory decides it: XLA runs a
jitted step in one temp buffer, and glibc serves allocations over 32 MiB with a fresh
``mmap``, so a step whose buffer crosses 32 MiB page-faults all of it on every call (about
10k faults, ~10 ms here). The whole training step needs 31.8 MiB with native convolutions
(both engines), 41.0 MiB with patches in the 1-channel layer alone and 92.3 MiB with patches in
both; with patches in the first layer the step took 23.6 / 24.1 ms (manual / autodiff)
against 14.5 / 14.1 ms native (funnn timed alone). ``benchmarks/cnn_cpu.py`` prints the
buffer size; outside the library ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` takes most of the
fault cost away.

Which kernels run the native convolutions matters more than the lowering. XLA's CPU backend
(jaxlib 0.10) hands them to YNNPACK by default, whose 32->64 kernel gradient took 9.3 ms and
forward 4.6 ms, against 3.6 and 2.6 ms in XLA's own convolution; funnn compiles its steps with
YNNPACK kept for matrix products only (:func:`funnn.core.compiler_options`, applied by
:func:`funnn.jit`, ``fit`` and the benchmarks). Step medians, interleaved with PyTorch eager
(2 threads): 79.6 / 42.7 / 22.6 ms autodiff / manual / torch before the pool work; 26.3 /
26.1 / 23.2 ms with YNNPACK convolutions; 19.3 / 19.0 / 24.7 ms (0.78x / 0.77x torch) with
XLA's. (The step's first bottleneck was max-pooling: see ``pool.py``.) No GPU was available
to measure the lowering; native (cuDNN) is the default there.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.core import (
    ConfigError,
    Layer,
    ShapeError,
    check_features,
    check_floating,
    check_in_shape,
    check_rank,
    matmul_wide,
    upcast,
    wide,
)
from funnn.layers.dense import get_initializer
from funnn.layers.per_example import gram_cheaper

__all__ = ["conv1d", "conv2d"]

_SPATIAL = {1: "W", 2: "H, W", 3: "D, H, W"}
_LOWERINGS = ("auto", "patches", "native")


# --------------------------------------------------------------------------- shared helpers
# (also used by pool.py)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _ntuple(name: str, v, nd: int, what: str, minimum: int = 1) -> tuple:
    """``v`` as a tuple of ``nd`` ints ``>= minimum``; an int is repeated on every axis."""
    t = (v,) * nd if _is_int(v) else v
    try:
        t = tuple(t)
    except TypeError:
        t = None
    if t is None or len(t) != nd or not all(_is_int(i) and i >= minimum for i in t):
        raise ConfigError(f"{what} must be an int >= {minimum} or a tuple of {nd} such ints "
                          f"(one per spatial axis), got {v!r}", (name,))
    return tuple(int(i) for i in t)


def _padding_spec(name: str, padding, nd: int):
    """Validate ``padding``: ``"VALID"``, ``"SAME"``, an int, or ``nd`` pairs ``(lo, hi)``."""
    if isinstance(padding, str):
        if padding.upper() not in ("VALID", "SAME"):
            raise ConfigError(f"padding must be 'VALID', 'SAME', an int or {nd} (lo, hi) pairs, "
                              f"got {padding!r}", (name,))
        return padding.upper()
    if _is_int(padding) and padding >= 0:
        return ((int(padding), int(padding)),) * nd
    try:
        pairs = tuple(tuple(p) for p in padding)
    except TypeError:
        pairs = None
    if (pairs is None or len(pairs) != nd
            or not all(len(p) == 2 and all(_is_int(i) and i >= 0 for i in p) for p in pairs)):
        raise ConfigError(f"padding must be 'VALID', 'SAME', an int >= 0 or {nd} pairs "
                          f"(lo, hi) of ints >= 0 (one per spatial axis), got {padding!r}",
                          (name,))
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def _pads(spec, sizes, extents, strides) -> tuple:
    """Explicit ``(lo, hi)`` per spatial axis for the given input sizes (static)."""
    if spec == "VALID":
        return ((0, 0),) * len(sizes)
    if spec == "SAME":
        out = []
        for n, e, s in zip(sizes, extents, strides):
            total = max((-(-n // s) - 1) * s + e - n, 0)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return spec


def _out_sizes(name: str, sizes, extents, strides, pads, what: str) -> tuple:
    """Output size per spatial axis; :class:`ShapeError` if a window exceeds the padded input."""
    out = []
    for i, (n, e, s, (lo, hi)) in enumerate(zip(sizes, extents, strides, pads)):
        if n is None:
            raise ShapeError(f"spatial axis {i} has unknown size None; give every axis but the "
                             f"batch a size", (name,))
        if n + lo + hi < e:
            raise ShapeError(f"{what} extent {e} on spatial axis {i} is larger than the padded "
                             f"input size {n + lo + hi} (size {n}, padding ({lo}, {hi})); use a "
                             f"smaller {what}, less dilation, more padding or padding='SAME'",
                             (name,))
        out.append((n + lo + hi - e) // s + 1)
    return tuple(out)


def _fmt(t: tuple) -> str:
    return str(t[0]) if len(set(t)) == 1 else str(t)


def _fmt_padding(spec) -> str:
    if isinstance(spec, str):
        return spec
    if len(set(spec)) == 1 and spec[0][0] == spec[0][1]:
        return str(spec[0][0])
    return str(spec)


def _dimension_numbers(nd: int, lhs, rhs, out) -> lax.ConvDimensionNumbers:
    """Conv dimension numbers from (batch, feature) axes; the other axes are spatial, in order."""
    def spec(bf, all_axes):
        return tuple(bf) + tuple(a for a in all_axes if a not in bf)
    return lax.ConvDimensionNumbers(spec(lhs, range(nd + 2)), spec(rhs, range(nd + 2)),
                                    spec(out, range(nd + 2)))


# --------------------------------------------------------------------------- patches (im2col)


def _patch_views(x, k, s, d, pads, m) -> list:
    """``xpad[:, o s + kk d, :]`` for each kernel offset ``kk`` (row-major), each ``(N, *m, C)``."""
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads]
                 + [(0, 0, 0)])
    n_b, n_c = x.shape[0], x.shape[-1]
    views = []
    for kk in itertools.product(*(range(ki) for ki in k)):
        start = tuple(ki * di for ki, di in zip(kk, d))
        end = tuple(st + (mi - 1) * si + 1 for st, mi, si in zip(start, m, s))
        views.append(lax.slice(xp, (0,) + start + (0,), (n_b,) + end + (n_c,), (1,) + s + (1,)))
    return views


def _patches(x, k, s, d, pads, m):
    """im2col: ``P[(n, o), (kk, ci)] = xpad[n, o s + kk d, ci]``, shape ``(N prod(m), K C_in)``
    with ``K = prod(k)``; the column order matches ``W.reshape(K C_in, C_out)``."""
    views = _patch_views(x, k, s, d, pads, m)
    p = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return p.reshape(-1, p.shape[-1])


def _col2im(dp, k, s, d, pads, sizes, m):
    """The transpose of :func:`_patches`: ``dp (N, *m, K, C_in)`` -> ``dx (N, *sizes, C_in)``.

    Column block ``kk`` of the patches read ``xpad[o s + kk d]``, so it is added back there:
    one zero pad per offset (``lo = kk d``, interior ``s - 1``), summed, then cropped.
    """
    nd = len(k)
    padded = [n + lo + hi for n, (lo, hi) in zip(sizes, pads)]
    zero = jnp.zeros((), dp.dtype)
    parts = []
    for j, kk in enumerate(itertools.product(*(range(ki) for ki in k))):
        cfg = [(ki * di, p - ki * di - (mi - 1) * si - 1, si - 1)
               for ki, di, p, mi, si in zip(kk, d, padded, m, s)]
        parts.append(lax.pad(dp[(slice(None),) * (nd + 1) + (j,)], zero,
                             [(0, 0, 0)] + cfg + [(0, 0, 0)]))
    dxp = functools.reduce(lax.add, parts)
    start = (0,) + tuple(lo for lo, _ in pads) + (0,)
    limit = (dp.shape[0],) + tuple(lo + n for (lo, _), n in zip(pads, sizes)) + (dp.shape[-1],)
    return lax.slice(dxp, start, limit)


# --------------------------------------------------------------------------- the layer


class _Geometry(NamedTuple):
    """A convolution's static geometry, checked once when the layer is built."""
    nd: int
    features: int
    k: tuple                       # kernel size per spatial axis
    s: tuple                       # stride
    d: tuple                       # dilation
    pad_spec: object               # "VALID", "SAME" or explicit pairs
    groups: int
    ext: tuple                     # dilated kernel extent, d (k - 1) + 1
    dn: lax.ConvDimensionNumbers   # dimension numbers of the forward convolution
    dn_w: lax.ConvDimensionNumbers  # those of the kernel gradient


def _geometry(nd: int, features, kernel_size, stride, padding, dilation, groups, use_bias,
              lowering) -> tuple[_Geometry, str]:
    """The checked geometry and the layer's display name."""
    kind = f"conv{nd}d"
    if not _is_int(features) or features < 1:
        raise ConfigError(f"features (output channels) must be a positive int, got {features!r}",
                          (kind,))
    k = _ntuple(kind, kernel_size, nd, "kernel_size")
    s = _ntuple(kind, stride, nd, "stride")
    d = _ntuple(kind, dilation, nd, "dilation")
    pad_spec = _padding_spec(kind, padding, nd)
    if not _is_int(groups) or groups < 1 or features % groups:
        raise ConfigError(f"groups must be a positive int dividing features={features}, "
                          f"got {groups!r}", (kind,))
    if lowering not in _LOWERINGS:
        raise ConfigError(f"lowering must be one of {', '.join(map(repr, _LOWERINGS))}, got "
                          f"{lowering!r}", (kind,))
    extras = [f"stride={_fmt(s)}" if set(s) != {1} else "",
              f"padding={_fmt_padding(pad_spec)}" if pad_spec != "VALID" else "",
              f"dilation={_fmt(d)}" if set(d) != {1} else "",
              f"groups={groups}" if groups != 1 else "",
              "no bias" if not use_bias else "",
              f"lowering={lowering}" if lowering != "auto" else ""]
    name = f"{kind}({', '.join([str(features), 'x'.join(map(str, k))] + [e for e in extras if e])})"
    ext = tuple(di * (ki - 1) + 1 for ki, di in zip(k, d))
    dn = _dimension_numbers(nd, (0, nd + 1), (nd + 1, nd), (0, nd + 1))
    # kernel gradient: x's channels act as the batch and its batch as the contracted feature
    dn_w = _dimension_numbers(nd, (nd + 1, 0), (nd + 1, 0), (nd, nd + 1))
    return _Geometry(nd, int(features), k, s, d, pad_spec, int(groups), ext, dn, dn_w), name


def _backward_patches(g: _Geometry, x, w, dy, pads):
    """dW = P^T dy and dx = col2im(dy W^T), with P = patches(x) (module docstring)."""
    sizes, m = x.shape[1:-1], dy.shape[1:-1]
    dy2, w2 = dy.reshape(-1, g.features), w.reshape(-1, g.features)
    dw = matmul_wide(_patches(x, g.k, g.s, g.d, pads, m).T, dy2).reshape(w.shape)
    dp = (dy2 @ w2.T).reshape(dy.shape[:-1] + (-1, x.shape[-1]))
    return dw, _col2im(dp, g.k, g.s, g.d, pads, sizes, m)


def _backward_native(g: _Geometry, x, w, dy, pads):
    """dW and dx as the two transposed convolutions (module docstring); the paddings go
    into the convolutions (no padded copies of x or dy)."""
    sizes = x.shape[1:-1]
    # dW: x padded, dropping the trailing rows no window reaches, so the result is exactly k.
    trim = [(lo, hi - (n + lo + hi - e) % si)
            for n, (lo, hi), e, si in zip(sizes, pads, g.ext, g.s)]
    dw = lax.conv_general_dilated(x, dy, g.d, trim, rhs_dilation=g.s,
                                  dimension_numbers=g.dn_w, batch_group_count=g.groups,
                                  preferred_element_type=wide(x.dtype))
    return dw, _dx_native(g, x, w, dy, pads)


def _dx_native(g: _Geometry, x, w, dy, pads):
    """dx alone: the full correlation of the s-dilated dy with the flipped, in/out-swapped
    kernel."""
    nd, k, groups = g.nd, g.k, g.groups
    sizes, m = x.shape[1:-1], dy.shape[1:-1]
    span = [(mi - 1) * si + 1 for mi, si in zip(m, g.s)]  # length of dy dilated by s
    c_ing, c_outg = w.shape[-2], g.features // groups
    wt = w.reshape(k + (c_ing, groups, c_outg))
    wt = jnp.transpose(wt, tuple(range(nd)) + (nd + 2, nd + 1, nd))  # (*k, C_out/g, g, C_in/g)
    wt = wt.reshape(k + (c_outg, groups * c_ing))
    wt = jnp.flip(wt, axis=tuple(range(nd)))
    return lax.conv_general_dilated(dy, wt, (1,) * nd,
                                    [(e - 1 - lo, n + lo - sp)
                                     for n, (lo, _), e, sp in zip(sizes, pads, g.ext, span)],
                                    lhs_dilation=g.s, rhs_dilation=g.d, dimension_numbers=g.dn,
                                    feature_group_count=groups)


def _pe_factors(g: _Geometry, params, x, dy):
    """Per example: patches ``(B, T, K, g, C_in/g)`` and deltas ``(B, T, g, C_out/g)``, with
    ``T = prod(out)`` positions and ``K = prod(k)`` kernel offsets."""
    pads = _pads(g.pad_spec, x.shape[1:-1], g.ext, g.s)
    dt = jnp.result_type(x, params["W"], dy)
    xd, dyd = x.astype(dt), dy.astype(dt)
    m = dy.shape[1:-1]
    b, kk, c_ing = x.shape[0], int(np.prod(g.k)), params["W"].shape[-2]
    pt = _patches(xd, g.k, g.s, g.d, pads, m).reshape(b, -1, kk, g.groups, c_ing)
    dl = dyd.reshape(b, -1, g.groups, g.features // g.groups)
    return pt, dl


def _conv_jvp(g: _Geometry, use_bias: bool, params, x, dparams, dx):
    """Tangent: ``dy = conv(dx, W) + conv(x, dW) + db`` (the layer is bilinear in x and W),
    two native convolutions whatever the lowering; ``dx`` ``None``: no input tangent (one
    convolution)."""
    pads = _pads(g.pad_spec, x.shape[1:-1], g.ext, g.s)
    dt = jnp.result_type(x, params["W"], dparams["W"], *(() if dx is None else (dx,)))

    def lin(a, w):
        return lax.conv_general_dilated(a.astype(dt), w.astype(dt), g.s, pads,
                                        rhs_dilation=g.d, dimension_numbers=g.dn,
                                        feature_group_count=g.groups)

    dy = lin(x, dparams["W"])
    dy = dy if dx is None else dy + lin(dx, params["W"])
    return dy + dparams["b"] if use_bias else dy


def _conv_factors(g: _Geometry, params, x, dy):
    """``dW = sum_{i,t} P_it^T dy_it``: the patches ``(B, T, K C_in)`` (columns in the order
    of ``W.reshape(K C_in, C_out)``) and the deltas ``(B, T, C_out)``."""
    pt, dl = _pe_factors(g, params, x, dy)
    return pt.reshape(pt.shape[:2] + (-1,)), dl.reshape(dl.shape[:2] + (-1,))


def _conv(nd: int, features: int, kernel_size, *, stride=1, padding="VALID", dilation=1,
          groups: int = 1, use_bias: bool = True, w_init="glorot_uniform", b_init="zeros",
          dtype=None, lowering: str = "auto") -> Layer:
    geo, name = _geometry(nd, features, kernel_size, stride, padding, dilation, groups,
                          use_bias, lowering)
    k, s, d, pad_spec, ext, dn = geo.k, geo.s, geo.d, geo.pad_spec, geo.ext, geo.dn
    w_fn = get_initializer(w_init, "kernel", name)
    b_fn = get_initializer(b_init, "bias", name) if use_bias else None
    layout = f"(batch, {_SPATIAL.get(nd, 'spatial...')}, channels)"

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, nd + 2, nd + 2)
        c_in = shape[-1]
        if c_in % groups:
            raise ShapeError(f"input channels {c_in} are not divisible by groups={groups} "
                             f"(init shape {shape})", (name,))
        out = _out_sizes(name, shape[1:-1], ext, s, _pads(pad_spec, shape[1:-1], ext, s),
                         "kernel")
        kw, kb = jax.random.split(key)
        dt = dtype if dtype is not None else jnp.zeros(()).dtype
        params = {"W": w_fn(kw, k + (c_in // groups, features), dt)}
        if b_fn is not None:        # use_bias
            params["b"] = b_fn(kb, (features,), dt)
        return (shape[0],) + out + (features,), params

    def _check(params, x) -> tuple:
        """Shape checks (static, free under jit); returns the explicit padding."""
        check_floating(name, x)
        check_rank(name, x, nd + 2, nd + 2, what=layout)
        w_shape = tuple(jnp.shape(params["W"]))
        if len(w_shape) != nd + 2 or w_shape[:nd] != k or w_shape[-1] != features:
            want = k + ("C_in/groups", features)
            raise ShapeError(f"kernel W has shape {w_shape}, expected {want}; were these params "
                             f"made by this layer's init?", (name,))
        check_features(name, x, w_shape[-2] * groups, what="input channels")
        pads = _pads(pad_spec, x.shape[1:-1], ext, s)
        _out_sizes(name, x.shape[1:-1], ext, s, pads, "kernel")
        return pads

    def use_patches() -> bool:
        """The lowering, decided at trace time: ``"auto"`` is native on every backend (the
        measurements in the module docstring); patches never for groups > 1."""
        return lowering == "patches" and groups == 1

    def apply(params, x, *, key=None, train=False):
        pads = _check(params, x)
        dt = jnp.result_type(x, params["W"])
        x, w = x.astype(dt), params["W"].astype(dt)
        if use_patches():
            m = _out_sizes(name, x.shape[1:-1], ext, s, pads, "kernel")
            y = (_patches(x, k, s, d, pads, m) @ w.reshape(-1, features)).reshape(
                x.shape[:1] + m + (features,))
        else:
            y = lax.conv_general_dilated(x, w, s, pads, rhs_dilation=d, dimension_numbers=dn,
                                         feature_group_count=groups)
        return y + params["b"] if use_bias else y

    def forward(params, x, *, key=None, train=False):
        return apply(params, x), x

    def backward(params, x, dy):
        """dy (N, *out, C_out) -> ({"W": dW, "b": db}, dx (N, *in, C_in)); see the module doc."""
        pads = _pads(pad_spec, x.shape[1:-1], ext, s)
        x_dt, w_dt = x.dtype, params["W"].dtype
        dt = jnp.result_type(x, params["W"], dy)
        x, w, dy = x.astype(dt), params["W"].astype(dt), dy.astype(dt)
        dw, dx = (_backward_patches if use_patches() else _backward_native)(geo, x, w, dy, pads)
        grads = {"W": dw.astype(w_dt)}
        if use_bias:
            grads["b"] = dy.sum(axis=tuple(range(nd + 1)), dtype=wide(dt)).astype(
                params["b"].dtype)
        return grads, dx.astype(x_dt)        # cotangents in their primals' dtypes, as autodiff

    def _pe_dx(params, x, dy):
        """dx without the batch dW (the per-example rules make their own)."""
        if use_patches():
            return backward(params, x, dy)[1]
        pads = _pads(pad_spec, x.shape[1:-1], ext, s)
        dt = jnp.result_type(x, params["W"], dy)
        return _dx_native(geo, x.astype(dt), params["W"].astype(dt), dy.astype(dt),
                          pads).astype(x.dtype)

    def per_example(params, x, dy):
        """dW_i = P_i^T dy_i over example i's patches (per group); db_i = sum_t dy_it."""
        pt, dl = _pe_factors(geo, params, x, dy)
        w = params["W"]
        dw = jnp.einsum("btkgc,btgo->bkcgo", pt, dl).reshape((x.shape[0],) + w.shape)
        grads = {"W": dw.astype(w.dtype)}
        if use_bias:
            grads["b"] = dy.reshape(dy.shape[0], -1, features).sum(1).astype(params["b"].dtype)
        return grads, _pe_dx(params, x, dy)

    def per_example_norms(params, x, dy):
        """||dW_i||^2 through the patches: the Gram form ``sum_{t,s} (P_t . P_s)(dy_t . dy_s)``
        (per group) when ``T^2 (K C_in + C_out) < T K C_in C_out``, else materialised."""
        pt, dl = _pe_factors(geo, params, x, dy)
        pt, dl = upcast(pt), upcast(dl)          # norms in float32 under bfloat16 / float16
        t, kc, co = pt.shape[1], pt.shape[2] * pt.shape[4], dl.shape[3]
        if gram_cheaper(t, kc, co):
            gx = jnp.einsum("btkgc,bskgc->bgts", pt, pt)
            gd = jnp.einsum("btgo,bsgo->bgts", dl, dl)
            sq = jnp.sum(gx * gd, (1, 2, 3))
        else:
            dw = jnp.einsum("btkgc,btgo->bkcgo", pt, dl)
            sq = jnp.sum(jnp.square(dw), (1, 2, 3, 4))
        if use_bias:
            sq = sq + jnp.sum(jnp.square(dl.sum(1)), (1, 2))
        return sq, _pe_dx(params, x, dy)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 per_example=per_example, per_example_norms=per_example_norms,
                 kind=f"conv{nd}d", jvp=functools.partial(_conv_jvp, geo, use_bias),
                 factors=functools.partial(_conv_factors, geo) if groups == 1 else None)


def conv1d(features: int, kernel_size, **options) -> Layer:
    """1-D convolution over NWC ``x (N, W, C_in) -> (N, W_out, features)``.

    Kernel ``W (KW, C_in/groups, features)``, bias ``b (features,)``; options as
    :func:`conv2d`. Formula, shapes and derivatives: see the module docstring.
    """
    return _conv(1, features, kernel_size, **options)


def conv2d(features: int, kernel_size, **options) -> Layer:
    """2-D convolution over NHWC ``x (N, H, W, C_in) -> (N, H_out, W_out, features)``.

    ``y = b + sum_k xpad[o s + k d] W[k]`` per group; ``W`` is HWIO ``(KH, KW, C_in/groups,
    features)``, ``b (features,)``; params ``{"W", "b"}`` (no ``"b"`` with ``use_bias=False``).
    Options (keyword only): ``stride=1``, ``padding="VALID"`` ("SAME", an int or
    ``((lo, hi), (lo, hi))``), ``dilation=1`` (ints or per-axis tuples), ``groups=1``
    (must divide C_in and features), ``use_bias=True``, ``w_init="glorot_uniform"``,
    ``b_init="zeros"`` (a name, a callable ``(key, shape, dtype)`` or an array), ``dtype``,
    ``lowering="auto"`` (``"patches"``: im2col and one matrix product; ``"native"``; see the
    module docstring for what ``"auto"`` picks and why).
    Derivative: ``dW`` = x correlated with dy, ``dx`` = transposed convolution of dy, ``db``
    = sum of dy (module docstring).
    """
    return _conv(2, features, kernel_size, **options)
