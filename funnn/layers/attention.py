"""Multi-head attention (self and cross), with its hand-written backward in two residual
strategies.

``x (batch, T, F)`` is projected to queries, keys and values (row-vector convention,
``W`` of shape ``(in, out)``); head ``h`` uses columns ``h*D:(h+1)*D`` of ``W_q``, and
key/value head ``h // G`` (``G = num_heads / num_kv_heads``, grouped-query attention)::

    Q = x W_q + b_q,   K = c W_k + b_k,   V = c W_v + b_v      (c = x, or the context)
    S = Q K^T / sqrt(D),   P = softmax(S over keys, masked),   O = P V,   y = O W_o + b_o

Hand-written backward (``dO`` from ``dy W_o^T``; ``dQ, dK, dV`` by the kernels of
:mod:`funnn.layers._attention_kernels`, the FlashAttention-2 equations)::

    dW_q = x^T dQ,  db_q = sum(dQ),  dx = dQ W_q^T + dK W_k^T + dV W_v^T   (likewise k, v, o)

``implementation`` picks what the forward keeps for the backward:

* ``"materialized"``: ``P`` itself, ``O(T * S)`` memory per head (the textbook version).
* ``"chunked"``: flash-attention style: an online softmax over key blocks of ``block_size``,
  keeping only ``O`` and the row log-sum-exp; the backward recomputes ``P`` block by block,
  ``O(T + S)`` memory besides the projections. The manual path tiles queries *and* keys, so
  a causal layer skips the tiles above the diagonal; ``apply`` and training with attention
  dropout keep the differentiable key-block ``scan``.
* ``"auto"``: ``"chunked"`` on every backend; ``apply`` (the autodiff path) calls cuDNN's
  fused attention on a GPU for float16/bfloat16 inputs without dropout (falling back when
  cuDNN refuses the shape).
* ``block_size=None`` picks the block by backend (``AUTO_BLOCK``): 128 on a CPU, 1024 on a
  GPU. The measurements behind these choices are in the transformers tutorial
  (``docs/tutorials/transformers.md``).

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

Rotary position embeddings (``rotary=True``, self-attention; Su et al. 2021, RoFormer): the
queries and keys of position ``t`` are rotated, pair of features by pair, by the angles
``t * base^(-2i/D)`` (``i < D/2``; the two halves of each head, as GPT-NeoX and the
Hugging Face LLaMA do: ``q' = q * cos + rotate_half(q) * sin``, ``rotate_half(q) = (-q2, q1)``),
so the scores ``q'_t . k'_s`` depend on the offset ``t - s`` alone. The rotation sits between
the projections and the kernel; it is orthogonal, so its backward rotates the kernel's
``dQ, dK`` back by the opposite angles. ``D`` must be even.

The key bias ``b_k`` gets an exactly-zero gradient, and its value changes nothing: it adds
``q . b_k`` to every score of a query row alike, and the softmax over keys ignores a shift
shared by the whole row (``dK`` sums to zero over the keys of each row). It is kept, on by
default, for parity with PyTorch's ``in_proj_bias`` (so its weights load unchanged and the
parameter counts agree); ``use_bias=False`` drops all four biases, and :func:`funnn.core.summary`
says so in a footnote.

From PyTorch ``nn.MultiheadAttention(E, num_heads, batch_first=True)`` (``kdim == vdim == E``)::

    W_q = in_proj_weight[:E].T      b_q = in_proj_bias[:E]
    W_k = in_proj_weight[E:2E].T    b_k = in_proj_bias[E:2E]
    W_v = in_proj_weight[2E:].T     b_v = in_proj_bias[2E:]
    W_o = out_proj.weight.T         b_o = out_proj.bias

(its ``key_padding_mask`` is ``True`` for padding: pass ``mask=~key_padding_mask``; its
``attn_mask`` boolean ``True`` means "not allowed", the opposite of funnn's ``mask``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
)
from funnn.dtypes import matmul_wide, wide
from funnn.layers import _attention_kernels as kernels
from funnn.layers._decode import Decoder
from funnn.layers.dense import INITIALIZERS
from funnn.layers.per_example import batch_outer, batch_sum, outer_sq_norm

__all__ = ["multi_head_attention", "cross_attention", "IMPLEMENTATIONS", "rotary_angles", "rotate"]

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


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _Config:
    """An attention layer's settings, checked once when it is built."""

    name: str
    kind: str
    heads: int                       # H, query heads
    kv_heads: int                    # K, key/value heads (divides H)
    head_dim: int | None             # None: F // H
    out_features: int | None         # None: F
    block_size: int | None           # None: by backend (AUTO_BLOCK)
    implementation: str
    rate: float                      # dropout on the attention weights
    causal: bool                     # self-attention only
    use_bias: bool
    cross: bool
    rotary: bool = False             # rotary position embeddings on queries and keys
    rotary_base: float = 10000.0

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def block(self) -> int:
        """Keys per block of the chunked strategy: ``block_size``, or by backend (128 keeps a
        CPU's tile in cache; a GPU wants fewer, wider blocks; timings in the transformers
        tutorial)."""
        if self.block_size is not None:
            return self.block_size
        return AUTO_BLOCK.get(jax.default_backend(), AUTO_BLOCK["cpu"])


