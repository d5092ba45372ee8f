"""Incremental decoding with a KV cache: each layer's rule for running new positions of a
sequence against what it kept from the earlier ones (:mod:`funnn.generate` drives it).

A :class:`Decoder` is two pure functions::

    init(params, batch, max_len)       -> cache          # a pytree of fixed shapes
    step(params, x, cache, pos)        -> (y, cache)     # x: positions pos .. pos+n-1

``x`` holds ``n`` new positions ``(batch, n, ...)``, ``pos`` (a traced int) is the position of
the first; ``y`` is what ``apply`` gives at those positions when run on the whole sequence so
far. A prompt of length ``T`` is one step with ``n = T`` (the prefill), each generated token
one more with ``n = 1``; the cache has fixed shapes, so a jitted loop traces the step once.

:func:`decoder_of` finds a layer's decoder: the layer's own (``Layer.decoder``: causal
attention keeps its keys and values, a transformer block its attention's), else by kind:
position-wise layers (dense, activations, norms, embeddings, dropout at inference) apply to
the new positions alone with an empty cache, ``serial``/``residual``/``tied_embedding``
compose their children's decoders, ``positional_embedding`` adds the rows at ``pos..``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.core import ConfigError, Layer, ShapeError, layer_scope

__all__ = ["Decoder", "decoder_of", "POSITIONWISE"]

# kinds whose output at a position depends on the input at that position alone
POSITIONWISE = frozenset({"dense", "activation", "prelu", "layer_norm", "rms_norm", "dropout",
                          "embedding"})


class Decoder(NamedTuple):
    """A layer's incremental-decoding rule (module docstring): ``init`` and ``step``."""

    init: Callable
    step: Callable


def _positionwise(layer: Layer) -> Decoder:
    def step(params, x, cache, pos):
        return layer.apply(params, x), cache

    return Decoder(lambda params, batch, max_len: (), step)


def _serial(layer: Layer) -> Decoder:
    decs = [decoder_of(child) for _, child in layer.children]
    labels = [label for label, _ in layer.children]

    def init(params, batch, max_len):
        return tuple(d.init(p, batch, max_len) for d, p in zip(decs, params))

    def step(params, x, cache, pos):
        new = []
        for label, d, p, c in zip(labels, decs, params, cache):
            with layer_scope(label):
                x, c = d.step(p, x, c, pos)
            new.append(c)
        return x, tuple(new)

    return Decoder(init, step)


def _residual(layer: Layer) -> Decoder:
    body = decoder_of(layer.children[0][1])

    def step(params, x, cache, pos):
        y, cache = body.step(params, x, cache, pos)
        return x + y, cache

    return Decoder(body.init, step)


def _tied(layer: Layer) -> Decoder:
    emb, body = (decoder_of(child) for _, child in layer.children)

    def init(params, batch, max_len):
        return body.init(params[1], batch, max_len)

    def step(params, ids, cache, pos):
        h, _ = emb.step(params[0], ids, (), pos)
        h, cache = body.step(params[1], h, cache, pos)
        return h @ params[0]["table"].T, cache

    return Decoder(init, step)


def _positional(layer: Layer) -> Decoder:
    """``x + P[pos:pos+n]``: the learned table's rows (params ``{"pos"}``), or the sinusoidal
    table's (no params) computed at those positions."""

    def step(params, x, cache, pos):
        n, f = x.shape[-2:]
        if "pos" in params:
            table = params["pos"]
            rows = lax.dynamic_slice_in_dim(table, pos, n, axis=0)
        else:
            p = (pos + jnp.arange(n))[:, None].astype(x.dtype)
            freq = jnp.asarray(np.exp(-np.log(10000.0) * (np.arange(0, f, 2) / f)), x.dtype)
            rows = jnp.zeros((n, f), x.dtype)
            rows = rows.at[:, 0::2].set(jnp.sin(p * freq))
            rows = rows.at[:, 1::2].set(jnp.cos(p * freq)[:, : f // 2])
        return x + rows.astype(x.dtype), cache

    def init(params, batch, max_len):
        if "pos" in params and max_len > params["pos"].shape[0]:
            raise ShapeError(f"decoding {max_len} positions needs a table of at least "
                             f"{max_len} rows, got max_len {params['pos'].shape[0]}",
                             (layer.name,))
        return ()

    return Decoder(init, step)


_BY_KIND = {"serial": _serial, "residual": _residual, "tied_embedding": _tied,
            "positional_embedding": _positional}


def decoder_of(layer: Layer) -> Decoder:
    """The :class:`Decoder` of ``layer`` (its own, or by kind), or a :class:`ConfigError`
    naming the layer that cannot be decoded incrementally and why."""
    if layer.decoder is not None:
        return layer.decoder
    if layer.kind in POSITIONWISE:
        return _positionwise(layer)
    if layer.kind in _BY_KIND:
        return _BY_KIND[layer.kind](layer)
    if layer.kind in ("multi_head_attention", "transformer_block"):
        why = "only causal self-attention can be decoded a token at a time"
    elif layer.stateful:
        why = "stateful layers (batch_norm) have no incremental decoding"
    else:
        why = (f"a {layer.kind!r} layer has no incremental-decoding rule (position-wise layers, "
               f"causal attention and transformer blocks, positional and tied embeddings, "
               f"serial and residual have one)")
    raise ConfigError(f"cannot generate with a KV cache: {why}", (layer.name,))
