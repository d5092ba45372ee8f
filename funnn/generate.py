"""Autoregressive generation for causal language models: a KV cache, greedy decoding,
temperature and top-k sampling, in one jitted program that traces its step once.

A model maps integer ids ``(batch, T)`` to logits ``(batch, T, vocab)`` and is built from
layers that decode incrementally (:mod:`funnn.layers._decode`): ``serial``/``residual``
stacks of embeddings, positional embeddings, causal ``transformer_block``s or causal
``multi_head_attention``, norms, dense layers and activations, or a ``tied_embedding``
around such a body. Each causal attention keeps the keys and values of the positions seen so
far in a cache of fixed shape ``(batch, max_len, kv_heads, head_dim)``, so a new token costs
one position's work (and attention over the cache) instead of a pass over the whole prefix::

    cache = init_cache(model, params, batch, max_len)
    logits, cache = decode(model, params, prompt, cache, 0)         # prefill: T positions
    logits, cache = decode(model, params, next_ids, cache, T)       # then one at a time

``decode``'s logits equal ``model.apply``'s at the same positions (float64: to rounding).

:func:`generate` runs the prefill and a ``lax.scan`` over the new tokens inside one
``jax.jit``; the compiled program is kept per (model, number of new tokens, sampling rule),
so further calls with other prompts of the same shape, keys or temperatures do not trace
again. Token ``i`` (``0`` the first new one) is drawn with ``jax.random.fold_in(key, i)``.
Prompts in one batch share their length (left-padding is not supported).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.core import ConfigError, DTypeError, Layer, ShapeError
from funnn.dtypes import wide
from funnn.layers._decode import decoder_of

__all__ = ["init_cache", "decode", "sample", "generator", "generate"]


def _check_model(model) -> None:
    if not isinstance(model, Layer):
        raise ConfigError(f"model must be a Layer, got {type(model).__name__}", ("generate",))


def init_cache(model: Layer, params, batch: int, max_len: int):
    """The model's empty KV cache for ``batch`` sequences of up to ``max_len`` positions: a
    pytree of zeros (``{"k", "v": (batch, max_len, kv_heads, head_dim)}`` per causal
    attention, ``()`` for layers that keep nothing)."""
    _check_model(model)
    return decoder_of(model).init(params, int(batch), int(max_len))


def decode(model: Layer, params, x, cache, pos):
    """Run positions ``pos .. pos+n-1`` of ``x (batch, n)`` against the cache:
    ``(logits (batch, n, vocab), new cache)``. ``pos`` may be traced (inside ``jit``/``scan``);
    the cache must have room: ``pos + n <= max_len`` (not checked when ``pos`` is traced)."""
    _check_model(model)
    if isinstance(pos, (int, np.integer)):
        n = jnp.shape(x)[1] if jnp.ndim(x) >= 2 else 0
        room = max((a.shape[1] for a in jax.tree.leaves(cache) if jnp.ndim(a) >= 2), default=None)
        if room is not None and pos + n > room:
            raise ShapeError(f"positions {pos}..{pos + n - 1} do not fit a cache of {room} "
                             f"positions; make it with a larger max_len", ("decode",))
    return decoder_of(model).step(params, x, cache, pos)


def sample(logits, key=None, *, temperature=1.0, top_k: int | None = None,
           greedy: bool = False):
    """One token per row of ``logits (..., vocab)``: the argmax (``greedy=True``), or a draw
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits
    (``None``: all). Ties at the ``top_k``-th value are all kept."""
    if greedy:
        return jnp.argmax(logits, axis=-1)
    if key is None:
        raise ConfigError("sampling needs a PRNG key; pass key=jax.random.key(seed), or "
                          "greedy=True", ("sample",))
    z = logits.astype(wide(logits.dtype)) / temperature
    if top_k is not None:
        kth = lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    return jax.random.categorical(key, z, axis=-1)


def _check_settings(num_tokens, top_k, greedy) -> None:
    for what, v, allow_none in (("num_tokens", num_tokens, False), ("top_k", top_k, True)):
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{what} must be a positive int, got {v!r}", ("generate",))
    if not isinstance(greedy, (bool, np.bool_)):
        raise ConfigError(f"greedy must be True or False, got {greedy!r}", ("generate",))


@functools.lru_cache(maxsize=64)
def generator(model: Layer, num_tokens: int, *, top_k: int | None = None,
              greedy: bool = False):
    """The jitted ``run(params, prompt, key, temperature) -> ids (batch, T + num_tokens)`` for
    a model and sampling rule, made once and kept (so is its compiled program, per prompt
    shape): the prefill, then a ``lax.scan`` over the new tokens (module docstring)."""
    _check_model(model)
    _check_settings(num_tokens, top_k, greedy)
    dec = decoder_of(model)

    def pick(logits, key, i, temperature):
        if logits.ndim != 3:
            raise ShapeError(f"expected the model to give logits (batch, positions, vocab), "
                             f"got shape {logits.shape}", (model.name,))
        k = None if greedy else jax.random.fold_in(key, i)
        return sample(logits[:, -1], k, temperature=temperature, top_k=top_k,
                      greedy=greedy).astype(jnp.int32)

    def run(params, prompt, key, temperature):
        b, t = prompt.shape
        logits, cache = dec.step(params, prompt, dec.init(params, b, t + num_tokens), 0)
        first = pick(logits, key, 0, temperature)

        def body(carry, i):
            tok, cache = carry
            logits, cache = dec.step(params, tok[:, None], cache, t + i)
            return (pick(logits, key, i + 1, temperature), cache), tok

        (last, _), toks = lax.scan(body, (first, cache), jnp.arange(num_tokens - 1))
        return jnp.concatenate([prompt.astype(jnp.int32), toks.T, last[:, None]], axis=1)

    return jax.jit(run)


def generate(model: Layer, params, prompt, num_tokens: int, *, key=None, temperature=1.0,
             top_k: int | None = None, greedy: bool = False):
    """Continue each row of ``prompt`` (integer ids ``(batch, T)``) by ``num_tokens`` tokens:
    ``ids (batch, T + num_tokens)``, the prompt first.

    ``greedy=True`` takes the argmax at every step (no key needed); otherwise token ``i`` is
    drawn from ``softmax(logits / temperature)`` over the ``top_k`` largest logits (``None``:
    all) with ``fold_in(key, i)``. One jitted program per (model, ``num_tokens``, ``top_k``,
    ``greedy``) and prompt shape: other prompts, keys and temperatures reuse it.
    """
    _check_model(model)
    _check_settings(num_tokens, top_k, greedy)
    if jnp.ndim(prompt) != 2 or not jnp.issubdtype(jnp.result_type(prompt), jnp.integer):
        raise DTypeError(f"prompt must be integer ids of shape (batch, T), got "
                         f"{jnp.result_type(prompt)} of shape {jnp.shape(prompt)}", ("generate",))
    if jnp.shape(prompt)[1] < 1:
        raise ShapeError("prompt must hold at least one token per row", ("generate",))
    if not greedy:
        if key is None:
            raise ConfigError("sampling needs a PRNG key: pass key=jax.random.key(seed), or "
                              "greedy=True", ("generate",))
        t = np.asarray(temperature) if not isinstance(temperature, jax.core.Tracer) else None
        if t is not None and not (t.shape == () and t > 0 and np.isfinite(t)):
            raise ConfigError(f"temperature must be a positive number, got {temperature!r}",
                              ("generate",))
    else:
        key = jax.random.key(0)                      # unused: greedy draws nothing
    return generator(model, int(num_tokens), top_k=top_k, greedy=bool(greedy))(
        params, jnp.asarray(prompt), key, jnp.asarray(temperature, jnp.zeros(()).dtype))