def _config(num_heads, head_dim, out_features, causal, use_bias, dropout, implementation,
            num_kv_heads, block_size, cross: bool, rotary=False,
            rotary_base=10000.0) -> _Config:
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
    base = _rotary_base(rotary, rotary_base, kind)
    opts = ([f"num_kv_heads={hk}"] if hk != h else []) + (["causal"] if causal else []) + (
        [f"dropout={rate:g}"] if rate else []) + (
        [implementation] if implementation != "auto" else []) + (
        (["rotary"] if base == 10000.0 else [f"rotary={base:g}"]) if rotary else [])
    return _Config(f"{kind}({', '.join([str(h)] + opts)})", kind, h, hk, d_fixed, out_fixed,
                   block_fixed, implementation, rate, bool(causal), bool(use_bias), cross,
                   bool(rotary), base)


def _rotary_base(rotary, rotary_base, kind: str) -> float:
    if not isinstance(rotary, (bool, np.bool_)):
        raise ConfigError(f"rotary must be True or False, got {rotary!r}", (kind,))
    ok = not isinstance(rotary_base, bool) and isinstance(rotary_base, (int, float, np.integer,
                                                                        np.floating))
    base = float(rotary_base) if ok else math.nan
    if not base > 1.0 or math.isinf(base):
        raise ConfigError(f"rotary_base must be a finite number > 1 (the wavelength base of "
                          f"the rotation angles), got {rotary_base!r}", (kind,))
    return base


# --------------------------------------------------------------------------- rotary


def rotary_angles(positions, d: int, base: float = 10000.0, dtype=None):
    """``(cos, sin)`` of the angles ``positions[..., None] * base^(-2i/d)``, ``i < d/2``:
    ``positions (...,)`` -> two arrays ``(..., d/2)`` in ``dtype`` (computed in float32 or
    wider)."""
    pos = jnp.asarray(positions)
    wide_dt = wide(dtype if dtype is not None else jnp.zeros(()).dtype)
    inv = jnp.asarray(base ** (-np.arange(0, d, 2) / d), wide_dt)
    ang = pos.astype(wide_dt)[..., None] * inv
    dt = dtype if dtype is not None else wide_dt
    return jnp.cos(ang).astype(dt), jnp.sin(ang).astype(dt)


