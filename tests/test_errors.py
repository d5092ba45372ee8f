"""Mistakes a user makes with params, state and custom layers: each gives a funnn error that
names the layer path and the problem, on every path (apply, forward, engines, jit, vmap)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import autodiff, core, losses, manual
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


# =========================================================================== 19c summary


@pytest.mark.slow
def test_summary_rejects_another_models_params():
    model = L.serial(L.dense(30), L.activation("tanh"), L.dense(10))
    _, params = model.init(KEY, (None, 64))
    text = core.summary(model, params)
    assert core.summary(model, params, in_shape=(None, 64)) == text
    longer = L.serial(L.dense(30), L.activation("tanh"), L.dense(10), L.activation("tanh"),
                      L.dense(5))
    _, p_long = longer.init(KEY, (None, 64))
    with pytest.raises(ShapeError, match=r"^serial: params do not match the model: expected a "
                                         r"tuple of 3 entries \(one per layer\), got a tuple of 5"):
        core.summary(model, p_long)
    swapped = L.serial(L.dense(30), L.dense(10), L.activation("tanh"))
    _, p_swap = swapped.init(KEY, (None, 64))
    with pytest.raises(ShapeError, match=r"^serial\[1\] activation\(tanh\): params do not match "
                                         r"the model: expected no params, got W \(30, 10\), "
                                         r"b \(10,\)"):
        core.summary(model, p_swap)
    narrower = L.serial(L.dense(20), L.activation("tanh"), L.dense(10))
    _, p_narrow = narrower.init(KEY, (None, 64))
    core.summary(model, p_narrow)             # without in_shape only the structure is known
    with pytest.raises(ShapeError, match=r"^serial\[0\] dense\(30\): params do not match the "
                                         r"model: expected W \(64, 30\), b \(30,\), got "
                                         r"W \(64, 20\), b \(20,\)"):
        core.summary(model, p_narrow, in_shape=(None, 64))
    with pytest.raises(ShapeError, match=r"^serial\[0\] dense\(30\): params do not match"):
        core.summary(model, params, in_shape=(None, 63))


def test_summary_checks_nested_combinators():
    model = L.serial(L.dense(3), L.parallel(L.dense(3), L.residual(L.serial(L.dense(3))),
                                            combine="sum"))
    _, params = model.init(KEY, (None, 2))
    assert "[1][1]/residual[0]" in core.summary(model, params, in_shape=(None, 2))
    bad = (params[0], (params[1][0], ({"W": jnp.ones((3, 4)), "b": jnp.ones(4)},)))
    with pytest.raises(ShapeError, match=r"^serial\[1\] parallel\[1\] residual\(serial\) "
                                         r"serial\[0\] dense\(3\): params do not match the model: "
                                         r"expected W \(3, 3\), b \(3,\), got W \(3, 4\), "
                                         r"b \(4,\)"):
        core.summary(model, bad, in_shape=(None, 2))
    with pytest.raises(ShapeError, match=r"^serial\[1\] parallel\[1\] residual\(serial\) serial: "
                                         r"params do not match the model: expected a tuple of 1"):
        core.summary(model, (params[0], (params[1][0], params[1][0])))


# =========================================================================== 19d backward shapes


def _custom(name, dx_fn=lambda dy: dy, dp_fn=lambda p, dy: {}):
    """An identity layer with no params (or a dense's) whose backward is given."""
    return Layer(name, lambda k, s: (s, {}), lambda p, x, **kw: x,
                 lambda p, x, **kw: (x, None), lambda p, r, dy: (dp_fn(p, dy), dx_fn(dy)))


@pytest.mark.slow
def test_backward_returning_a_wrong_shaped_dx_names_the_layer():
    mylayer = _custom("mylayer", dx_fn=lambda dy: dy[..., :3])
    model = L.serial(L.dense(5), mylayer, L.dense(2))
    _, params = model.init(KEY, (None, 7))
    x, y = _data()
    want = re.escape("serial[1] mylayer: backward returned dx of shape (4, 3), expected the "
                     "input's shape (4, 5)")
    vg = manual.value_and_grad(model, losses.mse)
    for call in (lambda: vg(params, x, y), lambda: jax.jit(vg)(params, x, y),
                 lambda: jax.grad(lambda p: jnp.sum(manual.bridge(model).apply(p, x)))(params)):
        with pytest.raises(ShapeError, match="^" + want):
            call()
    per_example = jax.vmap(lambda xi, yi: vg(params, xi, yi))
    with pytest.raises(ShapeError, match=re.escape("serial[1] mylayer: backward returned dx of "
                                                   "shape (3,), expected the input's shape (5,)")):
        per_example(x, y)
    for combo, label in ((L.parallel(L.dense(5), mylayer), "parallel[1]"),
                         (L.residual(mylayer), "residual(mylayer)")):
        net = L.serial(L.dense(5), combo)
        _, pn = net.init(KEY, (None, 7))
        y_shape = jax.eval_shape(net.apply, pn, x).shape
        with pytest.raises(ShapeError, match=re.escape(
                f"serial[1] {label} mylayer: backward returned dx of shape (4, 3), expected "
                f"the input's shape (4, 5)")):
            manual.value_and_grad(net, losses.mse)(pn, x, jnp.zeros(y_shape))


def test_backward_returning_wrong_dparams_names_the_layer():
    good = L.dense(2)

    def with_grads(fix):
        return Layer("mydense", good.init, good.apply, good.forward,
                     lambda p, r, dy: (fix(good.backward(p, r, dy)[0]), good.backward(p, r, dy)[1]))

    x, y = _data(f_out=2)
    cases = [(lambda g: {"W": g["W"]}, "missing leaves ['0.b']"),
             (lambda g: {**g, "c": g["b"]}, "unexpected leaves ['0.c']"),
             (lambda g: {"W": g["W"].T, "b": g["b"]},
              "leaf 0.W has shape (2, 7), the param (7, 2)"),
             (lambda g: (g["W"], g["b"]), "missing leaves ['0.W', '0.b']; unexpected leaves "
                                           "['0.0', '0.1']")]
    for fix, what in cases:
        model = L.serial(with_grads(fix), L.dense(2))
        _, params = model.init(KEY, (None, 7))
        with pytest.raises(ShapeError, match="^" + re.escape(
                "serial[0] mydense: backward returned dparams that do not match the params: "
                + what)):
            jax.jit(manual.value_and_grad(model, losses.mse))(params, x, y)
    # a bare layer through the manual engine is checked too
    bare = with_grads(lambda g: {"W": g["W"]})
    _, pb = bare.init(KEY, (None, 7))
    with pytest.raises(ShapeError, match=re.escape("mydense: backward returned dparams that do "
                                                   "not match the params: missing leaves ['b']")):
        manual.value_and_grad(bare, losses.mse)(pb, x, y)


@pytest.mark.slow
def test_checks_pass_for_layers_whose_dx_is_none_or_a_tuple():
    """Embedding's dx is None (integer ids); a masked rnn takes (x, mask) and returns (dx, None)."""
    emb = L.serial(L.embedding(10, 4), L.flatten(), L.dense(2))
    _, pe = emb.init(KEY, (None, 3))
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    manual.value_and_grad(emb, losses.mse)(pe, ids, jnp.zeros((2, 2)))
    rnn = L.serial(L.rnn(3, masked=True))
    _, pr = rnn.init(KEY, (None, 5, 2))
    xs = jnp.ones((2, 5, 2))
    lengths = jnp.array([5, 3])
    out = jax.eval_shape(lambda: rnn.apply(pr, (xs, lengths)))
    manual.value_and_grad(rnn, losses.mse)(pr, (xs, lengths), jnp.zeros(out.shape))
