"""funnn/gradcheck.py: manual vs autodiff vs finite differences, leaf by leaf, and a report
that names the leaf a wrong backward got wrong and by how much."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import autodiff, core, gradcheck, losses, manual
from funnn import layers as L


def _data(shape_x, shape_y, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, shape_x), jax.random.normal(ky, shape_y)


def test_a_wrong_bias_gradient_is_reported_on_its_leaf_with_its_difference():
    """A dense whose backward adds 0.5 to every bias gradient, second in a stack: only leaf
    ``1.b`` fails, its manual~autodiff difference is exactly 0.5, and autodiff still agrees
    with finite differences there (the fault is the hand-written rule, not the loss)."""
    good = L.dense(2)

    def off_by_half(p, res, dy):
        grads, dx = good.backward(p, res, dy)
        return {"W": grads["W"], "b": grads["b"] + 0.5}, dx

    model = L.serial(L.dense(3), core.Layer("off_by_half", good.init, good.apply, good.forward,
                                            off_by_half))
    _, params = model.init(jax.random.key(0), (None, 4))
    x, y = _data((5, 4), (5, 2))
    report = gradcheck.compare(model, losses.squared_error, params, x, y)
    assert report.method == "full" and not report.ok
    assert [leaf.path for leaf in report.leaves] == ["0.W", "0.b", "1.W", "1.b"]
    assert [leaf.path for leaf in report.failures()] == ["1.b"]
    bad = report.failures()[0]
    assert bad.shape == (2,)
    np.testing.assert_allclose(bad.abs_err["manual~autodiff"], 0.5, rtol=1e-9)
    np.testing.assert_allclose(bad.abs_err["manual~fd"], 0.5, rtol=1e-4)
    assert bad.rel_err["autodiff~fd"] <= 1e-6
    assert all(leaf.rel_err["manual~autodiff"] <= 1e-10 for leaf in report.leaves[:3])
    text = str(report)
    assert text.splitlines()[-1].endswith("1 disagree")
    assert [line.split()[-1] for line in text.splitlines()[2:6]] == ["yes", "yes", "yes", "NO"]
    d = report.to_dict()
    assert d["ok"] is False and d["leaves"][3]["path"] == "1.b" and not d["leaves"][3]["ok"]


def test_compare_rejects_an_unknown_fd_mode():
    model = L.dense(2)
    _, params = model.init(jax.random.key(0), (None, 3))
    x, y = _data((4, 3), (4, 2))
    with pytest.raises(ValueError, match=r"^gradcheck\.compare: fd must be 'auto', 'full', "
                                         r"'directional' or 'none', got 'exact'"):
        gradcheck.compare(model, losses.squared_error, params, x, y, fd="exact")


@pytest.mark.slow
def test_gradcheck_detects_a_wrong_backward():
    good = L.dense(2)
    bad = core.Layer("bad", good.init, good.apply, good.forward,
                     lambda p, res, dy: ({"W": 2 * good.backward(p, res, dy)[0]["W"],
                                          "b": good.backward(p, res, dy)[0]["b"]},
                                         good.backward(p, res, dy)[1]))
    _, params = bad.init(jax.random.key(0), (None, 3))
    x, y = _data((4, 3), (4, 2))
    report = gradcheck.compare(bad, losses.squared_error, params, x, y)
    assert not report.ok
    assert [l.path for l in report.failures()] == ["W"]
    assert "NO" in str(report)
    report = gradcheck.compare(bad, losses.squared_error, params, x, y, fd="directional")
    assert not report.ok


@pytest.mark.slow
def test_gradcheck_stateful_network_with_a_zero_gradient_leaf():
    """conv -> batch_norm -> ... -> dropout: state and key are threaded through all three
    engines; the conv bias before batch-norm has a true gradient of zero, which the
    report judges by absolute error rather than calling it a mismatch."""
    model = L.serial(L.conv2d(3, (3, 3), padding="SAME"), L.batch_norm(), L.activation("relu"),
                     L.max_pool((2, 2)), L.flatten(), L.dropout(0.3), L.dense(4))
    _, params = model.init(jax.random.key(0), (None, 6, 6, 2))
    state = model.init_state((None, 6, 6, 2))
    x = jax.random.normal(jax.random.key(1), (5, 6, 6, 2))
    y = jnp.array([0, 1, 2, 3, 0])
    key = jax.random.key(7)
    loss = losses.softmax_cross_entropy
    (la, sa), ga = autodiff.value_and_grad(model, loss)(params, x, y, key=key, state=state)
    (lb, sb), gb = jax.jit(autodiff.value_and_grad(manual.bridge(model), loss))(
        params, x, y, key=key, state=state)
    np.testing.assert_allclose(lb, la, rtol=1e-12)
    chex.assert_trees_all_close((gb, sb), (ga, sa), rtol=1e-10, atol=1e-14)
    assert float(jnp.max(jnp.abs(ga[0]["b"]))) < 1e-12
    report = gradcheck.compare(model, loss, params, x, y, key=key, state=state)
    assert report.ok, str(report)


@pytest.mark.slow
def test_side_inputs_and_loss_weights_reach_the_model_and_the_loss():
    """compare(..., side={"mask": ..., "weights": ...}) on a padded causal LM with ignore_index
    targets: the mask goes to attention, the per-example weights to the loss; three ways agree,
    the reported loss is the hand-written masked one, and a wrong side is named."""
    from _padded import tiny_lm
    model, params, x, y, mask = tiny_lm()
    ce = losses.softmax_cross_entropy.with_ignore_index()
    w = np.array([1.0, 0.0, 2.0, 0.5])          # per example, times each valid token
    report = gradcheck.compare(model, ce, params, x, y, side={"mask": mask, "weights": w},
                               fd="full")
    assert report.ok, str(report)

    @jax.jit
    def ref(p):
        tok = w[:, None] * (y != -100)
        logp = jax.nn.log_softmax(model.apply(p, x, mask=mask))
        nll = -jnp.take_along_axis(logp, jnp.where(y < 0, 0, y)[..., None], -1)[..., 0]
        return (tok * nll).sum() / tok.sum()

    assert report.loss == pytest.approx(float(ref(params)), rel=1e-12)
    with pytest.raises(core.ConfigError, match="gradcheck: side must be a dict"):
        gradcheck.compare(model, ce, params, x, y, side=[mask])
    with pytest.raises(core.ConfigError, match="got lengths_=, but"):
        gradcheck.compare(model, ce, params, x, y, side={"lengths_": mask.sum(1)})


@pytest.mark.slow   # ~2.3 CPU-s; summary names the fallback in the fast tier
def test_compare_per_example_names_the_vmap_fallback_and_catches_a_wrong_rule():
    """compare_per_example: rules (and vmap of the backward for layers without one) against
    autodiff's per-example gradients in float64; the report names the fallback layers; a
    rule that is off by a factor fails on its leaf and on the norms."""
    import dataclasses

    from funnn.core import Layer
    dense = L.dense(2)
    bare = Layer("custom", dense.init, dense.apply, dense.forward, dense.backward)
    model = L.serial(L.dense(3), L.activation("tanh"), L.dropout(0.5), bare)
    _, p = model.init(jax.random.key(0), (None, 4))
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jnp.arange(5) % 2
    xent = losses.softmax_cross_entropy
    r = gradcheck.compare_per_example(model, xent, p, x, y, key=jax.random.key(3))
    assert r.ok and r.vmapped == ("[3] custom",) and len(r.leaves) == 5
    assert "no per-example rule: [3] custom use vmap of their own backward" in str(r)
    assert r.to_dict()["vmapped"] == ["[3] custom"]

    def doubled(params, res, dy):
        g, dx = dense.per_example(params, res, dy)
        return {**g, "W": 2 * g["W"]}, dx

    wrong = dataclasses.replace(dense, per_example=doubled, name="wrong")
    bad = gradcheck.compare_per_example(L.serial(L.dense(3), wrong), xent, p[:1] + p[3:],
                                        x, y, train=False)
    assert [l.path for l in bad.failures()] == ["1.W"] and bad.vmapped == ()