def rotate(a, cos, sin, inverse: bool = False):
    """Rotate the two halves ``(a1, a2)`` of ``a``'s last axis by the angles of ``cos, sin``
    (broadcast against ``a[..., :d/2]``): ``(a1 cos - a2 sin, a2 cos + a1 sin)``;
    ``inverse=True`` rotates back (``sin -> -sin``), the transpose: the backward."""
    h = a.shape[-1] // 2
    a1, a2 = a[..., :h], a[..., h:]
    if inverse:
        sin = -sin
    return jnp.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], axis=-1)


def _rope(cfg: _Config, q, k, inverse: bool = False, offset=0):
    """Rotate ``q (b, t, K, G, d)`` and ``k (b, s, K, d)`` at positions ``offset + 0..``."""
    d = q.shape[-1]
    if d % 2:
        raise ShapeError(f"rotary position embeddings need an even head_dim, got {d}",
                         (cfg.name,))
    cq, sq = rotary_angles(offset + jnp.arange(q.shape[1]), d, cfg.rotary_base, q.dtype)
    ck, sk = rotary_angles(offset + jnp.arange(k.shape[1]), d, cfg.rotary_base, k.dtype)
    q = rotate(q, cq[:, None, None], sq[:, None, None], inverse)
    k = rotate(k, ck[:, None], sk[:, None], inverse)
    return q, k


# --------------------------------------------------------------------------- init and checks


def _head_dim(cfg: _Config, f_q: int) -> int:
    if cfg.head_dim is not None:
        return cfg.head_dim
    if f_q % cfg.heads:
        raise ShapeError(f"input features {f_q} are not divisible by num_heads {cfg.heads}; "
                         f"give head_dim= explicitly or change the width", (cfg.name,))
    return f_q // cfg.heads


def _init(cfg: _Config, key, in_shape):
    name, h, hk = cfg.name, cfg.heads, cfg.kv_heads
    if cfg.cross:
        if not (isinstance(in_shape, (tuple, list)) and len(in_shape) == 2
                and all(isinstance(s, (tuple, list)) for s in in_shape)):
            raise ShapeError(f"init shape must be a pair ((batch, T, features), (batch, S, "
                             f"context_features)), got {in_shape!r}", (name,))
        xs_, cs_ = (check_in_shape(name, s, 3, 3, allow_none=(0, 1)) for s in in_shape)
    else:
        xs_ = cs_ = check_in_shape(name, in_shape, 3, 3, allow_none=(0, 1))
    f_q, f_c = xs_[2], cs_[2]
    d = _head_dim(cfg, f_q)
    out = cfg.out_features or f_q
    dt = jnp.zeros(()).dtype
    glorot = INITIALIZERS["glorot_uniform"]
    kq, kk, kv, ko = jax.random.split(key, 4)
    params = {"W_q": glorot(kq, (f_q, h * d), dt), "W_k": glorot(kk, (f_c, hk * d), dt),
              "W_v": glorot(kv, (f_c, hk * d), dt), "W_o": glorot(ko, (h * d, out), dt)}
    if cfg.use_bias:
        params.update(b_q=jnp.zeros((h * d,), dt), b_k=jnp.zeros((hk * d,), dt),
                      b_v=jnp.zeros((hk * d,), dt), b_o=jnp.zeros((out,), dt))
    return (xs_[0], xs_[1], out), params


def _split_input(cfg: _Config, x):
    if not cfg.cross:
        return x, x
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise ShapeError(f"expected the input as a pair (x, context), got a "
                         f"{type(x).__name__}", (cfg.name,))
    return x[0], x[1]


