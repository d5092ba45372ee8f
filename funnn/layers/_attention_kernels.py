"""Attention kernels: softmax(Q K^T / sqrt(D)) V and its hand-written backward, in three
strategies, each forward beside its backward.

Arrays are head-grouped: queries ``q (b, t, K, G, d)`` (``K`` key/value heads, ``G`` query
heads per key/value head), keys and values ``k, v (b, s, K, d)``, output ``o`` like ``q``.
Scores, softmax and sums run in :func:`~funnn.dtypes.wide` precision (float32 for bfloat16);
results come back in the compute dtype.

* materialized: the forward keeps ``P (b, K, G, t, s)``; the backward is the textbook one.
* chunked: an online softmax over key blocks (a differentiable ``lax.scan``), keeping ``O``
  and the row log-sum-exp ``lse``; the backward recomputes ``P = exp(S - lse)`` per block.
  Dropout masks are drawn per key block from ``fold_in(key, block)`` and redrawn backward.
* tiled: the chunked forward over query blocks *and* key blocks, one ``lax.scan`` over the
  tiles a pass visits (a static list, so a causal layer skips the tiles above the diagonal
  and reverse mode can still differentiate the loop: second order through the manual
  gradient); the backward runs in FlashAttention-2's order, key block by key block.

Plus :func:`cudnn`, the fused GPU kernel ``apply`` uses for float16/bfloat16 when it can.
The backward equations (``dO`` given)::

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),   rowsum(dP * P) = rowsum(dO * O)
    dQ = dS K / sqrt(D),   dK = dS^T Q / sqrt(D)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.dtypes import upcast, wide

__all__ = ["allowed_pairs", "drop_mask", "materialized_fwd", "materialized_bwd",
           "materialized_jvp", "probs", "chunked_drop", "chunked_fwd", "chunked_bwd",
           "tiled_fwd", "tiled_bwd", "cudnn"]


# --------------------------------------------------------------------------- masks


def allowed_pairs(kvalid, full, causal, t, s, k0=0, q0=0):
    """Boolean ``(b|1, 1, 1, t, s)`` of allowed (query, key) pairs for queries ``q0..q0+t`` and
    keys ``k0..k0+s``, or ``None`` when everything is allowed. ``kvalid``/``full`` are already
    cut to those queries and keys."""
    out = None
    if causal:
        out = (jnp.arange(s)[None, :] + k0 <= jnp.arange(t)[:, None] + q0)[None, None, None]
    if kvalid is not None:
        kv = kvalid[:, None, None, None, :]
        out = kv if out is None else out & kv
    if full is not None:
        f = full[:, None, None]
        out = f if out is None else out & f
    return out


def _masked(sc, allowed):
    return sc if allowed is None else jnp.where(allowed, sc, -jnp.inf)


def _safe(m):
    """A row maximum that is ``0`` for rows with no valid key (``-inf``)."""
    return jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype))


# --------------------------------------------------------------------------- materialized


def drop_mask(key, keep, shape, dtype):
    z = jax.random.bernoulli(key, keep, shape)
    return jnp.where(z, jnp.asarray(1.0 / keep, dtype), jnp.zeros((), dtype))


def _ein(spec, a, b):
    """``einsum`` accumulated in float32 for bfloat16/float16 operands (result in float32)."""
    return jnp.einsum(spec, a, b, preferred_element_type=wide(jnp.result_type(a, b)))


def materialized_fwd(q, k, v, allowed, drop, scale):
    """``q (b,t,K,G,d)``, ``k, v (b,s,K,d)`` -> ``o (b,t,K,G,d)``, ``p (b,K,G,t,s)``.

    Scores, softmax and sums run in :func:`~funnn.core.wide` precision (float32 for
    bfloat16); ``P`` is kept, and multiplies ``V``, in the compute dtype."""
    dt = q.dtype
    sc = _masked(_ein("btkgd,bskd->bkgts", q, k) * scale, allowed)
    m = _safe(lax.stop_gradient(jnp.max(sc, axis=-1, keepdims=True)))
    e = jnp.exp(sc - m)
    l_ = jnp.sum(e, axis=-1, keepdims=True)
    p = (e / jnp.where(l_ > 0, l_, jnp.ones((), l_.dtype))).astype(dt)
    pd = p if drop is None else p * drop
    return _ein("bkgts,bskd->btkgd", pd, v).astype(dt), p


def materialized_bwd(q, k, v, p, drop, scale, do):
    dt = q.dtype
    pd = p if drop is None else p * drop
    dv = _ein("bkgts,btkgd->bskd", pd, do).astype(dt)             # dV = P^T dO
    dp = _ein("btkgd,bskd->bkgts", do, v)                         # dP = dO V^T
    if drop is not None:
        dp = dp * drop
    pw = upcast(p)
    ds = (pw * (dp - jnp.sum(dp * pw, axis=-1, keepdims=True))).astype(dt)   # softmax JVP
    dq = (_ein("bkgts,bskd->btkgd", ds, k) * scale).astype(dt)    # dQ = dS K / sqrt(d)
    dk = (_ein("bkgts,btkgd->bskd", ds, q) * scale).astype(dt)    # dK = dS^T Q / sqrt(d)
    return dq, dk, dv


def materialized_jvp(q, k, v, p, drop, scale, dq, dk, dv):
    """The tangent ``dO`` of :func:`materialized_fwd` along ``dq, dk, dv`` (shaped as ``q, k,
    v``) from its ``P``: ``dS = (dQ K^T + Q dK^T) / sqrt(D)``, ``dP = P * (dS - rowsum(P *
    dS))`` (a masked pair has ``P = 0``, so no tangent), ``dO = (dP * Z) V + (P * Z) dV``."""
    dt = q.dtype
    ds = (_ein("btkgd,bskd->bkgts", dq, k) + _ein("btkgd,bskd->bkgts", q, dk)) * scale
    pw = upcast(p)
    dp = pw * (ds - jnp.sum(pw * ds, axis=-1, keepdims=True))
    pd, dpd = (p, dp) if drop is None else (p * drop, dp * drop)
    return (_ein("bkgts,bskd->btkgd", dpd.astype(dt), v)
            + _ein("bkgts,bskd->btkgd", pd, dv)).astype(dt)


def probs(q, k, kvalid, full, causal, scale, lse):
    """``P = exp(S - lse)`` ``(b, K, G, t, s)`` recomputed whole from the chunked and tiled
    residuals (``0`` where masked and on rows with no valid key, whose ``lse`` is ``inf``)."""
    t, s = q.shape[1], k.shape[1]
    sc = _masked(_ein("btkgd,bskd->bkgts", q, k) * scale,
                 allowed_pairs(kvalid, full, causal, t, s))
    return jnp.exp(sc - lse[..., None]).astype(q.dtype)


def chunked_drop(key, keep, shape, block, dtype):
    """The dropout mask ``Z`` of :func:`chunked_fwd` for ``P`` of ``shape (b, K, G, t, s)``
    whole: each key block's, drawn as the forward draws it, side by side."""
    s = shape[-1]
    bs = min(block, s)
    parts = [_chunk_drop(key, keep, j, shape[:-1] + (bs,), dtype)
             for j in range(-(-s // bs))]
    return jnp.concatenate(parts, axis=-1)[..., :s]


def _blocks(k, v, kvalid, full, block):
    """Key-side arrays padded to whole blocks and stacked block-first for ``lax.scan``."""
    b, s = k.shape[:2]
    nb = -(-s // block)
    pad = nb * block - s
    if pad and kvalid is None:
        kvalid = jnp.ones((b, s), bool)

    def stack(a, axis):
        if a is None:
            return None
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        a = jnp.pad(a, widths)                       # False / zeros past the end
        a = a.reshape(a.shape[:axis] + (nb, block) + a.shape[axis + 1:])
        return jnp.moveaxis(a, axis, 0)

    return nb, (stack(k, 1), stack(v, 1), stack(kvalid, 1), stack(full, 2), jnp.arange(nb))


def _chunk_drop(key, keep, j, shape, dtype):
    return None if key is None else drop_mask(jax.random.fold_in(key, j), keep, shape, dtype)


def chunked_fwd(q, k, v, kvalid, full, causal, drop_key, keep, scale, block):
    """Online softmax over key blocks: returns ``o (b,t,K,G,d)`` and ``lse (b,K,G,t)``."""
    b, t, nk, g, _ = q.shape
    bs = min(block, k.shape[1])
    _, xs = _blocks(k, v, kvalid, full, bs)
    dt = q.dtype
    wt = wide(dt)                     # running max, sums and output accumulate in float32

    def step(carry, xs):
        m, l_, acc = carry
        kj, vj, kvj, fj, j = xs
        sc = _masked(_ein("btkgd,bskd->bkgts", q, kj) * scale,
                     allowed_pairs(kvj, fj, causal, t, bs, j * bs))
        m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(sc, axis=-1)))
        m_safe = _safe(m_new)
        alpha = jnp.exp(m - m_safe)                                 # rescale the old sums
        p = jnp.exp(sc - m_safe[..., None])
        l_ = alpha * l_ + jnp.sum(p, axis=-1)
        z = _chunk_drop(drop_key, keep, j, p.shape, dt)
        pc = p.astype(dt)
        pv = _ein("bkgts,bskd->btkgd", pc if z is None else pc * z, vj)
        acc = jnp.moveaxis(alpha, -1, 1)[..., None] * acc + pv
        return (m_new, l_, acc), None

    init = (jnp.full((b, nk, g, t), -jnp.inf, wt), jnp.zeros((b, nk, g, t), wt),
            jnp.zeros(q.shape, wt))
    (m, l_, acc), _ = lax.scan(step, init, xs)
    pos = l_ > 0
    o = acc / jnp.moveaxis(jnp.where(pos, l_, jnp.ones((), wt)), -1, 1)[..., None]
    lse = jnp.where(pos, _safe(m) + jnp.log(jnp.where(pos, l_, jnp.ones((), wt))), jnp.inf)
    return o.astype(dt), lse


def chunked_bwd(q, k, v, kvalid, full, causal, drop_key, keep, scale, block, o, lse, do):
    """Recompute ``P = exp(S - lse)`` per key block; accumulate ``dQ``, emit ``dK, dV``."""
    t = q.shape[1]
    s = k.shape[1]
    bs = min(block, s)
    nb, xs = _blocks(k, v, kvalid, full, bs)
    dt = q.dtype
    delta = _ein("btkgd,btkgd->bkgt", do, o)[..., None]            # rowsum(dP * P)

    def step(dq, xs):
        kj, vj, kvj, fj, j = xs
        sc = _masked(_ein("btkgd,bskd->bkgts", q, kj) * scale,
                     allowed_pairs(kvj, fj, causal, t, bs, j * bs))
        p = jnp.exp(sc - lse[..., None])                            # 0 where masked
        z = _chunk_drop(drop_key, keep, j, p.shape, dt)
        pc = p.astype(dt)
        dvj = _ein("bkgts,btkgd->bskd", pc if z is None else pc * z, do).astype(dt)
        dp = _ein("btkgd,bskd->bkgts", do, vj)
        ds = (p * ((dp if z is None else dp * z) - delta)).astype(dt)
        dq = dq + _ein("bkgts,bskd->btkgd", ds, kj) * scale
        dkj = (_ein("bkgts,btkgd->bskd", ds, q) * scale).astype(dt)
        return dq, (dkj, dvj)

    dq, (dk, dv) = lax.scan(step, jnp.zeros(q.shape, wide(dt)), xs)
    dq = dq.astype(dt)

    def unstack(a):                                  # (nb, b, bs, K, d) -> (b, s, K, d)
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape((a.shape[0], nb * bs) + a.shape[3:])[:, :s]

    return dq, unstack(dk), unstack(dv)


# --------------------------------------------------------------------------- tiled, causal-aware


def _pad_axis(a, axis, size, value=0):
    if a is None or a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths, constant_values=value)


def _tile(a, axis, start, size):
    return None if a is None else lax.dynamic_slice_in_dim(a, start, size, axis)


def _tiles(q, k, v, kvalid, full, block):
    """Block sizes and counts (queries ``bq, nq``, keys ``bk, nk``) and the arrays padded to
    whole tiles: ``q``, ``k``, ``v``, the key-valid mask (``False`` past the end) and the full
    mask."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    bq, bk = min(block, t), min(block, s)
    nq, nk = -(-t // bq), -(-s // bk)
    if kvalid is None and nk * bk != s:
        kvalid = jnp.ones((b, s), bool)
    fp = None if full is None else _pad_axis(_pad_axis(full, 1, nq * bq, False), 2, nk * bk,
                                             False)
    return (bq, bk, nq, nk, _pad_axis(q, 1, nq * bq), _pad_axis(k, 1, nk * bk),
            _pad_axis(v, 1, nk * bk), _pad_axis(kvalid, 1, nk * bk, False), fp)


def _tile_pairs(nq, nk, bq, bk, causal, by_key):
    """The tiles ``(i, j)`` (query block, key block) a causal-aware pass visits, as static
    ``int32`` arrays ``i, j`` and a boolean ``first`` (the first tile of its row, or of its
    column when ``by_key``): row by row for the forward (``j = 0..j_max(i)``), column by column
    for the backward (``i = i_min(j)..nq-1``). Known from the shapes alone, so one ``lax.scan``
    of static length walks them: no tile above a causal diagonal is visited, and reverse mode
    can differentiate the loop (second order)."""
    pairs = []
    if by_key:
        for j in range(nk):
            start = (j * bk) // bq if causal else 0
            pairs += [(i, j, i == start) for i in range(start, nq)]
    else:
        for i in range(nq):
            stop = min(nk, ((i + 1) * bq - 1) // bk + 1) if causal else nk
            pairs += [(i, j, j == 0) for j in range(stop)]
    table = np.array(pairs, np.int64).reshape(-1, 3)
    return (jnp.asarray(table[:, 0], jnp.int32), jnp.asarray(table[:, 1], jnp.int32),
            jnp.asarray(table[:, 2], bool))


def tiled_fwd(q, k, v, kvalid, full, causal, scale, block):
    """The chunked forward tiled over query blocks *and* key blocks: query block ``i`` visits
    key blocks ``0..j_max(i)`` only, so a causal layer skips the tiles above the diagonal
    (half the work). One ``lax.scan`` over the visited tiles (:func:`_tile_pairs`), row by row:
    the row statistics restart at a row's first tile, and each step writes its row's ``o`` and
    ``lse`` so far (the last write is the whole row). Reverse-differentiable, so the manual
    gradient can itself be differentiated; first order, its backward is :func:`tiled_bwd`.
    Returns ``o`` and ``lse`` as :func:`chunked_fwd`."""
    b, t, nkv, g = q.shape[:4]
    dt, wt = q.dtype, wide(q.dtype)
    bq, bk, nq, nk, qp, kp, vp, kvp, fp = _tiles(q, k, v, kvalid, full, block)

    def step(carry, xs):
        m, l_, acc, o_buf, lse_buf = carry
        i, j, first = xs
        m = jnp.where(first, -jnp.inf, m)                  # a new row: restart its statistics
        l_, acc = jnp.where(first, 0, l_), jnp.where(first, 0, acc)
        qi, kj, vj = _tile(qp, 1, i * bq, bq), _tile(kp, 1, j * bk, bk), _tile(vp, 1, j * bk, bk)
        allowed = allowed_pairs(_tile(kvp, 1, j * bk, bk),
                                _tile(_tile(fp, 1, i * bq, bq), 2, j * bk, bk), causal,
                                bq, bk, j * bk, i * bq)
        sc = _masked(_ein("btkgd,bskd->bkgts", qi, kj) * scale, allowed)
        m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(sc, axis=-1)))   # cancels exactly
        m_safe = _safe(m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(sc - m_safe[..., None])
        l_ = alpha * l_ + jnp.sum(p, axis=-1)
        pv = _ein("bkgts,bskd->btkgd", p.astype(dt), vj)
        acc = jnp.moveaxis(alpha, -1, 1)[..., None] * acc + pv
        pos = l_ > 0
        l_pos = jnp.where(pos, l_, jnp.ones((), wt))
        o_i = (acc / jnp.moveaxis(l_pos, -1, 1)[..., None]).astype(dt)
        lse_i = jnp.where(pos, _safe(m_new) + jnp.log(l_pos), jnp.inf)
        o_buf = lax.dynamic_update_slice_in_dim(o_buf, o_i, i * bq, 1)
        lse_buf = lax.dynamic_update_slice_in_dim(lse_buf, lse_i, i * bq, 3)
        return (m_new, l_, acc, o_buf, lse_buf), None

    init = (jnp.full((b, nkv, g, bq), -jnp.inf, wt), jnp.zeros((b, nkv, g, bq), wt),
            jnp.zeros((b, bq) + q.shape[2:], wt), jnp.zeros(qp.shape, dt),
            jnp.zeros((b, nkv, g, nq * bq), wt))
    (_, _, _, o, lse), _ = lax.scan(step, init, _tile_pairs(nq, nk, bq, bk, causal, False))
    return o[:, :t], lse[..., :t]


def tiled_bwd(q, k, v, kvalid, full, causal, scale, block, o, lse, do):
    """The backward of :func:`tiled_fwd` (FlashAttention-2's order): for each key block ``j``,
    the query blocks that see it (from the diagonal down when causal) recompute
    ``P = exp(S - lse)`` and add to ``dK_j``, ``dV_j`` and ``dQ_i``. One ``lax.scan`` over the
    visited tiles, column by column (reverse-differentiable, as the forward)."""
    t, s = q.shape[1], k.shape[1]
    dt, wt = q.dtype, wide(q.dtype)
    bq, bk, nq, nk, qp, kp, vp, kvp, fp = _tiles(q, k, v, kvalid, full, block)
    delta = _ein("btkgd,btkgd->bkgt", do, o)                          # rowsum(dP * P)
    dop = _pad_axis(do, 1, nq * bq)
    lsep = _pad_axis(lse, 3, nq * bq, jnp.inf)                         # padded rows: P = 0
    deltap = _pad_axis(delta, 3, nq * bq)

    def step(carry, xs):
        dq, dk, dv, dk_buf, dv_buf = carry
        i, j, first = xs
        dk, dv = jnp.where(first, 0, dk), jnp.where(first, 0, dv)   # a new key block
        kj, vj = _tile(kp, 1, j * bk, bk), _tile(vp, 1, j * bk, bk)
        qi, doi = _tile(qp, 1, i * bq, bq), _tile(dop, 1, i * bq, bq)
        lsei, deltai = _tile(lsep, 3, i * bq, bq), _tile(deltap, 3, i * bq, bq)
        allowed = allowed_pairs(_tile(kvp, 1, j * bk, bk),
                                _tile(_tile(fp, 2, j * bk, bk), 1, i * bq, bq), causal,
                                bq, bk, j * bk, i * bq)
        sc = _masked(_ein("btkgd,bskd->bkgts", qi, kj) * scale, allowed)
        p = jnp.exp(sc - lsei[..., None])                                # 0 where masked
        dv = dv + _ein("bkgts,btkgd->bskd", p.astype(dt), doi)
        dp = _ein("btkgd,bskd->bkgts", doi, vj)
        ds = (p * (dp - deltai[..., None])).astype(dt)
        dq_i = _tile(dq, 1, i * bq, bq) + _ein("bkgts,bskd->btkgd", ds, kj) * scale
        dq = lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, 1)
        dk = dk + _ein("bkgts,btkgd->bskd", ds, qi) * scale
        dk_buf = lax.dynamic_update_slice_in_dim(dk_buf, dk.astype(dt), j * bk, 1)
        dv_buf = lax.dynamic_update_slice_in_dim(dv_buf, dv.astype(dt), j * bk, 1)
        return (dq, dk, dv, dk_buf, dv_buf), None

    zeros = jnp.zeros((k.shape[0], bk) + k.shape[2:], wt)
    init = (jnp.zeros(qp.shape, wt), zeros, zeros, jnp.zeros(kp.shape, dt),
            jnp.zeros(kp.shape, dt))
    (dq, _, _, dk, dv), _ = lax.scan(step, init, _tile_pairs(nq, nk, bq, bk, causal, True))
    return dq[:, :t].astype(dt), dk[:, :s], dv[:, :s]


# --------------------------------------------------------------------------- cuDNN (apply, GPU)


def cudnn(q, k, v, causal: bool, lengths):
    """``o`` like ``q`` by ``jax.nn.dot_product_attention(implementation="cudnn")``, or ``None``
    when cuDNN refuses the shape or dtype. Masks: ``causal`` and key ``lengths`` only (the
    caller falls back for a boolean ``mask=``). A query row with no valid key gets zero, as
    in the other kernels."""
    b, t, _, _, d = q.shape
    try:
        o = jax.nn.dot_product_attention(
            q.reshape(b, t, -1, d), k, v, is_causal=causal,
            key_value_seq_lengths=(None if lengths is None
                                   else jnp.asarray(lengths, jnp.int32)),
            implementation="cudnn")
    except Exception:                     # a shape or dtype cuDNN does not support
        return None
    if lengths is not None:               # no valid key: zero, as the other paths
        o = o * (jnp.asarray(lengths) > 0)[:, None, None, None].astype(o.dtype)
    return o.reshape(q.shape)
