"""dropout: inverted scaling, explicit keys, identity at inference, hand-written backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from funnn.core import ConfigError, DTypeError, KeyMissingError
from funnn.layers.dropout import dropout

KEY = jax.random.key(0)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)


def _grads_three_ways(layer, x, *, key, train, seed=1):
    """Manual backward vs jax.vjp (1e-10) vs central finite differences (1e-6); key fixed.

    One jitted program per shape (JAX compiles per shape; op-by-op would compile dozens).
    """
    rng = np.random.default_rng(seed)
    dy, v = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=x.shape))
    eps = 1e-6

    @jax.jit
    def run(x, dy, v, key):
        f = lambda x: layer.apply({}, x, key=key, train=train)
        y, res = layer.forward({}, x, key=key, train=train)
        dp, dx = layer.backward({}, res, dy)
        (dx_auto,) = jax.vjp(f, x)[1](dy)
        fd = (jnp.sum(f(x + eps * v) * dy) - jnp.sum(f(x - eps * v) * dy)) / (2 * eps)
        return y, f(x), dp, dx, dx_auto, fd

    y, y_apply, dp, dx, dx_auto, fd = run(x, dy, v, key)
    np.testing.assert_array_equal(y, y_apply)
    assert dp == {}
    assert _rel(dx, dx_auto) <= 1e-10
    np.testing.assert_allclose(jnp.sum(dx * v), fd, rtol=1e-6, atol=1e-9)
    return y, dx


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_bad_rate_is_config_error(rate):
    with pytest.raises(ConfigError, match=r"dropout.*\[0, 1\)"):
        dropout(rate)


def test_name_and_init_shape():
    layer = dropout(0.25)
    assert layer.name == "dropout(0.25)" and not layer.stateful
    out, params = layer.init(KEY, (None, 7))
    assert out == (None, 7) and params == {}
    assert layer.init(KEY, (-1, 3, 4))[0] == (None, 3, 4)
    y = jax.eval_shape(lambda x: layer.apply({}, x, key=KEY, train=True),
                       jax.ShapeDtypeStruct((5, 3, 4), jnp.float64))
    assert y.shape == (5, 3, 4)


# --------------------------------------------------------------------------- behaviour


def test_train_without_key_raises_naming_layer():
    layer = dropout(0.5)
    x = jnp.ones((2, 3))
    for call in (layer.apply, layer.forward):
        with pytest.raises(KeyMissingError, match=r"dropout\(0\.5\).*key="):
            call({}, x, train=True)


def test_identity_at_inference_and_for_rate_zero():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)))
    assert dropout(0.5).apply({}, x) is x                      # inference, no key needed
    assert dropout(0.5).apply({}, x, key=KEY) is x             # a key alone does not train
    assert dropout(0.0).apply({}, x, train=True) is x          # rate 0 needs no key
    y, res = dropout(0.0).forward({}, x, key=KEY, train=True)
    assert y is x and res is None


def test_integer_input_is_dtype_error():
    with pytest.raises(DTypeError, match="dropout"):
        dropout(0.5).apply({}, jnp.ones((2, 3), jnp.int32), key=KEY, train=True)


def test_statistics_fraction_and_expectation():
    rate, n = 0.3, 1_000_000
    x = jnp.ones((1000, n // 1000))
    y = dropout(rate).apply({}, x, key=KEY, train=True)
    vals = np.unique(np.asarray(y))
    np.testing.assert_allclose(vals, [0.0, 1 / (1 - rate)], rtol=1e-15)
    sd = np.sqrt(rate * (1 - rate) / n)                        # binomial standard deviation
    assert abs(float(jnp.mean(y == 0)) - rate) < 5 * sd
    assert abs(float(jnp.mean(y)) - 1.0) < 5 * sd / (1 - rate)  # E[y] = x


def test_same_key_same_mask_other_key_other_mask():
    layer = dropout(0.5)
    x = jnp.ones((8, 16))
    a = layer.apply({}, x, key=jax.random.key(3), train=True)
    b = layer.apply({}, x, key=jax.random.key(3), train=True)
    c = layer.apply({}, x, key=jax.random.key(4), train=True)
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))
    old = layer.apply({}, x, key=jax.random.PRNGKey(3), train=True)   # legacy uint32 keys work
    assert old.shape == x.shape


def test_backward_uses_the_forward_mask():
    rate = 0.4
    layer = dropout(rate)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 7))) + 5.0   # no zeros in x
    y, res = layer.forward({}, x, key=KEY, train=True)
    _, dx = layer.backward({}, res, jnp.ones_like(x))
    kept = np.asarray(y) != 0
    np.testing.assert_array_equal(dx, kept / (1 - rate))
    np.testing.assert_allclose(y, np.where(kept, x / (1 - rate), 0.0), rtol=1e-15)
    assert 0 < kept.sum() < kept.size


def test_jit_equals_eager():
    layer = dropout(0.5)
    x = jnp.arange(12.0).reshape(3, 4)
    step = jax.jit(lambda x, k: layer.forward({}, x, key=k, train=True))
    (y1, m1), (y2, m2) = step(x, KEY), layer.forward({}, x, key=KEY, train=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(m1, m2)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("rate,train", [(0.0, True), (0.3, True), (0.3, False), (0.9, True)])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5)])
def test_gradients_three_ways(rate, train, shape):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape))
    _grads_three_ways(dropout(rate), x, key=KEY, train=train)


def test_per_example_gradients_with_vmap():
    layer = dropout(0.5)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)))
    dy = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)))
    keys = jax.random.split(KEY, 5)

    def manual(xi, dyi, k):
        _, res = layer.forward({}, xi, key=k, train=True)
        return layer.backward({}, res, dyi)[1]

    def auto(xi, dyi, k):
        return jax.vjp(lambda x: layer.apply({}, x, key=k, train=True), xi)[1](dyi)[0]

    xs, dys = x[:, None], dy[:, None]                       # a batch axis of 1 per example
    got_m = jax.jit(jax.vmap(manual))(xs, dys, keys)
    got_a = jax.jit(jax.vmap(auto))(xs, dys, keys)
    one = jax.jit(manual)
    loop = np.stack([one(xs[i], dys[i], keys[i]) for i in range(5)])
    np.testing.assert_allclose(got_m, loop, rtol=1e-15)
    np.testing.assert_allclose(got_a, loop, rtol=1e-15)


@pytest.mark.slow  # ~12 shapes, one compile each
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       rate=st.sampled_from([0.0, 0.1, 0.5, 0.75]), seed=st.integers(0, 2**16))
def test_property_gradients_and_values(shape, rate, seed):
    key = jax.random.key(seed)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=shape))
    y, _dx = _grads_three_ways(dropout(rate), x, key=key, train=True, seed=seed)
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-15)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_float32_stays_float32():
    x = jnp.ones((3, 4), jnp.float32)
    y, res = dropout(0.5).forward({}, x, key=KEY, train=True)
    assert y.dtype == jnp.float32 and res.dtype == jnp.float32


@pytest.mark.slow  # three jit compiles of a whole network
def test_in_serial_manual_engine_equals_autodiff():
    """dropout inside a small stack: manual engine vs autodiff with the same key."""
    from funnn import autodiff, losses, manual
    from funnn.layers import dense, serial

    model = serial(dense(5), dropout(0.5), dense(2))
    rng = np.random.default_rng(7)
    x, y = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(4, 2)))
    _, params = model.init(KEY, (None, 3))
    l_m, g_m = jax.jit(manual.value_and_grad(model, losses.mse))(params, x, y, key=KEY)
    l_a, g_a = jax.jit(autodiff.value_and_grad(model, losses.mse))(params, x, y, key=KEY)
    l_b, g_b = jax.jit(autodiff.value_and_grad(manual.bridge(model), losses.mse))(
        params, x, y, key=KEY)
    np.testing.assert_allclose(l_m, l_a, rtol=1e-14)
    np.testing.assert_allclose(l_b, l_a, rtol=1e-14)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(g) for g in (g_m, g_a, g_b))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)   # some grads are ~0 exactly
        np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-15)


def test_init_accepts_unknown_sequence_length():
    """Dropout is elementwise: any axis of its init shape may be unknown (e.g. time)."""
    import funnn.layers as L

    model = L.serial(L.rnn(4), L.dropout(0.2), L.dense(2))
    shape, _ = model.init(jax.random.key(0), (None, None, 3))
    assert shape == (None, None, 2)
