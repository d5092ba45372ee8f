"""embedding: table lookup, scatter-add backward, id validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from funnn.core import ConfigError, DTypeError, ShapeError
from funnn.layers.embedding import embedding

KEY = jax.random.key(0)
N, F = 7, 3


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)


def _scatter_ref(ids, dy, n):
    """Numpy loop: every position adds its dy row to the row of its id."""
    out = np.zeros((n, dy.shape[-1]))
    for i, row in zip(np.asarray(ids).reshape(-1), np.asarray(dy).reshape(-1, dy.shape[-1])):
        out[i] += row
    return out


def _grads_three_ways(layer, p, ids, seed=1):
    """Manual dtable vs numpy scatter loop, jax.vjp (1e-10) and central FD (1e-6); dx is None."""
    rng = np.random.default_rng(seed)
    dy = jnp.asarray(rng.normal(size=ids.shape + (F,)))
    v, eps = jnp.asarray(rng.normal(size=(N, F))), 1e-6

    @jax.jit
    def run(p, ids, dy, v):
        y, res = layer.forward(p, ids)
        dp, dx = layer.backward(p, res, dy)
        f = lambda p: layer.apply(p, ids)
        (dp_a,) = jax.vjp(f, p)[1](dy)
        loss = lambda t: jnp.sum(f({"table": p["table"] + t * v}) * dy)
        return y, dp, dx, dp_a, (loss(eps) - loss(-eps)) / (2 * eps)

    y, dp, dx, dp_a, fd = run(p, ids, dy, v)
    assert dx is None
    np.testing.assert_array_equal(y, np.asarray(p["table"])[np.asarray(ids)])
    np.testing.assert_allclose(dp["table"], _scatter_ref(ids, dy, N), rtol=1e-12, atol=1e-15)
    assert _rel(dp["table"], dp_a["table"]) <= 1e-10
    np.testing.assert_allclose(jnp.sum(dp["table"] * v), fd, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def params():
    return embedding(N, F).init(KEY, (None,))[1]


def test_init_shapes_name_and_scale():
    layer = embedding(N, F)
    assert layer.name == "embedding(7, 3)" and not layer.stateful
    out, p = layer.init(KEY, (None, 5))
    assert out == (None, 5, 3) and p["table"].shape == (7, 3) and p["table"].dtype == jnp.float64
    y = jax.eval_shape(layer.apply, p, jax.ShapeDtypeStruct((2, 5), jnp.int32))
    assert y.shape == (2, 5, 3) and y.dtype == jnp.float64
    big = embedding(2000, 50).init(KEY, (None,))[1]["table"]
    assert abs(float(jnp.std(big)) * np.sqrt(50) - 1.0) < 0.02          # N(0, 1/features)


def test_lookup_matches_numpy(params):
    ids = jnp.array([[0, 6, 3], [3, 3, 1]])
    y = embedding(N, F).apply(params, ids)
    np.testing.assert_array_equal(y, np.asarray(params["table"])[np.asarray(ids)])
    np.testing.assert_array_equal(embedding(N, F).apply(params, jnp.array(4)), params["table"][4])


@pytest.mark.parametrize("shape", [(6,), (2, 4)])
def test_gradients_three_ways_with_repeated_ids(params, shape):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=shape))   # ids repeat
    _grads_three_ways(embedding(N, F), params, ids)


def test_small_integer_dtypes(params):
    for dt in (jnp.int8, jnp.uint8, jnp.int16):
        ids = jnp.array([6, 0, 2], dt)
        y, res = embedding(N, F).forward(params, ids)
        np.testing.assert_array_equal(y, params["table"][np.array([6, 0, 2])])
        dp, _ = embedding(N, F).backward(params, res, jnp.ones((3, F)))
        np.testing.assert_array_equal(dp["table"].sum(1), [3.0, 0, 3.0, 0, 0, 0, 3.0])


def test_per_example_gradients_with_vmap(params):
    layer = embedding(N, F)
    ids = jnp.array([[1, 2], [2, 2], [6, 0], [1, 1]])
    dy = jnp.asarray(np.random.default_rng(3).normal(size=(4, 2, F)))

    def manual(ids_i, dy_i):
        return layer.backward(params, layer.forward(params, ids_i)[1], dy_i)[0]

    def auto(ids_i, dy_i):
        return jax.vjp(lambda p: layer.apply(p, ids_i), params)[1](dy_i)[0]

    got_m = jax.jit(jax.vmap(manual))(ids[:, None], dy[:, None])
    got_a = jax.jit(jax.vmap(auto))(ids[:, None], dy[:, None])
    for i in range(4):
        want = _scatter_ref(ids[i], dy[i], N)
        np.testing.assert_allclose(got_m["table"][i], want, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_a["table"][i], want, rtol=1e-12, atol=1e-15)


def test_dtype_errors(params):
    for ids in (jnp.array([0.0, 1.0]), jnp.array([True, False])):
        with pytest.raises(DTypeError, match=r"embedding\(7, 3\): expected integer ids"):
            embedding(N, F).apply(params, ids)


@pytest.mark.parametrize("bad", [7, -1, 100])
def test_out_of_range_ids_when_concrete(params, bad):
    with pytest.raises(ShapeError, match=rf"embedding\(7, 3\): id {bad} is out of range .*0\.\.6"):
        embedding(N, F).apply(params, jnp.array([0, bad, 2]))
    with pytest.raises(ShapeError, match="out of range"):
        embedding(N, F).forward(params, np.array([bad]))


def test_out_of_range_ids_under_jit_read_nan_and_get_no_gradient(params):
    layer = embedding(N, F)
    ids = jnp.array([0, 7, -1, 2])
    y = jax.jit(layer.apply)(params, ids)
    assert np.all(np.isnan(y[1:3])) and np.all(np.isfinite(y[jnp.array([0, 3])]))
    _, res = jax.jit(layer.forward)(params, ids)
    dp, _ = layer.backward(params, res, jnp.ones((4, F)))
    np.testing.assert_array_equal(dp["table"].sum(1), [3.0, 0, 3.0, 0, 0, 0, 0])  # -1 not wrapped


def test_config_and_shape_errors(params):
    for n, f in ((0, 3), (3, -1), (2.5, 3), (True, 3), (3, None)):
        with pytest.raises(ConfigError, match="embedding"):
            embedding(n, f)
    with pytest.raises(ShapeError, match=r"embedding\(5, 3\): expected a table of shape"):
        embedding(5, F).apply(params, jnp.array([0]))


@pytest.mark.slow  # ~12 shapes, one compile each
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_property_gradients(params, shape, seed):
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, N, size=shape))
    _grads_three_ways(embedding(N, F), params, ids, seed=seed)


@pytest.mark.slow  # three jit compiles of a whole network
def test_in_serial_manual_engine_equals_autodiff_and_bridge():
    """ids -> embedding -> flatten -> dense: dx None passes through the combinator."""
    from funnn import autodiff, losses, manual
    from funnn.layers import dense, flatten, serial

    model = serial(embedding(N, F), flatten(), dense(2))
    ids = jnp.array([[0, 3], [3, 6], [1, 1]])
    y = jnp.asarray(np.random.default_rng(7).normal(size=(3, 2)))
    _, params = model.init(KEY, (None, 2))
    l_m, g_m = jax.jit(manual.value_and_grad(model, losses.mse))(params, ids, y)
    l_a, g_a = jax.jit(autodiff.value_and_grad(model, losses.mse))(params, ids, y)
    _l_b, g_b = jax.jit(autodiff.value_and_grad(manual.bridge(model), losses.mse))(params, ids, y)
    np.testing.assert_allclose(l_m, l_a, rtol=1e-14)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(g) for g in (g_m, g_a, g_b))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)   # some grads are ~0 exactly
        np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-15)


def test_concrete_ids_closed_over_by_jit(params):
    """Ids known when a jitted function is traced (closed over, not arguments) are read with
    numpy: the range check runs, and jax's min on them would have been traced."""
    layer = embedding(N, F)
    ids = jnp.array([[0, 6], [3, 3]])
    y = jax.jit(lambda p: layer.apply(p, ids))(params)
    np.testing.assert_array_equal(y, np.asarray(params["table"])[np.asarray(ids)])
    g = jax.jit(jax.grad(lambda p: jnp.sum(layer.forward(p, ids)[0])))(params)
    np.testing.assert_array_equal(g["table"].sum(1), [3.0, 0, 0, 6.0, 0, 0, 3.0])
    bad = jnp.array([1, 7])
    with pytest.raises(ShapeError, match=r"embedding\(7, 3\): id 7 is out of range"):
        jax.jit(lambda p: layer.apply(p, bad))(params)


