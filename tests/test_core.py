"""funnn/core.py: the ``Layer`` record (its kind, its children's params), the checks the
manual engine runs on a hand-written backward (dx and dparams shapes, named by layer path),
and the names that moved out of core staying importable from it.

Side inputs through combinators and ``layer_from_apply`` are in test_context.py; errors on
bad params and state in test_errors.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import core, losses, manual, summary
from funnn import layers as L
from funnn.core import Layer, ShapeError, children_params
from funnn.layers.derived import layer_from_apply

KEY = jax.random.key(0)


def _data(n=4, f_in=7, f_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, f_in))), jnp.asarray(rng.normal(size=(n, f_out)))


def _scale(c: float, name: str = "scale") -> Layer:
    """A paramless layer ``y = c x`` whose backward is ``dx = c dy`` (a known answer)."""
    return Layer(name, lambda k, s: (s, {}), lambda p, x, **kw: c * x,
                 lambda p, x, **kw: (c * x, None), lambda p, r, dy: ({}, c * dy))


# =========================================================================== the Layer record


def test_every_layer_says_its_kind_and_old_style_layers_default_to_custom():
    assert [l.kind for l in (L.serial(L.dense(2)), L.parallel(L.dense(2), L.dense(3)),
                             L.residual(L.dense(2)), L.dense(2), L.conv2d(2, 3),
                             L.conv1d(2, 3), L.lstm(3), L.multi_head_attention(2),
                             L.transformer_block(2, 8), L.max_pool(2),
                             L.activation("tanh"))] == [
        "serial", "parallel", "residual", "dense", "conv2d", "conv1d", "lstm",
        "multi_head_attention", "transformer_block", "max_pool", "activation"]
    assert _scale(2.0).kind == "custom"                      # positional, as written before
    assert layer_from_apply(lambda k, s: (s, {}), lambda p, x, **kw: x).kind == "custom"


def test_children_params_pairs_tuples_and_shares_a_wrappers_params():
    stack = L.serial(L.dense(2), L.dense(3))
    assert [(lab, p) for lab, _, p in children_params(stack, ("a", "b"))] == [
        ("[0]", "a"), ("[1]", "b")]
    assert children_params(stack, ("a",)) is None            # one entry per child, or None
    assert [p for _, _, p in children_params(L.residual(L.dense(2)), {"W": 1})] == [{"W": 1}]


def test_moved_names_stay_importable_from_core():
    assert core.summary is summary.summary and core.derived_layers is summary.derived_layers
    assert core.layer_from_apply is layer_from_apply
    from funnn.core import FunnnError, path_str, wide  # noqa: F401
    from funnn.core import summary as from_core
    assert from_core is summary.summary


# =========================================================================== backward checks


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


def test_a_nested_list_input_works_as_its_array_and_a_ragged_one_names_the_layer():
    """issue 22 item 17: a Python list into ``apply`` was "Cannot determine dtype"."""
    model = L.serial(L.dense(3), L.activation("tanh"), L.dense(2))
    rng = np.random.default_rng(0)
    params = ({"W": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}, {},
              {"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2)})
    xs = [[1.0, 2.0], [0.5, -1.0]]
    want = model.apply(params, jnp.asarray(xs))
    np.testing.assert_array_equal(model.apply(params, xs), want)
    np.testing.assert_array_equal(model.forward(params, xs)[0], want)
    np.testing.assert_array_equal(jax.jit(model.apply)(params, xs), want)  # 0-d tracers
    with pytest.raises(ShapeError, match=r"^serial\S*: input x is a nested list whose rows "
                                         r"differ in length \(ragged\)"):
        model.apply(params, [[1.0, 2.0], [3.0]])
    # a list of arrays is an input pair (a masked LSTM's [x, mask]), left to the layer as is
    pair = [jnp.ones((1, 2, 2)), jnp.array([[True, False]])]
    same = Layer("as_is", init=lambda k, s: (s, {}), apply=lambda p, x, **kw: x,
                 forward=lambda p, x, **kw: (x, None), backward=lambda p, r, dy: ({}, dy))
    assert same.apply({}, pair) is pair and same.forward({}, pair)[0] is pair
