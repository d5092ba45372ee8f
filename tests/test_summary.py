"""funnn/summary.py: the printed model table (layer paths, parameter shapes and counts) and
its check that the params given belong to the model, named by layer path."""

import jax
import jax.numpy as jnp
import pytest

from funnn import activations as A
from funnn import core
from funnn import layers as L
from funnn.core import ShapeError

KEY = jax.random.key(0)


def _stack():
    return L.serial(L.dense(5), L.activation(A.tanh),
                    L.parallel(L.dense(3), L.serial(L.dense(2), L.activation(A.sigmoid))),
                    L.residual(L.serial(L.dense(5), L.activation(A.softplus))), L.dense(3))


def test_summary_and_count():
    model = _stack()
    _, params = model.init(jax.random.key(0), (None, 4))
    text = core.summary(model, params)
    assert core.param_count(params) == 25 + 18 + 12 + 30 + 18
    assert "dense(5)" in text and f"{core.param_count(params):,}" in text.splitlines()[-1]
    assert "[2][1][0]" in text          # a nested path
    paths = [p for p, _ in core.tree_paths(params)]
    assert paths[0] == "0.W" and "2.1.0.b" in paths



def test_summary_notes_the_gradient_free_key_bias():
    from funnn.summary import KEY_BIAS_NOTE
    lm = L.serial(L.embedding(7, 4), L.residual(L.multi_head_attention(2)), L.dense(7))
    params = jax.eval_shape(lambda k: lm.init(k, (None, 3))[1], KEY)
    assert core.summary(lm, params).endswith(KEY_BIAS_NOTE)
    assert all(len(line) <= 100 for line in KEY_BIAS_NOTE.splitlines())
    no_bias = L.serial(L.embedding(7, 4), L.multi_head_attention(2, use_bias=False))
    plain = [no_bias, _stack()]
    for model, shape in zip(plain, [(None, 3), (None, 4)]):
        p = jax.eval_shape(lambda k, m=model, s=shape: m.init(k, s)[1], KEY)
        assert "b_k" not in core.summary(model, p)

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
