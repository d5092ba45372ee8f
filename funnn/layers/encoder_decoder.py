"""PyTorch's encoder and decoder layers (``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer``, ``batch_first=True``) as funnn layers with the same arguments
and the same function, post-norm (PyTorch's default) or pre-norm, each child's hand-written
backward composed; :mod:`funnn.interop` converts PyTorch's weights to their params.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from funnn.core import (
    ConfigError,
    Layer,
    ShapeError,
    check_floating,
    check_rank,
    layer_scope,
    split_key,
)
from funnn.layers.attention import cross_attention, multi_head_attention
from funnn.layers.combinators import residual, serial
from funnn.layers.dense import dense
from funnn.layers.dropout import dropout as dropout_layer
from funnn.layers.elementwise import activation as activation_layer
from funnn.layers.norm import layer_norm
from funnn.layers.walk import tangent

__all__ = ["transformer_encoder_layer", "transformer_decoder_layer"]


def _positive(what: str, v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{what} must be a positive int, got {v!r}", (where,))
    return int(v)


def _feedforward(d_model: int, dim_feedforward: int, activation, dropout: float) -> Layer:
    """``drop(dense(d_model)(drop(act(dense(dim_feedforward)(h)))))``: PyTorch's ``_ff_block``."""
    return serial(dense(dim_feedforward), activation_layer(activation), dropout_layer(dropout),
                  dense(d_model), dropout_layer(dropout))


def transformer_encoder_layer(d_model: int, num_heads: int, dim_feedforward: int = 2048, *,
                              dropout: float = 0.0, activation="relu", eps: float = 1e-5,
                              norm_first: bool = False, causal: bool = False,
                              implementation: str = "auto") -> Layer:
    """PyTorch's ``nn.TransformerEncoderLayer`` (same arguments, ``batch_first=True``), built
    from funnn layers, so its backward is theirs, hand-written::

        norm_first=False (PyTorch's default, post-norm):
            h = layer_norm(x + drop(attention(x)));  y = layer_norm(h + ff(h))
        norm_first=True (pre-norm, as transformer_block):
            h = x + drop(attention(layer_norm(x)));  y = h + ff(layer_norm(h))
        ff(h) = drop(dense(d_model)(drop(act(dense(dim_feedforward)(h)))))

    ``activation``: ``"relu"`` (PyTorch's default) or ``"gelu"`` (exact, PyTorch's) or any
    funnn activation. ``dropout`` acts where PyTorch's does (the attention weights and the
    three dropout layers); ``mask=``/``lengths=`` reach the attention. Params (post-norm):
    ``((attention, {}), layer_norm, (dense, {}, {}, dense, {}), layer_norm)``; pre-norm:
    ``((layer_norm, attention, {}), (layer_norm, dense, {}, {}, dense, {}))``;
    :func:`funnn.interop.transformer_encoder_layer` converts PyTorch's weights to them.
    """
    d_model = _positive("d_model", d_model, "transformer_encoder_layer")
    dim_feedforward = _positive("dim_feedforward", dim_feedforward, "transformer_encoder_layer")
    attn = multi_head_attention(num_heads, causal=causal, dropout=dropout,
                                implementation=implementation)
    ff = list(_feedforward(d_model, dim_feedforward, activation, dropout).children)
    ff = [child for _, child in ff]
    if norm_first:
        body = serial(residual(serial(layer_norm(eps), attn, dropout_layer(dropout))),
                      residual(serial(layer_norm(eps), *ff)))
    else:
        body = serial(residual(serial(attn, dropout_layer(dropout))), layer_norm(eps),
                      residual(serial(*ff)), layer_norm(eps))
    opts = ", norm_first" if norm_first else ""
    name = (f"transformer_encoder_layer({int(d_model)}, {attn.name.split('(', 1)[1][:-1]}, "
            f"dim_feedforward={int(dim_feedforward)}{opts})")
    return dataclasses.replace(body, name=name, kind="transformer_encoder_layer")


_DECODER_KEYS = ("self_attn", "norm1", "cross_attn", "norm2", "ff", "norm3")


