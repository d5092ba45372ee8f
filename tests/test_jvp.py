"""Hand-written forward mode (``Layer.jvp``, :func:`funnn.manual.jvp`,
:func:`funnn.gradcheck.compare_jvp`) in float64.

The references are ``jax.jvp`` of ``apply`` and central differences (``compare_jvp``, per
parameter leaf and the input), and the hand-written backward through the transpose identity
``<J v, u> = <v, J^T u>``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from test_properties import cases, materialise

from funnn import gradcheck, manual
from funnn import layers as L
from funnn.core import ConfigError, run_apply, run_forward
from funnn.layers.derived import layer_from_apply

# test programs compile once and run once: XLA's backend optimisations cost more than they save
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _params(model, in_shape, seed=0):
    _, p = model.init(jax.random.key(seed), in_shape)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(a + 0.2 * rng.normal(size=a.shape)), p)


def _normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _rows(report):
    return {r.path: r for r in report.leaves}


def test_conv_pool_norm_stack_agrees_three_ways_per_leaf():
    model = L.serial(L.conv2d(3, (3, 3), padding="SAME", stride=2), L.max_pool((2, 2),
                     padding="SAME"), L.prelu(), L.avg_pool((2, 2), stride=1, padding="SAME"),
                     L.flatten(), L.dense(4),
                     L.layer_norm(), L.activation("softmax"))
    params = _params(model, (None, 5, 5, 2))
    report = gradcheck.compare_jvp(model, params, _normal((2, 5, 5, 2)))
    assert report.ok, str(report)
    rows = _rows(report)
    assert set(rows) == {"0.W", "0.b", "2.alpha", "5.W", "5.b", "6.gamma", "6.beta", "<input>"}
    assert rows["0.W"].rel_err["manual~autodiff"] <= 1e-10
    assert "max |y|" in str(report)


@pytest.mark.slow
def test_combinators_embedding_and_dropout_in_training():
    model = L.serial(L.embedding(6, 4),
                     L.parallel(L.dense(3), L.serial(L.dense(2), L.activation("gelu"))),
                     L.residual(L.serial(L.dense(5), L.activation("log_softmax"))),
                     L.dropout(0.4), L.parallel(L.dense(2), L.dense(2), combine="sum"))
    params = _params(model, (None, 3))
    ids = jnp.array([[0, 5, 2], [3, 3, 1]])
    report = gradcheck.compare_jvp(model, params, ids, key=jax.random.key(4), train=True)
    assert report.ok, str(report)
    assert "<input>" not in _rows(report)           # integer ids have no tangent
    assert len(report.leaves) == len(jax.tree.leaves(params))


def _transpose_gap(model, params, x, seed=3, **context):
    """``|<J v, u> - <v, J^T u>|`` relative, by manual.jvp and the hand-written backward."""
    rng = np.random.default_rng(seed)
    dp = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    dx = jnp.asarray(rng.normal(size=x.shape))

    @_jit
    def run(params, x, dp, dx):
        y, jv = manual.jvp(model)(params, x, dp, dx, **context)
        u = jnp.cos(jnp.arange(y.size).reshape(y.shape))
        _, res = model.forward(params, x, **context)
        g, gx = model.backward(params, res, u)
        lhs = jnp.sum(jv * u)
        rhs = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(g)))
        return lhs, rhs + jnp.sum(dx * gx)

    lhs, rhs = run(params, x, dp, dx)
    return abs(float(lhs - rhs)) / max(abs(float(lhs)), 1e-300)


def test_jvp_and_the_manual_backward_are_transposes_on_a_fixed_network():
    model = L.serial(L.dense(3), L.activation("tanh"), L.residual(L.dense(3)),
                     L.parallel(L.dense(2), L.dense(1)))
    params = _params(model, (None, 2))
    assert _transpose_gap(model, params, _normal((3, 2))) <= 1e-12


@pytest.mark.slow
def test_recurrent_tangents_with_lengths():
    model = L.serial(L.rnn(3), L.lstm(3), L.gru(2, return_sequences=False))
    params = _params(model, (None, 4, 2))
    report = gradcheck.compare_jvp(model, params, _normal((3, 4, 2)),
                                   lengths=jnp.array([4, 2, 1]))
    assert report.ok, str(report)


@pytest.mark.slow
def test_masked_rnn_takes_the_pair_input():
    model = L.serial(L.rnn(3, masked=True), L.dense(2))
    params = _params(model, ((None, 3, 2), (None,)))
    x, lengths = _normal((2, 3, 2)), jnp.array([3, 1])
    dx = _normal((2, 3, 2), seed=5)
    dp = jax.tree.map(jnp.ones_like, params)

    @_jit
    def run(params, x, dp, dx):
        _, dy = manual.jvp(model)(params, (x, lengths), dp, (dx, None))
        return dy, jax.jvp(lambda p, v: model.apply(p, (v, lengths)), (params, x), (dp, dx))[1]

    dy, want = run(params, x, dp, dx)
    np.testing.assert_allclose(dy, want, rtol=1e-10, atol=1e-12)


def test_a_wrong_tangent_rule_is_reported_on_its_leaf():
    good = L.dense(2)
    bad = dataclasses.replace(good, jvp=lambda p, x, dp, dx: good.jvp(p, x, dp, dx)
                              + 1e-3 * x @ dp["W"])
    params = _params(bad, (None, 3))
    report = gradcheck.compare_jvp(bad, params, _normal((4, 3)))
    assert not report.ok
    assert [r.path for r in report.failures()] == ["W"]
    assert "1 disagree" in str(report)


def test_layers_without_a_tangent_rule_are_named():
    derived = layer_from_apply(lambda k, s: (s, {"a": jnp.ones(s[-1])}),
                               lambda p, x, **kw: x * p["a"], name="scaled")
    model = L.serial(L.dense(3), derived)
    params = _params(model, (None, 2))
    with pytest.raises(ConfigError, match=r"serial\[1\].*scaled has no hand-written tangent"):
        jax.eval_shape(lambda: manual.jvp(model)(params, _normal((2, 2)), None, None))
    with pytest.raises(ConfigError, match=r"scaled has no hand-written tangent"):
        manual.jvp(derived)


@pytest.mark.slow
def test_batch_norm_tangent_through_the_batch_statistics():
    """Training mode (the tangent flows through the batch mean and variance); the running
    statistics' affine map is drawn by the property test's eval-mode networks."""
    model = L.serial(L.conv2d(2, (2, 2)), L.batch_norm(), L.activation("tanh"), L.flatten(),
                     L.dense(2), L.batch_norm())
    params = _params(model, (None, 3, 3, 1))
    state = jax.tree.map(lambda a: a + 0.3, model.init_state((None, 3, 3, 1)))
    report = gradcheck.compare_jvp(model, params, _normal((3, 3, 3, 1)), state=state,
                                   train=True)
    assert report.ok, str(report)


@pytest.mark.slow      # a new network and compile per example
@settings(max_examples=2, database=None)
@given(case=cases(max_depth=2))
def test_jvp_matches_autodiff_and_transposes_the_backward_on_random_networks(case):
    model, _, params, state, x, _, key = materialise(case)
    masked = isinstance(x, tuple)
    xf = x[0] if masked else x
    floating = jnp.issubdtype(xf.dtype, jnp.floating)
    dp = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(1).normal(size=a.shape)),
                      params)
    dx = _normal(xf.shape, seed=6) if floating else None

    @_jit
    def run(params, dp, dx):
        arg = (dx, None) if masked else dx
        y, jv = manual.jvp(model, train=case.train)(params, x, dp, arg, key=key, state=state)
        y = y[0] if model.stateful else y

        def f(p, v):
            return run_apply(model, p, (v, x[1]) if masked else v, key=key, state=state,
                             train=case.train)[0]

        want = (jax.jvp(f, (params, xf), (dp, dx)) if floating else
                jax.jvp(lambda p: f(p, xf), (params,), (dp,)))[1]
        u = jnp.cos(jnp.arange(y.size).reshape(y.shape))
        _, res, _ = run_forward(model, params, x, key=key, state=state, train=case.train)
        g, gx = model.backward(params, res, u)
        rhs = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(g)))
        if floating:
            rhs = rhs + jnp.sum(dx * (gx[0] if masked else gx))
        return jv, want, jnp.sum(jv * u), rhs

    jv, want, lhs, rhs = run(params, dp, dx)
    scale = float(np.max(np.abs(want))) or 1.0
    assert float(np.max(np.abs(jv - want))) <= 1e-9 * scale
    assert abs(float(lhs - rhs)) <= 1e-9 * max(abs(float(lhs)), scale)


# --------------------------------------------------------------------------- layer families


def _tangents(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=jnp.shape(a))), tree)


def _bi_gru():
    return L.bidirectional(L.gru(2))


_TOKENS = (2, 3)                 # (batch, T) for the sequence cases
# (id, model factory, in_shape, input maker, context, train)
_FAMILIES = [
    ("rms_norm", lambda: L.rms_norm(), (None, 3, 4), "x", {}, False),
    ("mha_materialized_causal_rotary_lengths",
     lambda: L.multi_head_attention(2, causal=True, rotary=True, implementation="materialized"),
     (None, 3, 4), "x", {"lengths": jnp.array([3, 2])}, False),
    ("mha_tiled_gqa_key_mask",
     lambda: L.multi_head_attention(2, num_kv_heads=1, block_size=2),
     (None, 3, 4), "x", {"mask": jnp.array([[True, False, True], [True, True, False]])}, False),
    ("mha_chunked_dropout_train",
     lambda: L.multi_head_attention(2, causal=True, dropout=0.3, block_size=2),
     (None, 3, 4), "x", {}, True),
    ("mha_materialized_dropout_train",
     lambda: L.multi_head_attention(2, dropout=0.3, implementation="materialized"),
     (None, 3, 4), "x", {}, True),
    ("cross_attention_full_mask", lambda: L.cross_attention(2, use_bias=False),
     ((None, 3, 4), (None, 2, 3)), "pair",
     {"mask": jnp.array([[[True, False], [True, True], [False, False]]] * 2)}, False),
    pytest.param("transformer_block",                  # ~2.7 CPU s
                 lambda: L.transformer_block(2, 5, causal=True, rotary=True),
                 (None, 3, 4), "x", {"lengths": jnp.array([3, 1])}, False,
                 marks=pytest.mark.slow),
    pytest.param("encoder_layer_post_norm_dropout",   # serial/residual of the rules above
                 lambda: L.transformer_encoder_layer(4, 2, 5, dropout=0.2),
                 (None, 3, 4), "x", {}, True, marks=pytest.mark.slow),
    ("decoder_layer_pre_norm", lambda: L.transformer_decoder_layer(4, 2, 5, norm_first=True),
     ((None, 3, 4), (None, 2, 4)), "pair", {"memory_lengths": jnp.array([2, 1])}, False),
    pytest.param("decoder_layer_post_norm", lambda: L.transformer_decoder_layer(4, 2, 5),
                 ((None, 3, 4), (None, 2, 4)), "pair", {}, False, marks=pytest.mark.slow),
    ("tied_embedding_positions",
     lambda: L.tied_embedding(6, 4, L.serial(L.positional_embedding(5), L.rms_norm(),
                                              L.positional_embedding(3, "sinusoidal"))),
     (None, 3), "ids", {}, False),
    ("bidirectional_gru_lengths", _bi_gru, (None, 3, 2), "x", {"lengths": jnp.array([3, 2])},
     False),
]


def _family_input(kind, in_shape):
    if kind == "ids":
        return jnp.array([[0, 5, 2], [3, 3, 1]])
    if kind == "pair":
        return tuple(_normal((2,) + s[1:], seed=7 + i) for i, s in enumerate(in_shape))
    return _normal((2,) + in_shape[1:], seed=7)


# The fast tier keeps one case per kind of rule (a norm, tiled attention with a key mask,
# cross-attention on a pair); the other families (~0.7-1.3 CPU-s each) run in the slow tier.
_FAST_FAMILIES = {"rms_norm", "mha_tiled_gqa_key_mask", "cross_attention_full_mask"}


def _as_params(rows):
    """``pytest.param``s with the first entry as the id (marks kept; slow unless fast)."""
    out = []
    for r in rows:
        values, marks = (r.values, r.marks) if hasattr(r, "marks") else (r, ())
        if values[0] not in _FAST_FAMILIES:
            marks = (pytest.mark.slow,)
        out.append(pytest.param(*values[1:], id=values[0], marks=marks))
    return out


@pytest.mark.parametrize("make, in_shape, kind, context, train", _as_params(_FAMILIES))
def test_layer_family_tangent_matches_jax_jvp(make, in_shape, kind, context, train):
    """Every parameter leaf and the input perturbed at once; one compile per family."""
    model = make()
    params = _params(model, in_shape)
    x = _family_input(kind, in_shape)
    dp, dx = _tangents(params, 3), (None if kind == "ids" else _tangents(x, 4))
    key = jax.random.key(5) if train else None

    @_jit
    def run(params, x, dp, dx):
        _, jv = manual.jvp(model, train=train)(params, x, dp, dx, key=key, **context)

        def f(p, *v):
            return model.apply(p, v[0] if v else x, key=key, train=train, **context)

        want = (jax.jvp(f, (params,), (dp,)) if dx is None else
                jax.jvp(f, (params, x), (dp, dx)))[1]
        return jv, want

    jv, want = run(params, x, dp, dx)
    scale = float(np.max(np.abs(want)))
    assert scale > 1e-3
    np.testing.assert_allclose(jv, want, rtol=0, atol=1e-10 * scale)


def test_every_layer_constructor_has_a_tangent_rule():
    """Each constructor of ``funnn.layers`` (``L.__all__``) builds a layer that carries
    ``jvp``; a new constructor must be added here."""
    d = L.dense(2)
    built = {
        "serial": L.serial(d), "parallel": L.parallel(d), "residual": L.residual(d),
        "dense": d, "activation": L.activation("relu"), "prelu": L.prelu(),
        "flatten": L.flatten(), "conv1d": L.conv1d(2, 3), "conv2d": L.conv2d(2, (2, 2)),
        "max_pool": L.max_pool((2, 2)), "avg_pool": L.avg_pool((2, 2)),
        "global_avg_pool": L.global_avg_pool(), "dropout": L.dropout(0.1),
        "layer_norm": L.layer_norm(), "rms_norm": L.rms_norm(), "batch_norm": L.batch_norm(),
        "embedding": L.embedding(3, 2), "rnn": L.rnn(2), "lstm": L.lstm(2), "gru": L.gru(2),
        "multi_head_attention": L.multi_head_attention(2),
        "cross_attention": L.cross_attention(2), "transformer_block": L.transformer_block(2, 3),
        "positional_embedding": L.positional_embedding(3),
        "tied_embedding": L.tied_embedding(3, 2, d),
        "transformer_encoder_layer": L.transformer_encoder_layer(4, 2, 5),
        "transformer_decoder_layer": L.transformer_decoder_layer(4, 2, 5),
        "bidirectional": L.bidirectional(L.lstm(2)),
    }
    assert set(built) == set(L.__all__) - {"INITIALIZERS", "out_shape"}
    assert [n for n, layer in built.items() if layer.jvp is None] == []