def _check(cfg: _Config, params, x, c) -> int:
    """Check inputs and params against the layer; the head dimension ``D``."""
    name, h, hk = cfg.name, cfg.heads, cfg.kv_heads
    for what, a in (("input", x), ("context", c)) if cfg.cross else (("input", x),):
        check_floating(name, a, what)
        check_rank(name, a, 3, 3, "(batch, seq, features)")
    shapes = {n: tuple(jnp.shape(a)) for n, a in params.items()}
    wq, wk = shapes["W_q"], shapes["W_k"]
    d = wq[1] // h if len(wq) == 2 else 0
    f_c = wk[0] if len(wk) == 2 else 0
    out = shapes["W_o"][-1] if shapes["W_o"] else 0
    want: dict[str, tuple] = {"W_q": (wq[0] if wq else 0, h * d), "W_k": (f_c, hk * d),
                              "W_v": (f_c, hk * d), "W_o": (h * d, out)}
    if cfg.use_bias:
        want.update(b_q=(h * d,), b_k=(hk * d,), b_v=(hk * d,), b_o=(out,))
    if d < 1 or (cfg.head_dim is not None and d != cfg.head_dim) or any(
            shapes[n] != w for n, w in want.items()):
        got = ", ".join(f"{n} {shapes[n]}" for n in want)
        raise ShapeError(f"params do not fit {h} heads of one head_dim ({hk} key/value "
                         f"heads): got {got}; were these params made by this layer's "
                         f"init?", (name,))
    check_features(name, x, wq[0])
    check_features(name, c, wk[0], what="context features" if cfg.cross else "input features")
    if cfg.cross and x.shape[0] != c.shape[0]:
        raise ShapeError(f"input and context batch sizes differ: {x.shape[0]} vs "
                         f"{c.shape[0]}", (name,))
    return d


# --------------------------------------------------------------------------- forward


def _proj(cfg: _Config, params, a, w, b):
    y = a @ params[w]
    return y + params[b] if cfg.use_bias else y


def _out(cfg: _Config, params, o, b, t):
    return _proj(cfg, params, o.reshape(b, t, cfg.heads * o.shape[-1]), "W_o", "b_o")


def _attend(cfg: _Config, x, c, q, k, v, kvalid, full, key, keep_res: bool):
    """``(o, res)``: the kernel for the strategy, and the residuals it keeps for the backward
    (``key`` is the dropout key, or ``None`` when not dropping)."""
    causal, scale = cfg.causal and not cfg.cross, 1.0 / math.sqrt(q.shape[-1])
    if cfg.implementation != "materialized" and keep_res and key is None:  # manual: tiled
        o, lse = kernels.tiled_fwd(q, k, v, kvalid, full, causal, scale, cfg.block())
        return o, _Chunked(x, c, q, k, v, o, lse, kvalid, full, None)
    if cfg.implementation != "materialized":   # differentiable (apply), or with dropout
        o, lse = kernels.chunked_fwd(q, k, v, kvalid, full, causal, key, 1.0 - cfg.rate,
                                     scale, cfg.block())
        return o, _Chunked(x, c, q, k, v, o, lse, kvalid, full, key)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    allowed = kernels.allowed_pairs(kvalid, full, causal, t, s)
    drop = (None if key is None else
            kernels.drop_mask(key, 1.0 - cfg.rate, (b, cfg.kv_heads, cfg.groups, t, s), q.dtype))
    o, p = kernels.materialized_fwd(q, k, v, allowed, drop, scale)
    return o, _Materialized(x, c, q, k, v, o, p, drop)


def _run(cfg: _Config, params, xin, key, train, mask, lengths, keep_res: bool):
    """``(y, res)`` (``res`` ``None`` unless ``keep_res``): projections, the kernel, output."""
    x, c = _split_input(cfg, xin)
    d = _check(cfg, params, x, c)
    b, t, s, hk = x.shape[0], x.shape[1], c.shape[1], cfg.kv_heads
    kvalid, full = _key_masks(cfg.name, b, t, s, mask, lengths)
    dropping = bool(train) and cfg.rate > 0.0
    if dropping and key is None:
        raise KeyMissingError("training with attention dropout needs a PRNG key; pass "
                              "key=jax.random.key(seed), or train=False", (cfg.name,))
    q = _proj(cfg, params, x, "W_q", "b_q").reshape(b, t, hk, cfg.groups, d)
    k = _proj(cfg, params, c, "W_k", "b_k").reshape(b, s, hk, d)
    v = _proj(cfg, params, c, "W_v", "b_v").reshape(b, s, hk, d)
    if cfg.rotary:
        q, k = _rope(cfg, q, k)
    if (not keep_res and not dropping and cfg.implementation == "auto"
            and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and full is None and (mask is None or lengths is not None)):
        o = kernels.cudnn(q, k, v, cfg.causal and not cfg.cross, lengths)
        if o is not None:
            return _out(cfg, params, o, b, t), None
    o, res = _attend(cfg, x, c, q, k, v, kvalid, full, key if dropping else None, keep_res)
    return _out(cfg, params, o, b, t), (res if keep_res else None)


