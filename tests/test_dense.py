"""Dense layer, combinators, engines and bridge (gradcheck reports: test_gradcheck.py; the
summary table: test_summary.py).

Manual vs autodiff vs finite differences.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funnn
from funnn import activations as A
from funnn import autodiff, core, gradcheck, losses, manual
from funnn import layers as L


def _data(shape_x, shape_y, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, shape_x), jax.random.normal(ky, shape_y)


def _vjp_check(layer, params, x, dy):
    """Manual backward against jax.vjp of apply, relative 1e-10 (one compiled program)."""

    @jax.jit
    def both(params, x, dy):
        y, res = layer.forward(params, x)
        _, vjp = jax.vjp(lambda p, xx: layer.apply(p, xx), params, x)
        return y, layer.apply(params, x), layer.backward(params, res, dy), vjp(dy)

    y, y_ref, manual_grads, auto_grads = both(params, x, dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    chex.assert_trees_all_close(manual_grads, auto_grads, rtol=1e-10, atol=1e-12)


def test_dense_values_against_numpy():
    w = np.arange(6.0).reshape(3, 2)
    b = np.array([0.5, -1.0])
    layer = L.dense(2, w_init=w, b_init=b)
    shape, params = layer.init(jax.random.key(0), (None, 3))
    assert shape == (None, 2)
    x = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(layer.apply(params, x), x @ w + b)
    dy = np.array([[1.0, -2.0]])
    dp, dx = layer.backward(params, layer.forward(params, x)[1], dy)
    np.testing.assert_allclose(dp["W"], x.T @ dy)      # the delta rule: O_j delta_k
    np.testing.assert_allclose(dp["b"], dy[0])
    np.testing.assert_allclose(dx, dy @ w.T)


@settings(max_examples=8)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=3), n_in=st.integers(1, 4),
       n_out=st.integers(1, 4), use_bias=st.booleans())
def test_dense_backward_any_leading_axes(lead, n_in, n_out, use_bias):
    rng = np.random.default_rng(n_in * 10 + n_out)
    layer = L.dense(n_out, use_bias=use_bias, w_init=rng.normal(size=(n_in, n_out)),
                    b_init=rng.normal(size=n_out))
    _, params = layer.init(jax.random.key(0), (None, n_in))
    x = rng.normal(size=tuple(lead) + (n_in,))
    dy = rng.normal(size=tuple(lead) + (n_out,))
    _vjp_check(layer, params, x, dy)


@pytest.mark.parametrize("name", sorted(L.INITIALIZERS))
def test_initializers_shapes_and_scale(name):
    shape, params = L.dense(64, w_init=name).init(jax.random.key(0), (None, 128))
    w = params["W"]
    assert w.shape == (128, 64) and shape == (None, 64)
    if name == "zeros":
        assert not w.any()
    elif name == "ones":
        assert (w == 1).all()
    elif name.startswith("he"):
        assert abs(float(w.std()) - np.sqrt(2 / 128)) < 0.2 * np.sqrt(2 / 128)
    elif name.startswith("glorot"):
        assert abs(float(w.std()) - np.sqrt(2 / 192)) < 0.2 * np.sqrt(2 / 192)
    elif name.startswith("lecun"):
        assert abs(float(w.std()) - np.sqrt(1 / 128)) < 0.2 * np.sqrt(1 / 128)


def _stack():
    return L.serial(L.dense(5), L.activation(A.tanh),
                    L.parallel(L.dense(3), L.serial(L.dense(2), L.activation(A.sigmoid))),
                    L.residual(L.serial(L.dense(5), L.activation(A.softplus))), L.dense(3))


@pytest.mark.parametrize("loss", [losses.squared_error, losses.mse,
                                  losses.softmax_cross_entropy,
                                  losses.squared_error.with_reduction("mean")],
                         ids=lambda l: f"{l.name}-{l.reduction}")
def test_stack_three_ways(loss):
    model = _stack()
    _, params = model.init(jax.random.key(0), (None, 4))
    x, y = _data((6, 4), (6, 3))
    if loss.name == "softmax_cross_entropy":
        y = jnp.array([0, 1, 2, 1, 0, 2])
    report = gradcheck.compare(model, loss, params, x, y)
    assert report.ok, str(report)
    assert report.method == "full"
    d = report.to_dict()
    assert len(d["leaves"]) == len(jax.tree_util.tree_leaves(params))
    assert all(r["rel_err"]["manual~autodiff"] <= 1e-10 for r in d["leaves"])


@pytest.mark.slow
def test_engines_agree_jit_and_vmap():
    model = _stack()
    _, params = model.init(jax.random.key(0), (None, 4))
    x, y = _data((5, 4), (5, 3))
    loss = losses.squared_error
    vg_a = jax.jit(autodiff.value_and_grad(model, loss))
    vg_m = jax.jit(manual.value_and_grad(model, loss))
    vg_b = jax.jit(autodiff.value_and_grad(manual.bridge(model), loss))
    la, ga = vg_a(params, x, y)
    for vg in (vg_m, vg_b):
        lv, g = vg(params, x, y)
        np.testing.assert_allclose(lv, la, rtol=1e-12)
        chex.assert_trees_all_close(g, ga, rtol=1e-10, atol=1e-13)
    # eager equals jit
    l_eager, _g_eager = manual.value_and_grad(model, loss)(params, x, y)
    np.testing.assert_allclose(l_eager, la, rtol=1e-12)
    # per-example gradients: vmap over examples equals a Python loop
    per_ex = jax.vmap(manual.value_and_grad(model, loss), in_axes=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        li, gi = vg_a(params, x[i:i + 1], y[i:i + 1])
        np.testing.assert_allclose(per_ex[0][i], li, rtol=1e-10)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-9,
                                                                        atol=1e-12), per_ex[1], gi)


def test_jitted_step_traces_once():
    model = L.serial(L.dense(4), L.activation(A.relu), L.dense(2))
    _, params = model.init(jax.random.key(0), (None, 3))
    traces = []
    vg = manual.value_and_grad(model, losses.squared_error)

    @jax.jit
    def step(p, x, y):
        traces.append(1)
        _, g = vg(p, x, y)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g)

    x, y = _data((8, 3), (8, 2))
    params = step(params, x, y)
    params = step(params, x + 1, y)
    assert len(traces) == 1


@pytest.mark.slow
def test_errors_name_the_layer_and_shapes():
    model = L.serial(L.dense(30), L.activation("sigmoid"), L.dense(10))
    _, params = model.init(jax.random.key(0), (None, 64))
    with pytest.raises(core.ShapeError,
                       match=r"serial\[0\] dense\(30\): expected input features 64, got 20"):
        model.apply(params, jnp.ones((2, 20)))
    with pytest.raises(core.ShapeError, match=r"serial\[0\] dense\(30\).*no feature size"):
        model.init(jax.random.key(0), (None,))
    with pytest.raises(core.ShapeError, match="positive int"):
        model.init(jax.random.key(0), (None, 0))
    with pytest.raises(core.DTypeError, match="floating"):
        model.apply(params, jnp.ones((2, 64), dtype=jnp.int32))
    with pytest.raises(core.ConfigError, match="unknown"):
        L.activation("sigmoidd")
    with pytest.raises(core.ConfigError, match="not a Layer"):
        L.serial(L.dense)
    with pytest.raises(core.ShapeError, match="explicit weight has shape"):
        L.dense(2, w_init=np.ones((3, 3))).init(jax.random.key(0), (None, 3))
    with pytest.raises(core.ConfigError):
        L.dense(0)
    with pytest.raises(core.ShapeError, match="must keep the shape"):
        L.residual(L.dense(3)).init(jax.random.key(0), (None, 4))
    # the error is raised while tracing, so jit gives the same clear message
    with pytest.raises(core.ShapeError, match=r"serial\[2\] dense\(10\)"):
        jax.jit(model.apply)((params[0], params[1], {"W": jnp.ones((29, 10)), "b": jnp.ones(10)}),
                             jnp.ones((2, 64)))


def test_public_api_names():
    for name in ("core", "layers", "activations", "losses", "autodiff", "manual", "gradcheck"):
        assert hasattr(funnn, name)


@pytest.mark.slow
def test_parallel_sum_and_nested_summary():
    model = L.serial(L.dense(4), L.parallel(L.dense(3), L.dense(2), combine="sum"))
    with pytest.raises(core.ShapeError, match=r"parallel\(sum\): .* cannot be merged by sum"):
        model.init(jax.random.key(0), (None, 2))
    model = L.serial(L.dense(3), L.parallel(L.dense(3), L.residual(L.serial(L.dense(3))),
                                            combine="sum"))
    shape, params = model.init(jax.random.key(0), (None, 2))
    assert shape == (None, 3)
    x, y = _data((4, 2), (4, 3))
    h = x @ params[0]["W"] + params[0]["b"]
    p1, p2 = params[1]
    expect = (h @ p1["W"] + p1["b"]) + (h + h @ p2[0]["W"] + p2[0]["b"])
    np.testing.assert_allclose(model.apply(params, x), expect, rtol=1e-12)
    report = gradcheck.compare(model, losses.squared_error, params, x, y)
    assert report.ok, str(report)
    text = core.summary(model, params)
    assert "[1][1]/residual[0]" in text
    assert text.splitlines()[-1].split()[-1] == str(core.param_count(params))


def test_params_of_the_wrong_length_and_a_backward_that_drops_a_leaf():
    model = L.serial(L.dense(3), L.dense(2))
    _, params = model.init(jax.random.key(0), (None, 4))
    x, y = _data((5, 4), (5, 2))
    with pytest.raises(core.ShapeError, match=r"serial: expected params as a tuple of 2"):
        model.apply(params[:1], x)
    with pytest.raises(core.ShapeError, match=r"tuple of 2"):
        manual.value_and_grad(model, losses.squared_error)(params[:1], x, y)
    par = L.parallel(L.dense(2), L.dense(3))
    _, pp = par.init(jax.random.key(0), (None, 4))
    with pytest.raises(core.ShapeError, match=r"parallel\(concat\): expected params"):
        par.apply(pp[:1], x)
    good = L.dense(2)
    forgetful = core.Layer("forgetful", good.init, good.apply, good.forward,
                           lambda p, r, dy: ({"W": good.backward(p, r, dy)[0]["W"]},
                                             good.backward(p, r, dy)[1]))
    net = L.serial(forgetful, L.dense(2))
    _, pn = net.init(jax.random.key(0), (None, 4))
    with pytest.raises(core.ShapeError, match=r"missing leaves \[.0\.b.\]"):
        gradcheck.compare(net, losses.squared_error, pn, x, y)


def _dtypes(tree):
    return jax.tree.map(lambda a: jnp.result_type(a), tree)


def test_manual_grads_come_back_in_the_param_and_input_dtypes():
    """float32 params, float64 input: the manual backward returns autodiff's dtypes (each
    param's own, x's for dx), so ``fit(engine="manual")``'s scan carry keeps one dtype."""
    layer = L.dense(3, dtype=jnp.float32)
    _, p = layer.init(jax.random.key(0), (None, 2))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)))           # float64

    @jax.jit
    def both(p, x):
        y, res = layer.forward(p, x)
        dy = jnp.cos(y)
        return layer.backward(p, res, dy), jax.vjp(layer.apply, p, x)[1](dy)

    got, want = both(p, x)
    assert _dtypes(got) == _dtypes(want) == ({"W": jnp.float32, "b": jnp.float32}, jnp.float64)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fit_manual_engine_with_float32_params_and_float64_data():
    """Adam's moments take the gradients' dtype: float64 grads of float32 params would change
    the epoch scan's carry dtype and fail to compile."""
    from funnn import train
    model = L.serial(L.dense(4, dtype=jnp.float32), L.activation("tanh"),
                     L.dense(2, dtype=jnp.float32))
    _, p0 = model.init(jax.random.key(0), (None, 3))
    x, y = _data((8, 3), (8, 2))                                             # float64
    runs = [train.fit(model, p0, (x, y), losses.squared_error, "adam", epochs=1, batch_size=4,
                      engine=engine, progress=False) for engine in ("manual", "autodiff")]
    assert _dtypes(runs[0].params) == _dtypes(p0)
    chex.assert_trees_all_close(runs[0].params, runs[1].params, rtol=1e-5, atol=1e-6)


