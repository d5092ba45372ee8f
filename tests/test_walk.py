"""funnn/layers/walk.py: the one reverse walk that composites, numerics and summary share.

The layer record's kind and ``children_params`` are in test_core.py."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import core
from funnn import layers as L
from funnn.core import Layer, ShapeError
from funnn.layers.walk import Child, walk_back


def _scale(c: float, name: str = "scale") -> Layer:
    """A paramless layer ``y = c x`` whose backward is ``dx = c dy`` (a known answer)."""
    return Layer(name, lambda k, s: (s, {}), lambda p, x, **kw: c * x,
                 lambda p, x, **kw: (c * x, None), lambda p, r, dy: ({}, c * dy))


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
