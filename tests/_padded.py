"""A tiny padded causal language model and its data, shared by the side-input tests
(test_train, test_gradcheck, test_privacy): embedding, causal attention, dense; 4 lines
of lengths 5, 3, 4, 2 padded to 5 tokens, targets -100 (ignored) at the padding."""

import jax
import jax.numpy as jnp
import numpy as np

from funnn import layers as L

VOCAB, T, LENGTHS = 7, 5, np.array([5, 3, 4, 2])


def tiny_lm(seed=0):
    """``(model, params, x, y, mask)``: ids ``x (4, 5)``, next-token targets ``y`` with -100
    at padded positions, and the key-padding ``mask`` (True = a real token)."""
    model = L.serial(L.embedding(VOCAB, 4),
                     L.multi_head_attention(1, causal=True, implementation="materialized",
                                            use_bias=False),    # b_k's gradient is 0 anyway
                     L.dense(VOCAB))
    _, params = model.init(jax.random.key(seed), (None, T))
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (len(LENGTHS), T + 1))
    pad = np.arange(T)[None] >= LENGTHS[:, None]
    x = np.where(pad, 0, tokens[:, :-1])
    y = np.where(pad, -100, tokens[:, 1:])
    return model, params, x, y, ~pad


def masked_ce(model, params, x, y, mask):
    """The hand-written masked loss: mean over the valid tokens of -log softmax(logits)[y],
    the model masking its padded keys."""
    logp = jax.nn.log_softmax(model.apply(params, x, mask=mask))
    valid = y != -100
    picked = jnp.take_along_axis(logp, jnp.where(valid, y, 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0)) / jnp.sum(valid)