def test_gradcheck_compare_on_a_network(params):
    """gradcheck traces the model with the ids closed over; embedding -> flatten -> dense."""
    from funnn import gradcheck, losses
    from funnn.layers import dense, flatten, serial

    model = serial(embedding(N, F), flatten(), dense(2))
    _, p = model.init(KEY, (None, 2))
    ids = jnp.array([[0, 3], [3, 6], [1, 1]])
    y = jnp.asarray(np.random.default_rng(8).normal(size=(3, 2)))
    report = gradcheck.compare(model, losses.mse, p, ids, y)
    assert report.ok, str(report)


def test_init_shapes_may_be_free_and_grads_keep_the_table_dtype():
    layer = embedding(N, F, dtype=jnp.float32)
    out, p = layer.init(KEY, (None, None))                 # sequences of any length
    assert out == (None, None, F) and p["table"].dtype == jnp.float32
    ids = jnp.array([[1, 2, 2]])
    _, res = layer.forward(p, ids)
    dy = jnp.ones((1, 3, F), jnp.float64)                  # e.g. from a float64 layer above
    dp, dx = layer.backward(p, res, dy)
    want = jax.vjp(lambda p: layer.apply(p, ids), p)[1](dy.astype(jnp.float32))[0]
    assert dx is None and dp["table"].dtype == want["table"].dtype == jnp.float32
    np.testing.assert_array_equal(dp["table"], want["table"])
