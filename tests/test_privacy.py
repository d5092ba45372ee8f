"""DP-SGD: settings, the accountant against dp-accounting itself, fit(dp=...) and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp

from funnn import activations as A
from funnn import cli, data, losses, manual, models, privacy, train
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

    from funnn import losses
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


# --------------------------------------------------------------------------- issue 20 item 5:
# accountant choice, calibration, per-layer and adaptive clipping

# The docs' digits setting: N 1437, batch 64, sigma 1, 10 epochs of 22 steps, delta 1e-5.
_DIGITS = dict(batch_size=64, num_examples=1437, steps=220)


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism (sensitivity 1, noise sigma) at delta:
    delta(eps) = Phi(-eps s + 1/(2s)) - e^eps Phi(-eps s - 1/(2s)) (Balle and Wang 2018),
    solved by bisection."""
    from scipy.special import ndtr

    def d(e):
        return ndtr(-e * sigma + 1 / (2 * sigma)) - math.exp(e) * ndtr(-e * sigma - 1 / (2 * sigma))
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


def test_accountants_against_exact_and_hand_checked_values():
    # without subsampling (batch = N) T Gaussian steps compose to one Gaussian of noise
    # sigma / sqrt(T): PLD is that exact figure up to its discretisation, from above
    sigma, steps, delta = 2.0, 10, 1e-5
    exact = _exact_gaussian_epsilon(sigma / math.sqrt(steps), delta)
    p = privacy.epsilon(sigma, 100, 100, steps, delta, accountant="pld")
    assert exact <= p <= exact * (1 + 1e-3), (exact, p)
    # RDP of the Gaussian is alpha T / (2 sigma^2); dp-accounting converts with
    # eps = rdp + log((a-1)/a) - (log delta + log a) / (a-1), minimised over its orders, which
    # include the integers 2..63: between the minimum over all a > 1 and over those integers
    def conv(a):
        return a * steps / (2 * sigma ** 2) + math.log((a - 1) / a) - (
            math.log(delta) + math.log(a)) / (a - 1)
    r = privacy.epsilon(sigma, 100, 100, steps, delta)
    assert min(conv(a) for a in np.linspace(1.01, 200, 20000)) <= r
    assert r <= min(conv(a) for a in range(2, 64)) + 1e-9
    assert p < r
    # the docs' figures (issue 20): RDP 4.98, PLD 4.41 at the same noise
    assert privacy.epsilon(1.0, **_DIGITS) == pytest.approx(4.978, abs=5e-4)
    assert privacy.DP(1.0, 1.0, accountant="pld").epsilon(220, 64, 1437) == pytest.approx(
        4.414, abs=5e-4)
    with pytest.raises(ConfigError, match="accountant must be one of 'rdp', 'pld'"):
        privacy.epsilon(1.0, 64, 1437, 10, accountant="prv")
    with pytest.raises(ConfigError, match="accountant 'pld' accounts Poisson sampling only"):
        privacy.DP(1.0, 1.0, sampling="fixed", accountant="pld")


def _dp_accounting_pld(sigma, q, steps, delta=1e-5):
    acc = pld.PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps", [
    (2.0, 64 / 1437, 220),                                  # the docs' setting, noise 2
    pytest.param(1.1, 256 / 60000, 60 * 234, marks=pytest.mark.slow),   # TF Privacy's MNIST
    pytest.param(0.5, 0.1, 50, marks=pytest.mark.slow),     # little noise, large rate
])
def test_own_pld_equals_dp_accounting_pld(sigma, q, steps):
    """funnn's PLD (funnn/_pld.py, numpy) against dp-accounting's PLD accountant: the same
    pessimistic discretisation, an independent implementation."""
    from funnn import _pld

    ours = _pld.poisson_gaussian_epsilon(sigma, q, steps, 1e-5)
    assert ours == pytest.approx(_dp_accounting_pld(sigma, q, steps), rel=3e-4)
    # a coarser grid is more pessimistic, never less
    assert _pld.poisson_gaussian_epsilon(sigma, q, steps, 1e-5, interval=1e-3) >= ours


