"""Mixed precision: the policy, the model wrapper on both engines, float32 where it matters,
dynamic loss scaling, and bfloat16 training reaching float32's accuracy on the digits.

These tests run in float32 (the rest of the suite enables float64): mixed precision is about
float32 master weights and bfloat16/float16 compute.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funnn
from funnn import data, losses, models, precision, train
from funnn import layers as L
from funnn.core import ConfigError

BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)


@pytest.fixture(autouse=True)
def float32_only():
    with jax.enable_x64(False):
        yield


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                        else a, tree)


# --------------------------------------------------------------------------- the policy


def test_named_policies_and_errors():
    assert precision.get_policy(None) == precision.Policy()
    bf = precision.get_policy("bf16")
    assert (bf.param, bf.compute, bf.output) == (F32, BF16, F32)
    assert bf.name == "bf16" and not bf.needs_loss_scaling
    assert precision.get_policy("f16").needs_loss_scaling
    custom = precision.Policy(param="float32", compute="bfloat16", output="bfloat16")
    assert custom.name == "param=float32,compute=bfloat16,output=bfloat16"
    assert precision.get_policy(custom) is custom
    with pytest.raises(ConfigError, match="unknown precision 'fp8'; valid: f32, bf16, f16"):
        precision.get_policy("fp8")
    with pytest.raises(ConfigError, match="compute dtype must be a floating dtype"):
        precision.Policy(compute="int8")
    assert precision.apply_policy(L.dense(2), "f32").name == "dense(2)"   # the model itself


# --------------------------------------------------------------------------- every layer


LAYERS = {
    "dense": (lambda: L.dense(4), (2, 3)),
    "conv2d": (lambda: L.conv2d(4, (3, 3), padding="SAME"), (2, 6, 6, 2)),
    "conv1d": (lambda: L.conv1d(4, 3, stride=2), (2, 7, 2)),
    "max_pool": (lambda: L.max_pool((2, 2)), (2, 4, 4, 2)),
    "avg_pool": (lambda: L.avg_pool((2, 2)), (2, 4, 4, 2)),
    "dropout": (lambda: L.dropout(0.5), (2, 5)),
    "layer_norm": (lambda: L.layer_norm(), (2, 5)),
    "batch_norm": (lambda: L.batch_norm(), (4, 5)),
    "prelu": (lambda: L.prelu(), (2, 5)),
    "softmax": (lambda: L.activation("softmax"), (2, 5)),
    "log_softmax": (lambda: L.activation("log_softmax"), (2, 5)),
    "gelu": (lambda: L.activation("gelu"), (2, 5)),
    "lstm": (lambda: L.lstm(4), (2, 5, 3)),
    "gru": (lambda: L.gru(4, return_sequences=False), (2, 5, 3)),
    "attention_chunked": (lambda: L.multi_head_attention(2, causal=True, block_size=2),
                          (2, 5, 4)),
    "attention_materialized": (lambda: L.multi_head_attention(2, implementation="materialized"),
                               (2, 5, 4)),
    "transformer_block": (lambda: L.transformer_block(2, 8, dropout=0.1), (2, 5, 4)),
    "positional_embedding": (lambda: L.positional_embedding(8), (2, 5, 4)),
}


# ~2-11 s each on 2 cores (compiles of both paths in two dtypes); the others stay in the fast tier
SLOW_LAYERS = {"conv2d", "conv1d", "max_pool", "lstm", "gru", "attention_chunked",
               "attention_materialized", "transformer_block"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_LAYERS
                                  else n for n in LAYERS])
def test_every_layer_keeps_the_compute_dtype_on_both_paths(name):
    """bfloat16 in, bfloat16 out, bfloat16 gradients: no layer promotes silently, and batch-norm
    statistics stay float32."""
    make, shape = LAYERS[name]
    layer = make()
    _, params = layer.init(jax.random.key(0), (None, *shape[1:]))
    p16 = _cast(params, BF16)
    x = jax.random.normal(jax.random.key(1), shape).astype(BF16)
    state = layer.init_state((None, *shape[1:])) if layer.stateful else None

    @jax.jit            # traced as eager calls are: one compile instead of one per primitive
    def both_paths(p, x, state, key):
        kw = {"key": key, "train": True}
        if layer.stateful:
            y, res, new_state = layer.forward(p, x, state=state, **kw)
            ya, _ = layer.apply(p, x, state=state, **kw)
        else:
            (y, res), new_state = layer.forward(p, x, **kw), None
            ya = layer.apply(p, x, **kw)
        grads, dx = layer.backward(p, res, jnp.ones_like(y))
        return y, ya, new_state, grads, dx

    y, ya, new_state, grads, dx = both_paths(p16, x, state, jax.random.key(2))
    if layer.stateful:
        assert {a.dtype for a in jax.tree.leaves(new_state)} == {F32}
    assert y.dtype == BF16 and ya.dtype == BF16
    assert dx.dtype == BF16
    assert all(g.dtype == BF16 for g in jax.tree.leaves(grads))
    # and the bfloat16 forward is the float32 forward of the same (rounded) numbers, rounded
    x32, p32 = x.astype(F32), _cast(p16, F32)
    y32 = both_paths(p32, x32, state, jax.random.key(2))[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_normalisation_and_softmax_run_in_float32():
    """Values a bfloat16 computation would get badly wrong (moments of 300 + small noise; a
    softmax over 4096 entries) come out as float32 computes them, rounded once."""
    x = (300.0 + jax.random.normal(jax.random.key(0), (4, 64))).astype(BF16)
    ln = L.layer_norm()
    _, p = ln.init(jax.random.key(0), (None, 64))
    got = ln.apply(_cast(p, BF16), x).astype(F32)
    want = ln.apply(p, x.astype(F32))
    np.testing.assert_allclose(got, want, atol=0.02)
    z = jax.random.normal(jax.random.key(1), (2, 4096)).astype(BF16)
    s = funnn.activations.softmax(z)
    assert s.dtype == BF16
    np.testing.assert_allclose(np.asarray(s.astype(F32)).sum(-1), 1.0, atol=1e-2)
    np.testing.assert_allclose(s.astype(F32), jax.nn.softmax(z.astype(F32)), rtol=1e-2,
                               atol=1e-7)


def test_weight_gradients_accumulate_in_float32():
    """``x^T dy`` over 8192 rows: each term is exactly representable, the float32 sum is exact
    and rounds once to bfloat16; a bfloat16 running sum would stall at 256 + ..."""
    layer = L.dense(1)
    x = jnp.ones((8192, 2), BF16)
    _, p = layer.init(jax.random.key(0), (None, 2))
    _, res = layer.forward(_cast(p, BF16), x)
    grads, _ = layer.backward(_cast(p, BF16), res, jnp.full((8192, 1), 0.5, BF16))
    assert float(grads["W"][0, 0]) == 4096.0 and float(grads["b"][0]) == 4096.0


# --------------------------------------------------------------------------- the wrapper


def _mixed_model():
    return L.serial(L.conv1d(6, 3, padding="SAME"), L.layer_norm(), L.gru(8),
                    L.multi_head_attention(2), L.flatten(), L.dense(3))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["manual", "bridge"])
def test_wrapper_engines_agree_and_keep_master_weights(engine):
    base = _mixed_model()
    model = precision.apply_policy(base, "bf16")
    assert model.name.endswith("@bf16") and model.context == base.context
    _, params = model.init(jax.random.key(0), (None, 6, 4))
    x = jax.random.normal(jax.random.key(1), (5, 6, 4))
    y = jnp.array([0, 1, 2, 1, 0])
    loss = losses.softmax_cross_entropy
    out = model.apply(params, x)
    assert out.dtype == F32
    va, ga = jax.jit(funnn.autodiff.value_and_grad(model, loss))(params, x, y)
    if engine == "manual":
        vm, gm = jax.jit(funnn.manual.value_and_grad(model, loss))(params, x, y)
    else:
        vm, gm = jax.jit(funnn.autodiff.value_and_grad(funnn.manual.bridge(model), loss))(
            params, x, y)
    assert jax.tree.structure(ga) == jax.tree.structure(params)
    assert all(g.dtype == F32 for g in jax.tree.leaves(ga) + jax.tree.leaves(gm))
    assert abs(float(va) - float(vm)) < 1e-6
    for a, m in zip(jax.tree.leaves(ga), jax.tree.leaves(gm)):
        scale = float(jnp.max(jnp.abs(a))) + 1e-3
        assert float(jnp.max(jnp.abs(a - m))) <= 0.05 * scale
    # and both are close to the float32 gradient
    _, g32 = funnn.autodiff.value_and_grad(base, loss)(params, x, y)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(g32)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-3
        assert float(jnp.max(jnp.abs(a - b))) <= 0.1 * scale


@pytest.mark.slow
def test_wrapper_keeps_batch_norm_state_float32_and_input_gradient_dtype():
    model = precision.apply_policy(L.serial(L.dense(4), L.batch_norm(), L.dense(2)), "bf16")
    _, params = model.init(jax.random.key(0), (None, 3))
    state = model.init_state((None, 3))
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y, res, new_state = model.forward(params, x, state=state, train=True)
    assert y.dtype == F32
    assert {a.dtype for a in jax.tree.leaves(new_state)} == {F32}
    grads, dx = model.backward(params, res, jnp.ones_like(y))
    assert dx.dtype == F32 and {g.dtype for g in jax.tree.leaves(grads)} == {F32}


# --------------------------------------------------------------------------- loss scaling


@pytest.mark.slow
def test_loss_scaled_step_skips_overflow_and_halves_the_scale():
    model = precision.apply_policy(L.serial(L.dense(4), L.activation("tanh"), L.dense(2)),
                                   "f16")
    _, params = model.init(jax.random.key(0), (None, 3))
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jnp.array([0, 1] * 4)
    opt = precision.loss_scaled(optax.sgd(0.1), initial_scale=2.0 ** 60, period=2)
    for engine in ("autodiff", "manual"):
        step = jax.jit(train.make_step(model, losses.softmax_cross_entropy, opt, engine))
        ts = train.TrainState(params, opt.init(params), None)
        ts2, value = step(ts, x, y, jax.random.key(0))     # 2^60 overflows float16: skipped
        assert bool(jnp.isfinite(value))
        assert float(ts2.opt_state.scale) == 2.0 ** 59
        for a, b in zip(jax.tree.leaves(ts2.params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)
        small = opt.init(params)._replace(scale=jnp.float32(128.0))
        ts3, _ = step(train.TrainState(params, small, None), x, y, jax.random.key(0))
        ts3, _ = step(ts3, x, y, jax.random.key(1))          # two finite steps: doubled
        assert float(ts3.opt_state.scale) == 256.0
        assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in
                   zip(jax.tree.leaves(ts3.params), jax.tree.leaves(params)))
    with pytest.raises(ConfigError, match="initial_scale must be positive"):
        precision.loss_scaled(optax.sgd(0.1), initial_scale=0)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digits():
    recipe = models.get("mlp")
    tr, te = data.load_digits("train"), data.load_digits("test")
    stats = models.input_stats(tr)
    return recipe, models.prepare(recipe, tr, stats), models.prepare(recipe, te, stats)


@pytest.mark.slow
def test_bf16_training_reaches_float32_accuracy_on_digits(digits):
    recipe, (x, y), (ex, ey) = digits
    acc = {}
    for prec in ("f32", "bf16"):
        model = recipe.build(10)
        _, params = model.init(jax.random.key(0), (None, 64))
        r = train.fit(model, params, (x, y), recipe.loss, recipe.optimizer,
                      learning_rate=recipe.learning_rate, schedule=recipe.schedule, epochs=10,
                      batch_size=recipe.batch_size, eval_data=(ex, ey), precision=prec,
                      progress=False, key=jax.random.key(1))
        acc[prec] = r.history[-1]["eval_accuracy"]
        assert {a.dtype for a in jax.tree.leaves(r.params)} == {F32}
    assert acc["f32"] > 0.95
    assert acc["bf16"] >= acc["f32"] - 0.005, acc


@pytest.mark.slow
def test_f16_fit_checkpoints_the_loss_scale_and_cli_records_precision(tmp_path, digits):
    recipe, (x, y), _ = digits
    model = recipe.build(10)
    _, params = model.init(jax.random.key(0), (None, 64))
    r = train.fit(model, params, (x[:256], y[:256]), recipe.loss, "adam", epochs=2,
                  batch_size=32, precision="f16", progress=False,
                  checkpoint_dir=tmp_path / "ck", engine="manual")
    assert isinstance(r.opt_state, precision.LossScaleState)
    back = train.restore_run(tmp_path / "ck", model)
    assert isinstance(back.opt_state, precision.LossScaleState)
    np.testing.assert_array_equal(back.opt_state.scale, r.opt_state.scale)
    np.testing.assert_array_equal(back.opt_state.counter, r.opt_state.counter)
    # resuming under another precision is refused, naming the setting
    with pytest.raises(ConfigError, match="precision: f16 -> bf16"):
        train.fit(model, params, (x[:256], y[:256]), recipe.loss, "adam", epochs=3,
                  batch_size=32, precision="bf16", progress=False,
                  checkpoint_dir=tmp_path / "ck", engine="manual", resume=True)
    from funnn import cli
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--precision", "bf16", "--quiet",
                     "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["precision"] == "bf16"
    assert cli.main(["eval", str(out), "--json"]) == 0


@pytest.mark.slow
def test_check_numerics_names_the_layer_inside_a_mixed_precision_model(digits):
    _, (x, y), _ = digits
    model = L.serial(L.dense(16), L.activation("relu"), L.dense(10))
    _, params = model.init(jax.random.key(0), (None, 64))
    assert precision.unwrap(precision.apply_policy(model, "bf16"))[0] is model
    assert precision.unwrap(model) is None
    with pytest.raises(train.TrainingDiverged, match=r"output of serial\[2\] dense\(10\)"):
        train.fit(model, params, (x, y), "softmax_cross_entropy", "sgd", learning_rate=1e37,
                  epochs=2, batch_size=64, precision="bf16", check_numerics=True,
                  progress=False)


# --------------------------------------------------------------------------- per example, DP


def test_norm_rules_accumulate_bf16_in_float32():
    """The norm helpers take bfloat16 rows and accumulate in float32: exactly the float32
    sums (bfloat16 accumulation would be off by ~1e-2), in both of outer_sq_norm's forms."""
    from funnn.layers.per_example import outer_sq_norm, sq_norms
    a = _cast(jax.random.normal(jax.random.key(2), (4, 3, 64)), BF16)
    d = _cast(jax.random.normal(jax.random.key(3), (4, 3, 64)), BF16)

    @jax.jit                      # one compile: got and want for each form
    def both(a, d):
        a32, d32 = a.astype(F32), d.astype(F32)
        out = []
        for t in (1, 3):          # no positions: ||a_i||^2 ||d_i||^2; three: the Gram form
            w = jnp.einsum("btm,btn->bmn", a32[:, :t], d32[:, :t])
            out.append((outer_sq_norm(a[:, :t], d[:, :t]), jnp.sum(w * w, (1, 2))))
        return out + [(sq_norms({"g": d}, 4, BF16), jnp.sum(d32 ** 2, (1, 2)))]

    for got, want in both(a, d):
        assert got.dtype == F32
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_bf16_keeps_per_example_rules_and_clips_by_float32_norms():
    """Under bf16 the wrapper keeps the layers' per-example rules: per-example gradients and
    norms equal the float32 vmap(jax.grad) reference to bfloat16's tolerance, the norms come
    back in float32, and the clipped sum is the reference's."""
    from funnn import manual
    base = L.serial(L.conv1d(4, 3, padding="SAME"), L.activation("tanh"), L.flatten(),
                    L.dense(3))
    model = precision.apply_policy(base, "bf16")
    assert model.per_example is not None and model.per_example_norms is not None
    _, params = model.init(jax.random.key(0), (None, 5, 2))
    x = 2 * jax.random.normal(jax.random.key(1), (6, 5, 2))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    xent = losses.softmax_cross_entropy
    ref = jax.vmap(lambda xi, yi: jax.grad(
        lambda p: xent.value(base.apply(p, xi[None]), yi[None]))(params))(x, y)
    ref_n = jnp.sqrt(sum(jnp.sum(g.reshape(6, -1) ** 2, 1) for g in jax.tree.leaves(ref)))
    clip = float(jnp.median(ref_n))

    @jax.jit
    def run(params, x, y):
        _, g = manual.per_example_value_and_grad(model, xent)(params, x, y)
        _, n = manual.per_example_grad_norms(model, xent)(params, x, y)
        _, n2, s = manual.clipped_grad_sum(model, xent, clip)(params, x, y, jnp.ones(6))
        return g, n, n2, s

    g, n, n2, summed = run(params, x, y)
    assert all(a.dtype == F32 and a.shape == b.shape
               for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
        assert float(jnp.max(jnp.abs(a - b))) <= 0.03 * float(jnp.max(jnp.abs(b)))
    assert n.dtype == F32 and n2.dtype == F32
    np.testing.assert_allclose(n, ref_n, rtol=0.02)
    factor = jnp.minimum(1.0, clip / ref_n)
    for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(ref)):
        want = jnp.tensordot(factor, b, axes=1)
        assert float(jnp.max(jnp.abs(a - want))) <= 0.03 * float(jnp.max(jnp.abs(want)))


