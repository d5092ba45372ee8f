"""Training loop: learning, engine agreement, resume, one compile, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _runs import XOR, leaves, main, tiny, tree_astype

from funnn import checkpoint, data, losses, models, train
from funnn import layers as L
from funnn.core import ConfigError, DataError


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _small_mlp():
    return L.serial(L.dense(16), L.activation("tanh"), L.dense(10))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----- moved from tests/test_runs.py


@pytest.mark.slow
def test_from_checkpoint_starts_a_new_run_from_its_weights(xor_run, tmp_path):
    path = checkpoint.latest(xor_run / "checkpoints")
    ck = checkpoint.restore(path)
    from funnn import models
    model = models.get("mlp").build(2)
    x, y = models.prepare(models.get("mlp"), data.load("xor")[0])
    res = train.fit(model, None, (x, y), "softmax_cross_entropy", "sgd", learning_rate=1e-30,
                    epochs=1, batch_size=4, progress=False, from_checkpoint=path)
    for a, b in zip(leaves(res.params), leaves(ck.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _counter_model():
    """``y = x W + b`` on x = 1, trained by a loss that rewards growth and turns NaN once the
    mean output passes 1: each SGD step raises it by 0.2, so epoch 6 is the first to see NaN."""
    import jax.numpy as jnp

    from funnn import layers as L

    model = L.dense(1, w_init="zeros")

    def loss(pred, y):
        s = pred.mean()
        return jnp.where(s > 1.0, jnp.nan, -s)

    return model, loss


@pytest.mark.slow
def test_fit_keeps_the_last_finite_checkpoint_and_raises_with_history(tmp_path):
    import jax
    model, loss = _counter_model()
    _, params = model.init(jax.random.key(0), (None, 1))
    x, y = np.ones((4, 1), np.float32), np.zeros((4, 1), np.float32)
    with pytest.raises(train.TrainingDiverged) as info:
        train.fit(model, params, (x, y), loss, "sgd", learning_rate=0.1, epochs=20,
                  batch_size=4, progress=False, checkpoint_dir=tmp_path / "c")
    err = info.value
    assert err.epoch == 7 and err.quantity == "training loss"
    assert [r["epoch"] for r in err.history] == list(range(1, 8))
    assert np.isnan(err.history[-1]["train_loss"])
    assert all(np.isfinite(r["train_loss"]) for r in err.history[:-1])
    assert checkpoint.latest(tmp_path / "c").endswith("ckpt_00000006.safetensors")
    assert err.checkpoint == checkpoint.latest(tmp_path / "c")
    assert np.isfinite(np.asarray(checkpoint.restore(err.checkpoint).params["W"])).all()


def _one_dense(w):
    from funnn import layers as L
    model = L.serial(L.dense(1))
    params = ({"W": np.full((1, 1), w, np.float32), "b": np.zeros(1, np.float32)},)
    return model, params


@pytest.mark.slow
def test_check_numerics_names_the_layer_and_step():
    import jax.numpy as jnp
    x, y = np.full((8, 1), 10.0, np.float32), np.zeros((8, 1), np.float32)
    kw = dict(epochs=2, batch_size=4, progress=False, check_numerics=True)
    # an output overflows float32: 10 * 1e38
    model, params = _one_dense(1e38)
    with pytest.raises(train.TrainingDiverged) as info:
        train.fit(model, params, (x, y), "mse", "sgd", learning_rate=1e-3, **kw)
    assert str(info.value).startswith("fit: step 1 (epoch 1, batch 1): the output of "
                                      "serial[0] dense(1) became non-finite")
    assert info.value.step == 1 and info.value.where == "the output of serial[0] dense(1)"
    # outputs and loss finite, the weight gradient overflows: x * dL/dy = 1e30 * 2e10
    model, params = _one_dense(1e-20)
    big = np.full((8, 1), 1e30, np.float32)
    with pytest.raises(train.TrainingDiverged, match=r"step 1 .*the gradient of serial\[0\] "
                       r"dense\(1\) \(parameter W\)"):
        train.fit(model, params, (big, y), lambda p, t: jnp.sum(p ** 2), "sgd",
                  learning_rate=1e-3, **kw)
    # a loss that is non-finite on finite outputs is named as such, at its step
    model, loss = _counter_model()
    with pytest.raises(train.TrainingDiverged, match=r"step 7 \(epoch 7, batch 1\): the loss "
                       r"\(on finite outputs"):
        train.fit(model, {"W": np.zeros((1, 1), np.float32), "b": np.zeros(1, np.float32)},
                  (np.ones((4, 1), np.float32), np.zeros((4, 1), np.float32)), loss, "sgd",
                  learning_rate=0.1, epochs=20, batch_size=4, progress=False,
                  check_numerics=True)


@pytest.mark.slow
def test_learning_rate_must_be_finite_in_float32(tmp_path, capsys):
    code, _, err = main(["train", *XOR, "--lr", "1e39", "--out", str(tmp_path / "D")], capsys)
    assert code == 2 and "finite in float32" in err
    model, params, xy = tiny()
    params = tree_astype(params, np.float32)
    with pytest.raises(train.ConfigError, match="not finite in the parameters' dtype float32"):
        train.fit(model, params, xy, "mse", "sgd", learning_rate=1e39, progress=False,
                  batch_size=4)


@pytest.mark.slow
def test_documented_restore_works_on_fit_checkpoints(tmp_path):
    import jax
    import optax
    model, params, xy = tiny()
    train.fit(model, params, xy, "mse", "adam", learning_rate=1e-2, epochs=2, batch_size=4,
              progress=False, checkpoint_dir=tmp_path / "c")
    opt = optax.adam(1e-2)
    ck = checkpoint.restore(checkpoint.latest(tmp_path / "c"),
                            like={"params": params, "opt_state": opt.init(params)})
    assert ck.step == 2 and type(ck.opt_state[0]).__name__ == "ScaleByAdamState"
    run = train.restore_run(tmp_path / "c", model)
    assert isinstance(run.opt_state[0], optax.ScaleByAdamState)
    grads = jax.tree_util.tree_map(lambda p: p * 0 + 1, run.params)
    updates, _ = train.get_optimizer("adam", 1e-2).update(grads, run.opt_state, run.params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(run.params)


@pytest.mark.slow
def test_optax_object_with_learning_rate_is_refused():
    import optax
    model, params, xy = tiny()
    for kw in ({"learning_rate": 0.1}, {"schedule": "cosine"}):
        with pytest.raises(train.ConfigError, match="optax optimizer carries its own"):
            train.fit(model, params, xy, "mse", optax.sgd(0.1), progress=False, batch_size=4,
                      **kw)
    res = train.fit(model, params, xy, "mse", optax.sgd(0.1), progress=False, batch_size=4,
                    epochs=1)
    assert res.config["optimizer"] == "optax:GradientTransformationExtraArgs"


@pytest.mark.slow
def test_loss_as_name_or_callable():
    import jax.numpy as jnp
    model, params, xy = tiny()
    kw = dict(epochs=2, batch_size=4, progress=False, learning_rate=0.1)
    by_obj = train.fit(model, params, xy, train.losses.mse, "sgd", **kw)
    by_name = train.fit(model, params, xy, "mse", "sgd", **kw)
    by_fn = train.fit(model, params, xy, lambda p, t: jnp.mean((p - t) ** 2), "sgd", **kw)
    bridge = train.fit(model, params, xy, lambda p, t: jnp.mean((p - t) ** 2), "sgd",
                       engine="bridge", **kw)
    for other in (by_name, by_fn, bridge):
        np.testing.assert_allclose(other.history[-1]["train_loss"],
                                   by_obj.history[-1]["train_loss"], rtol=1e-5)
    with pytest.raises(train.ConfigError, match=r"manual engine needs .*\.grad"):
        train.fit(model, params, xy, lambda p, t: jnp.mean((p - t) ** 2), "sgd",
                  engine="manual", **kw)
    with pytest.raises(train.ConfigError, match="unknown loss"):
        train.fit(model, params, xy, "hinge", "sgd", **kw)


def test_fit_on_empty_data():
    model, params, _ = tiny()
    x = np.zeros((0, 2), np.float32)
    with pytest.raises(train.DataError, match="training data is empty"):
        train.fit(model, params, (x, x[:, :1]), "mse", "sgd", progress=False)


# ----- the pieces fit is made of


@pytest.mark.slow
def test_settings_are_resolved_once_and_print_as_the_config():
    from funnn.train.settings import fingerprint
    model, params, xy = tiny()
    s, (x, _), held_out = train.resolve(
        model, params, xy, "mse", "adam", learning_rate=None, epochs=3, batch_size=4,
        engine="manual", schedule="cosine", eval_data=None, check_numerics=False, mesh=None,
        sharding="replicated", precision=None, dp=None, config={"note": "n"}, resume=False,
        overwrite=False, from_checkpoint=None)
    assert s.config == {"note": "n", "optimizer": "adam", "learning_rate": 1e-3,
                        "schedule": "cosine", "engine": "manual", "loss": "mse",
                        "batch_size": 4, "epochs": 3, "num_examples": 8, "precision": "f32",
                        "data_sha256": fingerprint(*xy),
                        "dtypes": "params float64, x float32"}     # conftest: x64 on
    assert repr(s) == str(s) == f"Settings({s.config!r})"
    assert s.plan is None and s.dp is None and held_out is None
    assert x.x.shape == (8, 2) and x.side == {}      # the inputs: Inputs(x, side)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epochs = 4                                # frozen
    # the optimizer it built is the one optimizer_from builds from its config (restore_run's)
    a, b = s.optimizer, train.optimizer_from(s.config)
    _, p0 = model.init(jax.random.key(1), (None, 2))
    g = jax.tree_util.tree_map(jnp.ones_like, p0)
    sa, sb = a.init(p0), b.init(p0)
    for _ in range(3):
        ua, sa = a.update(g, sa, p0)
        ub, sb = b.update(g, sb, p0)
        for u, v in zip(jax.tree_util.tree_leaves(ua), jax.tree_util.tree_leaves(ub)):
            np.testing.assert_array_equal(u, v)


def test_optimizer_settings_follow_the_recipe_only_for_its_own_optimizer():
    recipe = ("adamw", 3e-3, "cosine")
    assert train.optimizer_settings(None, None, None, recipe=recipe) == {
        "optimizer": "adamw", "learning_rate": 3e-3, "schedule": "cosine"}
    assert train.optimizer_settings("sgd", None, None, recipe=recipe) == {
        "optimizer": "sgd", "learning_rate": 0.1, "schedule": "constant"}
    assert train.optimizer_settings("adamw", 0.5, None, recipe=recipe)["learning_rate"] == 0.5
    assert train.optimizer_settings(optax.sgd(0.1))["optimizer"].startswith("optax:")
    with pytest.raises(ConfigError, match="learning rate"):
        train.optimizer_settings("sgd", -1.0)


@pytest.mark.slow
def test_checked_runner_steps_the_same_pieces_as_the_compiled_epoch():
    model = _small_mlp()
    _, params = model.init(jax.random.key(0), (None, 64))
    x = jax.random.normal(jax.random.key(1), (24, 64))
    y = jnp.arange(24) % 10
    opt = optax.adam(1e-2)
    fresh = lambda: train.TrainState(jax.tree_util.tree_map(jnp.copy, params),
                                     opt.init(params), None)
    loss = losses.softmax_cross_entropy
    a, la = train.make_epoch(model, loss, opt, "autodiff", 8, 24)(fresh(), x, y,
                                                                  jax.random.key(2))
    b, lb = train.make_checked_epoch(model, loss, opt, "autodiff", 8, 24)(fresh(), x, y,
                                                                        jax.random.key(2))
    np.testing.assert_allclose(la, lb, rtol=1e-12)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)


def test_one_epoch_order_is_used_by_data_and_training():
    from funnn.train import epoch as E
    key = jax.random.key(4)
    order = E.shuffled(10, 3)
    idx, weights = order.draw(key)
    assert order.num_batches == 3 and weights is None
    np.testing.assert_array_equal(idx, data.epoch_order(key, 10, 3))
    x = jnp.arange(10.0)[:, None]
    xb, _ = data.epoch_batches(x, jnp.arange(10), 3, key)
    np.testing.assert_array_equal(xb[..., 0], idx)


def test_engines_are_chosen_by_one_lookup():
    from funnn import engines
    assert train.ENGINES == engines.names() == ("autodiff", "manual", "bridge")
    assert train.get_engine("manual") is engines.get("manual").value_and_grad
    assert [e.name for e in engines.ENGINES.values() if e.clips_by_rules] == ["manual"]
    with pytest.raises(ConfigError, match="unknown engine 'symbolic'; valid: autodiff, manual"):
        engines.get("symbolic")


# ----- issue 22 item 17: the library takes what a user naturally passes, or says why not


@pytest.mark.slow
def test_fit_takes_an_int_seed_and_numpy_integer_epochs():
    model, params, xy = tiny()
    kw = dict(batch_size=4, progress=False, learning_rate=0.1)
    a = train.fit(model, params, xy, "mse", "sgd", epochs=np.int64(2), key=3, **kw)
    b = train.fit(model, params, xy, "mse", "sgd", epochs=2, key=jax.random.key(3), **kw)
    assert a.epochs_done == 2 and a.config["epochs"] == 2 and type(a.config["epochs"]) is int
    for x, y in zip(leaves(a.params), leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    for bad in ("x", 1.5, True):
        with pytest.raises(ConfigError, match=r"key must be a jax\.random\.key, an int seed"):
            train.fit(model, params, xy, "mse", "sgd", epochs=1, key=bad, **kw)
    with pytest.raises(ConfigError, match=r"epochs must be a positive int, got 2\.0"):
        train.fit(model, params, xy, "mse", "sgd", epochs=2.0, **kw)


def test_a_png_given_as_a_checkpoint_is_not_a_funnn_checkpoint(tmp_path):
    png = tmp_path / "curves.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64))
    for read in (checkpoint.header, checkpoint.restore):
        with pytest.raises(checkpoint.CheckpointError, match="is not a funnn checkpoint"):
            read(png)


def test_gradcheck_refuses_more_examples_than_the_data_holds(capsys):
    code, _, err = main(["gradcheck", "--examples", "100000"], capsys)
    assert code == 2 and "--examples 100000 exceeds the 1437 examples of the digits" in err, err


@pytest.mark.slow
def test_resuming_with_other_epochs_says_the_schedule_changes(tmp_path):
    model, params, xy = tiny()
    kw = dict(batch_size=4, progress=False, run_dir=tmp_path / "D", schedule="cosine")
    with pytest.raises(KeyboardInterrupt):
        train.fit(model, params, xy, "mse", "sgd", epochs=4, on_epoch=_stop_at(2), **kw)
    said: list = []
    train.fit(model, params, xy, "mse", "sgd", epochs=3, resume=True, log=said.append, **kw)
    assert any("planned 4 epochs; its cosine schedule now spans 3" in s for s in said), said


def _stop_at(epoch):
    def stop(row):
        if row["epoch"] == epoch:
            raise KeyboardInterrupt
    return stop


@pytest.mark.slow
def test_nan_inputs_are_named_as_the_cause_before_training(tmp_path):
    """issue 22 item 17: NaN in the data is the data's fault, not the learning rate's."""
    model, params, (x, y) = tiny()
    x = x.copy()
    x[5, 1] = np.nan
    with pytest.raises(DataError, match=r"training x data holds NaN or inf in 1 of its 8 "
                                        r"examples \(the first: row 5\)"):
        train.fit(model, params, (x, y), "mse", "sgd", epochs=1, batch_size=4,
                  progress=False, run_dir=tmp_path / "D")
    assert not (tmp_path / "D").exists()


def test_integer_params_are_refused():
    model, params, xy = tiny()
    bad = jax.tree_util.tree_map(lambda p: np.asarray(p).astype(np.int32), params)
    with pytest.raises(ConfigError, match="is int32; training needs floating-point"):
        train.fit(model, bad, xy, "mse", "sgd", epochs=1, batch_size=4, progress=False)


# --------------------------------------------------------------------------- side inputs


def _masked_loop(model, params, x, y, mask, opt, epochs, batch_size, key):
    """The hand-written masked training loop: fit's order (data.epoch_order of fold_in(key,
    e)), optax on jax.grad of the hand-written masked loss; ``(params, mean loss per epoch,
    the jitted step)``."""
    from _padded import masked_ce

    @jax.jit
    def step(p, s, xb, yb, mb):
        value, g = jax.value_and_grad(lambda p: masked_ce(model, p, xb, yb, mb))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    p, s, means = params, opt.init(params), []
    for e in range(epochs):
        idx = np.asarray(data.epoch_order(jax.random.fold_in(key, e), len(x), batch_size))
        values = []
        for b in idx:
            p, s, v = step(p, s, x[b], y[b], mask[b])
            values.append(float(v))
        means.append(np.mean(values))
    return p, means, step


def _close(got, want, rtol=1e-10, atol=1e-13):
    for a, b in zip(leaves(got), leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.slow   # ~2.5 CPU-s: fit and a hand loop (make_step + side stays fast)
def test_padded_causal_lm_fit_equals_a_hand_written_masked_loop():
    """fit on (x, y, {"mask": mask}) with ignore_index targets: the same losses epoch by epoch
    and the same parameters as the hand-written masked loop."""
    from _padded import tiny_lm
    model, params, x, y, mask = tiny_lm()
    ce, opt = losses.softmax_cross_entropy.with_ignore_index(), optax.sgd(0.5)
    res = train.fit(model, params, (x, y, {"mask": mask}), ce, opt, epochs=2, batch_size=2,
                    key=3, progress=False)
    want, means, _ = _masked_loop(model, params, x, y, mask, opt, 2, 2, jax.random.key(3))
    np.testing.assert_allclose([r["train_loss"] for r in res.history], means, rtol=1e-12)
    _close(res.params, want)
    assert res.config["loss_ignore_index"] == -100


@pytest.mark.slow
def test_padded_lm_make_step_and_evaluate_take_the_side_dict():
    """make_step (manual engine) with the mask given to the model and to the loss as side
    ``weights`` takes the hand-written masked step; evaluate counts the valid tokens."""
    from _padded import masked_ce, tiny_lm
    model, params, x, y, mask = tiny_lm()
    opt, y0 = optax.adam(0.05), np.where(mask, y, 0)
    side = {"mask": mask, "weights": mask}
    _, _, hand_step = _masked_loop(model, params, x[:0], y[:0], mask[:0], opt, 0, 2,
                                   jax.random.key(0))
    step = jax.jit(train.make_step(model, losses.softmax_cross_entropy, opt, "manual"))
    got, value = step(train.TrainState(params, opt.init(params), None), x[:2], y0[:2], None,
                      {"mask": mask[:2], "weights": mask[:2]})
    one, _, first = hand_step(params, opt.init(params), x[:2], y[:2], mask[:2])
    assert float(value) == pytest.approx(float(first), rel=1e-12)
    _close(got.params, one)
    ref = jax.jit(lambda p: (masked_ce(model, p, x, y, mask), model.apply(p, x, mask=mask)))
    want, logits = ref(params)
    hits = (np.argmax(logits, -1) == y) & mask
    assert train.evaluate(model, losses.softmax_cross_entropy, params, x, y0, side=side) == \
        pytest.approx((float(want), float(hits.sum() / mask.sum())), rel=1e-12)


def test_wrong_data_structures_get_one_clear_error():
    """What fit (and evaluate, make_step) expect is named, before anything compiles."""
    from _padded import tiny_lm
    model, params, x, y, mask = tiny_lm()
    ce = losses.softmax_cross_entropy.with_ignore_index()
    form = r"fit expected data as \(x, y\) or \(x, y, side\)"
    for bad, match in [
            ((x, y, {"mask": mask}, 1), "training data is a tuple of 4.*" + form),
            ((x,), "training data is a tuple of 1"),
            (x, "training data is an array of shape"),
            ((x, y, [mask]), r"side is a list of 1.*expected a dict of named arrays"),
            (({"ids": x}, y), r"x is a dict with keys \['ids'\]; " + form),
            (((x, mask[:2]), y), r"every part needs the same number of examples.*x\[0\] has 4, "
                                 r"x\[1\] has 2, y has 4"),
            ((x, y, {"mask": mask[:3]}), r"side\['mask'\] has 3"),
            ((x, y[:2]), "x has 4, y has 2"),
            ((x, y, {"mask": 1.0}), r"side\['mask'\] is a scalar")]:
        with pytest.raises(DataError, match=match):
            train.fit(model, params, bad, ce, epochs=1, batch_size=2, progress=False)
    with pytest.raises(DataError, match=r"evaluation data: every part.*side\[.mask.\] has 2"):
        train.fit(model, params, (x, y), ce, epochs=1, batch_size=2, progress=False,
                  eval_data=(x, y, {"mask": mask[:2]}))
    with pytest.raises(ConfigError, match=r"got lenghts=, but this model reads only mask=, "
                                          r"lengths="):
        train.fit(model, params, (x, y, {"lenghts": mask.sum(1)}), ce, epochs=1,
                  batch_size=2, progress=False)
    with pytest.raises(ConfigError, match="need a funnn Loss"):
        train.fit(model, params, (x, y, {"weights": mask}), lambda p, t: p.sum(), epochs=1,
                  batch_size=2, progress=False)
    with pytest.raises(DataError, match=r"evaluate expected data as \(x, y\) or"):
        train.evaluate(model, ce, params, x, y, side=[mask])
    step = train.make_step(model, ce, optax.sgd(0.1))
    with pytest.raises(DataError, match="make_step: side must be a dict"):
        step(train.TrainState(params, (), None), x, y, None, mask)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 7\) \(or equal ignore_index "
                                        r"-100\)"):
        train.fit(model, params, (x, y - 1), ce, epochs=1, batch_size=2, progress=False)


@pytest.mark.slow
def test_tuple_inputs_and_lengths_are_batched_with_the_same_rows():
    """fit(model, params, ((x, context), y, {"lengths": lengths})) for cross-attention: every
    part of the pair and the side input take the same rows, as in a hand-written loop."""
    model = L.serial(L.cross_attention(1, implementation="materialized"), L.dense(2))
    _, params = model.init(jax.random.key(0), ((None, 3, 2), (None, 4, 3)))
    rng = np.random.default_rng(0)
    q, c, y = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 4, 3)), rng.normal(size=(4, 3, 2))
    lengths = np.array([4, 1, 3, 2])
    res = train.fit(model, params, ((q, c), y, {"lengths": lengths}), "mse", "sgd",
                    learning_rate=0.3, epochs=2, batch_size=2, key=5, progress=False,
                    eval_data=((q, c), y, {"lengths": lengths}))

    @jax.jit
    def step(p, qb, cb, yb, lb):
        value, g = jax.value_and_grad(
            lambda p: jnp.mean((model.apply(p, (qb, cb), lengths=lb) - yb) ** 2))(p)
        return jax.tree_util.tree_map(lambda a, b: a - 0.3 * b, p, g), value

    p = params
    for e in range(2):
        for b in np.asarray(data.epoch_order(jax.random.fold_in(jax.random.key(5), e), 4, 2)):
            p, _ = step(p, q[b], c[b], y[b], lengths[b])
    _close(res.params, p)
    want = float(step(p, q, c, y, lengths)[1])
    assert res.history[-1]["eval_loss"] == pytest.approx(want, rel=1e-12)
    assert train.evaluate(model, "mse", p, (q, c), y, side={"lengths": lengths})[0] == \
        pytest.approx(want, rel=1e-12)
