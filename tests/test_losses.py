"""Losses: hand-written grad vs jax.grad vs finite differences, values vs hand/numpy, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funnn import losses
from funnn.core import ConfigError, DataError, DTypeError, ShapeError

CASES = [(loss, r) for loss in losses.ALL for r in losses.REDUCTIONS]
IDS = [f"{loss.name}-{r}" for loss, r in CASES]
BATCHES = [(), (1,), (3,), (2, 2)]          # few shapes: JAX compiles per shape


def make_pair(loss, batch, k, seed, kind="probs"):
    """Random (pred, target) for ``loss`` with batch axes ``batch`` and ``k`` features."""
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=batch + (k,)) * 2.0
    if loss is losses.softmax_cross_entropy or loss.name == "softmax_cross_entropy":
        if kind == "labels":
            return pred, rng.integers(0, k, size=batch)
        t = rng.uniform(0.1, 1.0, size=batch + (k,))
        return pred, t / t.sum(-1, keepdims=True)
    if loss.name == "binary_cross_entropy":
        return pred, rng.uniform(0.0, 1.0, size=batch + (k,))
    return pred, rng.normal(size=batch + (k,))


def central_fd(f, x, h=1e-6):
    """Central differences of scalar f at every element of x, batched with vmap."""
    e = jnp.eye(x.size, dtype=x.dtype).reshape((x.size,) + x.shape) * h
    return ((jax.vmap(f)(x + e) - jax.vmap(f)(x - e)) / (2 * h)).reshape(x.shape)


@functools.partial(jax.jit, static_argnums=0)
def oracles(loss, pred, t):
    """(jax.grad of loss.value, central differences of loss.value), one compile per shape."""
    return jax.grad(loss.value)(pred, t), central_fd(lambda p: loss.value(p, t), pred)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("loss,reduction", CASES, ids=IDS)
@settings(max_examples=6)
@given(batch=st.sampled_from(BATCHES), k=st.sampled_from([1, 3]),
       kind=st.sampled_from(["labels", "probs"]), seed=st.integers(0, 2**31 - 1))
def test_grad_three_ways(loss, reduction, batch, k, kind, seed):
    loss = loss.with_reduction(reduction)
    pred, t = make_pair(loss, batch, k, seed, kind)
    pred = jnp.asarray(pred)
    manual = loss.grad(pred, t)
    auto, fd = oracles(loss, pred, t)
    assert manual.shape == pred.shape and manual.dtype == pred.dtype
    np.testing.assert_allclose(manual, auto, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(manual, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss,reduction", CASES, ids=IDS)
def test_jit_equals_eager(loss, reduction):
    loss = loss.with_reduction(reduction)
    pred, t = make_pair(loss, (3,), 3, 0, "labels")
    np.testing.assert_allclose(jax.jit(loss.value)(pred, t), loss.value(pred, t), rtol=1e-14)
    np.testing.assert_allclose(jax.jit(loss.grad)(pred, t), loss.grad(pred, t), rtol=1e-14)
    # a Loss is hashable, so it can be a static argument
    g = jax.jit(lambda l, p, y: l.grad(p, y), static_argnums=0)(loss, pred, t)
    np.testing.assert_allclose(g, loss.grad(pred, t), rtol=1e-14)


def test_squared_error_sum_grad_is_delta_rule():
    o, t = jnp.array([[0.2, 0.7], [0.9, 0.1]]), jnp.array([[0.0, 1.0], [1.0, 0.0]])
    assert losses.squared_error.reduction == "sum"
    np.testing.assert_array_equal(losses.squared_error.grad(o, t), o - t)


# --------------------------------------------------------------------------- values


def test_squared_error_values():
    se = losses.squared_error
    assert se.value(jnp.array([[1.0, 2.0]]), jnp.zeros((1, 2))) == 2.5
    o, t = jnp.array([[1.0, 2.0], [3.0, 0.0]]), jnp.zeros((2, 2))
    assert se.value(o, t) == 2.5 + 4.5
    assert se.with_reduction("mean").value(o, t) == (2.5 + 4.5) / 2
    np.testing.assert_array_equal(se.with_reduction("mean").grad(o, t), o / 2)


def test_mse_values():
    o, t = jnp.array([[1.0, 2.0], [3.0, 0.0]]), jnp.zeros((2, 2))
    assert losses.mse.value(o, t) == (1 + 4 + 9 + 0) / 4          # mean over every element
    assert losses.mse.with_reduction("sum").value(o, t) == 14.0
    np.testing.assert_array_equal(losses.mse.grad(o, t), 2 * o / 4)


def test_cross_entropy_against_numpy():
    z, y = make_pair(losses.softmax_cross_entropy, (4,), 5, 1, "labels")
    ref = np.mean([-math.log(math.exp(z[i, y[i]]) / sum(math.exp(v) for v in z[i]))
                   for i in range(4)])
    np.testing.assert_allclose(losses.softmax_cross_entropy.value(z, y), ref, rtol=1e-12)
    onehot = np.eye(5)[y]
    np.testing.assert_allclose(losses.softmax_cross_entropy.value(z, onehot), ref, rtol=1e-12)
    np.testing.assert_allclose(losses.softmax_cross_entropy.grad(z, y),
                               losses.softmax_cross_entropy.grad(z, onehot), rtol=1e-14)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(losses.softmax_cross_entropy.grad(z, y), (p - onehot) / 4,
                               rtol=1e-12)


@pytest.mark.parametrize("c", [2, 10])
def test_cross_entropy_uniform_logits_is_log_c(c):
    z = jnp.full((3, c), 0.7)
    y = jnp.array([0, 1, c - 1])
    np.testing.assert_allclose(losses.softmax_cross_entropy.value(z, y), math.log(c), rtol=1e-14)


def test_binary_cross_entropy_against_numpy():
    z, t = make_pair(losses.binary_cross_entropy, (3,), 2, 2)
    s = 1 / (1 + np.exp(-z))
    ref = -t * np.log(s) - (1 - t) * np.log(1 - s)
    np.testing.assert_allclose(losses.binary_cross_entropy.value(z, t), ref.mean(), rtol=1e-12)
    bce_sum = losses.binary_cross_entropy.with_reduction("sum")
    np.testing.assert_allclose(bce_sum.value(z, t), ref.sum(), rtol=1e-12)
    np.testing.assert_allclose(bce_sum.grad(z, t), s - t, rtol=1e-12)
    assert losses.binary_cross_entropy.value(jnp.zeros(4), jnp.array([0, 1, 0, 1])) == \
        pytest.approx(math.log(2), rel=1e-14)


# --------------------------------------------------------------------------- stability


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cross_entropy_extreme_logits(dtype):
    z = jnp.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]], dtype)
    ce = losses.softmax_cross_entropy.with_reduction("sum")
    assert ce.value(z[:1], jnp.array([0])) == 0.0
    np.testing.assert_allclose(ce.value(z[:1], jnp.array([1])), 2e4, rtol=1e-6)
    np.testing.assert_allclose(ce.value(z[:1], jnp.array([2])), 1e4, rtol=1e-6)
    g = ce.grad(z, jnp.array([0, 1]))
    assert g.dtype == dtype
    np.testing.assert_allclose(g, [[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(jax.grad(ce.value)(z, jnp.array([0, 1])), g, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_binary_cross_entropy_extreme_logits(dtype):
    z = jnp.array([1e4, 1e4, -1e4, -1e4], dtype)
    t = jnp.array([1.0, 0.0, 1.0, 0.0], dtype)
    bce = losses.binary_cross_entropy.with_reduction("sum")
    terms = [bce.value(z[i:i + 1], t[i:i + 1]) for i in range(4)]
    np.testing.assert_allclose(terms, [0.0, 1e4, 1e4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(bce.grad(z, t), [0.0, 1.0, -1.0, 0.0], atol=1e-6)
    assert bce.grad(z, t).dtype == dtype


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("loss,reduction", CASES, ids=IDS)
def test_single_example_and_vmap(loss, reduction):
    loss = loss.with_reduction(reduction)
    pred, t = make_pair(loss, (4,), 3, 3, "labels")
    pred = jnp.asarray(pred)
    # one example, no batch axis
    v0 = loss.value(pred[0], t[0])
    assert v0.shape == ()
    per_ex = jax.vmap(loss.value)(pred, t)
    np.testing.assert_allclose(per_ex[0], v0, rtol=1e-14)
    # per-example gradients with vmap == a python loop == autodiff per example
    g = jax.vmap(loss.grad)(pred, t)
    loop = np.stack([loss.grad(pred[i], t[i]) for i in range(4)])
    np.testing.assert_allclose(g, loop, rtol=1e-14)
    np.testing.assert_allclose(g, jax.vmap(jax.grad(loss.value))(pred, t), rtol=1e-10,
                               atol=1e-14)
    # and they average (mean) or add up (sum) to the batch gradient
    scale = 1 / 4 if reduction == "mean" else 1.0
    np.testing.assert_allclose(g * scale, loss.grad(pred, t), rtol=1e-12)
    np.testing.assert_allclose(per_ex.sum() * scale, loss.value(pred, t), rtol=1e-12)


def test_reduction_counts_examples_or_elements():
    pred, t = jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))
    assert losses.squared_error.with_reduction("mean").value(pred, t) == 2.0   # 6 examples
    assert losses.mse.value(pred, t) == 1.0                                   # 24 elements
    with pytest.raises(ShapeError, match="empty batch"):
        losses.mse.value(jnp.zeros((0, 3)), jnp.zeros((0, 3)))
    assert losses.mse.with_reduction("sum").value(jnp.zeros((0, 3)), jnp.zeros((0, 3))) == 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [[0, 3], [-1, 0]])
def test_labels_out_of_range(bad):
    z = jnp.zeros((2, 3))
    for fn in (losses.softmax_cross_entropy.value, losses.softmax_cross_entropy.grad,
               losses.accuracy):
        with pytest.raises(DataError, match=r"\[0, 3\).*min .*max"):
            fn(z, jnp.array(bad))


def test_small_unsigned_labels_with_many_classes():
    z, y = jnp.zeros((2, 300)), np.array([1, 255], np.uint8)
    ce = losses.softmax_cross_entropy
    np.testing.assert_allclose(jax.jit(ce.value)(z, y), math.log(300), rtol=1e-14)
    np.testing.assert_allclose(ce.grad(z, y), ce.grad(z, y.astype(int)), rtol=1e-14)


def test_labels_out_of_range_under_jit_are_nan_not_clamped():
    z, y = jnp.zeros((2, 3)), jnp.array([1, 3])
    ce = losses.softmax_cross_entropy
    assert jnp.isnan(jax.jit(ce.value)(z, y))
    g = jax.jit(ce.grad)(z, y)
    assert jnp.all(jnp.isfinite(g[0])) and jnp.all(jnp.isnan(g[1]))


@pytest.mark.parametrize("loss", losses.ALL, ids=lambda l: l.name)
def test_shape_mismatch(loss):
    pred = jnp.zeros((2, 3))
    for t in (jnp.zeros((2, 4)), jnp.zeros((3, 2)), jnp.zeros((1, 3)), jnp.zeros((2, 3, 1))):
        for fn in (loss.value, loss.grad):
            with pytest.raises(ShapeError, match=rf"{loss.name}.*\(2, 3\).*{tuple(t.shape)}"):
                fn(pred, t)


def test_dtype_errors():
    ce = losses.softmax_cross_entropy
    with pytest.raises(DTypeError, match=r"softmax_cross_entropy.*integers.*float"):
        ce.value(jnp.zeros((2, 3)), jnp.array([0.0, 1.0]))
    with pytest.raises(DTypeError, match=r"mse.*floating"):
        losses.mse.value(jnp.zeros((2, 3), int), jnp.zeros((2, 3)))
    with pytest.raises(ShapeError, match=r"softmax_cross_entropy.*rank >= 1"):
        ce.value(jnp.float64(1.0), jnp.array(0))


def test_bad_reduction_and_unknown_name():
    with pytest.raises(ConfigError, match=r"mse: unknown reduction 'avg'.*'sum', 'mean'"):
        losses.mse.with_reduction("avg")
    with pytest.raises(ConfigError, match=r"unknown loss 'nll'.*'squared_error'.*'mse'"):
        losses.get("nll")
    with pytest.raises(ConfigError, match="unknown reduction"):
        losses.get("mse", "avg")
    with pytest.raises(ConfigError, match="unknown loss"):
        losses.get(["mse"])


def test_get():
    for loss in losses.ALL:
        assert losses.get(loss.name) is loss
        assert losses.get(loss) is loss
    assert losses.get("softmax_cross_entropy", "sum").reduction == "sum"
    assert losses.softmax_cross_entropy.reduction == "mean"      # the original is unchanged
    assert losses.mse.with_reduction("sum") == losses.get("mse", "sum")


# --------------------------------------------------------------------------- accuracy


def test_accuracy():
    z = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0]])
    y = jnp.array([0, 2, 0, 1])
    assert losses.accuracy(z, y) == 0.5
    assert losses.accuracy(z, jnp.eye(3)[y]) == 0.5
    assert losses.accuracy(z[0], y[0]) == 1.0 and losses.accuracy(z[2], y[2]) == 0.0
    assert losses.accuracy(z.reshape(2, 2, 3), y.reshape(2, 2)) == 0.5
    with pytest.raises(ShapeError, match="accuracy"):
        losses.accuracy(z, y[:3])


# --------------------------------------------------------------------------- masks and weights


def _reference_terms(loss, pred, t):
    """Each loss's unreduced terms written again, independently of funnn (for autodiff)."""
    if loss.name == "softmax_cross_entropy":
        logp = jax.nn.log_softmax(pred)
        if t.ndim < pred.ndim:
            return -jnp.take_along_axis(logp, t[..., None], -1)[..., 0]
        return -jnp.sum(t * logp, -1)
    if loss.name == "binary_cross_entropy":
        return -t * jax.nn.log_sigmoid(pred) - (1 - t) * jax.nn.log_sigmoid(-pred)
    if loss.name == "mse":
        return (pred - t) ** 2
    return 0.5 * jnp.sum((pred - t) ** 2, -1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _weighted_reference(loss, mean, pred, t, wt):
    """The batch value and gradient of ``sum(wt f) / sum(wt)`` (or ``sum(wt f)``) and each
    example's alone (divided by its own weights), by jax.grad of the reference terms."""
    def one(p, t, w):
        den = jnp.sum(w) if mean else 1.0
        return jnp.sum(w * _reference_terms(loss, p, t)) / jnp.where(den == 0, 1.0, den)
    batch = jax.value_and_grad(one)(pred, t, wt)
    return batch, jax.vmap(jax.value_and_grad(one))(pred, t, wt)


@pytest.mark.parametrize("loss,reduction", [
    (losses.softmax_cross_entropy, "mean"), (losses.mse, "sum"),   # per example, per element
    *(pytest.param(l, r, marks=pytest.mark.slow) for l, r in CASES
      if (l.name, r) not in (("softmax_cross_entropy", "mean"), ("mse", "sum")))],
    ids=lambda v: getattr(v, "name", v))
def test_weighted_losses_hand_written_grad_equals_autodiff(loss, reduction):
    """value = sum(w f) / sum(w) ("mean") or sum(w f) ("sum"), for per-example (B,) and per-token
    (B, T) weights (and per-element (B, T, K) for element losses); the hand-written grad and
    per-example rows against jax.grad of an independent float64 reference."""
    rng = np.random.default_rng(1)
    loss = loss.with_reduction(reduction)
    pred, t = make_pair(loss, (3, 4), 5, 1, "labels")
    pred, t = jnp.asarray(pred), jnp.asarray(t)
    terms = pred.shape if loss.per == "element" else pred.shape[:-1]
    for shape in sorted({(3,), (3, 4), terms}):
        w = jnp.asarray(rng.uniform(0, 2, shape) * (rng.uniform(size=shape) > 0.3))
        wt = jnp.broadcast_to(w.reshape(shape + (1,) * (len(terms) - len(shape))), terms)
        (value, grad), (values, deltas) = _weighted_reference(loss, reduction == "mean",
                                                              pred, t, wt)
        np.testing.assert_allclose(loss.value(pred, t, weights=w), value, rtol=1e-12)
        np.testing.assert_allclose(loss.grad(pred, t, weights=w), grad, rtol=1e-10, atol=1e-15)
        got_values, got_deltas = loss.per_example(pred, t, weights=w)
        np.testing.assert_allclose(got_values, values, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_deltas, deltas, rtol=1e-10, atol=1e-15)
    # unit weights change nothing
    np.testing.assert_allclose(loss.value(pred, t, weights=jnp.ones(3)), loss.value(pred, t),
                               rtol=1e-14)


def test_ignore_index_averages_over_valid_tokens_only():
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(3, 4, 5)))
    y = rng.integers(0, 5, (3, 4))
    y[0, 3], y[2, 1:] = -100, -100               # 3 + 4 + 1 = 8 valid tokens
    valid = y != -100
    ce = losses.softmax_cross_entropy.with_ignore_index()
    assert ce.ignore_index == -100 and "ignore_index=-100" in repr(ce)

    @jax.value_and_grad
    def ref(z):   # PyTorch's CrossEntropyLoss(ignore_index=-100): mean over valid tokens
        logp = jax.nn.log_softmax(z)
        picked = jnp.take_along_axis(logp, jnp.where(valid, y, 0)[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(valid, picked, 0)) / 8

    value, grad = jax.jit(ref)(z)
    np.testing.assert_allclose(ce.value(z, y), value, rtol=1e-13)
    g = ce.grad(z, y)
    np.testing.assert_allclose(g, grad, rtol=1e-10, atol=1e-16)
    assert not np.any(np.asarray(g)[~valid])                  # ignored rows: exactly 0
    # the same as 0/1 weights; per example: each divided by its own valid count
    np.testing.assert_allclose(losses.softmax_cross_entropy.value(
        z, np.where(valid, y, 0), weights=valid), value, rtol=1e-14)
    values, _ = ce.per_example(z, y)
    np.testing.assert_allclose(values[2], -jax.nn.log_softmax(z[2, 0])[y[2, 0]], rtol=1e-13)
    # nothing valid: loss 0, gradient 0
    none = jnp.full((3, 4), -100)
    assert float(ce.value(z, none)) == 0.0 and not np.any(np.asarray(ce.grad(z, none)))
    # accuracy over the valid tokens only
    hits = (np.argmax(np.asarray(z), -1) == y) & valid
    assert float(losses.accuracy(z, y, ignore_index=-100)) == pytest.approx(hits.sum() / 8)


def test_mask_and_weight_errors():
    z, y = jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), int)
    ce = losses.softmax_cross_entropy
    with pytest.raises(ShapeError, match=r"weights of shape \(3,\).*terms' shape \(2, 3\)"):
        ce.value(z, y, weights=jnp.ones(3))
    with pytest.raises(DataError, match="weights must be >= 0"):
        ce.grad(z, y, weights=-jnp.ones((2, 3)))
    with pytest.raises(ConfigError, match="mse: ignore_index needs integer class labels"):
        losses.mse.with_ignore_index(-100)
    with pytest.raises(ConfigError, match="ignore_index must be an int"):
        ce.with_ignore_index(0.5)
    with pytest.raises(ConfigError, match="need a funnn Loss"):
        losses.weighted(lambda p, t: 0.0, jnp.ones(2))
    with pytest.raises(DataError, match=r"labels must lie in \[0, 4\)"):
        ce.value(z, y - 100)            # -100 is a bad label unless the loss ignores it
    assert ce.with_ignore_index(None) == ce and ce.with_ignore_index().with_ignore_index(None) == ce
    assert losses.split_side({"mask": 1, "weights": 2}) == (2, {"mask": 1})