def _check_inverts(target, **kw):
    args = {**_DIGITS, **kw}
    s = privacy.noise_for(target, **args)
    e = privacy.epsilon(s, **args)
    assert target * 0.99 <= e <= target, (target, kw, s, e)
    assert privacy.epsilon(0.99 * s, **args) > target          # the smallest such noise
    return s


def test_noise_for_inverts_the_accountant():
    """Acceptance (issue 20): epsilon(noise_for(target)) is the target to 1%, and 1% less
    noise misses it."""
    assert _check_inverts(1.0) > _check_inverts(4.0) > 1.0     # less epsilon, more noise
    assert privacy.noise_for(3.0, 64, 1437, 0) == 0.0          # no step spends privacy
    for bad, match in [(0.0, "target_epsilon must be a positive"),
                       (float("nan"), "target_epsilon must be a positive"),
                       ("a", "target_epsilon must be a number"),
                       (1e-4, "target_epsilon 0.0001 is out of reach")]:
        with pytest.raises(ConfigError, match=match):
            privacy.noise_for(bad, **_DIGITS)
    with pytest.raises(ConfigError, match="batch_size <= num_examples"):
        privacy.noise_for(1.0, 2000, 1437, 10)


@pytest.mark.slow
def test_noise_for_inverts_pld():
    assert _check_inverts(2.0, accountant="pld", steps=30) < _check_inverts(2.0, steps=30)


@pytest.fixture(scope="module")
def tiny():
    """A tiny dense net, a batch, and its per-example gradients by vmap(jax.grad) as numpy
    (the reference every clipping test compares with)."""
    model = L.serial(L.dense(5), L.activation(A.tanh), L.dense(3))
    _, p = model.init(jax.random.key(0), (None, 4))
    x = 3 * jax.random.normal(jax.random.key(1), (6, 4))
    y = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    xent = losses.softmax_cross_entropy
    ref = jax.vmap(lambda xi, yi: jax.grad(
        lambda q: xent.value(model.apply(q, xi[None]), yi[None]))(p))(x, y)
    return model, p, x, y, jax.tree.map(np.asarray, ref)


def _ref_layer_clip(ref, caps, w):
    """``(norms {group: (B,)}, clipped sum {layer: {W, b}})`` of per-layer clipping, by hand."""
    norms, out = {}, {}
    for k in caps:
        g = ref[int(k)]
        norms[k] = np.sqrt(sum(np.sum(v.reshape(len(w), -1) ** 2, 1) for v in g.values()))
        factor = np.minimum(1, caps[k] / norms[k]) * np.asarray(w)
        out[int(k)] = {n: np.tensordot(factor, v, axes=1) for n, v in g.items()}
    return norms, out


@pytest.mark.parametrize("engine", ["manual", pytest.param("autodiff", marks=pytest.mark.slow)])
def test_per_layer_clipping_bounds_each_group(engine, tiny):
    model, p, x, y, ref = tiny
    caps = {"0": 0.3, "2": 0.05}
    f = jax.jit(privacy.per_layer_clipped_grad_sum(model, losses.softmax_cross_entropy, caps,
                                                   engine))
    w = jnp.array([1.0, 1, 0, 1, 1, 1])             # row 2 is padding
    _, norms, summed = f(p, x, y, w)
    _, _, one = f(p, x, y, jnp.eye(6)[1])           # example 1 alone
    n, want = _ref_layer_clip(ref, caps, w)
    for k, layer in (("0", 0), ("2", 2)):
        np.testing.assert_allclose(norms[:, sorted(caps).index(k)], n[k], rtol=1e-10)
        for name in ("W", "b"):
            np.testing.assert_allclose(summed[layer][name], want[layer][name], rtol=1e-9,
                                       atol=1e-12)
        assert (n[k] > caps[k]).any()               # the test clips something
        # each group of one clipped example has norm min(||g_k||, C_k) <= C_k
        got = math.sqrt(sum(float(jnp.sum(v ** 2)) for v in one[layer].values()))
        assert got == pytest.approx(min(n[k][1], caps[k]), rel=1e-9)
        assert got <= caps[k] * (1 + 1e-12)


