"""Transformer pieces: the pre-norm block, positional embeddings, and a token embedding tied to
the output projection; each with its hand-written backward, composed from funnn layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from funnn.core import (
    ConfigError,
    Layer,
    ShapeError,
    check_floating,
    check_in_shape,
    check_rank,
    input_spec,
    layer_scope,
    run_apply,
    run_forward,
    split_key,
)
from funnn.layers._decode import Decoder
from funnn.layers.attention import multi_head_attention
from funnn.layers.combinators import residual, serial
from funnn.layers.dense import dense
from funnn.layers.dropout import dropout as dropout_layer
from funnn.layers.elementwise import activation as activation_layer
from funnn.layers.embedding import embedding
from funnn.layers.norm import layer_norm
from funnn.layers.per_example import batch_outer, outer_sq_norm
from funnn.layers.walk import Child, tangent, walk_back

__all__ = ["transformer_block", "positional_embedding", "tied_embedding"]


def _masks(mask, lengths) -> dict:
    return {k: v for k, v in (("mask", mask), ("lengths", lengths)) if v is not None}


def _block_decoder(name: str, ln: Layer, attn: Layer, mlp_half) -> Decoder:
    """A causal block's incremental decoding: the attention half against its KV cache, the MLP
    half (``mlp_half(F)``) on the new positions."""

    def decode_init(params, batch, max_len):
        return attn.decoder.init(params["attn"][1], batch, max_len)

    def decode_step(params, x, cache, pos):
        (p_ln, p_attn) = params["attn"]
        with layer_scope(name):
            a, cache = attn.decoder.step(p_attn, ln.apply(p_ln, x), cache, pos)
            with layer_scope("mlp"):
                return mlp_half(x.shape[-1]).apply(params["mlp"], x + a), cache

    return Decoder(decode_init, decode_step)


def transformer_block(num_heads: int, mlp_dim: int, *, causal: bool = False,
                      dropout: float = 0.0, num_kv_heads: int | None = None,
                      implementation: str = "auto", eps: float = 1e-5,
                      rotary: bool = False) -> Layer:
    """A pre-norm transformer block on ``x (batch, T, F) -> (batch, T, F)``::

        h = x + drop(attention(layer_norm(x)))                 # mask=/lengths= reach attention
        y = h + drop(dense(F)(gelu(dense(mlp_dim)(layer_norm(h)))))

    Params: ``{"attn": (layer_norm, multi_head_attention), "mlp": (layer_norm, dense(mlp_dim),
    {}, dense(F), {})}`` (the same for any ``dropout``). The MLP half is
    ``residual(serial(...))``, built for ``F`` at first use; the attention half is written out
    here so that ``mask=``/``lengths=`` reach the attention.
    ``dropout`` applies to the attention weights and to both residual branches (training only,
    ``key=`` required). ``rotary=True`` gives the attention rotary position embeddings (see
    :func:`~funnn.layers.multi_head_attention`).
    Backward: the children's, in reverse; ``dx = dh + dx_attention_half``.
    """
    if isinstance(mlp_dim, bool) or not isinstance(mlp_dim, (int, np.integer)) or mlp_dim < 1:
        raise ConfigError(f"mlp_dim must be a positive int, got {mlp_dim!r}",
                          ("transformer_block",))
    attn = multi_head_attention(num_heads, causal=causal, dropout=dropout,
                                implementation=implementation, num_kv_heads=num_kv_heads,
                                rotary=rotary)
    ln = layer_norm(eps)
    drop = dropout_layer(dropout)
    name = f"transformer_block({attn.name.split('(', 1)[1][:-1]}, mlp_dim={int(mlp_dim)})"
    m_label = "mlp"

    @functools.cache
    def mlp_half(f: int) -> Layer:
        return residual(serial(layer_norm(eps), dense(int(mlp_dim)), activation_layer("gelu"),
                               dense(f), dropout_layer(dropout)))

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, 3, 3, allow_none=(0, 1))
        k1, k2, k3 = split_key(key, 3)
        with layer_scope(name):
            _, p_ln = ln.init(k1, shape)
            _, p_attn = attn.init(k2, shape)
            with layer_scope(m_label):
                _, p_mlp = mlp_half(shape[2]).init(k3, shape)
        return shape, {"attn": (p_ln, p_attn), "mlp": p_mlp}

    def _check(x):
        check_floating(name, x)
        check_rank(name, x, 3, 3, "(batch, seq, features)")

    def apply(params, x, *, key=None, train=False, mask=None, lengths=None):
        _check(x)
        (p_ln, p_attn), k1, k2, k3 = params["attn"], *split_key(key, 3)
        with layer_scope(name):
            a = attn.apply(p_attn, ln.apply(p_ln, x), key=k1, train=train, **_masks(mask, lengths))
            h = x + drop.apply({}, a, key=k2, train=train)
            with layer_scope(m_label):
                return mlp_half(x.shape[-1]).apply(params["mlp"], h, key=k3, train=train)

    def forward(params, x, *, key=None, train=False, mask=None, lengths=None):
        _check(x)
        (p_ln, p_attn), k1, k2, k3 = params["attn"], *split_key(key, 3)
        with layer_scope(name):
            u, r_ln = ln.forward(p_ln, x)
            a, r_attn = attn.forward(p_attn, u, key=k1, train=train, **_masks(mask, lengths))
            a, r_drop = drop.forward({}, a, key=k2, train=train)
            with layer_scope(m_label):
                y, r_mlp = mlp_half(x.shape[-1]).forward(params["mlp"], x + a, key=k3,
                                                         train=train)
        return y, (r_ln, r_attn, r_drop, r_mlp)

    def _walk(params, res, dy, how):
        """The children last to first (``how`` as in :func:`~funnn.layers.walk.walk_back`):
        the MLP half gives ``dh``, the attention half's chain continues from it."""
        r_ln, r_attn, r_drop, r_mlp = res
        (p_ln, p_attn) = params["attn"]
        mlp = Child(m_label, mlp_half(dy.shape[-1]), params["mlp"], r_mlp, input_spec(dy),
                    "mlp.")
        with layer_scope(name):
            (g_mlp,), dh = walk_back([mlp], dy, how)
            (g_ln, g_attn, g_drop), dx = walk_back(
                [Child(None, ln, p_ln, r_ln, None, "attn.0."),
                 Child(None, attn, p_attn, r_attn, None, "attn.1."),
                 Child(None, drop, {}, r_drop)], dh, how)
        return (g_ln, g_attn, g_drop, g_mlp), dh + dx

    def walk(params, res, dy, how):
        """:func:`funnn.curvature`'s walk: the outputs laid out like the params."""
        (o_ln, o_attn, _, o_mlp), dx = _walk(params, res, dy, how)
        return {"attn": (o_ln, o_attn), "mlp": o_mlp}, dx

    def jvp(params, res, dparams, dx):
        """The children's tangents first to last: ``dh = dx + drop(attn(ln(dx)))``, then the
        MLP half's ``dy = dh + mlp(dh)``."""
        r_ln, r_attn, r_drop, r_mlp = res
        (p_ln, p_attn), (dp_ln, dp_attn) = params["attn"], dparams["attn"]
        with layer_scope(name):
            da = tangent(attn)(p_attn, r_attn, dp_attn, tangent(ln)(p_ln, r_ln, dp_ln, dx))
            dh = dx + tangent(drop)({}, r_drop, {}, da)
            with layer_scope(m_label):
                return tangent(mlp_half(dx.shape[-1]))(params["mlp"], r_mlp, dparams["mlp"], dh)

    backward = functools.partial(walk, how="backward")
    per_example = functools.partial(walk, how="per_example")

    def per_example_norms(params, res, dy):
        (s_ln, s_attn, _, s_mlp), dx = _walk(params, res, dy, "per_example_norms")
        return s_ln + s_attn + s_mlp, dx

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 context=attn.context, per_example=per_example,
                 per_example_norms=per_example_norms, kind="transformer_block",
                 decoder=_block_decoder(name, ln, attn, mlp_half) if causal else None, jvp=jvp,
                 walk=walk)