def transformer_decoder_layer(d_model: int, num_heads: int, dim_feedforward: int = 2048, *,
                              dropout: float = 0.0, activation="relu", eps: float = 1e-5,
                              norm_first: bool = False, causal: bool = True,
                              implementation: str = "auto") -> Layer:
    """PyTorch's ``nn.TransformerDecoderLayer`` on the pair ``(x (batch, T, d_model),
    memory (batch, S, d_model))`` -> ``(batch, T, d_model)``::

        norm_first=False (post-norm, PyTorch's default):
            h1 = norm1(x + drop(self_attn(x)));  h2 = norm2(h1 + drop(cross_attn(h1, memory)))
            y = norm3(h2 + ff(h2))
        norm_first=True (pre-norm):
            h1 = x + drop(self_attn(norm1(x)));  h2 = h1 + drop(cross_attn(norm2(h1), memory))
            y = h2 + ff(norm3(h2))

    ``causal=True`` (the default here: a decoder) is PyTorch's causal ``tgt_mask``;
    ``lengths=``/``mask=`` pad the targets' keys (``tgt_key_padding_mask``), and
    ``memory_lengths=`` the memory's (``memory_key_padding_mask``). ``ff`` as in
    :func:`transformer_encoder_layer`. Params ``{"self_attn", "norm1", "cross_attn", "norm2",
    "ff": (dense, {}, {}, dense, {}), "norm3"}`` (PyTorch's names). Backward: the children's
    in reverse, written out below; ``dx`` is the pair ``(dx, dmemory)``. No per-example rules.
    """
    where = "transformer_decoder_layer"
    d_model = _positive("d_model", d_model, where)
    dim_feedforward = _positive("dim_feedforward", dim_feedforward, where)
    sa = multi_head_attention(num_heads, causal=causal, dropout=dropout,
                              implementation=implementation)
    ca = cross_attention(num_heads, dropout=dropout, implementation=implementation)
    ln, drop = layer_norm(eps), dropout_layer(dropout)
    ff = _feedforward(d_model, dim_feedforward, activation, dropout)
    name = (f"{where}({d_model}, {sa.name.split('(', 1)[1][:-1]}, "
            f"dim_feedforward={dim_feedforward}{', norm_first' if norm_first else ''})")

    def init(key, in_shape):
        if not (isinstance(in_shape, (tuple, list)) and len(in_shape) == 2):
            raise ShapeError(f"init shape must be a pair ((batch, T, {d_model}), (batch, S, "
                             f"{d_model})), got {in_shape!r}", (name,))
        xs, ms = (tuple(s) for s in in_shape)
        ks = split_key(key, 4)
        with layer_scope(name):
            _, p_sa = sa.init(ks[0], xs)
            _, p_ca = ca.init(ks[1], (xs, ms))
            _, p_ff = ff.init(ks[2], xs)
            _, p_ln = ln.init(ks[3], xs)
        return xs, {"self_attn": p_sa, "norm1": p_ln, "cross_attn": p_ca, "norm2": p_ln,
                    "ff": p_ff, "norm3": p_ln}

    def _run(params, xin, key, train, self_ctx, mem_ctx, call):
        """Both paths over one walk: ``call(layer, p, x, **kw) -> (y, res)``."""
        if not (isinstance(xin, (tuple, list)) and len(xin) == 2):
            raise ShapeError("expected the input as a pair (x, memory)", (name,))
        x, mem = xin
        for what, a in (("input", x), ("memory", mem)):
            check_floating(name, a, what)
            check_rank(name, a, 3, 3, "(batch, seq, d_model)")
        k = split_key(key, 5)
        kw = {"train": train}
        res = {}
        with layer_scope(name):
            def half(h, label, fn):
                """One residual half: ``(h_next, residuals)`` in pre- or post-norm order."""
                norm = {"self_attn": "norm1", "cross_attn": "norm2", "ff": "norm3"}[label]
                if norm_first:
                    u, res[norm] = call(ln, params[norm], h)
                    a = fn(u)
                    return h + a
                a = fn(h)
                y, res[norm] = call(ln, params[norm], h + a)
                return y

            def self_block(u):
                a, res["self_attn"] = call(sa, params["self_attn"], u, key=k[0], **kw,
                                           **self_ctx)
                a, res["drop1"] = call(drop, {}, a, key=k[1], **kw)
                return a

            def cross_block(u):
                c, res["cross_attn"] = call(ca, params["cross_attn"], (u, mem), key=k[2], **kw,
                                            **mem_ctx)
                c, res["drop2"] = call(drop, {}, c, key=k[3], **kw)
                return c

            def ff_block(u):
                f, res["ff"] = call(ff, params["ff"], u, key=k[4], **kw)
                return f

            h = half(x, "self_attn", self_block)
            h = half(h, "cross_attn", cross_block)
            y = half(h, "ff", ff_block)
        return y, res

    def _ctx(mask, lengths, memory_lengths):
        self_ctx = {n: v for n, v in (("mask", mask), ("lengths", lengths)) if v is not None}
        return self_ctx, ({} if memory_lengths is None else {"lengths": memory_lengths})

    def apply(params, x, *, key=None, train=False, mask=None, lengths=None,
              memory_lengths=None):
        self_ctx, mem_ctx = _ctx(mask, lengths, memory_lengths)
        return _run(params, x, key, train, self_ctx, mem_ctx,
                    lambda layer, p, a, **kw: (layer.apply(p, a, **kw), None))[0]

    def forward(params, x, *, key=None, train=False, mask=None, lengths=None,
                memory_lengths=None):
        self_ctx, mem_ctx = _ctx(mask, lengths, memory_lengths)
        return _run(params, x, key, train, self_ctx, mem_ctx,
                    lambda layer, p, a, **kw: layer.forward(p, a, **kw))

    def backward(params, res, dy):
        with layer_scope(name):
            return _decoder_backward((sa, ca, ln, drop, ff), norm_first, params, res, dy)

    def jvp(params, res, dparams, dx):
        with layer_scope(name):
            return _decoder_jvp((sa, ca, ln, drop, ff), norm_first, params, res, dparams, dx)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 context=("mask", "lengths", "memory_lengths"), kind=where, jvp=jvp)