def test_per_layer_dp_settings(tiny):
    model, p, x, y, _ = tiny
    xent = losses.softmax_cross_entropy
    dp = privacy.DP({"2": 0.5, "0": 1.2}, 0.0)
    assert dp.clip_norm == pytest.approx(1.3) and dp.layer_clips == {"0": 1.2, "2": 0.5}
    assert dp.config()["dp_clip"] == pytest.approx(1.3)
    assert dp.config()["dp_layer_clip"] == {"0": 1.2, "2": 0.5}
    assert hash(dp) == hash(privacy.DP({"0": 1.2, "2": 0.5}, 0.0))
    assert dataclasses.replace(dp, noise_multiplier=2.0).layer_clips == dp.layer_clips
    with pytest.raises(ConfigError, match="root sum of squares"):
        privacy.DP(1.0, 1.0, layer_clip={"0": 1.2, "2": 0.5})
    for caps, match in [({"0": 1.0}, "no threshold for parameter '2.W'"),
                        ({"0": 1.0, "2": 1.0, "9": 1.0}, r"names \['9'\], which match no")]:
        with pytest.raises(ConfigError, match=match):
            privacy.per_layer_clipped_grad_sum(model, xent, caps)(p, x, y, jnp.ones(6))
    g = privacy.make_dp_batch_grad(model, xent, dp, "manual", 4)
    with pytest.raises(ConfigError, match="per-layer clipping takes no side inputs yet"):
        g(p, x, y, jnp.ones(6), jax.random.key(0), side={"mask": jnp.ones((6, 1))})
    for caps, match in [({}, "at least one parameter group"), ({"0": -1.0}, "positive finite")]:
        with pytest.raises(ConfigError, match=match):
            privacy.DP(caps, 1.0)


def test_adaptive_clip_tracks_the_target_quantile():
    """Andrew et al. 2021: on log-normal norms the clip settles at their quantile
    (median 1, 90% quantile e^1.2816 = 3.60)."""
    adaptive_med = privacy.AdaptiveClip(target_quantile=0.5, learning_rate=0.2)
    adaptive_90 = privacy.AdaptiveClip(target_quantile=0.9, learning_rate=0.2)

    def step(clips, key):
        k1, k2 = jax.random.split(key)
        norms = jnp.exp(jax.random.normal(k1, (256,)))
        nxt = jnp.stack([privacy.adaptive_clip_update(c, norms, jnp.ones(256), a, 256, k2)
                         for c, a in zip(clips, (adaptive_med, adaptive_90))])
        return nxt, nxt

    _, clips = jax.lax.scan(step, jnp.array([0.1, 0.1]),
                            jax.random.split(jax.random.key(0), 400))
    late = np.mean(np.asarray(clips[-200:]), 0)
    assert late[0] == pytest.approx(1.0, rel=0.1)
    assert late[1] == pytest.approx(math.exp(1.2816), rel=0.1)
    assert abs(float(clips[0, 0]) - 0.1) < 0.1 * 0.2          # it starts where it was put
    # the count's privacy is paid from the step's noise: z^-2 = z_grad^-2 + (2 sigma_b)^-2
    z_grad = privacy.adaptive_noise(1.0, 64 / 20)
    assert z_grad == pytest.approx((1 - 1 / 6.4 ** 2) ** -0.5, rel=1e-12)
    assert privacy.AdaptiveClip().sigma_b(64) == 3.2
    with pytest.raises(ConfigError, match="need 2 \\* count_noise > noise_multiplier"):
        privacy.adaptive_noise(2.0, 1.0)
    with pytest.raises(ConfigError, match="target_quantile must lie in"):
        privacy.AdaptiveClip(target_quantile=1.0)


