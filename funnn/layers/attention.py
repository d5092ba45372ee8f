"""Multi-head attention (self and cross), with its hand-written backward in two residual
strategies.

``x (batch, T, F)`` is projected to queries, keys and values (row-vector convention,
``W`` of shape ``(in, out)``); head ``h`` uses columns ``h*D:(h+1)*D`` of ``W_q``, and
key/value head ``h // G`` (``G = num_heads / num_kv_heads``, grouped-query attention)::

    Q = x W_q + b_q,   K = c W_k + b_k,   V = c W_v + b_v      (c = x, or the context)
    S = Q K^T / sqrt(D),   P = softmax(S over keys, masked),   O = P V,   y = O W_o + b_o

Hand-written backward (``dO`` from ``dy W_o^T``), the FlashAttention-2 equations::

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),   rowsum(dP * P) = rowsum(dO * O)
    dQ = dS K / sqrt(D),   dK = dS^T Q / sqrt(D)
    dW_q = x^T dQ,  db_q = sum(dQ),  dx = dQ W_q^T + dK W_k^T + dV W_v^T   (likewise k, v, o)

``implementation`` picks what the forward keeps for the backward:

* ``"materialized"``: ``P`` itself, ``O(T * S)`` memory per head (the textbook version).
* ``"chunked"``: flash-attention style. The forward runs an online softmax over key blocks
  of ``block_size`` (a ``lax.scan``) and keeps only ``O`` and the row log-sum-exp
  ``lse = m + log(l)``; the backward recomputes ``P = exp(S - lse)`` block by block.
  ``O(T + S)`` memory besides the projections (one ``T x block_size`` tile at a time).
* ``"auto"``: ``"chunked"`` on every backend. Measured on CPU (2 cores, float32, batch 2,
  4 heads, 128 features; forward + backward, jitted): chunked 6.3 / 31 / 182 ms against
  materialized 7.4 / 93 / 538 ms at 256 / 512 / 1024 tokens (the ``T x S`` softmax tile does
  not stay in cache). ``apply`` (the autodiff path) calls
  ``jax.nn.dot_product_attention(implementation="cudnn")`` on a GPU for float16/bfloat16
  inputs without dropout (falling back when cuDNN refuses the shape); elsewhere it runs the
  same computation as the manual forward.
* The manual path's chunked forward and backward tile queries *and* keys (blocks of
  ``block_size``): query block ``i`` visits only key blocks ``0..j_max(i)``, so a causal layer
  skips the tiles above the diagonal, half the work (a ``fori_loop`` with a traced bound,
  which the hand-written backward never differentiates; the backward runs in
  FlashAttention-2's order, key block by key block). ``apply`` and training with attention
  dropout keep the differentiable key-block ``scan``.
* ``block_size=None`` picks the block by backend (``AUTO_BLOCK``): 128 on a CPU, 1024 on a
  GPU. Measured on one H200 (causal, 16 heads x 64, bfloat16, forward + backward with the
  projections; ``benchmarks/results/h200/attention_tiled.txt``): at seq 4096 (batch 4) the
  tiled chunked backward 11.2 ms against softmax(QK^T)V under ``jax.grad`` 12.8 ms (0.87x,
  with linear memory), materialized 12.4 ms, 128-key tiles 43.2 ms; at seq 1024 (batch 16)
  chunked 3.9 ms against 3.5 ms (one tile, nothing to skip). The autodiff path (cuDNN)
  2.3 ms and PyTorch SDPA 2.3 ms at seq 4096: ``apply`` is the fast path on a GPU.
* jax 0.10's ``dot_product_attention`` with ``implementation=None`` is plain XLA that
  computes the softmax in float32 even for float64 inputs, so it is not used for
  float32/float64 (float64 checks would lose precision).

Masks (keyword arguments of ``apply`` and ``forward``; key positions are the context's for
cross-attention): ``lengths=`` integer ``(batch,)``, key ``s`` is valid when
``s < lengths[b]``; or ``mask=`` boolean ``(batch, S)`` (``True`` = attend) or
``(batch, T, S)``; and ``causal=True`` (self-attention: query ``t`` sees keys ``s <= t``).
A masked key gets exactly zero weight and zero gradient. A query row with no valid key
outputs zero attention (``y = b_o``), not NaN (PyTorch) or a uniform average (jax).
Padded query positions are computed as usual; mask them in the loss.

Dropout (``dropout > 0``, ``train=True``, explicit ``key=``): inverted dropout on ``P``,
``O = (P * Z) V`` with ``Z = bernoulli(1 - rate) / (1 - rate)``; the chunked variant draws
``Z`` per key block from ``fold_in(key, block)`` and redraws it in the backward, so its
masks differ from the materialized variant's for the same key.

From PyTorch ``nn.MultiheadAttention(E, num_heads, batch_first=True)`` (``kdim == vdim == E``)::

    W_q = in_proj_weight[:E].T      b_q = in_proj_bias[:E]
    W_k = in_proj_weight[E:2E].T    b_k = in_proj_bias[E:2E]
    W_v = in_proj_weight[2E:].T     b_v = in_proj_bias[2E:]
    W_o = out_proj.weight.T         b_o = out_proj.bias

(its ``key_padding_mask`` is ``True`` for padding: pass ``mask=~key_padding_mask``; its
``attn_mask`` boolean ``True`` means "not allowed", the opposite of funnn's ``mask``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.core import (
    ConfigError,
    DTypeError,
    KeyMissingError,
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
from funnn.layers._per_example import batch_outer, batch_sum, outer_sq_norm
from funnn.layers.dense import INITIALIZERS

__all__ = ["multi_head_attention", "cross_attention", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("auto", "materialized", "chunked")
# keys per block of the chunked strategy when block_size is None, by backend
AUTO_BLOCK = {"cpu": 128, "gpu": 1024, "tpu": 1024}


def _positive(value, what: str, layer: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}", (layer,))
    return int(value)


def _concrete(a):
    """``a`` as numpy when its values are known now (not a tracer), else ``None``."""
    if isinstance(a, jax.core.Tracer):
        return None
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


# --------------------------------------------------------------------------- masks


def _key_masks(name, b, t, s, mask, lengths):
    """``(kvalid (b, s) | None, full (b, t, s) | None)`` from ``mask=`` / ``lengths=``."""
    kvalid = full = None
    if lengths is not None:
        ls = jnp.shape(lengths)
        if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
            raise DTypeError(f"lengths must be integers of shape (batch,) = ({b},), got dtype "
                             f"{jnp.result_type(lengths)}", (name,))
        if ls != (b,):
            raise ShapeError(f"expected lengths of shape (batch,) = ({b},), got {ls}", (name,))
        values = _concrete(lengths)
        if values is not None and values.size and (values.min() < 0 or values.max() > s):
            raise ShapeError(f"key padding lengths must lie in 0..{s} (the key sequence length), "
                             f"got lengths in {values.min()}..{values.max()}", (name,))
        kvalid = jnp.arange(s) < jnp.asarray(lengths)[:, None]
    if mask is not None:
        ms, dt = jnp.shape(mask), jnp.result_type(mask)
        if dt != jnp.bool_:
            raise DTypeError(f"mask must be boolean (True = attend), got dtype {dt}; for "
                             f"integer key lengths pass lengths= instead", (name,))
        if ms == (b, s):
            m = jnp.asarray(mask)
            kvalid = m if kvalid is None else kvalid & m
        elif ms == (b, t, s):
            full = jnp.asarray(mask)
        else:
            raise ShapeError(f"expected mask of shape (batch, keys) = {(b, s)} or (batch, "
                             f"queries, keys) = {(b, t, s)}, got {ms}", (name,))
    return kvalid, full


def _allowed(kvalid, full, causal, t, s, k0=0, q0=0):
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


# --------------------------------------------------------------------------- the core


def _drop_mask(key, keep, shape, dtype):
    z = jax.random.bernoulli(key, keep, shape)
    return jnp.where(z, jnp.asarray(1.0 / keep, dtype), jnp.zeros((), dtype))


def _ein(spec, a, b):
    """``einsum`` accumulated in float32 for bfloat16/float16 operands (result in float32)."""
    return jnp.einsum(spec, a, b, preferred_element_type=wide(jnp.result_type(a, b)))


def _materialized_fwd(q, k, v, allowed, drop, scale):
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


def _materialized_bwd(q, k, v, p, drop, scale, do):
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
    return None if key is None else _drop_mask(jax.random.fold_in(key, j), keep, shape, dtype)


def _chunked_fwd(q, k, v, kvalid, full, causal, drop_key, keep, scale, block):
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
                     _allowed(kvj, fj, causal, t, bs, j * bs))
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


def _chunked_bwd(q, k, v, kvalid, full, causal, drop_key, keep, scale, block, o, lse, do):
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
                     _allowed(kvj, fj, causal, t, bs, j * bs))
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


def _tiled_fwd(q, k, v, kvalid, full, causal, scale, block):
    """The chunked forward tiled over query blocks *and* key blocks: query block ``i`` visits
    key blocks ``0..j_max(i)`` only, so a causal layer skips the tiles above the diagonal
    (half the work). A ``fori_loop`` with a traced bound: the manual path never differentiates
    it (its backward is :func:`_tiled_bwd`). Returns ``o`` and ``lse`` as
    :func:`_chunked_fwd`."""
    b, t, nkv, g = q.shape[:4]
    dt, wt = q.dtype, wide(q.dtype)
    bq, bk, nq, nk, qp, kp, vp, kvp, fp = _tiles(q, k, v, kvalid, full, block)

    def q_block(i):
        qi = _tile(qp, 1, i * bq, bq)
        fi = _tile(fp, 1, i * bq, bq)

        def body(j, carry):
            m, l_, acc = carry
            kj, vj = _tile(kp, 1, j * bk, bk), _tile(vp, 1, j * bk, bk)
            allowed = _allowed(_tile(kvp, 1, j * bk, bk), _tile(fi, 2, j * bk, bk), causal,
                               bq, bk, j * bk, i * bq)
            sc = _masked(_ein("btkgd,bskd->bkgts", qi, kj) * scale, allowed)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            m_safe = _safe(m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(sc - m_safe[..., None])
            l_ = alpha * l_ + jnp.sum(p, axis=-1)
            pv = _ein("bkgts,bskd->btkgd", p.astype(dt), vj)
            return m_new, l_, jnp.moveaxis(alpha, -1, 1)[..., None] * acc + pv

        stop = jnp.minimum(nk, ((i + 1) * bq - 1) // bk + 1) if causal else nk
        init = (jnp.full((b, nkv, g, bq), -jnp.inf, wt), jnp.zeros((b, nkv, g, bq), wt),
                jnp.zeros(qi.shape, wt))
        m, l_, acc = lax.fori_loop(0, stop, body, init)
        pos = l_ > 0
        o = acc / jnp.moveaxis(jnp.where(pos, l_, jnp.ones((), wt)), -1, 1)[..., None]
        lse = jnp.where(pos, _safe(m) + jnp.log(jnp.where(pos, l_, jnp.ones((), wt))), jnp.inf)
        return o.astype(dt), lse

    o, lse = lax.map(q_block, jnp.arange(nq))       # (nq, b, bq, ...), (nq, b, K, G, bq)
    o = jnp.moveaxis(o, 0, 1).reshape((b, nq * bq) + q.shape[2:])[:, :t]
    lse = jnp.moveaxis(lse, 0, -2).reshape(lse.shape[1:-1] + (nq * bq,))[..., :t]
    return o, lse


def _tiled_bwd(q, k, v, kvalid, full, causal, scale, block, o, lse, do):
    """The backward of :func:`_tiled_fwd` (FlashAttention-2's order): for each key block ``j``,
    the query blocks that see it (from the diagonal down when causal) recompute
    ``P = exp(S - lse)`` and add to ``dK_j``, ``dV_j`` and ``dQ_i``."""
    t, s = q.shape[1], k.shape[1]
    dt, wt = q.dtype, wide(q.dtype)
    bq, bk, nq, nk, qp, kp, vp, kvp, fp = _tiles(q, k, v, kvalid, full, block)
    delta = _ein("btkgd,btkgd->bkgt", do, o)                          # rowsum(dP * P)
    dop = _pad_axis(do, 1, nq * bq)
    lsep = _pad_axis(lse, 3, nq * bq, jnp.inf)                         # padded rows: P = 0
    deltap = _pad_axis(delta, 3, nq * bq)

    def k_block(dq, j):
        kj, vj = _tile(kp, 1, j * bk, bk), _tile(vp, 1, j * bk, bk)
        kvj, fj = _tile(kvp, 1, j * bk, bk), _tile(fp, 2, j * bk, bk)

        def body(i, carry):
            dq, dk, dv = carry
            qi, doi = _tile(qp, 1, i * bq, bq), _tile(dop, 1, i * bq, bq)
            lsei, deltai = _tile(lsep, 3, i * bq, bq), _tile(deltap, 3, i * bq, bq)
            allowed = _allowed(kvj, _tile(fj, 1, i * bq, bq), causal, bq, bk, j * bk, i * bq)
            sc = _masked(_ein("btkgd,bskd->bkgts", qi, kj) * scale, allowed)
            p = jnp.exp(sc - lsei[..., None])                            # 0 where masked
            dv = dv + _ein("bkgts,btkgd->bskd", p.astype(dt), doi)
            dp = _ein("btkgd,bskd->bkgts", doi, vj)
            ds = (p * (dp - deltai[..., None])).astype(dt)
            dq_i = _tile(dq, 1, i * bq, bq) + _ein("bkgts,bskd->btkgd", ds, kj) * scale
            dq = lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, 1)
            dk = dk + _ein("bkgts,btkgd->bskd", ds, qi) * scale
            return dq, dk, dv

        start = (j * bk) // bq if causal else 0
        zeros = jnp.zeros(kj.shape, wt)
        dq, dk, dv = lax.fori_loop(start, nq, body, (dq, zeros, zeros))
        return dq, (dk.astype(dt), dv.astype(dt))

    dq, (dk, dv) = lax.scan(k_block, jnp.zeros(qp.shape, wt), jnp.arange(nk))

    def unstack(a):                                  # (nk, b, bk, K, d) -> (b, s, K, d)
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape((a.shape[0], nk * bk) + a.shape[3:])[:, :s]

    return dq[:, :t].astype(dt), unstack(dk), unstack(dv)


# --------------------------------------------------------------------------- the layer


class _Materialized(NamedTuple):
    """Residuals that keep ``P (b, K, G, t, s)`` and the dropout mask ``Z`` (or ``None``)."""
    x: jnp.ndarray
    c: jnp.ndarray
    q: jnp.ndarray
    k: jnp.ndarray
    v: jnp.ndarray
    o: jnp.ndarray
    p: jnp.ndarray
    drop: jnp.ndarray | None


class _Chunked(NamedTuple):
    """Residuals that keep only ``O`` and the row ``lse (b, K, G, t)``, the masks as given
    (``O(S)`` or the user's ``(b, t, s)``) and the dropout key (or ``None``)."""
    x: jnp.ndarray
    c: jnp.ndarray
    q: jnp.ndarray
    k: jnp.ndarray
    v: jnp.ndarray
    o: jnp.ndarray
    lse: jnp.ndarray
    kvalid: jnp.ndarray | None
    full: jnp.ndarray | None
    key: jnp.ndarray | None


def _make(num_heads, head_dim, out_features, causal, use_bias, dropout, implementation,
          num_kv_heads, block_size, cross: bool) -> Layer:
    kind = "cross_attention" if cross else "multi_head_attention"
    h = _positive(num_heads, "num_heads", kind)
    assert h is not None
    hk = _positive(num_kv_heads, "num_kv_heads", kind, allow_none=True) or h
    if h % hk:
        raise ConfigError(f"num_kv_heads {hk} must divide num_heads {h} (each key/value head "
                          f"serves num_heads / num_kv_heads query heads)", (kind,))
    d_fixed = _positive(head_dim, "head_dim", kind, allow_none=True)
    out_fixed = _positive(out_features, "out_features", kind, allow_none=True)
    block_fixed = _positive(block_size, "block_size", kind, allow_none=True)
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got "
                          f"{implementation!r}", (kind,))
    ok = not isinstance(dropout, bool) and isinstance(dropout, (int, float, np.integer,
                                                                np.floating))
    rate = float(dropout) if ok else math.nan
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"dropout must be a number in [0, 1) (the drop probability on the "
                          f"attention weights), got {dropout!r}", (kind,))
    if cross and causal:
        raise ConfigError("causal masking is for self-attention; give cross_attention a "
                          "mask= of shape (batch, queries, keys) instead", (kind,))
    g = h // hk
    opts = ([f"num_kv_heads={hk}"] if hk != h else []) + (["causal"] if causal else []) + (
        [f"dropout={rate:g}"] if rate else []) + (
        [implementation] if implementation != "auto" else [])
    name = f"{kind}({', '.join([str(h)] + opts)})"
    glorot = INITIALIZERS["glorot_uniform"]

    def _head_dim(f_q: int) -> int:
        if d_fixed is not None:
            return d_fixed
        if f_q % h:
            raise ShapeError(f"input features {f_q} are not divisible by num_heads {h}; give "
                             f"head_dim= explicitly or change the width", (name,))
        return f_q // h

    def init(key, in_shape):
        if cross:
            if not (isinstance(in_shape, (tuple, list)) and len(in_shape) == 2
                    and all(isinstance(s, (tuple, list)) for s in in_shape)):
                raise ShapeError(f"init shape must be a pair ((batch, T, features), (batch, S, "
                                 f"context_features)), got {in_shape!r}", (name,))
            xs_, cs_ = (check_in_shape(name, s, 3, 3, allow_none=(0, 1)) for s in in_shape)
        else:
            xs_ = cs_ = check_in_shape(name, in_shape, 3, 3, allow_none=(0, 1))
        f_q, f_c = xs_[2], cs_[2]
        d = _head_dim(f_q)
        out = out_fixed or f_q
        dt = jnp.zeros(()).dtype
        kq, kk, kv, ko = jax.random.split(key, 4)
        params = {"W_q": glorot(kq, (f_q, h * d), dt), "W_k": glorot(kk, (f_c, hk * d), dt),
                  "W_v": glorot(kv, (f_c, hk * d), dt), "W_o": glorot(ko, (h * d, out), dt)}
        if use_bias:
            params.update(b_q=jnp.zeros((h * d,), dt), b_k=jnp.zeros((hk * d,), dt),
                          b_v=jnp.zeros((hk * d,), dt), b_o=jnp.zeros((out,), dt))
        return (xs_[0], xs_[1], out), params

    def _split_input(x):
        if not cross:
            return x, x
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            raise ShapeError(f"expected the input as a pair (x, context), got a "
                             f"{type(x).__name__}", (name,))
        return x[0], x[1]

    def _check(params, x, c):
        for what, a in (("input", x), ("context", c)) if cross else (("input", x),):
            check_floating(name, a, what)
            check_rank(name, a, 3, 3, "(batch, seq, features)")
        shapes = {n: tuple(jnp.shape(a)) for n, a in params.items()}
        wq, wk = shapes["W_q"], shapes["W_k"]
        d = wq[1] // h if len(wq) == 2 else 0
        f_c = wk[0] if len(wk) == 2 else 0
        out = shapes["W_o"][-1] if shapes["W_o"] else 0
        want: dict[str, tuple] = {"W_q": (wq[0] if wq else 0, h * d), "W_k": (f_c, hk * d),
                "W_v": (f_c, hk * d), "W_o": (h * d, out)}
        if use_bias:
            want.update(b_q=(h * d,), b_k=(hk * d,), b_v=(hk * d,), b_o=(out,))
        if d < 1 or (d_fixed is not None and d != d_fixed) or any(
                shapes[n] != w for n, w in want.items()):
            got = ", ".join(f"{n} {shapes[n]}" for n in want)
            raise ShapeError(f"params do not fit {h} heads of one head_dim ({hk} key/value "
                             f"heads): got {got}; were these params made by this layer's "
                             f"init?", (name,))
        check_features(name, x, wq[0])
        check_features(name, c, wk[0], what="context features" if cross else "input features")
        if cross and x.shape[0] != c.shape[0]:
            raise ShapeError(f"input and context batch sizes differ: {x.shape[0]} vs "
                             f"{c.shape[0]}", (name,))
        return d

    def _proj(params, a, w, b):
        y = a @ params[w]
        return y + params[b] if use_bias else y

    def _choose(s):
        return "chunked" if implementation == "auto" else implementation

    def _block():
        """Keys per block of the chunked strategy: ``block_size``, or by backend (measured, see
        the module docstring: 128 keeps a CPU's tile in cache; a GPU wants fewer, wider
        blocks)."""
        if block_fixed is not None:
            return block_fixed
        return AUTO_BLOCK.get(jax.default_backend(), AUTO_BLOCK["cpu"])

    def _run(params, xin, key, train, mask, lengths, keep_res):
        x, c = _split_input(xin)
        d = _check(params, x, c)
        b, t, s = x.shape[0], x.shape[1], c.shape[1]
        kvalid, full = _key_masks(name, b, t, s, mask, lengths)
        dropping = bool(train) and rate > 0.0
        if dropping and key is None:
            raise KeyMissingError("training with attention dropout needs a PRNG key; pass "
                                  "key=jax.random.key(seed), or train=False", (name,))
        scale = 1.0 / math.sqrt(d)
        q = _proj(params, x, "W_q", "b_q").reshape(b, t, hk, g, d)
        k = _proj(params, c, "W_k", "b_k").reshape(b, s, hk, d)
        v = _proj(params, c, "W_v", "b_v").reshape(b, s, hk, d)
        how = _choose(s)
        if not keep_res and not dropping and implementation == "auto" \
                and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            o = _cudnn(q, k, v, kvalid, full, lengths, mask)
            if o is not None:
                return _out(params, o, b, t), None
        res: _Chunked | _Materialized
        if how == "chunked" and keep_res and not dropping:     # the manual path: tiled
            o, lse = _tiled_fwd(q, k, v, kvalid, full, causal and not cross, scale, _block())
            res = _Chunked(x, c, q, k, v, o, lse, kvalid, full, None)
        elif how == "chunked":    # differentiable (apply) or with dropout: key blocks only
            o, lse = _chunked_fwd(q, k, v, kvalid, full, causal and not cross,
                                  key if dropping else None, 1.0 - rate, scale, _block())
            res = _Chunked(x, c, q, k, v, o, lse, kvalid, full,
                                                     key if dropping else None)
        else:
            allowed = _allowed(kvalid, full, causal and not cross, t, s)
            drop = (_drop_mask(key, 1.0 - rate, (b, hk, g, t, s), q.dtype) if dropping
                    else None)
            o, p = _materialized_fwd(q, k, v, allowed, drop, scale)
            res = _Materialized(x, c, q, k, v, o, p, drop)
        return _out(params, o, b, t), (res if keep_res else None)

    def _out(params, o, b, t):
        return _proj(params, o.reshape(b, t, h * o.shape[-1]), "W_o", "b_o")

    def _cudnn(q, k, v, kvalid, full, lengths, mask):
        if full is not None or (mask is not None and lengths is None):
            return None
        b, t, _, _, d = q.shape
        try:
            o = jax.nn.dot_product_attention(
                q.reshape(b, t, h, d), k, v, is_causal=causal and not cross,
                key_value_seq_lengths=(None if lengths is None
                                       else jnp.asarray(lengths, jnp.int32)),
                implementation="cudnn")
        except Exception:                     # a shape or dtype cuDNN does not support
            return None
        if lengths is not None:               # no valid key: zero, as the other paths
            o = o * (jnp.asarray(lengths) > 0)[:, None, None, None].astype(o.dtype)
        return o.reshape(q.shape)

    def apply(params, x, *, key=None, train=False, mask=None, lengths=None):
        return _run(params, x, key, train, mask, lengths, False)[0]

    def forward(params, x, *, key=None, train=False, mask=None, lengths=None):
        return _run(params, x, key, train, mask, lengths, True)

    def _core_bwd(res, q, k, v, o, scale, do):
        """``dQ, dK, dV`` from ``dO`` by the strategy whose residuals ``res`` holds."""
        if isinstance(res, _Chunked) and res.key is None:
            return _tiled_bwd(q, k, v, res.kvalid, res.full, causal and not cross, scale,
                              _block(), o, res.lse, do)
        if isinstance(res, _Chunked):
            return _chunked_bwd(q, k, v, res.kvalid, res.full, causal and not cross, res.key,
                                1.0 - rate, scale, _block(), o, res.lse, do)
        return _materialized_bwd(q, k, v, res.p, res.drop, scale, do)

    def _deltas(params, res, dy):
        """The projections' inputs and deltas ``[(name, input, delta)]`` (batch-first, as
        ``(b, seq, features)``), and ``dq, dk, dv``; shared by the batch and per-example rules."""
        x, c, q, k, v, o = res[:6]
        b, t, _, _, d = q.shape
        scale = 1.0 / math.sqrt(d)
        do = (dy @ params["W_o"].T).reshape(q.shape)                # dO = dy W_o^T
        dq, dk, dv = _core_bwd(res, q, k, v, o, scale, do)
        dq, dk, dv = dq.reshape(b, t, -1), dk.reshape(b, k.shape[1], -1), dv.reshape(
            b, k.shape[1], -1)
        pairs = [("o", o.reshape(b, t, -1), dy), ("q", x, dq), ("k", c, dk), ("v", c, dv)]
        return pairs, (dq, dk, dv)

    def _dx(params, res, dq, dk, dv):
        x, c = res[0], res[1]
        dx = dq @ params["W_q"].T
        dc = dk @ params["W_k"].T + dv @ params["W_v"].T
        if cross:
            return dx.astype(x.dtype), dc.astype(c.dtype)
        return (dx + dc).astype(x.dtype)

    def per_example(params, res, dy):
        """``dW_{q,k,v,o}[i] = sum_t a_it^T d_it`` per example over the four projections (their
        inputs ``x``, context ``c``, attention output ``O``, and the deltas ``dQ, dK, dV, dy``
        of the backward); biases ``sum_t d_it``."""
        pairs, dqkv = _deltas(params, res, dy)
        grads = {}
        for n_, a, dl in pairs:
            grads[f"W_{n_}"] = batch_outer(a, dl)
            if use_bias:
                grads[f"b_{n_}"] = batch_sum(dl)
        grads = {n_: grads[n_].astype(params[n_].dtype) for n_ in params}
        return grads, _dx(params, res, *dqkv)

    def per_example_norms(params, res, dy):
        """Each projection's ``||dW_i||^2`` by the cheaper of the Gram form over positions and
        materialising (:mod:`funnn.layers._per_example`), plus the biases'."""
        pairs, dqkv = _deltas(params, res, dy)
        sq = None
        for _, a, dl in pairs:
            term = outer_sq_norm(a, dl)
            if use_bias:
                term = term + jnp.sum(jnp.square(batch_sum(dl)), -1)
            sq = term if sq is None else sq + term
        return sq, _dx(params, res, *dqkv)

    def backward(params, res, dy):
        x, c, q, k, v, o = res[:6]
        b, t, _, _, d = q.shape
        scale = 1.0 / math.sqrt(d)
        o2 = o.reshape(-1, h * d)
        dy2 = dy.reshape(-1, dy.shape[-1])
        grads = {"W_o": matmul_wide(o2.T, dy2)}
        do = (dy @ params["W_o"].T).reshape(q.shape)                # dO = dy W_o^T
        dq, dk, dv = _core_bwd(res, q, k, v, o, scale, do)
        dq, dk, dv = dq.reshape(b, t, -1), dk.reshape(b, k.shape[1], -1), dv.reshape(
            b, k.shape[1], -1)
        x2, c2 = x.reshape(-1, x.shape[-1]), c.reshape(-1, c.shape[-1])
        for w, a2, da in (("W_q", x2, dq), ("W_k", c2, dk), ("W_v", c2, dv)):
            grads[w] = matmul_wide(a2.T, da.reshape(-1, da.shape[-1]))
        if use_bias:
            acc = wide(dy2.dtype)
            grads.update(b_q=dq.sum((0, 1), dtype=acc), b_k=dk.sum((0, 1), dtype=acc),
                         b_v=dv.sum((0, 1), dtype=acc), b_o=dy2.sum(0, dtype=acc))
        grads = {n: grads[n].astype(params[n].dtype) for n in params}
        dx = dq @ params["W_q"].T
        dc = dk @ params["W_k"].T + dv @ params["W_v"].T
        if cross:
            return grads, (dx.astype(x.dtype), dc.astype(c.dtype))
        return grads, (dx + dc).astype(x.dtype)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 context=("mask", "lengths"), per_example=per_example,
                 per_example_norms=per_example_norms, kind=kind)


