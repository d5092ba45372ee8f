"""Side inputs (masks) flowing through combinators, and layers derived from ``apply`` alone.

A padded batch runs through ``serial(embedding, transformer_block, lstm, dense)`` with one
``lengths=`` argument: valid positions do not depend on the padding, the result equals the
layers called one by one with the mask handed to each reader, and manual = autodiff in
float64 on both the plain and the bridged model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funnn
from funnn import core, losses
from funnn import layers as L
from funnn.core import ConfigError, ShapeError

B, T, V, F = 3, 5, 11, 8
LENGTHS = jnp.array([5, 3, 1])
IDS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 0, 0, 0, 0]])


def _stack():
    return L.serial(L.embedding(V, F), L.transformer_block(2, 16), L.lstm(6), L.dense(4))


@pytest.fixture(scope="module")
def stack():
    model = _stack()
    _, params = model.init(jax.random.key(0), (None, T))
    return model, params


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_context_is_the_union_of_the_readers():
    assert L.dense(3).context == ()
    assert L.lstm(3).context == ("mask", "lengths")
    assert L.multi_head_attention(2).context == ("mask", "lengths")
    assert L.serial(L.dense(3), L.gru(2)).context == ("mask", "lengths")
    assert L.serial(L.dense(3), L.dense(2)).context == ()
    assert L.residual(L.serial(L.layer_norm(), L.multi_head_attention(2))).context == (
        "mask", "lengths")


@pytest.mark.slow
def test_mask_reaches_every_reader_and_padding_is_ignored(stack):
    model, params = stack
    y = model.apply(params, IDS, lengths=LENGTHS)
    garbage = jnp.where(jnp.arange(T) < LENGTHS[:, None], IDS, 10)
    y2 = model.apply(params, garbage, lengths=LENGTHS)
    valid = np.asarray(jnp.arange(T) < LENGTHS[:, None])
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y2)[valid], rtol=1e-12)
    # without the mask the padding leaks into the valid positions (attention sees it)
    y3 = model.apply(params, garbage)
    assert float(jnp.max(jnp.abs(y3 - y)[valid])) > 1e-6


@pytest.mark.slow
def test_serial_equals_the_layers_called_one_by_one(stack):
    model, params = stack
    emb, block, rec, out = (l for _, l in model.children)
    h = emb.apply(params[0], IDS)
    h = block.apply(params[1], h, mask=jnp.arange(T) < LENGTHS[:, None])
    h = rec.apply(params[2], h, lengths=LENGTHS)
    ref = out.apply(params[3], h)
    np.testing.assert_allclose(model.apply(params, IDS, lengths=LENGTHS), ref, rtol=1e-12)
    # the boolean (batch, time) mask and the lengths mean the same to every reader
    np.testing.assert_allclose(
        model.apply(params, IDS, mask=jnp.arange(T) < LENGTHS[:, None]), ref, rtol=1e-12)


@pytest.mark.slow
def test_masked_recurrent_layer_in_the_middle_matches_masked_pair():
    x = jax.random.normal(jax.random.key(1), (B, T, 4))
    model = L.serial(L.dense(5), L.gru(3, return_sequences=False))
    _, params = model.init(jax.random.key(2), (None, T, 4))
    pair = L.gru(3, return_sequences=False, masked=True)
    ref = pair.apply(params[1], (L.dense(5).apply(params[0], x), LENGTHS))
    np.testing.assert_allclose(model.apply(params, x, lengths=LENGTHS), ref, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["manual", "bridge"])
def test_masked_gradients_agree_with_autodiff(stack, engine):
    model, params = stack
    target = jax.random.normal(jax.random.key(3), (B, T, 4))
    loss = losses.mse
    # jitted: run eagerly, every primitive of a recurrent gradient compiles on its own
    auto_vg = jax.jit(funnn.autodiff.value_and_grad(model, loss))
    auto = auto_vg(params, IDS, target, lengths=LENGTHS)
    if engine == "manual":
        other = jax.jit(funnn.manual.value_and_grad(model, loss))(params, IDS, target,
                                                                   lengths=LENGTHS)
    else:
        bridged = funnn.manual.bridge(model)
        other = jax.jit(funnn.autodiff.value_and_grad(bridged, loss))(params, IDS, target,
                                                                      lengths=LENGTHS)
    assert abs(float(auto[0]) - float(other[0])) < 1e-12
    assert _max_diff(auto[1], other[1]) < 1e-10
    # the mask changes the gradient: it is really used on this path
    plain = auto_vg(params, IDS, target)
    assert _max_diff(auto[1], plain[1]) > 1e-8


def test_side_input_nobody_reads_is_an_error():
    model = L.serial(L.dense(3), L.activation("relu"))
    _, params = model.init(jax.random.key(0), (None, 4))
    x = jnp.ones((2, 4))
    with pytest.raises(ConfigError, match="no layer of this model reads side inputs"):
        model.apply(params, x, mask=jnp.ones((2, 4), bool))
    with pytest.raises(ConfigError, match="lengths="):
        funnn.manual.value_and_grad(model, losses.mse)(params, x, jnp.ones((2, 3)),
                                                       lengths=jnp.array([1, 2]))
    with pytest.raises(ConfigError, match="reads only mask=, lengths="):
        L.lstm(2).apply(L.lstm(2).init(jax.random.key(0), (None, 3, 4))[1],
                        jnp.ones((2, 3, 4)), padding=jnp.ones(2))


def test_recurrent_mask_errors():
    rec = L.lstm(2)
    _, p = rec.init(jax.random.key(0), (None, 3, 4))
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ConfigError, match="both mask= and lengths="):
        rec.apply(p, x, mask=jnp.ones((2, 3), bool), lengths=jnp.array([1, 2]))
    with pytest.raises(ShapeError, match="key-padding masks only"):
        rec.apply(p, x, mask=jnp.ones((2, 3, 3), bool))
    with pytest.raises(ShapeError, match=r"lengths of shape \(batch,\)"):
        rec.apply(p, x, lengths=jnp.array([1, 2, 3]))
    pair = L.lstm(2, masked=True)
    with pytest.raises(ConfigError, match="do not also pass"):
        pair.apply(p, (x, jnp.array([1, 2])), lengths=jnp.array([1, 2]))


# --------------------------------------------------------------------------- layer_from_apply


def _scaled_sin():
    def init(key, in_shape):
        return in_shape, {"a": jax.random.normal(key, (in_shape[-1],))}

    def apply(params, x, *, key=None, train=False):
        return jnp.sin(x) * params["a"]

    return core.layer_from_apply(init, apply, name="scaled_sin")


@pytest.mark.slow
def test_layer_from_apply_gradients_and_marking():
    model = L.serial(L.dense(4), _scaled_sin(), L.dense(2))
    _, params = model.init(jax.random.key(0), (None, 3))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.random.normal(jax.random.key(2), (5, 2))
    report = funnn.gradcheck.compare(model, losses.mse, params, x, y)
    assert report.ok
    assert report.derived == ("[1] scaled_sin",)
    assert "derived by jax.vjp" in str(report) and report.to_dict()["derived"]
    table = core.summary(model, params)
    assert "scaled_sin [derived]" in table and "not hand-written" in table
    assert "[derived]" not in core.summary(L.serial(L.dense(2)), (params[0],))
    # the derived backward agrees with the hand-written rule sin'(x) a = cos(x) a
    layer = model.children[1][1]
    h = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    out, res = layer.forward(params[1], h)
    dy = jnp.ones_like(out)
    g, dx = layer.backward(params[1], res, dy)
    np.testing.assert_allclose(dx, jnp.cos(h) * params[1]["a"], rtol=1e-12)
    np.testing.assert_allclose(g["a"], jnp.sin(h).sum(0), rtol=1e-12)


@pytest.mark.slow
def test_layer_from_apply_integer_input_and_side_inputs():
    def init(key, in_shape):
        return (*in_shape, 3), {"table": jax.random.normal(key, (7, 3))}

    def apply(params, ids, *, key=None, train=False, mask=None):
        h = params["table"][ids]
        return h if mask is None else h * mask[..., None]

    emb = core.layer_from_apply(init, apply, name="lookup", context=("mask",))
    model = L.serial(emb, L.dense(2))
    assert model.context == ("mask",)
    _, params = model.init(jax.random.key(0), (None, 4))
    ids = jnp.array([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.float64)
    y = jnp.zeros((2, 4, 2))
    a = funnn.autodiff.value_and_grad(model, losses.mse)(params, ids, y, mask=mask)
    m = funnn.manual.value_and_grad(model, losses.mse)(params, ids, y, mask=mask)
    assert _max_diff(a[1], m[1]) < 1e-12
    _, res = emb.forward(params[0], ids)
    assert emb.backward(params[0], res, jnp.ones((2, 4, 3)))[1] is None


def test_layer_from_apply_rejects_non_callables():
    with pytest.raises(ConfigError, match="needs callables"):
        core.layer_from_apply(None, lambda p, x: x, name="bad")