@pytest.mark.slow   # ~2 CPU-s; the quantile tracking itself stays fast
def test_adaptive_dp_step_clips_at_the_current_norm(tiny):
    model, p, x, y, ref = tiny
    xent = losses.softmax_cross_entropy
    dp = privacy.DP(1.0, 0.0)
    adaptive = privacy.AdaptiveClip(target_quantile=0.5, learning_rate=0.3, count_noise=1e-9)
    g = jax.jit(privacy.make_adaptive_dp_batch_grad(model, xent, dp, adaptive, "manual", 6))
    _, noisy, nxt = g(p, x, y, jnp.ones(6), jax.random.key(2), jnp.asarray(1.0))
    norms = np.sqrt(sum(np.sum(v.reshape(6, -1) ** 2, 1) for v in jax.tree.leaves(ref)))
    factor = np.minimum(1, 1.0 / norms)
    for u, v in zip(jax.tree.leaves(noisy), jax.tree.leaves(ref)):
        np.testing.assert_allclose(u, np.tensordot(factor, v, axes=1) / 6, rtol=1e-9,
                                   atol=1e-12)
    frac = float(np.mean(norms <= 1.0))
    assert 0 < frac < 1
    assert float(nxt) == pytest.approx(math.exp(-0.3 * (frac - 0.5)), rel=1e-6)
    with pytest.raises(ConfigError, match="adaptive clipping tracks one clip norm"):
        privacy.make_adaptive_dp_batch_grad(model, xent, privacy.DP({"0": 1.0, "2": 1.0}, 1.0),
                                            adaptive, "manual", 6)


def test_cli_dp_epsilon_chooses_the_noise():
    args = cli._parser().parse_args(["train", "--dp-clip", "1", "--dp-epsilon", "3"])
    dp = cli._dp(args, 1437, 64, 10)
    assert dp.noise_multiplier == privacy.noise_for(3.0, **_DIGITS)
    args = cli._parser().parse_args(["train", "--dp-clip", "1", "--dp-noise", "1",
                                     "--dp-accountant", "pld"])
    dp = cli._dp(args, 1437, 64, 10)
    assert dp.accountant == "pld" and cli._dp_of(dp.config()) == dp
    args = cli._parser().parse_args(["train", "--dp-clip", "1", "--dp-noise", "1",
                                     "--dp-epsilon", "3"])
    with pytest.raises(ConfigError, match="give --dp-noise S or --dp-epsilon E, not both"):
        cli._dp(args, 1437, 64, 10)
    text = cli._describe(models.get("mlp"), {
        "train_examples": 1437, "test_examples": 360, "data": "digits", "engine": "manual",
        "optimizer": "sgd", "learning_rate": 1.0, "schedule": "constant", "epochs": 10,
        "batch_size": 64, "batch_size_asked": 64, **dp.config(), "dp_epsilon_target": 3.0})
    assert "noise 1 (chosen for epsilon 3), delta 1e-05, poisson sampling, pld accountant" \
        in text, text


@pytest.mark.slow
def test_per_layer_dp_step_and_fit(tiny, tmp_path):
    model, p, x, y, ref = tiny
    # with no noise the DP step is the per-layer clipped sum over batch_size
    dp0 = privacy.DP({"2": 0.5, "0": 1.2}, 0.0)
    _, noisy = jax.jit(privacy.make_dp_batch_grad(model, losses.softmax_cross_entropy, dp0,
                                                  "manual", 4))(
        p, x, y, jnp.ones(6), jax.random.key(0))
    _, want = _ref_layer_clip(ref, dp0.layer_clips, np.ones(6))
    for layer in (0, 2):
        for name in ("W", "b"):
            np.testing.assert_allclose(noisy[layer][name], want[layer][name] / 4, rtol=1e-9)
    # fit takes it as any DP setting: recorded, accounted, compared on resume
    xs = jnp.tile(x, (8, 1))
    ys = jnp.tile(y, (8, 1))
    dp = privacy.DP({"0": 1.0, "2": 0.5}, 1.0)
    kw = dict(learning_rate=0.1, batch_size=8, engine="manual", progress=False,
              key=jax.random.key(0), checkpoint_dir=tmp_path / "ck")
    r = train.fit(model, p, (xs, ys), "softmax_cross_entropy", "sgd", epochs=1, dp=dp, **kw)
    assert r.config["dp_layer_clip"] == {"0": 1.0, "2": 0.5}
    assert r.history[-1]["epsilon"] == pytest.approx(dp.epsilon(6, 8, 48))
    with pytest.raises(ConfigError, match="dp_layer_clip"):
        train.fit(model, p, (xs, ys), "softmax_cross_entropy", "sgd", epochs=2,
                  dp=privacy.DP({"0": 1.0, "2": 0.7}, 1.0), resume=True, **kw)


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


