"""The layer record's kind, and the one reverse walk composites, numerics and summary share."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import core, losses, numerics, summary
from funnn import layers as L
from funnn.core import Layer, ShapeError, children_params
from funnn.layers.derived import layer_from_apply
from funnn.layers.walk import Child, walk_back


def _scale(c: float, name: str = "scale") -> Layer:
    """A paramless layer ``y = c x`` whose backward is ``dx = c dy`` (a known answer)."""
    return Layer(name, lambda k, s: (s, {}), lambda p, x, **kw: c * x,
                 lambda p, x, **kw: (c * x, None), lambda p, r, dy: ({}, c * dy))


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


def test_the_walk_chains_a_stack_and_sums_a_fan_out():
    dy = jnp.ones((2, 3))
    kids = [Child(f"s[{i}]", _scale(c), {}, None) for i, c in enumerate((2.0, 3.0, 5.0))]
    outs, dx = walk_back(kids, dy)
    np.testing.assert_allclose(dx, 30.0 * dy)                # 2 * 3 * 5, last to first
    assert outs == [{}, {}, {}]
    _, dx = walk_back(kids, [dy, 2 * dy, 3 * dy], fan_out=True)
    np.testing.assert_allclose(dx, (2 + 6 + 15) * dy)        # each child its own dy, summed
    order = []
    walk_back(kids, dy, lambda c, d: (order.append(c.scope), d)[::-1])
    assert order == ["s[2]", "s[1]", "s[0]"]


def test_the_walk_names_the_child_whose_backward_is_wrong():
    bad = Layer("bad", lambda k, s: (s, {}), lambda p, x, **kw: x, lambda p, x, **kw: (x, None),
                lambda p, r, dy: ({}, dy[:, :1]))             # dx of the wrong shape
    kids = [Child("serial[0]", _scale(2.0), {}, None), Child("serial[1]", bad, {}, None,
                                                             core.input_spec(jnp.ones((2, 3))))]
    with pytest.raises(ShapeError, match=r"^serial\[1\] bad: backward returned dx of shape"):
        walk_back(kids, jnp.ones((2, 3)))


@pytest.mark.slow
def test_serial_backward_through_the_walk_matches_autodiff():
    model = L.serial(L.dense(4), L.activation("tanh"), L.residual(L.dense(4)),
                     L.parallel(L.dense(2), L.dense(3)))
    _, params = model.init(jax.random.key(0), (None, 3))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y, res = model.forward(params, x)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    grads, dx = model.backward(params, res, dy)
    g_auto, dx_auto = jax.grad(lambda p, v: jnp.vdot(model.apply(p, v), dy), (0, 1))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g_auto)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dx_auto, rtol=1e-5, atol=1e-6)


def test_children_params_pairs_tuples_and_shares_a_wrappers_params():
    stack = L.serial(L.dense(2), L.dense(3))
    assert [(lab, p) for lab, _, p in children_params(stack, ("a", "b"))] == [
        ("[0]", "a"), ("[1]", "b")]
    assert children_params(stack, ("a",)) is None            # one entry per child, or None
    assert [p for _, _, p in children_params(L.residual(L.dense(2)), {"W": 1})] == [{"W": 1}]


def test_numerics_descends_by_kind_not_by_display_name():
    nan_after_3 = layer_from_apply(lambda k, s: (s, {}), lambda p, x, **kw: jnp.log(x - 3.0),
                                   name="log_minus_3")
    model = L.serial(L.dense(2, w_init="ones"), nan_after_3)
    _, params = model.init(jax.random.key(0), (None, 2))
    x, y = jnp.ones((4, 2)), jnp.zeros((4, 2))
    want = "the output of serial[1] log_minus_3"
    assert numerics.locate(model, losses.mse, params, x, y) == want
    renamed = dataclasses.replace(model, name="my network")  # still a serial stack
    assert renamed.kind == "serial"
    assert numerics.locate(renamed, losses.mse, params, x, y) == want


def test_moved_names_stay_importable_from_core():
    assert core.summary is summary.summary and core.derived_layers is summary.derived_layers
    assert core.layer_from_apply is layer_from_apply
    from funnn.core import FunnnError, path_str, wide  # noqa: F401
    from funnn.core import summary as from_core
    assert from_core is summary.summary
