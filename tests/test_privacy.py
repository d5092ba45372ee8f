"""DP-SGD: settings, the accountant against dp-accounting itself, fit(dp=...) and the CLI."""

from __future__ import annotations

import json
import math
import re

import dp_accounting as dpa
import jax
import numpy as np
import pytest
from dp_accounting import pld, rdp

from funnn import cli, data, losses, models, privacy, train
from funnn import layers as L
from funnn.core import ConfigError

# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs, match", [
    ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm must be a positive"),
    ({"clip_norm": -1.0, "noise_multiplier": 1.0}, "clip_norm must be a positive"),
    ({"clip_norm": float("inf"), "noise_multiplier": 1.0}, "clip_norm must be a positive"),
    ({"clip_norm": "a", "noise_multiplier": 1.0}, "clip_norm must be a number"),
    ({"clip_norm": 1.0, "noise_multiplier": -0.1}, "noise_multiplier must be a finite number"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, r"delta must lie in \(0, 1\)"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, r"delta must lie in \(0, 1\)"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": -1e-5}, r"delta must lie"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling": "shuffle"}, "sampling must be"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        privacy.DP(**kwargs)


# --------------------------------------------------------------------------- accountant


def test_epsilon_matches_dp_accounting_own_composition():
    # TF Privacy's MNIST setting: N=60000, batch 256, sigma 1.1, 60 epochs, delta 1e-5
    n, b, sigma, steps = 60000, 256, 1.1, 60 * 60000 // 256
    ours = privacy.epsilon(sigma, b, n, steps, 1e-5)
    acc = rdp.RdpAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(b / n, dpa.GaussianDpEvent(sigma)), steps)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # RDP is an upper bound: above the tighter PLD accountant, and not far above it
    p = pld.PLDAccountant()
    p.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(b / n, dpa.GaussianDpEvent(sigma)), steps))
    assert p.get_epsilon(1e-5) <= ours <= 1.2 * p.get_epsilon(1e-5)
    assert 2.0 < ours < 3.1           # the published RDP figure of this setting is ~3
    # fixed-size batches: replace-one adjacency, sensitivity 2C
    fixed = privacy.DP(1.0, sigma, sampling="fixed").epsilon(steps, b, n)
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(n, b, dpa.GaussianDpEvent(sigma / 2)),
                steps)
    assert fixed == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert fixed > ours


def test_epsilon_edges():
    assert privacy.epsilon(1.0, 10, 100, 0) == 0.0
    assert privacy.epsilon(0.0, 10, 100, 5) == math.inf
    more = [privacy.epsilon(1.0, 10, 100, s) for s in (10, 20)]
    assert 0 < more[0] < more[1]
    with pytest.raises(ConfigError, match="batch_size <= num_examples"):
        privacy.epsilon(1.0, 200, 100, 5)
    assert privacy.poisson_capacity(32, 1000) == 32 + 46 + 8
    assert privacy.poisson_capacity(32, 40) == 40


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digits():
    recipe = models.get("mlp")
    tr, te = data.load("digits")
    stats = models.input_stats(tr)
    x, y = models.prepare(recipe, tr, stats)
    ex, ey = models.prepare(recipe, te, stats)
    model = recipe.build(10)
    _, params = model.init(jax.random.key(0), (None,) + tuple(x.shape[1:]))
    return recipe, model, params, (x, y), (ex, ey)


@pytest.mark.slow
def test_dp_training_on_digits_reaches_documented_accuracy(digits):
    """README figure: sgd lr 1, batch 64, clip 1, noise 1, 3 epochs: ~90% at epsilon ~3.1."""
    recipe, model, params, xy, exy = digits
    dp = privacy.DP(1.0, 1.0)
    r = train.fit(model, params, xy, recipe.loss, "sgd", learning_rate=1.0, epochs=3,
                  batch_size=64, engine="manual", eval_data=exy, dp=dp, progress=False)
    last = r.history[-1]
    assert last["eval_accuracy"] >= 0.85
    steps = 3 * (xy[0].shape[0] // 64)
    assert last["epsilon"] == pytest.approx(dp.epsilon(steps, 64, xy[0].shape[0]))
    assert 2.5 < last["epsilon"] < 4.0
    assert [h["epsilon"] for h in r.history] == sorted(h["epsilon"] for h in r.history)
    assert r.config["dp_clip"] == 1.0 and r.config["dp_noise"] == 1.0


@pytest.mark.slow
def test_dp_manual_equals_autodiff_fallback_and_resume_is_exact(digits, tmp_path):
    recipe, model, params, (x, y), _ = digits
    x, y = x[:256], y[:256]
    kw = dict(learning_rate=0.5, batch_size=32, progress=False, key=jax.random.key(3))
    dp = privacy.DP(1.0, 0.8, sampling="poisson")
    # one DP-SGD gradient (same sampled batch, same noise): ghost clipping == vmap(grad)
    k = jax.random.key(5)
    v1, g1 = jax.jit(privacy.make_dp_grad(model, recipe.loss, dp, "manual", 32, 256))(
        params, x, y, k)
    v2, g2 = jax.jit(privacy.make_dp_grad(model, recipe.loss, dp, "autodiff", 32, 256))(
        params, x, y, k)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    a = train.fit(model, params, (x, y), recipe.loss, "sgd", epochs=2, engine="manual", dp=dp,
                  **kw)
    # interrupted after epoch 1 and resumed: bit-for-bit the uninterrupted run
    d = tmp_path / "ck"
    train.fit(model, params, (x, y), recipe.loss, "sgd", epochs=1, engine="manual", dp=dp,
              checkpoint_dir=d, **kw)
    c = train.fit(model, params, (x, y), recipe.loss, "sgd", epochs=2, engine="manual", dp=dp,
                  checkpoint_dir=d, resume=True, **kw)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(c.params)):
        np.testing.assert_array_equal(u, v)
    assert [h["epsilon"] for h in c.history] == [h["epsilon"] for h in a.history]
    with pytest.raises(ConfigError, match=r"dp_noise: 0\.8 -> 0\.9"):
        train.fit(model, params, (x, y), recipe.loss, "sgd", epochs=3, engine="manual",
                  dp=privacy.DP(1.0, 0.9), checkpoint_dir=d, resume=True, **kw)


