"""layer_norm, rms_norm and batch_norm: numpy references, running statistics, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from funnn.core import ConfigError, DTypeError, ShapeError, StateError
from funnn.layers.norm import batch_norm, layer_norm, rms_norm

KEY = jax.random.key(0)
EPS = 1e-5


def _rel(a, b, floor=1e-4):
    """Relative error, with a floor on the scale: with 2 features layer-norm's dx is pure
    cancellation (~1e-7), where a relative error measures only rounding noise."""
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), floor)


def _normal(rng, shape):
    return jnp.asarray(rng.normal(size=shape))


def _random_params(rng, c):
    return {"gamma": _normal(rng, (c,)) + 1.0, "beta": _normal(rng, (c,))}


def _grads_three_ways(f, manual, p, x, seed=1):
    """f(p, x) -> y; manual(p, x, dy) -> (dp, dx) via forward + backward. Returns jitted y.

    Compares with jax.vjp (1e-10) and central finite differences (1e-6), all computed in
    one jitted program per shape (JAX compiles per shape; op-by-op would compile dozens).
    """
    rng = np.random.default_rng(seed)
    dy = _normal(rng, jax.eval_shape(f, p, x).shape)
    vp = {k: _normal(rng, v.shape) for k, v in p.items()}
    vx, eps = _normal(rng, x.shape), 1e-6

    @jax.jit
    def run(p, x, dy, vp, vx):
        dp, dx = manual(p, x, dy)
        dp_a, dx_a = jax.vjp(f, p, x)[1](dy)

        def loss(t):
            return jnp.sum(f({k: p[k] + t * vp[k] for k in p}, x + t * vx) * dy)

        fd = (loss(eps) - loss(-eps)) / (2 * eps)
        exact = sum(jnp.sum(dp[k] * vp[k]) for k in p) + jnp.sum(dx * vx)
        return f(p, x), dp, dx, dp_a, dx_a, fd, exact

    y, dp, dx, dp_a, dx_a, fd, exact = run(p, x, dy, vp, vx)
    assert jax.tree_util.tree_structure(dp) == jax.tree_util.tree_structure(p)
    for k in p:
        assert dp[k].shape == p[k].shape
        assert _rel(dp[k], dp_a[k]) <= 1e-10, k
    assert _rel(dx, dx_a) <= 1e-10
    np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-8)
    return y


def _per_example_agree(manual, auto, p, x, dy):
    """vmap of the manual and autodiff per-example gradients equals a loop over examples."""
    xs, dys = x[:, None], dy[:, None]                   # a batch axis of 1 per example
    got_m, got_a = jax.jit(jax.vmap(manual))(xs, dys), jax.jit(jax.vmap(auto))(xs, dys)
    one = jax.jit(manual)
    for i in range(xs.shape[0]):
        dp_i, dx_i = one(xs[i], dys[i])
        for k in p:
            np.testing.assert_allclose(got_m[0][k][i], dp_i[k], rtol=1e-12)
            np.testing.assert_allclose(got_a[0][k][i], dp_i[k], rtol=1e-10)
        np.testing.assert_allclose(got_m[1][i], dx_i, rtol=1e-12)
        np.testing.assert_allclose(got_a[1][i], dx_i, rtol=1e-10)


# =========================================================================== layer_norm


def _ln_ref(x, g, b):
    x = np.asarray(x)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * np.asarray(g) + np.asarray(b)


def _ln_manual(p, x, dy):
    return layer_norm().backward(p, layer_norm().forward(p, x)[1], dy)


def test_layer_norm_init_and_out_shape():
    layer = layer_norm()
    assert layer.name == "layer_norm" and not layer.stateful
    out, p = layer.init(KEY, (None, 3, 5))
    assert out == (None, 3, 5)
    np.testing.assert_array_equal(p["gamma"], np.ones(5))
    np.testing.assert_array_equal(p["beta"], np.zeros(5))
    assert p["gamma"].dtype == jnp.float64
    y = jax.eval_shape(layer.apply, p, jax.ShapeDtypeStruct((4, 3, 5), jnp.float64))
    assert y.shape == (4, 3, 5)
    assert layer_norm(eps=1e-3).name == "layer_norm(eps=0.001)"
    with pytest.raises(ShapeError, match=r"layer_norm.*feature size"):
        layer.init(KEY, (None,))


def test_layer_norm_matches_numpy():
    rng = np.random.default_rng(0)
    x, p = _normal(rng, (4, 6)) * 3 + 1, _random_params(rng, 6)
    np.testing.assert_allclose(layer_norm().apply(p, x), _ln_ref(x, p["gamma"], p["beta"]),
                               rtol=1e-12)
    y = layer_norm().apply({"gamma": jnp.ones(6), "beta": jnp.zeros(6)}, x)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-4)   # var/(var+eps)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5), (5,)])
def test_layer_norm_gradients_three_ways(shape):
    layer, rng = layer_norm(), np.random.default_rng(1)
    x, p = _normal(rng, shape), _random_params(rng, shape[-1])
    y, _res = layer.forward(p, x)
    np.testing.assert_array_equal(y, layer.apply(p, x))
    _grads_three_ways(layer.apply, _ln_manual, p, x)


def test_layer_norm_backward_matches_classic_formula():
    rng = np.random.default_rng(2)
    x, p, dy = _normal(rng, (3, 4)), _random_params(rng, 4), _normal(rng, (3, 4))
    _, res = layer_norm().forward(p, x)
    dp, dx = layer_norm().backward(p, res, dy)
    xn, dyn, g = np.asarray(x), np.asarray(dy), np.asarray(p["gamma"])
    n = xn.shape[-1]
    inv = 1 / np.sqrt(xn.var(-1, keepdims=True) + EPS)
    xhat = (xn - xn.mean(-1, keepdims=True)) * inv
    dxhat = dyn * g
    want = inv / n * (n * dxhat - dxhat.sum(-1, keepdims=True)
                      - xhat * (dxhat * xhat).sum(-1, keepdims=True))
    np.testing.assert_allclose(dx, want, rtol=1e-10)
    np.testing.assert_allclose(dp["gamma"], (dyn * xhat).sum(0), rtol=1e-10)
    np.testing.assert_allclose(dp["beta"], dyn.sum(0), rtol=1e-12)


def test_layer_norm_per_example_vmap():
    layer, rng = layer_norm(), np.random.default_rng(3)
    x, dy, p = _normal(rng, (5, 4)), _normal(rng, (5, 4)), _random_params(rng, 4)

    def manual(xi, dyi):
        return layer.backward(p, layer.forward(p, xi)[1], dyi)

    def auto(xi, dyi):
        return jax.vjp(layer.apply, p, xi)[1](dyi)

    _per_example_agree(manual, auto, p, x, dy)


def test_layer_norm_errors():
    p = {"gamma": jnp.ones(4), "beta": jnp.zeros(4)}
    with pytest.raises(ShapeError, match=r"layer_norm: expected input features 4, got 3"):
        layer_norm().apply(p, jnp.ones((2, 3)))
    with pytest.raises(DTypeError, match="layer_norm"):
        layer_norm().apply(p, jnp.ones((2, 4), jnp.int32))
    for eps in (0.0, -1.0, "1e-5"):
        with pytest.raises(ConfigError, match="eps"):
            layer_norm(eps)


@pytest.mark.slow  # ~12 shapes, one compile each
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_layer_norm_property(shape, seed):
    layer, rng = layer_norm(), np.random.default_rng(seed)
    x, p = _normal(rng, shape) * 2, _random_params(rng, shape[-1])
    y = _grads_three_ways(layer.apply, _ln_manual, p, x, seed=seed)
    np.testing.assert_allclose(y, _ln_ref(x, p["gamma"], p["beta"]), rtol=1e-10, atol=1e-12)


# =========================================================================== rms_norm


def _rms_manual(p, x, dy):
    return rms_norm().backward(p, rms_norm().forward(p, x)[1], dy)


def test_rms_norm_matches_numpy_and_gradients_three_ways():
    layer, rng, shape = rms_norm(), np.random.default_rng(11), (2, 3, 5)
    x, g = _normal(rng, shape) * 2 + 0.5, _normal(rng, (shape[-1],)) + 1.0
    p = {"gamma": g}
    xn = np.asarray(x)
    want = xn / np.sqrt((xn * xn).mean(-1, keepdims=True) + 1e-6) * np.asarray(g)
    y = _grads_three_ways(layer.apply, _rms_manual, p, x)
    np.testing.assert_allclose(y, want, rtol=1e-12)
    np.testing.assert_array_equal(layer.forward(p, x)[0], layer.apply(p, x))
    # the closed form of the docstring, by hand in numpy
    dy = _normal(rng, shape)
    dp, dx = _rms_manual(p, x, dy)
    r = 1 / np.sqrt((xn * xn).mean(-1, keepdims=True) + 1e-6)
    xhat, dxhat = xn * r, np.asarray(dy) * np.asarray(g)
    np.testing.assert_allclose(dx, r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True)),
                               rtol=1e-10)
    np.testing.assert_allclose(dp["gamma"], (np.asarray(dy) * xhat).reshape(-1, shape[-1]).sum(0),
                               rtol=1e-10)


def test_rms_norm_per_example_rules_equal_vmap_of_autodiff():
    layer, rng = rms_norm(), np.random.default_rng(12)
    x, dy = _normal(rng, (3, 2, 4)), _normal(rng, (3, 2, 4))
    p = {"gamma": _normal(rng, (4,)) + 1.0}

    @jax.jit
    def run(p, x, dy):
        res = layer.forward(p, x)[1]
        auto = jax.vmap(lambda xi, di: jax.vjp(layer.apply, p, xi)[1](di))(x, dy)
        return layer.per_example(p, res, dy), layer.per_example_norms(p, res, dy)[0], auto

    (g, dx), sq, auto = run(p, x, dy)
    np.testing.assert_allclose(g["gamma"], auto[0]["gamma"], rtol=1e-10)
    np.testing.assert_allclose(dx, auto[1], rtol=1e-10)
    np.testing.assert_allclose(sq, np.sum(np.asarray(auto[0]["gamma"]) ** 2, -1), rtol=1e-10)


@pytest.mark.slow   # ~2 s, most of it importing torch
def test_rms_norm_matches_torch():
    torch = pytest.importorskip("torch")
    if not hasattr(torch.nn, "RMSNorm"):
        pytest.skip("torch.nn.RMSNorm needs torch >= 2.4")
    rng = np.random.default_rng(13)
    x, g = rng.normal(size=(2, 3, 6)), rng.normal(size=6) + 1.0
    ref = torch.nn.RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(g))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    dy = rng.normal(size=yt.shape)
    yt.backward(torch.from_numpy(dy))
    layer = rms_norm()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    from funnn import interop
    p = interop.load(layer, {"gamma": jnp.ones(6)}, sd, {"": ""})
    np.testing.assert_array_equal(p["gamma"], g)
    y, res = layer.forward(p, jnp.asarray(x))
    dp, dx = layer.backward(p, res, jnp.asarray(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(dp["gamma"], ref.weight.grad.numpy(), rtol=1e-10)


def test_rms_norm_init_names_and_errors():
    out, p = rms_norm().init(KEY, (None, 3, 5))
    assert out == (None, 3, 5) and set(p) == {"gamma"}
    np.testing.assert_array_equal(p["gamma"], np.ones(5))
    assert rms_norm().name == "rms_norm" and rms_norm(1e-5).name == "rms_norm(eps=1e-05)"
    with pytest.raises(ShapeError, match=r"rms_norm: expected input features 5, got 3"):
        rms_norm().apply(p, jnp.ones((2, 3)))
    with pytest.raises(DTypeError, match="rms_norm"):
        rms_norm().apply(p, jnp.ones((2, 5), jnp.int32))
    for eps in (0.0, -1.0, "1e-6"):
        with pytest.raises(ConfigError, match="eps"):
            rms_norm(eps)
    # bfloat16 in, bfloat16 out (the mean square in float32), gradients in their dtypes
    xb = jnp.ones((2, 5), jnp.bfloat16)
    y, res = rms_norm().forward(p, xb)
    dp, dx = rms_norm().backward(p, res, y)
    assert (y.dtype, dx.dtype, dp["gamma"].dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float64)


# =========================================================================== batch_norm


def _state(rng, c):
    return {"mean": _normal(rng, (c,)), "var": jnp.asarray(rng.uniform(0.5, 2.0, size=c))}


def _bn_train_ref(x, g, b, s, momentum=0.9):
    x = np.asarray(x)
    red = tuple(range(x.ndim - 1))
    mu, var = x.mean(red), x.var(red)
    y = (x - mu) / np.sqrt(var + EPS) * np.asarray(g) + np.asarray(b)
    new = {"mean": momentum * np.asarray(s["mean"]) + (1 - momentum) * mu,
           "var": momentum * np.asarray(s["var"]) + (1 - momentum) * var}
    return y, new


def _bn_fns(layer, s, train):
    """(f, manual) for the gradient checks, with the state held fixed."""
    def f(p, x):
        return layer.apply(p, x, state=s, train=train)[0]

    def manual(p, x, dy):
        return layer.backward(p, layer.forward(p, x, state=s, train=train)[1], dy)

    return f, manual


def test_batch_norm_init_state_and_names():
    layer = batch_norm()
    assert layer.name == "batch_norm" and layer.stateful
    out, p = layer.init(KEY, (None, 4, 4, 3))
    assert out == (None, 4, 4, 3) and {k: v.shape for k, v in p.items()} == {
        "gamma": (3,), "beta": (3,)}
    s = layer.init_state((None, 4, 4, 3))
    np.testing.assert_array_equal(s["mean"], np.zeros(3))
    np.testing.assert_array_equal(s["var"], np.ones(3))
    y, s2 = jax.eval_shape(lambda x: layer.apply(p, x, state=s, train=True),
                           jax.ShapeDtypeStruct((2, 4, 4, 3), jnp.float64))
    assert y.shape == (2, 4, 4, 3) and s2["mean"].shape == (3,)
    assert batch_norm(momentum=0.99, axis=1).name == "batch_norm(momentum=0.99, axis=1)"
    with pytest.raises(ShapeError, match=r"batch_norm.*rank"):
        layer.init(KEY, (None,))


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 3)])
def test_batch_norm_train_step_matches_hand_formula(shape):
    rng = np.random.default_rng(0)
    x, p, s = _normal(rng, shape) * 2 + 1, _random_params(rng, 3), _state(rng, 3)
    y, new = batch_norm().apply(p, x, state=s, train=True)
    y_ref, new_ref = _bn_train_ref(x, p["gamma"], p["beta"], s)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10)
    for k in ("mean", "var"):                          # biased batch variance, momentum 0.9
        np.testing.assert_allclose(new[k], new_ref[k], rtol=1e-12)


def test_batch_norm_running_stats_hand_values():
    x = jnp.array([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]])   # means (3, 12), biased vars (8/3, 8)
    s = {"mean": jnp.array([1.0, 2.0]), "var": jnp.array([1.0, 1.0])}
    _, new = batch_norm(momentum=0.5).apply({"gamma": jnp.ones(2), "beta": jnp.zeros(2)}, x,
                                            state=s, train=True)
    np.testing.assert_allclose(new["mean"], [2.0, 7.0], rtol=1e-15)
    np.testing.assert_allclose(new["var"], [0.5 + 4 / 3, 4.5], rtol=1e-15)


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 3)])
def test_batch_norm_inference_uses_running_stats(shape):
    rng = np.random.default_rng(1)
    x, p, s = _normal(rng, shape), _random_params(rng, 3), _state(rng, 3)
    y, new = batch_norm().apply(p, x, state=s)
    assert new is s                                    # state comes back unchanged
    want = ((np.asarray(x) - np.asarray(s["mean"])) / np.sqrt(np.asarray(s["var"]) + EPS)
            * np.asarray(p["gamma"]) + np.asarray(p["beta"]))
    np.testing.assert_allclose(y, want, rtol=1e-12)


@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 3)], ids=["2d", "4d"])
def test_batch_norm_gradients_three_ways(shape, train):
    """In train mode y depends on x through the batch statistics; state is held fixed."""
    layer, rng = batch_norm(), np.random.default_rng(2)
    x, p, s = _normal(rng, shape), _random_params(rng, 3), _state(rng, 3)
    y, _res, new = layer.forward(p, x, state=s, train=train)
    y2, new2 = layer.apply(p, x, state=s, train=train)
    np.testing.assert_array_equal(y, y2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, new2)
    _grads_three_ways(*_bn_fns(layer, s, train), p, x)


def test_batch_norm_train_backward_matches_classic_formula():
    rng = np.random.default_rng(3)
    x, p, dy = _normal(rng, (5, 2)), _random_params(rng, 2), _normal(rng, (5, 2))
    _, res, _ = batch_norm().forward(p, x, state=_state(rng, 2), train=True)
    _, dx = batch_norm().backward(p, res, dy)
    xn, dyn = np.asarray(x), np.asarray(dy)
    n = xn.shape[0]
    inv = 1 / np.sqrt(xn.var(0) + EPS)
    xhat = (xn - xn.mean(0)) * inv
    dxhat = dyn * np.asarray(p["gamma"])
    want = inv / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    np.testing.assert_allclose(dx, want, rtol=1e-10)


def test_batch_norm_channel_axis_1_matches_transposed_input():
    rng = np.random.default_rng(4)
    x, p, s = _normal(rng, (2, 3, 4, 2)), _random_params(rng, 3), _state(rng, 3)   # NCHW
    nhwc = jnp.transpose(x, (0, 2, 3, 1))
    dy = _normal(rng, x.shape)
    for train in (True, False):
        y1, res1, n1 = batch_norm(axis=1).forward(p, x, state=s, train=train)
        y2, res2, n2 = batch_norm().forward(p, nhwc, state=s, train=train)
        np.testing.assert_allclose(jnp.transpose(y1, (0, 2, 3, 1)), y2, rtol=1e-12)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), n1, n2)
        dp1, dx1 = batch_norm(axis=1).backward(p, res1, dy)
        dp2, dx2 = batch_norm().backward(p, res2, jnp.transpose(dy, (0, 2, 3, 1)))
        np.testing.assert_allclose(jnp.transpose(dx1, (0, 2, 3, 1)), dx2, rtol=1e-10, atol=1e-14)
        for k in p:
            np.testing.assert_allclose(dp1[k], dp2[k], rtol=1e-10)


def test_batch_norm_per_example_vmap_inference():
    """Per-example gradients in inference mode; in train mode a batch of 1 is degenerate
    (each example would be normalised by its own statistics) and raises (tested below)."""
    layer, rng = batch_norm(), np.random.default_rng(5)
    x, dy = _normal(rng, (5, 3)), _normal(rng, (5, 3))
    p, s = _random_params(rng, 3), _state(rng, 3)

    def manual(xi, dyi):
        return layer.backward(p, layer.forward(p, xi, state=s)[1], dyi)

    def auto(xi, dyi):
        return jax.vjp(lambda p, x: layer.apply(p, x, state=s)[0], p, xi)[1](dyi)

    _per_example_agree(manual, auto, p, x, dy)


@pytest.mark.parametrize("shape", [(1, 2), (1, 1, 1, 2)], ids=["2d", "4d"])
def test_batch_norm_batch_of_one_in_train_mode_raises(shape):
    """One value per channel: xhat = 0, y = beta and every earlier layer gets a zero gradient,
    silently. Both paths refuse, as PyTorch does; jit traces the same check."""
    layer = batch_norm()
    p = {"gamma": jnp.ones(2), "beta": jnp.array([3.0, 4.0])}
    s, x = layer.init_state((None, 2)), jnp.ones(shape)
    want = (r"^batch_norm: needs more than 1 value per channel in training mode, got 1 "
            r"\(input shape \(1, [1, ]*2\)\)")
    for call in (layer.apply, layer.forward, jax.jit(layer.apply, static_argnames="train")):
        with pytest.raises(ShapeError, match=want):
            call(p, x, state=s, train=True)
    y, new = layer.apply(p, x, state=s)                 # inference: the running statistics
    np.testing.assert_allclose(y, np.broadcast_to(1 / np.sqrt(1 + EPS) + np.array([3.0, 4.0]),
                                                  shape), rtol=1e-12)
    assert new is s
    y, _ = layer.apply(p, jnp.arange(4.0).reshape(1, 2, 1, 2), state=s, train=True)
    assert np.all(np.isfinite(y))                       # one example, 2 values per channel: fine


@pytest.mark.slow
def test_batch_norm_per_example_vmap_in_train_mode_names_the_layer():
    """The README's per-example recipe (vmap over x[:, None]) hits a batch of one per example:
    both engines raise, naming the layer; train=False works."""
    from funnn import autodiff, losses, manual
    from funnn.layers import dense, serial

    model = serial(dense(3), batch_norm(), dense(2))
    _, params = model.init(KEY, (None, 4))
    state = model.init_state((None, 4))
    rng = np.random.default_rng(11)
    x, y = _normal(rng, (5, 4)), _normal(rng, (5, 2))
    for engine in (autodiff, manual):
        vg = engine.value_and_grad(model, losses.mse)
        per_example = jax.vmap(lambda xi, yi: vg(params, xi, yi, state=state),
                               in_axes=(0, 0))
        with pytest.raises(ShapeError, match=r"^serial\[1\] batch_norm: needs more than 1 value "
                                             r"per channel in training mode, got 1"):
            per_example(x[:, None], y[:, None])
        vg_eval = engine.value_and_grad(model, losses.mse, train=False)
        (loss, _), grads = jax.vmap(lambda xi, yi: vg_eval(params, xi, yi, state=state))(
            x[:, None], y[:, None])
        assert loss.shape == (5,) and grads[0]["W"].shape == (5, 4, 3)


def test_batch_norm_jit_equals_eager():
    layer, rng = batch_norm(), np.random.default_rng(6)
    x, p, s = _normal(rng, (4, 3)), _random_params(rng, 3), _state(rng, 3)
    step = jax.jit(lambda p, x, s: layer.apply(p, x, state=s, train=True))
    y1, s1 = step(p, x, s)
    y2, s2 = layer.apply(p, x, state=s, train=True)
    np.testing.assert_allclose(y1, y2, rtol=1e-13)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13), s1, s2)


def test_batch_norm_state_as_scan_carry():
    """k training steps on one batch: mean_k = (1 - m^k) mu, var_k = m^k + (1 - m^k) var."""
    layer, rng = batch_norm(), np.random.default_rng(8)
    x, p = _normal(rng, (5, 2)) + 3.0, _random_params(rng, 2)
    s0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), layer.init_state((None, 2)))

    def step(s, _):
        return layer.apply(p, x, state=s, train=True)[1], None

    s, _ = jax.lax.scan(step, s0, None, length=5)        # fails if the carry's dtype drifts
    assert s["mean"].dtype == jnp.float32
    w = 0.9 ** 5
    np.testing.assert_allclose(s["mean"], (1 - w) * np.asarray(x).mean(0), rtol=1e-6)
    np.testing.assert_allclose(s["var"], w + (1 - w) * np.asarray(x).var(0), rtol=1e-6)


def test_batch_norm_state_errors():
    layer = batch_norm()
    p, x = {"gamma": jnp.ones(3), "beta": jnp.zeros(3)}, jnp.ones((4, 3))
    with pytest.raises(StateError, match=r"batch_norm: .*state=.*init_state"):
        layer.apply(p, x)
    with pytest.raises(StateError, match=r"batch_norm: .*state=.*init_state"):
        layer.forward(p, x, state=None, train=True)
    bad = {"mean": jnp.zeros(3), "var": jnp.ones(4)}
    with pytest.raises(StateError, match=r"batch_norm: expected state shapes mean \(3,\), "
                                         r"var \(3,\), got mean \(3,\), var \(4,\)"):
        layer.apply(p, x, state=bad, train=True)
    with pytest.raises(StateError, match=r"keys \['mean', 'var'\], got \['mu', 'var'\]"):
        layer.apply(p, x, state={"mu": jnp.zeros(3), "var": jnp.ones(3)})
    with pytest.raises(StateError, match="got tuple"):
        layer.apply(p, x, state=(jnp.zeros(3), jnp.ones(3)))


def test_batch_norm_shape_dtype_and_config_errors():
    layer = batch_norm()
    p, s = {"gamma": jnp.ones(3), "beta": jnp.zeros(3)}, layer.init_state((None, 3))
    with pytest.raises(ShapeError, match=r"batch_norm: expected channels 3, got 5"):
        layer.apply(p, jnp.ones((4, 5)), state=s, train=True)
    with pytest.raises(ShapeError, match=r"batch_norm: expected input of rank >= 2"):
        layer.apply(p, jnp.ones((3,)), state=s)
    with pytest.raises(DTypeError, match="batch_norm"):
        layer.apply(p, jnp.ones((4, 3), jnp.int32), state=s)
    with pytest.raises(ShapeError, match="batch axis"):
        batch_norm(axis=-2).apply(p, jnp.ones((3, 4)), state=s)
    for kw in ({"momentum": 1.5}, {"momentum": -0.1}, {"eps": 0.0}, {"axis": 0},
               {"axis": 1.0}, {"momentum": "0.9"}):
        with pytest.raises(ConfigError, match="batch_norm"):
            batch_norm(**kw)


@pytest.mark.slow  # ~12 shapes, one compile each
@given(shape=st.one_of(st.tuples(st.integers(2, 6), st.integers(1, 4)),
                       st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
                                 st.integers(1, 3)).filter(lambda s: s[0] * s[1] * s[2] > 1)),
       train=st.booleans(), seed=st.integers(0, 2**16))
def test_batch_norm_property(shape, train, seed):
    layer, rng = batch_norm(), np.random.default_rng(seed)
    c = shape[-1]
    x, p, s = _normal(rng, shape), _random_params(rng, c), _state(rng, c)
    y = _grads_three_ways(*_bn_fns(layer, s, train), p, x, seed=seed)
    if train:
        np.testing.assert_allclose(y, _bn_train_ref(x, p["gamma"], p["beta"], s)[0],
                                   rtol=1e-9, atol=1e-12)


# =========================================================================== in a network


@pytest.mark.slow  # three jit compiles of a whole network
def test_in_serial_manual_engine_equals_autodiff_and_bridge():
    """A small stack through the lead's engines: manual vs autodiff vs the custom_vjp bridge."""
    from funnn import autodiff, losses, manual
    from funnn.layers import dense, serial

    model = serial(dense(4), layer_norm(), batch_norm(), dense(2))   # bias before bn: zero grad
    rng = np.random.default_rng(7)
    x, y = _normal(rng, (6, 3)), _normal(rng, (6, 2))
    _, params = model.init(KEY, (None, 3))
    state = model.init_state((None, 3))
    (l_m, s_m), g_m = jax.jit(manual.value_and_grad(model, losses.mse))(params, x, y, state=state)
    (l_a, s_a), g_a = jax.jit(autodiff.value_and_grad(model, losses.mse))(params, x, y,
                                                                         state=state)
    (_l_b, _s_b), g_b = jax.jit(autodiff.value_and_grad(manual.bridge(model), losses.mse))(
        params, x, y, state=state)
    np.testing.assert_allclose(l_m, l_a, rtol=1e-14)
    np.testing.assert_allclose(s_m[2]["mean"], s_a[2]["mean"], rtol=1e-14)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(g) for g in (g_m, g_a, g_b))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)   # some grads are ~0 exactly
        np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-15)


