"""Elementwise layers: manual backward vs jax.vjp vs finite differences (float64),
any number of leading axes, vmap, jit, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import activations as A
from funnn.core import ConfigError, DTypeError, ShapeError
from funnn.layers.elementwise import activation, flatten, prelu

F = 4
LAYERS = {
    "tanh": lambda: activation(A.tanh),
    "relu": lambda: activation("relu"),
    "elu(alpha=0.5)": lambda: activation("elu(alpha=0.5)"),
    "softmax": lambda: activation(A.softmax),
    "log_softmax": lambda: activation("log_softmax"),
    "prelu": lambda: prelu(0.3),
}
# no batch axis, one batch axis, three leading axes
SHAPES = [(F,), (3, F), (2, 1, 3, F)]


def make(name, shape):
    layer = LAYERS[name]()
    _, params = layer.init(jax.random.key(0), (None,) + shape[1:] if len(shape) > 1 else (None, F))
    if name == "prelu":      # distinct slopes per feature, so a wrong axis would show
        params = {"alpha": jnp.array([0.3, -0.2, 0.5, 1.5])}
    kx, kd = jax.random.split(jax.random.key(len(shape)))
    x = 2 * jax.random.normal(kx, shape, jnp.float64)
    x = x.at[..., 0].set(0.0)                # the kink: both paths must take the same side
    dy = jax.random.normal(kd, shape, jnp.float64)
    return layer, params, x, dy


def vjp_oracle(layer, params, x, dy):
    _, vjp = jax.vjp(lambda p, x: layer.apply(p, x), params, x)
    return vjp(dy)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_manual_backward_equals_vjp_and_finite_differences(name, shape):
    layer, params, x, dy = make(name, shape)
    y, res = layer.forward(params, x)
    np.testing.assert_array_equal(y, layer.apply(params, x))
    assert y.shape == x.shape and y.dtype == x.dtype
    dparams, dx = layer.backward(params, res, dy)
    dparams_ref, dx_ref = vjp_oracle(layer, params, x, dy)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-14)
    assert jax.tree_util.tree_structure(dparams) == jax.tree_util.tree_structure(params)
    for k in params:
        np.testing.assert_allclose(dparams[k], dparams_ref[k], rtol=1e-10, atol=1e-14)
    if len(shape) != 2:
        return
    # central differences of L = sum(y * dy) along a random direction (x and params)
    kv, kp = jax.random.split(jax.random.key(7))
    vx = jax.random.normal(kv, x.shape, jnp.float64).at[..., 0].set(0.0)   # stay off the kink
    vp = {k: jax.random.normal(kp, v.shape, jnp.float64) for k, v in params.items()}
    h = 1e-6

    def loss(t):
        p = {k: params[k] + t * vp[k] for k in params}
        return jnp.sum(layer.apply(p, x + t * vx) * dy)

    fd = (loss(h) - loss(-h)) / (2 * h)
    exact = jnp.sum(dx * vx) + sum(jnp.sum(dparams[k] * vp[k]) for k in params)
    np.testing.assert_allclose(fd, exact, rtol=1e-6, atol=1e-9)


def test_prelu_against_numpy_loop():
    layer, params, x, dy = make("prelu", (3, F))
    x, dy, alpha = np.asarray(x), np.asarray(dy), np.asarray(params["alpha"])
    y_ref, dx_ref, da_ref = np.zeros_like(x), np.zeros_like(x), np.zeros(F)
    for n in range(3):
        for j in range(F):
            if x[n, j] > 0:
                y_ref[n, j], dx_ref[n, j] = x[n, j], dy[n, j]
            else:                                # x <= 0: the alpha side, also at the kink
                y_ref[n, j], dx_ref[n, j] = alpha[j] * x[n, j], alpha[j] * dy[n, j]
                da_ref[j] += x[n, j] * dy[n, j]
    y, res = layer.forward(params, jnp.asarray(x))
    dparams, dx = layer.backward(params, res, jnp.asarray(dy))
    np.testing.assert_allclose(y, y_ref, rtol=1e-15)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-15)
    np.testing.assert_allclose(dparams["alpha"], da_ref, rtol=1e-13)


def test_init_shapes_and_params():
    out, params = activation("tanh").init(jax.random.key(0), (None, 3, 5))
    assert out == (None, 3, 5) and params == {}
    out, params = activation("softmax").init(None, (-1, 10))
    assert out == (None, 10) and params == {}
    out, params = prelu().init(jax.random.key(0), (None, 7, F))
    assert out == (None, 7, F) and set(params) == {"alpha"}
    np.testing.assert_array_equal(params["alpha"], np.full(F, 0.25))
    out, params = flatten().init(jax.random.key(0), (None, 2, 3, 4))
    assert out == (None, 24) and params == {}
    assert activation(A.elu.with_params(alpha=2.0)).name == "activation(elu(alpha=2.0))"
    assert activation("logistic").name == "activation(sigmoid)"
    assert prelu(0.1).name == "prelu(init_alpha=0.1)" and flatten().name == "flatten"


def test_flatten_forward_backward_and_dtypes():
    layer = flatten()
    x = np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)            # integers are fine here
    y, _res = layer.forward({}, x)
    np.testing.assert_array_equal(y, x.reshape(2, 24))
    np.testing.assert_array_equal(layer.apply({}, x), y)
    xf = jnp.asarray(x, jnp.float64) / 7
    dy = jnp.sin(jnp.arange(48.0)).reshape(2, 24)
    dparams, dx = layer.backward({}, layer.forward({}, xf)[1], dy)
    assert dparams == {}
    np.testing.assert_array_equal(dx, vjp_oracle(layer, {}, xf, dy)[1])
    np.testing.assert_array_equal(dx, np.asarray(dy).reshape(2, 3, 4, 2))
    # an empty batch keeps its feature count
    assert layer.apply({}, jnp.zeros((0, 3, 4))).shape == (0, 12)


@pytest.mark.parametrize("name", ["tanh", "softmax", "prelu"])
def test_vmap_per_example_and_jit(name):
    layer, params, x, dy = make(name, (3, F))
    y, res = layer.forward(params, x)
    dparams, dx = layer.backward(params, res, dy)
    # per example (no batch axis) under vmap == the batched call
    y_v = jax.vmap(lambda xi: layer.apply(params, xi))(x)
    np.testing.assert_allclose(y_v, y, rtol=1e-15)

    def per_example(xi, dyi):
        _, r = layer.forward(params, xi)
        return layer.backward(params, r, dyi)

    dp_v, dx_v = jax.vmap(per_example)(x, dy)
    np.testing.assert_allclose(dx_v, dx, rtol=1e-15)
    for k in params:                 # per-example gradients sum to the batch gradient
        assert dp_v[k].shape == (3,) + params[k].shape
        np.testing.assert_allclose(dp_v[k].sum(0), dparams[k], rtol=1e-12)
    # jit == eager
    _dp_j, dx_j = jax.jit(layer.backward)(params, res, dy)
    np.testing.assert_allclose(dx_j, dx, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), y, rtol=1e-12)


def test_flatten_under_vmap():
    layer = flatten()
    x = jnp.arange(2 * 1 * 3 * 2.0).reshape(2, 1, 3, 2)        # each example is (1, 3, 2)
    np.testing.assert_array_equal(jax.vmap(lambda xi: layer.apply({}, xi))(x), x.reshape(2, 1, 6))


def test_float32_is_kept():
    x = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32).reshape(2, F)
    for layer in (activation("gelu"), activation("softmax")):
        y, res = layer.forward({}, x)
        assert y.dtype == jnp.float32 and layer.backward({}, res, y)[1].dtype == jnp.float32
    layer = prelu()
    _, params = layer.init(None, (None, F))
    params32 = {"alpha": params["alpha"].astype(jnp.float32)}
    y, res = layer.forward(params32, x)
    dp, dx = layer.backward(params32, res, y)
    assert y.dtype == dx.dtype == dp["alpha"].dtype == jnp.float32


# --------------------------------------------------------------------------- errors


def test_unknown_activation_name():
    with pytest.raises(ConfigError, match=r"activation\(nope\): unknown activation 'nope'.*tanh"):
        activation("nope")
    with pytest.raises(ConfigError, match="unknown parameter"):
        activation("elu(beta=1)")


def test_bad_init_shapes():
    with pytest.raises(ShapeError, match=r"flatten: init shape \(None,\) has rank 1"):
        flatten().init(None, (None,))
    with pytest.raises(ShapeError, match=r"prelu.*rank 1"):
        prelu().init(None, (None,))
    with pytest.raises(ShapeError, match=r"activation\(softmax\)"):
        activation("softmax").init(None, (None,))
    with pytest.raises(ShapeError, match="positive int"):
        activation("tanh").init(None, (None, 0))


def test_bad_inputs():
    with pytest.raises(DTypeError,
                       match=r"activation\(tanh\): expected a floating-point input, got dtype int"):
        activation("tanh").apply({}, jnp.arange(4))
    with pytest.raises(DTypeError, match=r"activation\(relu\)"):
        activation("relu").forward({}, jnp.arange(4))
    with pytest.raises(DTypeError, match=r"prelu\(init_alpha=0.25\)"):
        prelu().apply({"alpha": jnp.ones(4)}, jnp.arange(4))
    with pytest.raises(ShapeError, match="expected input features 4, got 3"):
        prelu().apply({"alpha": jnp.ones(4)}, jnp.ones((2, 3)))
    with pytest.raises(ShapeError, match=r"flatten: expected input of rank >= 2"):
        flatten().apply({}, jnp.ones(3))
    with pytest.raises(ShapeError, match=r"activation\(softmax\)"):
        activation("softmax").apply({}, jnp.float64(1.0))
    with pytest.raises(ConfigError, match="init_alpha"):
        prelu("big")


def test_init_shapes_with_none_off_the_batch_axis():
    """An activation keeps any shape (None anywhere, e.g. after an rnn over free time); prelu
    needs its feature size; flatten needs every size but the batch (it multiplies them)."""
    assert activation("relu").init(None, (None, None, None)) == ((None, None, None), {})
    assert activation("softmax").init(None, (None, None, 5)) == ((None, None, 5), {})
    assert prelu().init(None, (None, None, F))[0] == (None, None, F)
    for shape in ((None, None), (None, 3, None)):
        with pytest.raises(ShapeError, match=r"^prelu\(init_alpha=0\.25\): init shape .* no "
                                             r"feature size on its last axis"):
            prelu().init(None, shape)
    for shape, axis in (((None, None, 3), 1), ((None, 2, None), 2), ((4, None), 1)):
        with pytest.raises(ShapeError, match=rf"^flatten: init shape .* no size on axis {axis}; "
                                             r"only the batch axis may be None"):
            flatten().init(None, shape)


def test_prelu_grads_in_param_and_input_dtypes():
    """float32 alpha with float64 x (and the reverse): dalpha in alpha's dtype, dx in x's."""
    layer = prelu()
    x64 = jnp.asarray(np.random.default_rng(2).normal(size=(3, F)))
    for dt_p, dt_x in ((jnp.float32, jnp.float64), (jnp.float64, jnp.float32)):
        p, x = {"alpha": jnp.array([0.3, -0.2, 0.5, 1.5], dt_p)}, x64.astype(dt_x)
        y, res = layer.forward(p, x)
        dy = jnp.cos(y)
        dp, dx = layer.backward(p, res, dy)
        dp_a, dx_a = vjp_oracle(layer, p, x, dy)
        assert (dp["alpha"].dtype, dx.dtype) == (dp_a["alpha"].dtype, dx_a.dtype) == (dt_p, dt_x)
        np.testing.assert_allclose(dp["alpha"], dp_a["alpha"], rtol=1e-5)
        np.testing.assert_allclose(dx, dx_a, rtol=1e-6)