# --------------------------------------------------------------------------- backward


def _core_bwd(cfg: _Config, res, do):
    """``dQ, dK, dV`` from ``dO`` by the kernel whose residuals ``res`` holds."""
    causal, q, k, v, o = cfg.causal and not cfg.cross, res.q, res.k, res.v, res.o
    scale = 1.0 / math.sqrt(q.shape[-1])
    if isinstance(res, _Chunked) and res.key is None:
        return kernels.tiled_bwd(q, k, v, res.kvalid, res.full, causal, scale, cfg.block(), o,
                                 res.lse, do)
    if isinstance(res, _Chunked):
        return kernels.chunked_bwd(q, k, v, res.kvalid, res.full, causal, res.key,
                                   1.0 - cfg.rate, scale, cfg.block(), o, res.lse, do)
    return kernels.materialized_bwd(q, k, v, res.p, res.drop, scale, do)


def _deltas(cfg: _Config, params, res, dy):
    """The projections' inputs and deltas ``[(name, input, delta)]`` (``(b, seq, features)``)
    and the input gradient: what the batch backward and the per-example rules share."""
    x, c, q, k, o = res.x, res.c, res.q, res.k, res.o
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    do = (dy @ params["W_o"].T).reshape(q.shape)                # dO = dy W_o^T
    dq, dk, dv = _core_bwd(cfg, res, do)
    if cfg.rotary:                                              # the rotation's transpose
        dq, dk = _rope(cfg, dq, dk, inverse=True)
    dq, dk, dv = dq.reshape(b, t, -1), dk.reshape(b, s, -1), dv.reshape(b, s, -1)
    pairs = [("o", o.reshape(b, t, -1), dy), ("q", x, dq), ("k", c, dk), ("v", c, dv)]
    dx = dq @ params["W_q"].T
    dc = dk @ params["W_k"].T + dv @ params["W_v"].T
    if cfg.cross:
        return pairs, (dx.astype(x.dtype), dc.astype(c.dtype))
    return pairs, (dx + dc).astype(x.dtype)


def _backward(cfg: _Config, params, res, dy):
    """``dW_n = a^T d`` over the batch and positions for each projection, ``db_n = sum d``."""
    pairs, dx = _deltas(cfg, params, res, dy)
    grads = {}
    for n, a, dl in pairs:
        grads[f"W_{n}"] = matmul_wide(a.reshape(-1, a.shape[-1]).T,
                                      dl.reshape(-1, dl.shape[-1]))
        if cfg.use_bias:
            grads[f"b_{n}"] = dl.sum((0, 1), dtype=wide(dy.dtype))
    return {n: grads[n].astype(params[n].dtype) for n in params}, dx


def _per_example(cfg: _Config, params, res, dy):
    """``dW_{q,k,v,o}[i] = sum_t a_it^T d_it`` per example over the four projections (their
    inputs ``x``, context ``c``, attention output ``O``, and the deltas ``dQ, dK, dV, dy`` of
    the backward); biases ``sum_t d_it``."""
    pairs, dx = _deltas(cfg, params, res, dy)
    grads = {}
    for n, a, dl in pairs:
        grads[f"W_{n}"] = batch_outer(a, dl)
        if cfg.use_bias:
            grads[f"b_{n}"] = batch_sum(dl)
    return {n: grads[n].astype(params[n].dtype) for n in params}, dx


