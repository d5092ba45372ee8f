"""Training loop: learning, engine agreement, resume, one compile, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from funnn import checkpoint, data, losses, models, train
from funnn import layers as L
from funnn.core import ConfigError, DataError


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _small_mlp():
    return L.serial(L.dense(16), L.activation("tanh"), L.dense(10))


def test_fit_learns_the_digits(digits):
    tr, te = digits
    model = models.mlp(10)
    _, params = model.init(jax.random.key(0), (None, 64))
    before = train.evaluate(model, losses.softmax_cross_entropy, params, te.x, te.y)
    result = train.fit(model, params, tr, losses.softmax_cross_entropy, "adam",
                       learning_rate=3e-3, epochs=4, batch_size=64, eval_data=te, progress=False)
    h = result.history
    assert [r["epoch"] for r in h] == [1, 2, 3, 4]
    assert h[-1]["train_loss"] < h[0]["train_loss"] < before[0]
    assert h[-1]["eval_accuracy"] > 0.9 > before[1]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_three_engines_same_trajectory(digits, optimizer):
    tr, _ = digits
    x, y = tr.x[:96].astype(jnp.float64), tr.y[:96]
    model = L.serial(L.dense(8), L.activation("sigmoid"), L.dropout(0.2), L.dense(10))
    _, p0 = model.init(jax.random.key(0), (None, 64))
    finals = {}
    for engine in train.ENGINES:
        r = train.fit(model, p0, (x, y), losses.softmax_cross_entropy, optimizer,
                      learning_rate=0.05, epochs=2, batch_size=32, engine=engine,
                      key=jax.random.key(3), progress=False)
        finals[engine] = r
    ref = finals["autodiff"]
    for engine in ("manual", "bridge"):
        for a, b in zip(jax.tree_util.tree_leaves(finals[engine].params),
                        jax.tree_util.tree_leaves(ref.params)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose([r["train_loss"] for r in finals[engine].history],
                                   [r["train_loss"] for r in ref.history], rtol=1e-10)


def test_batch_norm_state_is_threaded(digits):
    tr, te = digits
    model = L.serial(L.dense(16), L.batch_norm(), L.activation("relu"), L.dense(10))
    _, params = model.init(jax.random.key(0), (None, 64))
    r = train.fit(model, params, tr, losses.softmax_cross_entropy, "adam", learning_rate=1e-2,
                  epochs=2, batch_size=64, eval_data=te, progress=False)
    s0 = model.init_state((None, 64))
    moved = r.model_state[1]["mean"]
    assert not np.allclose(moved, s0[1]["mean"])
    assert r.history[-1]["eval_accuracy"] > 0.8


def test_resume_equals_uninterrupted(tmp_path, digits):
    tr, _ = digits
    x, y = tr.x[:128], tr.y[:128]
    model = _small_mlp()
    _, p0 = model.init(jax.random.key(0), (None, 64))
    kw = dict(learning_rate=1e-2, batch_size=32, key=jax.random.key(5), progress=False)
    full = train.fit(model, p0, (x, y), losses.softmax_cross_entropy, "adam", epochs=4,
                     checkpoint_dir=tmp_path / "a", **kw)
    train.fit(model, p0, (x, y), losses.softmax_cross_entropy, "adam", epochs=2,
              checkpoint_dir=tmp_path / "b", **kw)
    assert checkpoint.latest(tmp_path / "b").endswith("ckpt_00000002.safetensors")
    resumed = train.fit(model, p0, (x, y), losses.softmax_cross_entropy, "adam", epochs=4,
                        checkpoint_dir=tmp_path / "b", resume=True, **kw)
    for a, b in zip(jax.tree_util.tree_leaves((full.params, full.opt_state)),
                    jax.tree_util.tree_leaves((resumed.params, resumed.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_epoch_compiles_once():
    model = _small_mlp()
    _, params = model.init(jax.random.key(0), (None, 64))
    traces = []
    loss = losses.softmax_cross_entropy
    base = train.make_step(model, loss, optax.sgd(0.1))

    def counting(ts, x, y, key):
        traces.append(1)
        return base(ts, x, y, key)

    step = jax.jit(counting, donate_argnums=0)
    ts = train.TrainState(params, optax.sgd(0.1).init(params), None)
    x, y = jnp.ones((8, 64)), jnp.zeros(8, jnp.int32)
    for i in range(3):
        ts, _ = step(ts, x, y, jax.random.key(i))
    assert len(traces) == 1
    epoch = train.make_epoch(model, loss, optax.sgd(0.1), "manual", 4, 8)
    epoch(ts, x, y, jax.random.key(0))
    assert epoch._cache_size() == 1


@pytest.mark.parametrize("kw, match", [
    (dict(epochs=0), "epochs"), (dict(batch_size=-1), "batch_size"),
    (dict(learning_rate=0.0), "learning rate"), (dict(optimizer="adamax"), "unknown optimizer"),
    (dict(engine="symbolic"), "unknown engine"), (dict(batch_size=10_000), "exceeds")])
def test_bad_arguments(kw, match):
    model = _small_mlp()
    _, params = model.init(jax.random.key(0), (None, 64))
    args = dict(learning_rate=0.1, epochs=1, batch_size=4, progress=False)
    args.update(kw)
    opt = args.pop("optimizer", "sgd")
    with pytest.raises(ConfigError, match=match):
        train.fit(model, params, (jnp.ones((8, 64)), jnp.zeros(8, jnp.int32)),
                  losses.softmax_cross_entropy, opt, **args)


def test_seed_sigmoid_recipe_learns(digits):
    """The classic curriculum network, a few epochs (the README has the full run)."""
    tr, te = digits
    recipe = models.get("sigmoid")
    x, y = models.prepare(recipe, tr)
    ex, ey = models.prepare(recipe, te)
    assert y.shape == (tr.n, 10)
    model = recipe.build(10)
    _, params = model.init(jax.random.key(0), (None, 64))
    r = train.fit(model, params, (x, y), recipe.loss, recipe.optimizer,
                  learning_rate=recipe.learning_rate, epochs=5, batch_size=recipe.batch_size,
                  eval_data=(ex, ey), progress=False)
    assert r.history[-1]["eval_accuracy"] > 0.8


def test_labels_out_of_range_are_caught_before_training():
    model = _small_mlp()
    _, params = model.init(jax.random.key(0), (None, 64))
    x = jnp.ones((16, 64))
    with pytest.raises(DataError,
                       match=r"labels must lie in \[0, 10\).*max 15"):
        train.fit(model, params, (x, jnp.arange(16)), losses.softmax_cross_entropy,
                  epochs=1, batch_size=4, progress=False)
    with pytest.raises(DataError, match="evaluation labels"):
        train.fit(model, params, (x, jnp.zeros(16, jnp.int32)), losses.softmax_cross_entropy,
                  epochs=1, batch_size=4, progress=False, eval_data=(x, -jnp.ones(16, jnp.int32)))


def test_evaluate_compiles_once_and_learning_rate_types():
    model = _small_mlp()
    _, params = model.init(jax.random.key(0), (None, 64))
    x, y = jnp.ones((8, 64)), jnp.zeros(8, jnp.int32)
    train.evaluate(model, losses.softmax_cross_entropy, params, x, y)
    train.evaluate(model, losses.softmax_cross_entropy, params, x, y)
    assert train.make_evaluate(model, losses.softmax_cross_entropy)._cache_size() == 1
    assert isinstance(train.get_optimizer("sgd", np.float32(0.1)), optax.GradientTransformation)
    for bad in (True, float("inf"), float("nan"), "fast", -1):
        with pytest.raises(ConfigError, match="learning rate"):
            train.get_optimizer("sgd", bad)
