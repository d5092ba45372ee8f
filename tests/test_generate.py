"""KV-cache decoding and generation: cached logits equal the full causal model's; greedy and
sampled tokens equal a reference that reruns the whole model each step; one trace in all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from funnn import activations as A
from funnn import generate as G
from funnn import layers as L
from funnn.core import ConfigError, DTypeError, ShapeError

V, F, T, N = 11, 8, 4, 5
TRACES = []


def _counted_tanh(x):
    TRACES.append(1)                       # a Python side effect: runs once per trace
    return jnp.tanh(x)


COUNTED = A.Activation(name="counted_tanh", f=_counted_tanh, df=lambda x: 1 - jnp.tanh(x) ** 2,
                       range=(-1.0, 1.0))


def _lm():
    """Tied embedding, learned positions, a rotary GQA block (materialized: the chunked and
    tiled kernels are checked in test_attention.py),
    a counted activation, rms_norm."""
    body = L.serial(L.positional_embedding(T + N),
                    L.transformer_block(2, 16, causal=True, num_kv_heads=1, rotary=True,
                                        implementation="materialized"),
                    L.activation(COUNTED), L.rms_norm())
    return L.tied_embedding(V, F, body)


@pytest.fixture(scope="module")
def lm():
    model = _lm()
    params = jax.jit(lambda k: model.init(k, (None, T + N))[1])(jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, T + N)))
    return model, params, ids


@pytest.mark.slow   # ~2.5 CPU-s: the model and its decoding loop compiled
def test_cached_decoding_equals_the_full_causal_model(lm):
    model, params, ids = lm

    @jax.jit
    def both(p, ids):
        full = model.apply(p, ids)
        cache = G.init_cache(model, p, ids.shape[0], ids.shape[1])
        first, cache = G.decode(model, p, ids[:, :T], cache, 0)             # prefill

        def one(cache, t):                                                   # one by one
            out, cache = G.decode(model, p, lax.dynamic_slice_in_dim(ids, t, 1, 1), cache, t)
            return cache, out[:, 0]

        _, rest = lax.scan(one, cache, jnp.arange(T, ids.shape[1]))
        return full, jnp.concatenate([first, rest.transpose(1, 0, 2)], 1)

    full, cached = both(params, ids)
    assert cached.shape == (2, T + N, V)
    np.testing.assert_allclose(cached, full, rtol=1e-10, atol=1e-12)
    # the sinusoidal table's rows at positions pos.. (no params), and a position-wise layer
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 6)))
    pe = L.positional_embedding(16, "sinusoidal")
    from funnn.layers._decode import decoder_of
    y, _ = decoder_of(pe).step({}, x, (), 5)
    np.testing.assert_allclose(y, pe.apply({}, jnp.zeros((2, 8, 6)))[:, 5:] + x, rtol=1e-12)


def _reference(model, params, got, key, temperature, top_k, greedy):
    """No cache: the whole model once on the generated ids (causal: the logits at position t
    ignore what lies after it, so they are the ones each step saw); token i must be the
    draw from position T + i - 1's logits with fold_in(key, i)."""

    @jax.jit
    def draws(params, ids, key):
        logits = model.apply(params, ids)[:, T - 1:-1]               # (batch, N, vocab)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(N))
        pick = lambda lg, k: G.sample(lg, None if greedy else k, temperature=temperature,
                                      top_k=top_k, greedy=greedy)
        return jax.vmap(pick, in_axes=(1, 0), out_axes=1)(logits, keys)

    return draws(params, got, key)


@pytest.mark.slow   # ~3 CPU-s: two generators and their references compiled
def test_generate_equals_rerunning_the_model_and_traces_once(lm):
    model, params, ids = lm
    prompt, key = ids[:, :T], jax.random.key(7)
    for top_k, greedy, temp in ((None, True, 1.0), (3, False, 0.7)):
        run = G.generator(model, N, top_k=top_k, greedy=greedy)
        before = len(TRACES)
        got = G.generate(model, params, prompt, N, key=key, temperature=temp, top_k=top_k,
                         greedy=greedy)
        traced = len(TRACES) - before
        assert traced == 2          # the prefill and the scan body, each traced once
        np.testing.assert_array_equal(got[:, T:],
                                      _reference(model, params, got, key, temp, top_k, greedy))
        assert got.shape == (2, T + N) and got.dtype == jnp.int32
        np.testing.assert_array_equal(got[:, :T], prompt)
        # another prompt, key and temperature: the same compiled program, no new trace
        before = len(TRACES)
        again = G.generate(model, params, ids[:, 1:T + 1], N, key=jax.random.key(8),
                           temperature=1.3, top_k=top_k, greedy=greedy)
        assert len(TRACES) == before and run._cache_size() == 1
        np.testing.assert_array_equal(again[:, :T], ids[:, 1:T + 1])
    sampled = G.generate(model, params, prompt, N, key=key, temperature=0.7, top_k=3)
    assert not np.array_equal(sampled, G.generate(model, params, prompt, N, greedy=True))


def test_sample_rules():
    logits = jnp.asarray([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.5]])
    np.testing.assert_array_equal(G.sample(logits, greedy=True), [1, 0])

    @jax.jit
    def rules(keys):
        return (jax.vmap(lambda k: G.sample(logits, k, top_k=2))(keys),
                jax.vmap(lambda k: G.sample(logits, k, top_k=1, temperature=5.0))(keys),
                jax.vmap(lambda k: G.sample(logits, k, temperature=1e-3))(keys))

    draws, one, cold = rules(jax.random.split(jax.random.key(0), 200))
    assert set(np.unique(draws[:, 0])) == {1, 2} and set(np.unique(draws[:, 1])) == {0, 3}
    assert (one == jnp.asarray([1, 0])).all()          # top-1 is greedy at any temperature
    assert (cold == jnp.asarray([1, 0])).all()
    with pytest.raises(ConfigError, match="sample: sampling needs a PRNG key"):
        G.sample(logits)


def test_generate_errors_name_the_place(lm):
    model, params, ids = lm
    prompt = ids[:, :T]
    with pytest.raises(DTypeError, match=r"generate: prompt must be integer ids"):
        G.generate(model, params, prompt.astype(jnp.float32), 2, greedy=True)
    with pytest.raises(ConfigError, match="generate: sampling needs a PRNG key"):
        G.generate(model, params, prompt, 2)
    for bad in ({"temperature": 0.0}, {"top_k": 0}):
        with pytest.raises(ConfigError, match=r"temperature|top_k"):
            G.generate(model, params, prompt, 2, key=jax.random.key(0), **bad)
    with pytest.raises(ConfigError, match="num_tokens must be a positive int"):
        G.generate(model, params, prompt, 0, greedy=True)
    bidir = L.serial(L.embedding(V, F), L.transformer_block(2, 16), L.dense(V))
    with pytest.raises(ConfigError, match=r"transformer_block\(2, mlp_dim=16\): cannot "
                                          r"generate.*only causal"):
        G.init_cache(bidir, None, 1, 4)
    with pytest.raises(ConfigError, match=r"lstm.*no incremental-decoding rule"):
        G.init_cache(L.serial(L.embedding(V, F), L.lstm(4), L.dense(V)), None, 1, 4)
    with pytest.raises(ShapeError, match="needs a table of at least 20 rows, got max_len 9"):
        G.init_cache(model, params, 2, 20)
    cache = G.init_cache(model, params, 2, T)
    with pytest.raises(ShapeError, match=r"positions 2..5 do not fit a cache of 4"):
        G.decode(model, params, prompt, cache, 2)