def _sinusoid(t: int, f: int, dtype) -> jnp.ndarray:
    """``PE[pos, 2i] = sin(pos / 10000^(2i/F))``, ``PE[pos, 2i+1] = cos(...)`` (Vaswani et al.)."""
    pos = np.arange(t)[:, None]
    freq = np.exp(-np.log(10000.0) * (np.arange(0, f, 2) / f))
    pe = np.zeros((t, f))
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)[:, : f // 2]
    return jnp.asarray(pe, dtype)


def positional_embedding(max_len: int, kind: str = "learned", *, std: float = 0.02) -> Layer:
    """Add a position embedding: ``y[..., t, :] = x[..., t, :] + P[t, :]`` for ``t < T``.

    Shapes: ``x (..., T, F) -> y (..., T, F)`` with ``T <= max_len``.
    ``kind="learned"``: params ``{"pos": (max_len, F)}`` drawn from ``N(0, std^2)`` (GPT-2);
    derivative ``dpos[:T] = sum of dy over the leading axes`` (rows ``T..`` get zero).
    ``kind="sinusoidal"``: the fixed table of Vaswani et al., params ``{}``. Both: ``dx = dy``.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ConfigError(f"max_len must be a positive int, got {max_len!r}",
                          ("positional_embedding",))
    if kind not in ("learned", "sinusoidal"):
        raise ConfigError(f"kind must be 'learned' or 'sinusoidal', got {kind!r}",
                          ("positional_embedding",))
    name = f"positional_embedding({int(max_len)}, {kind})"

    def init(key, in_shape):
        shape = check_in_shape(name, in_shape, 2, allow_none=True)
        t, f = shape[-2], shape[-1]
        if f is None:
            raise ShapeError(f"init shape {tuple(in_shape)} has no feature size on its last axis",
                             (name,))
        if t is not None and t > max_len:
            raise ShapeError(f"sequence length {t} exceeds max_len {max_len}", (name,))
        if kind == "sinusoidal":
            return shape, {}
        dt = jnp.zeros(()).dtype
        return shape, {"pos": std * jax.random.normal(key, (int(max_len), f), dt)}

    def _table(params, x):
        check_floating(name, x)
        check_rank(name, x, 2, what="(..., seq, features)")
        t, f = x.shape[-2:]
        if t > max_len:
            raise ShapeError(f"sequence length {t} exceeds max_len {max_len} (input shape "
                             f"{x.shape})", (name,))
        if kind == "sinusoidal":
            return _sinusoid(t, f, x.dtype)
        pos = params["pos"]
        if pos.shape != (max_len, f):
            raise ShapeError(f"expected params pos ({max_len}, {f}) for input features {f}, "
                             f"got {pos.shape}", (name,))
        return pos[:t]

    def apply(params, x, *, key=None, train=False):
        return x + _table(params, x)

    def forward(params, x, *, key=None, train=False):
        return apply(params, x), None

    def backward(params, res, dy):
        if kind == "sinusoidal":
            return {}, dy
        pos = params["pos"]
        t, f = dy.shape[-2:]
        dpos = dy.reshape(-1, t, f).sum(0).astype(pos.dtype)
        return {"pos": jnp.pad(dpos, ((0, pos.shape[0] - t), (0, 0)))}, dy

    def _dpos_rows(dy):
        """dpos[:T] per example: dy (B, ..., T, F) summed over example i's middle axes."""
        t, f = dy.shape[-2:]
        return dy.reshape(dy.shape[0], -1, t, f).sum(1)

    def per_example(params, res, dy):
        if kind == "sinusoidal":
            return {}, dy
        pos = params["pos"]
        d = _dpos_rows(dy).astype(pos.dtype)
        return {"pos": jnp.pad(d, ((0, 0), (0, pos.shape[0] - d.shape[1]), (0, 0)))}, dy

    def per_example_norms(params, res, dy):
        if kind == "sinusoidal":
            return jnp.zeros((dy.shape[0],), dy.dtype), dy
        return jnp.sum(jnp.square(_dpos_rows(dy)), (1, 2)), dy

    def jvp(params, res, dparams, dx):
        """Tangent: ``dy = dx + dpos[:T]`` (``dx`` for the fixed sinusoidal table)."""
        if kind == "sinusoidal":
            return dx
        return dx + dparams["pos"][:dx.shape[-2]].astype(dx.dtype)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 per_example=per_example, per_example_norms=per_example_norms,
                 kind="positional_embedding", jvp=jvp)