# =========================================================================== dtypes, init shapes


@pytest.mark.parametrize("which", ["layer_norm", "batch_norm_train", "batch_norm_infer"])
@pytest.mark.parametrize("dt_p, dt_x", [(jnp.float32, jnp.float64), (jnp.float64, jnp.float32)],
                         ids=["f32_params_f64_x", "f64_params_f32_x"])
def test_grads_come_back_in_param_and_input_dtypes(which, dt_p, dt_x):
    """Mixed precision: each manual gradient has its primal's dtype, as autodiff's does (a
    float64 gradient of a float32 param breaks fit(engine="manual")'s scan carry)."""
    rng = np.random.default_rng(9)
    x = _normal(rng, (4, 3)).astype(dt_x)
    p = {k: v.astype(dt_p) for k, v in _random_params(rng, 3).items()}
    if which == "layer_norm":
        f, man = layer_norm().apply, _ln_manual
    else:                                       # the state in the params' dtype, as init_state
        s = {k: v.astype(dt_p) for k, v in _state(rng, 3).items()}
        f, man = _bn_fns(batch_norm(), s, which.endswith("train"))

    @jax.jit
    def both(p, x):
        dy = jnp.cos(f(p, x))
        return man(p, x, dy), jax.vjp(f, p, x)[1](dy)

    got, want = both(p, x)
    dtypes = lambda t: jax.tree.map(lambda a: a.dtype, t)
    assert dtypes(got) == dtypes(want) == ({"gamma": dt_p, "beta": dt_p}, dt_x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_init_shapes_with_free_axes():
    """Any axis but the normalised one may be None (sequences of any length); that one not."""
    for layer in (layer_norm(), batch_norm()):
        assert layer.init(KEY, (None, None, 4))[0] == (None, None, 4)
    assert batch_norm().init_state((None, None, 4))["mean"].shape == (4,)
    assert batch_norm(axis=1).init(KEY, (None, 4, None))[1]["gamma"].shape == (4,)
    with pytest.raises(ShapeError, match=r"^layer_norm: init shape \(None, 4, None\) has no "
                                         r"feature size"):
        layer_norm().init(KEY, (None, 4, None))
    for shape in ((None, 4, None), (None, None)):
        with pytest.raises(ShapeError, match=r"^batch_norm: init shape .* no channel size"):
            batch_norm().init(KEY, shape)
    with pytest.raises(ShapeError, match=r"^batch_norm: init shape .* axis 1 must be a positive"):
        batch_norm().init_state((None, 0, 4))