def _per_example_norms(cfg: _Config, params, res, dy):
    """Each projection's ``||dW_i||^2`` by the cheaper of the Gram form over positions and
    materialising (:mod:`funnn.layers.per_example`), plus the biases'."""
    pairs, dx = _deltas(cfg, params, res, dy)
    sq = None
    for _, a, dl in pairs:
        term = outer_sq_norm(a, dl)
        if cfg.use_bias:
            term = term + jnp.sum(jnp.square(batch_sum(dl)), -1)
        sq = term if sq is None else sq + term
    return sq, dx


# --------------------------------------------------------------------------- tangent


def _proj_tangent(cfg: _Config, params, dparams, a, da, w, b):
    """``d(a W + b) = da W + a dW + db`` (``da`` ``None``: no input tangent)."""
    y = a @ dparams[w] if da is None else a @ dparams[w] + da @ params[w]
    return y + dparams[b] if cfg.use_bias else y


def _probs(cfg: _Config, res):
    """``P`` and the dropout mask ``Z`` (or ``None``) of the forward, whole: kept by the
    materialized strategy, recomputed from ``lse`` (and the key) for the others."""
    if isinstance(res, _Materialized):
        return res.p, res.drop
    causal, scale = cfg.causal and not cfg.cross, 1.0 / math.sqrt(res.q.shape[-1])
    p = kernels.probs(res.q, res.k, res.kvalid, res.full, causal, scale, res.lse)
    drop = (None if res.key is None else
            kernels.chunked_drop(res.key, 1.0 - cfg.rate, p.shape, cfg.block(), p.dtype))
    return p, drop


def _jvp(cfg: _Config, params, res, dparams, dx):
    """Tangent: the projections' (``dQ = dx W_q + x dW_q + db_q``, likewise ``dK, dV`` from the
    context's tangent), rotated as ``Q, K`` are, the kernel's on the materialized form
    (:func:`~funnn.layers._attention_kernels.materialized_jvp`, ``P`` recomputed from ``lse``
    for the chunked residuals), then ``dy = dO W_o + O dW_o + db_o``."""
    x, c, q, k, v, o = res.x, res.c, res.q, res.k, res.v, res.o
    dxq, dc = dx if cfg.cross else (dx, dx)
    b, t = q.shape[0], q.shape[1]
    dq = _proj_tangent(cfg, params, dparams, x, dxq, "W_q", "b_q").reshape(q.shape)
    dk = _proj_tangent(cfg, params, dparams, c, dc, "W_k", "b_k").reshape(k.shape)
    dv = _proj_tangent(cfg, params, dparams, c, dc, "W_v", "b_v").reshape(v.shape)
    if cfg.rotary:                                      # the rotation is linear in q, k
        dq, dk = _rope(cfg, dq, dk)
    p, drop = _probs(cfg, res)
    do = kernels.materialized_jvp(q, k, v, p, drop, 1.0 / math.sqrt(q.shape[-1]), dq, dk, dv)
    dy = _proj_tangent(cfg, params, dparams, o.reshape(b, t, -1), do.reshape(b, t, -1), "W_o",
                       "b_o")
    return dy.astype(x.dtype)


# --------------------------------------------------------------------------- KV cache