def tied_embedding(num_embeddings: int, features: int, body: Layer) -> Layer:
    """Token embedding and output projection sharing one table (weight tying, Press & Wolf)::

        logits = body(table[ids]) @ table^T

    Shapes: integer ``ids (batch, T) -> logits (batch, T, num_embeddings)``; ``body`` maps
    ``(batch, T, features)`` to the same shape (e.g. ``serial(positional_embedding(...),
    transformer_block(...), layer_norm())``).
    Params: a pair ``({"table": (V, F)}, body_params)``; the table is the
    :func:`~funnn.layers.embedding` layer's. Side inputs (``mask=``, ``lengths=``) pass to
    ``body`` when it reads them.
    Derivative: ``dtable = dlogits^T h`` (summed over positions) ``+ scatter_add(ids, dh0)``,
    where ``dh = dlogits @ table`` flows back through ``body`` to ``dh0``; ``dx`` is ``None``.
    """
    if not isinstance(body, Layer):
        raise ConfigError(f"body must be a Layer, got {type(body).__name__}", ("tied_embedding",))
    emb = embedding(num_embeddings, features)
    n, f = int(num_embeddings), int(features)
    name = f"tied_embedding({n}, {f})"
    b_label = f"body({body.name})"

    def init(key, in_shape):
        k1, k2 = split_key(key, 2)
        with layer_scope(name):
            shape, p_emb = emb.init(k1, in_shape)
            with layer_scope(b_label):
                out, p_body = body.init(k2, shape)
        if tuple(out)[-1:] != (f,):
            raise ShapeError(f"the body maps {tuple(shape)} to {tuple(out)}; it must keep "
                             f"{f} features for the tied output projection", (name,))
        return tuple(out)[:-1] + (n,), (p_emb, p_body)

    def apply(params, ids, *, key=None, train=False, **ctx):
        p_emb, p_body = params
        with layer_scope(name):
            h0 = emb.apply(p_emb, ids)
            with layer_scope(b_label):
                h, _ = run_apply(body, p_body, h0, key=key, train=train, **ctx)
        return h @ p_emb["table"].T

    def forward(params, ids, *, key=None, train=False, **ctx):
        p_emb, p_body = params
        with layer_scope(name):
            h0, r_emb = emb.forward(p_emb, ids)
            with layer_scope(b_label):
                h, r_body, _ = run_forward(body, p_body, h0, key=key, train=train, **ctx)
        return h @ p_emb["table"].T, (r_emb, r_body, h, input_spec(h0))

    def _walk(params, res, dh, how):
        """The body, then the embedding (``how`` as in :func:`~funnn.layers.walk.walk_back`):
        ``(g_emb, g_body, dh0)``, ``dh0`` the body's input gradient (the lookup's output's)."""
        p_emb, p_body = params
        r_emb, r_body, _, spec = res
        with layer_scope(name):
            (g_body,), dh0 = walk_back([Child(b_label, body, p_body, r_body, spec)], dh, how)
            (g_emb,), _ = walk_back([Child(None, emb, p_emb, r_emb)], dh0, how)
        return g_emb, g_body, dh0

    def backward(params, res, dy):
        table, h = params[0]["table"], res[2]
        d_out = dy.reshape(-1, n).T @ h.reshape(-1, f)              # (V, F) from the projection
        g_emb, g_body, _ = _walk(params, res, dy @ table, "backward")
        return ({"table": (g_emb["table"] + d_out).astype(table.dtype)}, g_body), None

    def per_example(params, res, dy):
        """dtable_i = sum_t dlogits_it^T h_it + scatter_add(ids_i, dh0_i): (B, V, F)."""
        table, h = params[0]["table"], res[2]
        d_out = batch_outer(dy, h)                                    # (B, V, F)
        g_emb, g_body, _ = _walk(params, res, dy @ table, "per_example")
        return ({"table": (g_emb["table"] + d_out).astype(table.dtype)}, g_body), None

    def per_example_norms(params, res, dy):
        """The shared table's ``||A_i + E_i||^2`` (``A`` the projection's part, ``E`` the lookup's)
        without materialising either: ``||A_i||^2`` by the Gram or outer rule,
        ``||E_i||^2`` by the embedding's, and the cross term
        ``<A_i, E_i> = sum_{t,s} dlogits_it[id_is] (h_it . dh0_is)``."""
        r_emb, h = res[0], res[2]
        s_emb, s_body, dh0 = _walk(params, res, dy @ params[0]["table"], "per_example_norms")
        b = dy.shape[0]
        dy3, h3, g3 = dy.reshape(b, -1, n), h.reshape(b, -1, f), dh0.reshape(b, -1, f)
        ids = r_emb.reshape(b, 1, -1)
        picked = jnp.take_along_axis(dy3, jnp.broadcast_to(ids, (b, dy3.shape[1], ids.shape[2]))
                                     .astype(jnp.int32), axis=2, mode="fill", fill_value=0)
        cross = jnp.sum(picked * jnp.einsum("btf,bsf->bts", h3, g3), (1, 2))
        return outer_sq_norm(dy, h) + s_emb + 2 * cross + s_body, None

    def jvp(params, res, dparams, dx):
        """Tangent: the lookup's ``dh0 = dtable[ids]``, the body's ``dh``, then ``dlogits = dh
        table^T + h dtable^T`` (the ids have no tangent: ``dx`` is ignored)."""
        (p_emb, p_body), (dp_emb, dp_body) = params, dparams
        r_emb, r_body, h, _ = res
        with layer_scope(name):
            dh0 = tangent(emb)(p_emb, r_emb, dp_emb, None)
            with layer_scope(b_label):
                dh = tangent(body)(p_body, r_body, dp_body, dh0)
        return dh @ p_emb["table"].T + h @ dp_emb["table"].T

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 children=(("[0]", emb), ("[1]", body)), context=body.context,
                 per_example=per_example, per_example_norms=per_example_norms,
                 kind="tied_embedding", jvp=jvp)