def _decoder_backward(layers, norm_first: bool, params, res, dy):
    """:func:`transformer_decoder_layer`'s backward: the children's, last to first;
    ``(grads, (dx, dmemory))``."""
    sa, ca, ln, drop, ff = layers
    g: dict = {}

    def back(layer, label, d):
        g[label], dx = layer.backward(params.get(label, {}), res[label], d)
        return dx

    if norm_first:                       # y = h2 + ff(norm3(h2)), and so on
        dh2 = dy + back(ln, "norm3", back(ff, "ff", dy))
        du2, dmem = back(ca, "cross_attn", back(drop, "drop2", dh2))
        dh1 = dh2 + back(ln, "norm2", du2)
        dx = dh1 + back(ln, "norm1", back(sa, "self_attn", back(drop, "drop1", dh1)))
    else:                                # y = norm3(h2 + ff(h2)), and so on
        dz = back(ln, "norm3", dy)
        dz = back(ln, "norm2", dz + back(ff, "ff", dz))
        dh1c, dmem = back(ca, "cross_attn", back(drop, "drop2", dz))
        dz = back(ln, "norm1", dz + dh1c)
        dx = dz + back(sa, "self_attn", back(drop, "drop1", dz))
    return {k: g[k] for k in _DECODER_KEYS}, (dx, dmem)


def _decoder_jvp(layers, norm_first: bool, params, res, dparams, dxin):
    """:func:`transformer_decoder_layer`'s tangent: the children's, first to last, along
    ``dxin = (dx, dmemory)``."""
    sa, ca, ln, drop, ff = layers
    dx, dmem = dxin

    def tan(layer, label, d):
        return tangent(layer)(params.get(label, {}), res[label], dparams.get(label, {}), d)

    if norm_first:                       # h1 = x + drop(self_attn(norm1(x))), and so on
        dh1 = dx + tan(drop, "drop1", tan(sa, "self_attn", tan(ln, "norm1", dx)))
        dh2 = dh1 + tan(drop, "drop2", tan(ca, "cross_attn", (tan(ln, "norm2", dh1), dmem)))
        return dh2 + tan(ff, "ff", tan(ln, "norm3", dh2))
    dh1 = tan(ln, "norm1", dx + tan(drop, "drop1", tan(sa, "self_attn", dx)))
    dh2 = tan(ln, "norm2", dh1 + tan(drop, "drop2", tan(ca, "cross_attn", (dh1, dmem))))
    return tan(ln, "norm3", dh2 + tan(ff, "ff", dh2))