@pytest.mark.slow
def test_fit_dp_under_bf16_steps_as_float32():
    """fit(dp=..., precision="bf16"): no longer refused; it takes the float32 run's steps (the
    same sampled rows and noise) to bfloat16's tolerance, and accounts epsilon the same way."""
    from funnn import privacy
    model = L.serial(L.dense(8), L.activation("tanh"), L.dense(3))
    _, params = model.init(jax.random.key(0), (None, 4))
    x = np.asarray(jax.random.normal(jax.random.key(1), (32, 4)))
    y = np.arange(32) % 3
    kw = dict(learning_rate=0.5, epochs=1, batch_size=8, engine="manual", key=2,
              progress=False, dp=privacy.DP(0.5, 0.2, sampling="fixed"))
    a = train.fit(model, params, (x, y), "softmax_cross_entropy", "sgd", **kw)
    b = train.fit(model, params, (x, y), "softmax_cross_entropy", "sgd", precision="bf16",
                  **kw)
    assert b.config["precision"] == "bf16" and b.config["dp_clip"] == 0.5
    assert all(p.dtype == F32 for p in jax.tree.leaves(b.params))
    for u, v, p in zip(jax.tree.leaves(b.params), jax.tree.leaves(a.params),
                       jax.tree.leaves(params)):
        assert float(jnp.max(jnp.abs(u - v))) <= 0.02 * float(jnp.max(jnp.abs(v - p))) + 1e-3
    assert b.history[-1]["epsilon"] == a.history[-1]["epsilon"] == pytest.approx(
        kw["dp"].epsilon(4, 8, 32))