def test_dp_fit_bad_input():
    model = L.serial(L.dense(4), L.batch_norm(), L.dense(2))
    _, params = model.init(jax.random.key(0), (None, 3))
    x, y = np.ones((8, 3), np.float32), np.zeros(8, np.int32)
    with pytest.raises(ConfigError, match="undefined for a stateful model"):
        train.fit(model, params, (x, y), "softmax_cross_entropy", dp=privacy.DP(1.0, 1.0),
                  batch_size=4)
    with pytest.raises(ConfigError, match=r"dp must be a funnn\.privacy\.DP"):
        train.fit(L.dense(2), None, (x, y), "softmax_cross_entropy", dp=(1.0, 1.0),
                  batch_size=4)


@pytest.mark.parametrize("argv, match", [
    (["--dp-clip", "1"], "--dp-noise is missing"),
    (["--dp-noise", "1"], "--dp-clip is missing"),
    (["--dp-delta", "1e-6"], "--dp-delta needs --dp-clip"),
    (["--dp-clip", "0", "--dp-noise", "1"], "must be a positive finite number"),
    (["--dp-clip", "1", "--dp-noise", "-1"], "must be a finite number >= 0"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "2"], r"must lie in \(0, 1\)"),
])
def test_cli_bad_dp_options_exit_2(argv, match, capsys, tmp_path):
    try:
        code = cli.main(["train", "--out", str(tmp_path / "r"), "--epochs", "1", *argv])
    except SystemExit as e:            # argparse's own checks exit 2 themselves
        code = e.code
    assert code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.slow
def test_cli_dp_run_records_settings_and_epsilon(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(out), "--quiet", "--optimizer",
                     "sgd", "--lr", "1", "--batch-size", "64", "--dp-clip", "1",
                     "--dp-noise", "1", "--dp-delta", "1e-6", "--engine", "manual"]) == 0
    assert "epsilon" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = metrics["config"]
    assert (cfg["dp_clip"], cfg["dp_noise"], cfg["dp_delta"], cfg["dp_sampling"]) == (
        1.0, 1.0, 1e-6, "poisson")
    assert metrics["final"]["epsilon"] > 0
    assert cli.main(["train", "--epochs", "2", "--out", str(out), "--quiet", "--optimizer",
                     "sgd", "--lr", "1", "--batch-size", "64", "--dp-clip", "2",
                     "--dp-noise", "1", "--dp-delta", "1e-6", "--engine", "manual",
                     "--resume"]) == 2
    assert "dp_clip: 1.0 -> 2.0" in capsys.readouterr().err