def test_params_of_the_wrong_shape_name_the_layer():
    """A bias or weight with the wrong output size must not silently broadcast."""
    layer = L.dense(3)
    _, p = layer.init(jax.random.key(0), (None, 2))
    x = jnp.ones((1, 2))
    for bad in ({"W": p["W"], "b": jnp.zeros(1)}, {"W": p["W"], "b": jnp.zeros((1, 3))},
                {"W": jnp.zeros((2, 1)), "b": p["b"]}, {"W": jnp.zeros((2, 3, 1)), "b": p["b"]}):
        for call in (layer.apply, layer.forward, jax.jit(layer.apply)):
            with pytest.raises(core.ShapeError, match=r"^dense\(3\): expected params W \(in, 3\), "
                                                      r"b \(3,\), got W \(2, [\d, ]+\), b \("):
                call(bad, x)
    nobias = L.dense(3, use_bias=False)
    with pytest.raises(core.ShapeError, match=r"^dense\(3\): expected params W \(in, 3\), got"):
        nobias.apply({"W": jnp.zeros((2, 4))}, x)


def test_init_shape_none_off_the_batch_axis():
    """Leading axes may be None (any number of them); the feature axis may not."""
    for lead in ((None, None), (4, None), (None, None, 2)):
        assert L.dense(5).init(jax.random.key(0), lead + (3,))[0] == lead + (5,)
        with pytest.raises(core.ShapeError, match=r"^dense\(5\): init shape .* no feature size"):
            L.dense(5).init(jax.random.key(0), lead + (None,))
