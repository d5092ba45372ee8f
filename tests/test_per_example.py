"""Per-example gradients, norms and clipping from the hand-written rules (float64).

The oracle is autodiff on single-example batches: ``vmap`` over ``i`` of ``jax.grad`` of
``loss(model.apply(params, x[i:i+1]), y[i:i+1])``. Layers that draw random masks (dropout)
draw them for the whole batch, so their oracle differentiates each example's loss through
the batch's forward with the same key (``jax.jacrev`` of the vector of per-example losses),
which is the same function of the params because examples do not interact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funnn import layers as L
from funnn import losses, manual
from funnn.core import ConfigError, ShapeError, StateError

XENT = losses.softmax_cross_entropy
RTOL = 1e-9


def _leaves_sq(tree, b):
    return sum(jnp.sum(jnp.square(leaf).reshape(b, -1), 1) for leaf in jax.tree.leaves(tree))


def _reference(model, loss, params, x, y, key, batch_forward):
    """Per-example (values, grads) by autodiff (module docstring), jitted: run eagerly, every
    primitive of the vmapped gradient would compile on its own."""
    if batch_forward:
        def values(p, x, y, key):
            return manual.per_example_loss(loss, model.apply(p, x, key=key, train=True), y)[0]

        def ref(p, x, y, key):
            return values(p, x, y, key), jax.jacrev(values)(p, x, y, key)
    else:
        def ref(p, x, y, key):
            def one(xi, yi):
                def f(p):
                    return loss.value(model.apply(p, jax.tree.map(lambda a: a[None], xi),
                                                  train=True), yi[None])
                return jax.value_and_grad(f)(p)
            return jax.vmap(one)(x, y)

    return jax.jit(ref)(params, x, y, key)


def _close(a, b, what):
    """Leaf by leaf to RTOL relative to the leaf's largest entry; a leaf that is zero in exact
    arithmetic (attention's key bias: softmax ignores a shift of all scores) is compared to
    RTOL times the largest entry of the whole tree."""
    big = max([float(np.max(np.abs(v))) for v in jax.tree.leaves(b) if np.size(v)] + [1e-300])
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape, (what, path, u.shape, v.shape)
        scale = max(np.max(np.abs(v)) if v.size else 0.0, 1e-6 * big, 1e-300)
        err = np.max(np.abs(u - v)) / scale if u.size else 0.0
        assert err <= RTOL, f"{what} {jax.tree_util.keystr(path)}: relative error {err:.3g}"


def check(model, in_shape, x, y, loss=XENT, key=None, batch_forward=False):
    _, params = model.init(jax.random.key(0), in_shape)
    b = jax.tree.leaves(x)[0].shape[0]
    ref_v, ref_g = _reference(model, loss, params, x, y, key, batch_forward)
    ref_n = jnp.sqrt(_leaves_sq(ref_g, b))
    clip = float(jnp.median(ref_n))
    ref_factor = jnp.minimum(1.0, clip / ref_n)
    ref_clipped = jax.tree.map(
        lambda g: jnp.mean(g * ref_factor.reshape((-1,) + (1,) * (g.ndim - 1)), 0), ref_g)

    @jax.jit
    def run(params, x, y, key):
        v, g = manual.per_example_value_and_grad(model, loss)(params, x, y, key=key)
        v2, n = manual.per_example_grad_norms(model, loss)(params, x, y, key=key)
        m, c = manual.clipped_value_and_grad(model, loss, clip)(params, x, y, key=key)
        return v, g, v2, n, m, c

    v, g, v2, n, m, c = run(params, x, y, key)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    _close(v, ref_v, "values")
    _close(g, ref_g, "per-example grads")
    _close(v2, ref_v, "values (norms)")
    _close(n, ref_n, "norms")
    _close(m, jnp.mean(ref_v), "mean value")
    _close(c, ref_clipped, "clipped mean")
    assert float(jnp.min(ref_factor)) < 1.0          # some examples really were clipped


def _normal(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _labels(shape, k, seed=2):
    return jax.random.randint(jax.random.key(seed), shape, 0, k)


@pytest.mark.slow
def test_dense_prelu_activation():
    model = L.serial(L.dense(6), L.prelu(), L.activation("tanh"), L.dense(3))
    check(model, (None, 5), _normal((5, 5)), _labels((5,), 3))


@pytest.mark.slow
def test_dense_with_time_axis_mse_both_norm_rules():
    # dense(8) on T=3 rows of 8 takes the Gram form (9*16 < 3*64), dense(2) materialises
    model = L.serial(L.dense(8), L.activation("sigmoid"), L.dense(2))
    check(model, (None, 3, 8), _normal((4, 3, 8)), _normal((4, 3, 2), 3), loss=losses.mse)


@pytest.mark.slow
def test_conv_pool_flatten():
    # conv 3x3 -> 4 channels on 6x6 materialises; the second conv has T = 4 positions and
    # the Gram form (16 * (36 + 5) < 4 * 36 * 5 is false -> check both by the third conv)
    model = L.serial(L.conv2d(4, (3, 3), padding="SAME"), L.activation("relu"),
                     L.max_pool((2, 2)), L.conv2d(16, (2, 2), stride=1, padding="SAME"),
                     L.avg_pool((2, 2)), L.conv2d(12, (1, 1)), L.flatten(), L.dense(3))
    check(model, (None, 6, 6, 2), _normal((4, 6, 6, 2)), _labels((4,), 3))


@pytest.mark.slow
def test_conv1d_groups_stride_dilation_global_pool():
    model = L.serial(L.conv1d(4, 3, stride=2, dilation=1, groups=2, padding=1),
                     L.activation("tanh"), L.conv1d(6, 2, dilation=2), L.global_avg_pool(),
                     L.dense(3))
    check(model, (None, 9, 2), _normal((4, 9, 2)), _labels((4,), 3))


@pytest.mark.slow
def test_dropout_with_key():
    model = L.serial(L.dense(8), L.dropout(0.5), L.activation("relu"), L.dense(3))
    check(model, (None, 5), _normal((6, 5)), _labels((6,), 3), key=jax.random.key(7),
          batch_forward=True)


@pytest.mark.slow
def test_layer_norm_embedding_sequence_loss():
    # ids (B, T) -> embedding -> layer_norm -> dense: the loss of one example is the mean
    # over its T positions; T*T <= num_embeddings takes the embedding's Gram form
    ids = jnp.array([[1, 3, 1], [0, 0, 0], [9, 2, 5], [4, 4, 7]])
    model = L.serial(L.embedding(10, 4), L.layer_norm(), L.dense(5))
    check(model, (None, 3), ids, _labels((4, 3), 5))


@pytest.mark.slow
def test_embedding_materialised_norm():
    ids = jnp.array([[1, 3, 1, 2, 0], [0, 0, 0, 1, 1], [2, 2, 3, 3, 1]])
    model = L.serial(L.embedding(4, 3), L.flatten(), L.dense(2))
    check(model, (None, 5), ids, _labels((3,), 2))


@pytest.mark.slow
@pytest.mark.parametrize("cell", [L.rnn, L.lstm, L.gru])
def test_recurrent(cell):
    model = L.serial(cell(5), cell(4, return_sequences=False), L.dense(3))
    check(model, (None, 4, 3), _normal((4, 4, 3)), _labels((4,), 3))


@pytest.mark.slow
def test_recurrent_masked_parallel_residual():
    lengths = jnp.array([4, 2, 3, 1])
    x = _normal((4, 4, 3))
    model = L.serial(L.gru(4, masked=True), L.residual(L.dense(4)),
                     L.parallel(L.dense(2), L.serial(L.dense(3), L.activation("tanh"))),
                     L.dense(3))

    def ref_one(p, xi, li, yi):
        return XENT.value(model.apply(p, (xi[None], li[None])), yi[None])

    _, params = model.init(jax.random.key(0), ((None, 4, 3), (None,)))
    y = _labels((4, 4), 3)
    g_ref = jax.vmap(jax.grad(ref_one), (None, 0, 0, 0))(params, x, lengths, y)
    _, g = jax.jit(manual.per_example_value_and_grad(model, XENT))(params, (x, lengths), y)
    _close(g, g_ref, "masked gru")
    _, n = manual.per_example_grad_norms(model, XENT)(params, (x, lengths), y)
    _close(n, jnp.sqrt(_leaves_sq(g_ref, 4)), "masked gru norms")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["materialized", "chunked"])
def test_attention(impl):
    model = L.serial(L.positional_embedding(8, "sinusoidal"),
                     L.multi_head_attention(2, causal=True, implementation=impl, block_size=2),
                     L.dense(3))
    check(model, (None, 5, 4), _normal((3, 5, 4)), _labels((3, 5), 3))


@pytest.mark.slow
def test_cross_attention():
    model = L.serial(L.cross_attention(2, implementation="materialized"), L.dense(3))
    x, ctx = _normal((3, 2, 4)), _normal((3, 5, 6), 5)
    check(model, ((None, 2, 4), (None, 5, 6)), (x, ctx), _labels((3,), 3).repeat(2).reshape(3, 2))


@pytest.mark.slow
def test_transformer_block_positional_tied_embedding():
    # grouped-query attention (2 heads sharing 1 key/value head) inside the block
    body = L.serial(L.positional_embedding(6, "learned", std=0.5),
                    L.transformer_block(2, 8, causal=True, num_kv_heads=1), L.layer_norm())
    model = L.tied_embedding(7, 4, body)
    ids = jnp.array([[1, 3, 1, 6], [0, 0, 2, 5], [4, 4, 4, 4]])
    check(model, (None, 4), ids, _labels((3, 4), 7))


@pytest.mark.slow
@settings(max_examples=3)
@given(t=st.integers(1, 4), f=st.integers(1, 6), out=st.integers(1, 6), b=st.integers(2, 4))
def test_dense_norm_rules_any_shape(t, f, out, b):
    model = L.dense(out)
    _, params = model.init(jax.random.key(0), (None, t, f))
    x, dy = _normal((b, t, f)), _normal((b, t, out), 4)
    g, dx = model.per_example(params, x, dy)
    sq, dx2 = model.per_example_norms(params, x, dy)
    _close(sq, _leaves_sq(g, b), "dense norms")
    ref = jax.vmap(lambda xi, di: model.backward(params, xi[None], di[None])[0])(x, dy)
    _close(g, ref, "dense per-example")
    _close(dx2, dx, "dx")


def test_bad_clip_norm_and_stateful_model():
    model = L.dense(3)
    for bad in (0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ConfigError, match="clip_norm must be a positive"):
            manual.clipped_value_and_grad(model, XENT, bad)
    bn = L.serial(L.dense(3), L.batch_norm())
    for make in (manual.per_example_value_and_grad, manual.per_example_grad_norms):
        with pytest.raises(StateError, match="undefined for a stateful model"):
            make(bn, XENT)
    with pytest.raises(StateError, match="whole batch"):
        manual.clipped_value_and_grad(bn, XENT, 1.0)


def _no_rule_layers():
    """A hand-written layer without rules (residuals sliced per example), one whose residual
    folds the batch into its rows (masked), and a layer_from_apply (masked)."""
    from funnn.core import Layer, layer_from_apply
    dense = L.dense(2)
    bare = Layer("custom", dense.init, dense.apply, dense.forward, dense.backward)

    def rows_forward(params, x, *, key=None, train=False):
        return x * params["s"], x.reshape(-1, x.shape[-1])          # (B T, f): not sliceable

    def rows_backward(params, x2, dy):
        return {"s": jnp.sum(x2 * dy.reshape(x2.shape), 0)}, dy * params["s"]

    scale = Layer("rows_scale", lambda k, s: (s, {"s": jnp.linspace(0.5, 1.5, s[-1])}),
                  lambda p, x, **kw: x * p["s"], rows_forward, rows_backward)
    swish = layer_from_apply(lambda k, s: (s, {"beta": jnp.linspace(0.5, 2.0, s[-1])}),
                             lambda p, x, **kw: x * jax.nn.sigmoid(p["beta"] * x),
                             name="learned_swish")
    return bare, scale, swish


@pytest.mark.slow
def test_layers_without_rules_fall_back_to_vmap_of_their_own_backward():
    """A model mixing ruled and unruled layers (sliced and masked fallbacks): per-example
    grads, norms and clipping equal vmap(jax.grad) (float64). The fast tier checks the sliced
    fallback through gradcheck.compare_per_example (test_gradcheck.py)."""
    bare, scale, swish = _no_rule_layers()
    model = L.serial(L.dense(3), swish, scale, L.activation("tanh"), bare)
    check(model, (None, 2, 4), _normal((5, 2, 4)), _labels((5, 2), 2))


def test_summary_names_the_fallback_layers_and_which_way_they_run():
    """summary and vmapped_layers name the layers without rules; the hand-written one is
    sliced per example, the one whose residual folds the batch into rows is masked."""
    from funnn import summary
    from funnn.core import input_spec
    from funnn.layers import _vmap_rule
    bare, scale, swish = _no_rule_layers()
    model = L.serial(L.dense(3), swish, scale, L.activation("tanh"), bare)
    _, params = model.init(jax.random.key(0), (None, 2, 4))
    assert summary.vmapped_layers(model) == ["[1] learned_swish", "[2] rows_scale",
                                             "[4] custom"]
    table = summary.summary(model, params)
    assert "custom [vmap]" in table and "learned_swish [derived] [vmap]" in table
    assert "dense(3) [vmap]" not in table and "[vmap]: no per-example rule" in table
    x = _normal((5, 2, 3))     # which way: the hand-written one sliced, the others masked
    _, p = bare.init(jax.random.key(0), (None, 3))
    assert _vmap_rule._sliceable(bare, p, bare.forward(p, x)[1], input_spec(x)) == [0]
    _, p = scale.init(jax.random.key(0), (None, 3))
    assert _vmap_rule._sliceable(scale, p, scale.forward(p, x)[1], input_spec(x)) is None


def test_no_batch_axis_and_stateful_layer_named():
    dense = L.dense(2)
    _, params = dense.init(jax.random.key(0), (None, 3))
    with pytest.raises(ShapeError, match="batch axis"):
        manual.per_example_value_and_grad(dense, XENT)(params, jnp.ones(3), jnp.array(1))
    from funnn.layers.walk import rule
    with pytest.raises(ConfigError, match=r"batch_norm.* has no per-example gradient rule "
                                          r"\(a stateful layer"):
        rule(L.batch_norm(), "per_example")


@pytest.mark.slow
def test_side_inputs_reach_the_forward():
    model = L.multi_head_attention(2, implementation="chunked", block_size=2)
    _, params = model.init(jax.random.key(0), (None, 4, 4))
    x, y, lengths = _normal((3, 4, 4)), _normal((3, 4, 4), 6), jnp.array([4, 2, 1])

    def one(xi, yi, li):
        return jax.grad(lambda p: losses.mse.value(model.apply(p, xi[None], lengths=li[None]),
                                                   yi[None]))(params)

    ref = jax.vmap(one)(x, y, lengths)
    _, g = manual.per_example_value_and_grad(model, losses.mse)(params, x, y, lengths=lengths)
    _close(g, ref, "attention with lengths")
    _, n = manual.per_example_grad_norms(model, losses.mse)(params, x, y, lengths=lengths)
    _close(n, jnp.sqrt(_leaves_sq(ref, 3)), "norms with lengths")


def test_jit_reusing_writes_into_the_previous_result():
    """manual.jit_reusing gives the same per-example gradients and consumes the result it
    reuses (its buffers are donated), instead of allocating a fresh one each call."""
    model = L.serial(L.dense(5), L.activation("tanh"), L.dense(3))
    _, params = model.init(jax.random.key(0), (None, 4))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    f = manual.per_example_value_and_grad(model, losses.softmax_cross_entropy)
    g = manual.jit_reusing(f)
    first = g(params, x, y)
    again = g(params, x * 2, y, out=first)
    want = jax.jit(f)(params, x * 2, y)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(first))


@pytest.mark.slow
def test_library_layer_without_rules_transformer_decoder_layer():
    """transformer_decoder_layer has no per-example rule; its residuals hold static shapes of
    the batch (its feed-forward serial's), so the fallback masks: still vmap(jax.grad)'s."""
    from funnn import gradcheck
    dec = L.transformer_decoder_layer(4, 2, 8)
    model = L.serial(dec, L.dense(3))
    x, mem = _normal((3, 4, 4)), _normal((3, 5, 4), 5)
    _, params = model.init(jax.random.key(0), ((None, 4, 4), (None, 5, 4)))
    report = gradcheck.compare_per_example(model, XENT, params, (x, mem), _labels((3, 4), 3),
                                           train=False)
    assert report.ok, str(report)
    assert report.vmapped == (f"[0] {dec.name}",)