@pytest.mark.slow
def test_per_example_grads_feed_optax_dpsgd():
    """optax's DP-SGD aggregate takes per-example gradients (leading batch axis): with no noise
    its update is -lr times funnn's clipped mean."""
    import optax

    from funnn import losses, manual
    model = L.serial(L.dense(4), L.activation("tanh"), L.dense(3))
    _, params = model.init(jax.random.key(0), (None, 5))
    x = jax.random.normal(jax.random.key(1), (6, 5))
    y = jax.random.randint(jax.random.key(2), (6,), 0, 3)
    xent = losses.softmax_cross_entropy
    _, g = manual.per_example_value_and_grad(model, xent)(params, x, y)
    # optax.contrib.dpsgd(0.1, 0.5, 0.0, seed) is this chain (its seed= is deprecated)
    opt = optax.chain(optax.contrib.differentially_private_aggregate(
        l2_norm_clip=0.5, noise_multiplier=0.0, key=jax.random.key(0)), optax.sgd(0.1))
    updates, _ = opt.update(g, opt.init(params), params)
    _, clipped = manual.clipped_value_and_grad(model, xent, 0.5)(params, x, y)
    for u, c in zip(jax.tree.leaves(updates), jax.tree.leaves(clipped)):
        np.testing.assert_allclose(u, -0.1 * c, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("clip, noise, match", [
    (1e308, 1.0, "clip_norm 1e\\+308 is not finite in float32"),
    (1e38, 10.0, "noise_multiplier \\* clip_norm = 1e\\+39 is not finite in float32"),
])
def test_dp_settings_must_be_finite_in_float32(clip, noise, match):
    """issue 22 item 15: bounded as a learning rate is, before anything trains."""
    with pytest.raises(ConfigError, match=match):
        privacy.DP(clip, noise)
    privacy.DP(3e38, 0.0)            # the largest float32 clip without noise is fine


def test_cli_dp_clip_beyond_float32_exits_2_in_flags(capsys, tmp_path):
    """issue 22 item 15: ``--dp-clip 1e308`` is refused in one line naming the flag, no
    warning, no run directory."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = cli.main(["train", "--data", "xor", "--out", str(tmp_path / "r"), "--epochs",
                         "1", "--dp-clip", "1e308", "--dp-noise", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--dp-clip 1e+308 is not finite in float32" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- masked DP


def _clipped_reference(model, x, y, mask, rows):
    """``ref(params, C) -> (norms, sum_i rows_i clip(g_i, C) / B, logits)`` with g_i = jax.grad
    of example i's hand-written masked loss (the mean over *its own* valid tokens)."""
    from _padded import masked_ce

    @jax.jit
    def ref(p, clip):
        g = jax.vmap(lambda xi, yi, mi: jax.grad(lambda p: masked_ce(
            model, p, xi[None], yi[None], mi[None]))(p))(x, y, mask)
        sq = sum(jax.numpy.sum(a.reshape(len(x), -1) ** 2, 1) for a in jax.tree.leaves(g))
        norms = jax.numpy.sqrt(sq)
        f = rows * jax.numpy.minimum(1.0, clip / norms)
        return norms, jax.tree.map(lambda a: jax.numpy.tensordot(f, a, 1) / len(x), g), \
            model.apply(p, x, mask=mask)

    return ref


def test_dp_with_ignore_index_clips_each_example_by_its_valid_token_count():
    """With ignore_index targets each example's gradient is that of the mean over its own valid
    tokens before clipping: the ghost-clipped DP gradient (noise 0) equals clipping the
    hand-written per-example masked gradients."""
    from _padded import tiny_lm
    model, params, x, y, mask = tiny_lm()
    ce = losses.softmax_cross_entropy.with_ignore_index()
    rows = np.array([1.0, 1.0, 0.0, 1.0])             # a padded Poisson row sits out
    ref = _clipped_reference(model, x, y, mask, rows)
    clip = float(np.median(ref(params, 1.0)[0]))      # some examples clipped, some not
    norms, want, logits = ref(params, clip)
    assert (norms > clip).sum() == 2
    g = jax.jit(privacy.make_dp_batch_grad(model, ce, privacy.DP(clip, 0.0), "manual", 4))
    value, got = g(params, x, y, rows, jax.random.key(0), side={"mask": mask})
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # the loss: the mean over kept examples of each one's own mean over its valid tokens
    logp = np.asarray(jax.nn.log_softmax(logits))
    nll = -np.take_along_axis(logp, np.where(mask, y, 0)[..., None], -1)[..., 0]
    own = (nll * mask).sum(1) / mask.sum(1)            # example 3: 2 valid tokens, not 5
    assert float(value) == pytest.approx(own[rows > 0].mean(), rel=1e-12)


@pytest.mark.slow
def test_fit_dp_takes_side_inputs_with_the_rows_it_samples():
    """fit(dp=...) on (x, y, {"weights": ...}) (noise 0, fixed-size batches) with the autodiff
    engine (the vmap(jax.grad) fallback, slicing the side inputs per example) steps as a hand
    loop over make_dp_grad with ghost clipping, which samples the same rows of every part."""
    model = L.serial(L.embedding(7, 3), L.dense(7))
    _, params = model.init(jax.random.key(1), (None, 5))
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 7, (6, 5)), rng.integers(0, 7, (6, 5))
    w = (np.arange(5)[None] < np.array([5, 1, 3, 2, 4, 5])[:, None]).astype(float)
    dp = privacy.DP(0.3, 0.0, sampling="fixed")
    ce = losses.softmax_cross_entropy
    res = train.fit(model, params, (x, y, {"weights": w}), ce, "sgd", learning_rate=0.5,
                    epochs=1, batch_size=2, dp=dp, engine="autodiff", key=4, progress=False)
    grad = jax.jit(privacy.make_dp_grad(model, ce, dp, "manual", 2, 6))
    p, epoch_key = params, jax.random.fold_in(jax.random.key(4), 0)
    for i in range(3):
        _, g = grad(p, x, y, jax.random.fold_in(epoch_key, i), {"weights": w})
        p = jax.tree.map(lambda a, b: a - 0.5 * b, p, g)
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