def multi_head_attention(num_heads: int, *, head_dim: int | None = None,
                         out_features: int | None = None, causal: bool = False,
                         use_bias: bool = True, dropout: float = 0.0,
                         implementation: str = "auto", num_kv_heads: int | None = None,
                         block_size: int | None = None) -> Layer:
    """Multi-head self-attention ``y = softmax(Q K^T / sqrt(D) + mask) V W_o + b_o``.

    Shapes: ``x (batch, T, F) -> y (batch, T, out_features or F)``.
    Params: ``W_q (F, H*D)``, ``W_k, W_v (F, Hkv*D)``, ``W_o (H*D, out)`` (glorot uniform) and
    ``b_q, b_k, b_v, b_o`` (zeros; none when ``use_bias=False``); ``H = num_heads``,
    ``Hkv = num_kv_heads or H`` (must divide ``H``), ``D = head_dim or F // H``.
    ``apply``/``forward`` take ``mask=`` (boolean ``(batch, T)`` key padding or
    ``(batch, T, T)``, ``True`` = attend) or ``lengths=`` (integer ``(batch,)``).
    ``implementation``: ``"materialized"``, ``"chunked"`` (``block_size`` keys per block) or
    ``"auto"``; residuals and the derivative: see the module docstring.
    """
    return _make(num_heads, head_dim, out_features, causal, use_bias, dropout, implementation,
                 num_kv_heads, block_size, cross=False)


def cross_attention(num_heads: int, *, head_dim: int | None = None,
                    out_features: int | None = None, use_bias: bool = True,
                    dropout: float = 0.0, implementation: str = "auto",
                    num_kv_heads: int | None = None, block_size: int | None = None) -> Layer:
    """Cross-attention: queries from ``x``, keys and values from ``context``.

    The input is a pair ``(x (batch, T, F), context (batch, S, Fc))`` (``init`` takes the pair
    of shapes) -> ``y (batch, T, out_features or F)``; ``backward`` returns ``dx`` as the pair
    ``(dx, dcontext)``. Params as :func:`multi_head_attention`'s, with ``W_k, W_v (Fc, Hkv*D)``.
    Masks refer to context positions: ``mask=`` ``(batch, S)`` or ``(batch, T, S)``,
    ``lengths=`` ``(batch,)``. No ``causal`` option.
    """
    return _make(num_heads, head_dim, out_features, False, use_bias, dropout, implementation,
                 num_kv_heads, block_size, cross=True)