@pytest.mark.slow   # ~5 CPU-s: a padded LM per-example engine and its reference
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


# --------------------------------------------------------------------------- adaptive clip in fit


@pytest.mark.slow
def test_fit_adaptive_clipping_carries_the_clip_and_accounts_it(tiny):
    """fit(dp=DP(..., adaptive=AdaptiveClip(...))) steps as a hand loop over
    make_adaptive_dp_batch_grad (same sampled rows, noise and clip updates, float64), keeps the
    clip in the optimizer state, records the setting and accounts epsilon at the step's
    noise_multiplier (the count's share is paid from it)."""
    model, p, x, y, _ = tiny
    xs, ys = jnp.tile(x, (4, 1)), jnp.tile(y, (4, 1))
    adaptive = privacy.AdaptiveClip(target_quantile=0.5, learning_rate=0.3, count_noise=2.0)
    dp = privacy.DP(1.0, 1.0, adaptive=adaptive)
    xent = losses.softmax_cross_entropy
    r = train.fit(model, p, (xs, ys), xent, "sgd", learning_rate=0.5, epochs=1, batch_size=8,
                  engine="manual", dp=dp, key=4, progress=False)
    sample = privacy.dp_sample(dp, 8, 24)
    grad = jax.jit(privacy.make_adaptive_dp_batch_grad(model, xent, dp, adaptive, "manual", 8))
    q, clip, epoch_key = p, jnp.asarray(1.0, jnp.float32), jax.random.fold_in(jax.random.key(4), 0)
    for i in range(3):
        k = jax.random.fold_in(epoch_key, i)
        idx, w = sample(k)
        _, g, clip = grad(q, xs[idx], ys[idx], w, k, clip)
        clip = clip.astype(jnp.float32)                     # the optimizer state's dtype
        q = jax.tree.map(lambda a, b: a - 0.5 * b, q, g)
    for a, b in zip(jax.tree.leaves(r.params), jax.tree.leaves(q), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    assert float(r.opt_state.clip) == pytest.approx(float(clip), rel=1e-6)
    assert float(r.opt_state.clip) != 1.0                       # the clip moved
    assert r.config["dp_adaptive"] == {"target_quantile": 0.5, "learning_rate": 0.3,
                                       "count_noise": 2.0}
    assert r.history[-1]["epsilon"] == pytest.approx(dp.epsilon(3, 8, 24))
    for bad, match in [(dict(adaptive=0.5), "adaptive must be a privacy.AdaptiveClip"),
                       (dict(clip_norm={"0": 1.0, "2": 1.0}, adaptive=adaptive),
                        "adaptive clipping tracks one clip norm")]:
        with pytest.raises(ConfigError, match=match):
            privacy.DP(**{"clip_norm": 1.0, "noise_multiplier": 1.0, **bad})
    with pytest.raises(ConfigError, match="need 2 \\* count_noise > noise_multiplier"):
        train.fit(model, p, (xs, ys), xent, "sgd", batch_size=8, progress=False,
                  dp=privacy.DP(1.0, 1.0, adaptive=privacy.AdaptiveClip(count_noise=0.4)))
    with pytest.raises(ConfigError, match="float16's loss scaling"):
        train.fit(model, p, (xs, ys), xent, "sgd", batch_size=8, progress=False,
                  precision="f16", dp=privacy.DP(1.0, 1.0))