def _decoder(cfg: _Config) -> Decoder:
    """Causal self-attention a few positions at a time against a cache of keys and values
    ``{"k", "v": (batch, max_len, Hkv, D)}`` (rotated keys when ``rotary``): the new
    positions' keys and values are written at ``pos..pos+n-1``; query ``pos + t`` attends to
    cached keys ``0..pos+t`` (the materialized kernel over the whole cache, the rest masked)."""

    def init(params, batch, max_len):
        hk = cfg.kv_heads
        d = params["W_k"].shape[1] // hk
        z = jnp.zeros((batch, max_len, hk, d), params["W_k"].dtype)
        return {"k": z, "v": z}

    def step(params, x, cache, pos):
        d = _check(cfg, params, x, x)
        b, n, hk = x.shape[0], x.shape[1], cfg.kv_heads
        q = _proj(cfg, params, x, "W_q", "b_q").reshape(b, n, hk, cfg.groups, d)
        k = _proj(cfg, params, x, "W_k", "b_k").reshape(b, n, hk, d)
        v = _proj(cfg, params, x, "W_v", "b_v").reshape(b, n, hk, d)
        if cfg.rotary:
            q, k = _rope(cfg, q, k, offset=pos)
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, 1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, 1)
        s = ck.shape[1]
        allowed = (jnp.arange(s)[None, :] <= pos + jnp.arange(n)[:, None])[None, None, None]
        o, _ = kernels.materialized_fwd(q, ck.astype(q.dtype), cv.astype(q.dtype), allowed,
                                        None, 1.0 / math.sqrt(d))
        return _out(cfg, params, o, b, n), {"k": ck, "v": cv}

    return Decoder(init, step)


def _make(cfg: _Config) -> Layer:
    """The layer: its functions over the checked settings ``cfg``."""

    def apply(params, x, *, key=None, train=False, mask=None, lengths=None):
        return _run(cfg, params, x, key, train, mask, lengths, False)[0]

    def forward(params, x, *, key=None, train=False, mask=None, lengths=None):
        return _run(cfg, params, x, key, train, mask, lengths, True)

    return Layer(name=cfg.name, init=functools.partial(_init, cfg), apply=apply,
                 forward=forward, backward=functools.partial(_backward, cfg),
                 context=("mask", "lengths"),
                 per_example=functools.partial(_per_example, cfg),
                 per_example_norms=functools.partial(_per_example_norms, cfg), kind=cfg.kind,
                 jvp=functools.partial(_jvp, cfg),
                 decoder=_decoder(cfg) if cfg.causal and not cfg.cross else None)


def multi_head_attention(num_heads: int, *, head_dim: int | None = None,
                         out_features: int | None = None, causal: bool = False,
                         use_bias: bool = True, dropout: float = 0.0,
                         implementation: str = "auto", num_kv_heads: int | None = None,
                         block_size: int | None = None, rotary: bool = False,
                         rotary_base: float = 10000.0) -> Layer:
    """Multi-head self-attention ``y = softmax(Q K^T / sqrt(D) + mask) V W_o + b_o``.

    Shapes: ``x (batch, T, F) -> y (batch, T, out_features or F)``.
    Params: ``W_q (F, H*D)``, ``W_k, W_v (F, Hkv*D)``, ``W_o (H*D, out)`` (glorot uniform) and
    ``b_q, b_k, b_v, b_o`` (zeros; none when ``use_bias=False``; ``b_k``'s gradient is exactly
    zero, see the module docstring); ``H = num_heads``,
    ``Hkv = num_kv_heads or H`` (must divide ``H``), ``D = head_dim or F // H``.
    ``apply``/``forward`` take ``mask=`` (boolean ``(batch, T)`` key padding or
    ``(batch, T, T)``, ``True`` = attend) or ``lengths=`` (integer ``(batch,)``).
    ``implementation``: ``"materialized"``, ``"chunked"`` (``block_size`` keys per block) or
    ``"auto"``; residuals and the derivative: see the module docstring.
    ``rotary=True`` rotates queries and keys by their positions (rotary position embeddings,
    wavelength base ``rotary_base``; even ``D``); its backward rotates ``dQ, dK`` back.
    """
    return _make(_config(num_heads, head_dim, out_features, causal, use_bias, dropout,
                         implementation, num_kv_heads, block_size, cross=False,
                         rotary=rotary, rotary_base=rotary_base))


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
    return _make(_config(num_heads, head_dim, out_features, False, use_bias, dropout,
                         implementation, num_kv_heads, block_size, cross=True))
