"""Mistakes a user makes with params and state: each gives a funnn error that names the layer
path and the problem, on every path (apply, forward, engines, jit, vmap).

The checks of a custom layer's backward are in test_core.py, of the summary table in
test_summary.py."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import autodiff, losses, manual
from funnn import layers as L
from funnn.core import Layer, ShapeError, StateError

KEY = jax.random.key(0)


def _data(n=4, f_in=7, f_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, f_in))), jnp.asarray(rng.normal(size=(n, f_out)))


def _engines(model, loss=losses.mse):
    return [engine.value_and_grad(model, loss) for engine in (autodiff, manual)]


# =========================================================================== 19a missing keys


def test_params_missing_a_key_name_the_layer_on_every_path():
    model = L.serial(L.dense(10), L.activation("tanh"), L.dense(2))
    _, params = model.init(KEY, (None, 7))
    x, y = _data(f_out=2)
    bad = ({"W": params[0]["W"]}, *params[1:])
    want = r"^serial\[0\] dense\(10\): params missing key 'b' \(got keys \['W'\]\)"
    calls = [lambda: model.apply(bad, x), lambda: model.forward(bad, x),
             lambda: jax.jit(model.apply)(bad, x)]
    calls += [lambda vg=vg: vg(bad, x, y) for vg in _engines(model)]
    calls += [lambda vg=vg: jax.jit(vg)(bad, x, y) for vg in _engines(model)]
    for call in calls:
        with pytest.raises(ShapeError, match=want):
            call()
    nested = L.serial(L.dense(3), L.residual(L.serial(L.dense(3))))
    _, pn = nested.init(KEY, (None, 7))
    with pytest.raises(ShapeError, match=r"^serial\[1\] residual\(serial\) serial\[0\] dense\(3\): "
                                         r"params missing key 'W' \(got keys \['b'\]\)"):
        nested.apply((pn[0], ({"b": pn[1][0]["b"]},)), x)


def test_params_missing_a_key_bare_layer_and_backward():
    layer = L.dense(3)
    _, p = layer.init(KEY, (None, 7))
    x, _ = _data()
    with pytest.raises(ShapeError, match=r"^dense\(3\): params missing key 'W' \(got keys \[\]\)"):
        layer.apply({}, x)
    _, res = layer.forward(p, x)
    with pytest.raises(ShapeError,
                       match=r"^dense\(3\): params missing key 'b' \(got keys \['W'\]\)"):
        layer.backward({"W": p["W"]}, res, jnp.ones((4, 3)))
    bn = L.batch_norm()
    _, pb = bn.init(KEY, (None, 3))
    with pytest.raises(ShapeError, match=r"^batch_norm: params missing key 'gamma' \(got keys "
                                         r"\['beta'\]\)"):
        bn.apply({"beta": pb["beta"]}, jnp.ones((4, 3)), state=bn.init_state((None, 3)))


def test_a_key_error_that_is_not_about_the_params_is_left_alone():
    def apply(p, x, *, key=None, train=False):
        return x * {"scale": 2.0}["shift"]

    odd = Layer("odd", lambda k, s: (s, {"shift": jnp.ones(())}), apply,
                lambda p, x, **kw: (apply(p, x), None), lambda p, r, dy: ({"shift": 0.0}, dy))
    with pytest.raises(KeyError, match="shift"):
        odd.apply({"shift": jnp.ones(())}, jnp.ones((2, 3)))


# =========================================================================== 19b state


def test_state_given_to_a_stateless_model():
    model = L.serial(L.dense(3), L.activation("relu"), L.dense(2))
    _, params = model.init(KEY, (None, 7))
    x, y = _data()
    state = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    want = (r"^serial: this model is stateless \(no batch_norm or other stateful layer\) and "
            r"takes no state=, got a dict")
    for call in (lambda: model.apply(params, x, state=state),
                 lambda: model.forward(params, x, state=state),
                 lambda: jax.jit(lambda p, x, s: model.apply(p, x, state=s))(params, x, state)):
        with pytest.raises(StateError, match=want):
            call()
    for vg in _engines(model):
        with pytest.raises(StateError, match=want):
            vg(params, x, y, state=state)
        assert vg(params, x, y, state=None)[0].shape == ()     # None means "no state": fine
    with pytest.raises(StateError, match=r"^dense\(3\): this model is stateless"):
        L.dense(3).apply(params[0], x, state=state)
    np.testing.assert_array_equal(model.apply(params, x, state=None), model.apply(params, x))


def test_stateful_model_without_state():
    model = L.serial(L.dense(3), L.batch_norm(), L.dense(2))
    _, params = model.init(KEY, (None, 7))
    x, y = _data()
    want = r"^serial: this network has stateful layers \(batch_norm\) and needs state="
    for call in [lambda: model.apply(params, x), lambda: model.forward(params, x, train=True)] + [
            lambda vg=vg: vg(params, x, y) for vg in _engines(model)]:
        with pytest.raises(StateError, match=want):
            call()
    with pytest.raises(StateError, match=r"^batch_norm: needs its running statistics"):
        L.batch_norm().apply({"gamma": jnp.ones(3), "beta": jnp.zeros(3)}, jnp.ones((2, 3)))
    # a state from another (stateful) model: the stateless entry is not None
    other = L.serial(L.batch_norm(), L.dense(3), L.dense(2))
    with pytest.raises(StateError, match=r"^serial\[0\] dense\(3\): this model is stateless"):
        model.apply(params, x, state=other.init_state((None, 7)))
