"""Curvature optimizers (:mod:`funnn.optimizers`) in float64 against hand-written references.

The K-FAC update against ``kron(A + a I, G + g I)^-1`` applied to the gradient, with ``A``
and ``G`` written out by hand for a dense-tanh-dense network (inputs with a ones column; the
softmax Hessian ``(diag p - p p^T) / B`` pushed back through ``W2`` and ``tanh'``) and the
gradient by ``jax.grad``; the inverse refresh schedule and the moving averages; the
diagonal-GGN preconditioner against ``grad / (diag(J^T H J) + damping)`` with ``J`` by
``jax.jacobian``; the quadratic-model adaptation against the 2x2 solve on the explicit GGN;
``fit(optimizer="kfac")``; bad input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from funnn import curvature, losses, optimizers, train
from funnn import layers as L
from funnn.core import ConfigError, StateError

XENT = losses.softmax_cross_entropy
MODEL = L.serial(L.dense(3), L.activation("tanh"), L.dense(4))
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def _problem(b=5, seed=0):
    _, params = MODEL.init(jax.random.key(seed), (None, 2))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)
                                                + 0.3 * rng.normal(size=a.shape)), params)
    x = jnp.asarray(rng.normal(size=(b, 2)))
    y = jnp.asarray(rng.integers(0, 4, size=b))
    return params, x, y


def _grad(params, x, y):
    return jax.grad(lambda p: XENT.value(MODEL.apply(p, x), y))(params)


def _hand_factors(params, x, y):
    """``{"0": (A, G), "2": (A, G)}`` of MODEL with numpy: exact (kflr) factors."""
    p = {k: {n: np.asarray(v) for n, v in params[int(k)].items()} for k in ("0", "2")}
    x = np.asarray(x)
    b = x.shape[0]
    h = np.tanh(x @ p["0"]["W"] + p["0"]["b"])
    z = h @ p["2"]["W"] + p["2"]["b"]
    prob = np.exp(z - z.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    hs = [(np.diag(q) - np.outer(q, q)) / b for q in prob]          # H_i of the mean loss
    ones = np.ones((b, 1))
    a0, a2 = np.hstack([x, ones]), np.hstack([h, ones])
    g2 = sum(hs)
    g0 = sum(np.diag(1 - hi * hi) @ p["2"]["W"] @ hm @ p["2"]["W"].T @ np.diag(1 - hi * hi)
             for hi, hm in zip(h, hs))
    return {"0": (a0.T @ a0 / b, g0), "2": (a2.T @ a2 / b, g2)}


def _stacked(tree, i):
    """``[dW; db]`` of layer ``i``."""
    return np.vstack([np.asarray(tree[i]["W"]), np.asarray(tree[i]["b"])[None]])


def test_kfac_update_is_the_damped_kronecker_inverse_by_hand(x64):
    params, x, y = _problem()
    damping = 0.04
    plain = optimizers.scale_by_kfac(MODEL, XENT, convention="kflr", damping=damping,
                                     pi_damping=False)
    pi = optimizers.scale_by_kfac(MODEL, XENT, convention="kflr", damping=damping)

    @_jit
    def run(params, x, y):
        g = _grad(params, x, y)
        return (g, plain.update(g, plain.init(params), params, x=x, y=y)[0],
                pi.update(g, pi.init(params), params, x=x, y=y)[0])

    g, got, got_pi = run(params, x, y)
    root = np.sqrt(damping)
    for i, (a, gm) in _hand_factors(params, x, y).items():
        v = _stacked(g, int(i)).reshape(-1)
        ia, ig = np.eye(len(a)), np.eye(len(gm))
        want = np.linalg.solve(np.kron(a + root * ia, gm + root * ig), v)
        np.testing.assert_allclose(_stacked(got, int(i)).reshape(-1), want, rtol=1e-9,
                                   atol=1e-12, err_msg=f"layer {i}")
        t = np.sqrt((np.trace(a) / len(a)) / (np.trace(gm) / len(gm)))      # pi-damping
        want = np.linalg.solve(np.kron(a + t * root * ia, gm + root / t * ig), v)
        np.testing.assert_allclose(_stacked(got_pi, int(i)).reshape(-1), want, rtol=1e-9,
                                   atol=1e-12, err_msg=f"layer {i}, pi-damping")


def test_inverses_refresh_every_n_steps_and_factors_average(x64):
    params, _, _ = _problem()
    batches = [_problem(b=4, seed=s)[1:] for s in range(1, 5)]
    opt = optimizers.scale_by_kfac(MODEL, XENT, convention="kflr", damping=0.1, decay=0.5,
                                   inverse_every=3)
    factors_of = curvature.kfac_factors(MODEL, XENT)

    @_jit
    def run(params):
        state, states, fresh = opt.init(params), [], []
        for x, y in batches:
            state = opt.update(_grad(params, x, y), state, params, x=x, y=y)[1]
            states.append(state)
            fresh.append(factors_of(params, x, y))
        return states, fresh, [optimizers.damped_inverses(s.factors, 0.1) for s in states]

    states, fresh, inverses = run(params)
    close = functools.partial(jax.tree.map, functools.partial(np.testing.assert_allclose,
                                                              rtol=1e-10, atol=1e-13))
    close(states[0].factors, fresh[0])                  # the first step: no average yet
    close(states[1].factors, jax.tree.map(lambda o, n: 0.5 * o + 0.5 * n, states[0].factors,
                                          fresh[1]))
    # counts 0 and 3 refresh; counts 1 and 2 keep the inverses of count 0
    assert [int(s.count) for s in states] == [1, 2, 3, 4]
    close(states[0].inverses, inverses[0])
    close(states[1].inverses, inverses[0])
    close(states[2].inverses, inverses[0])
    close(states[3].inverses, inverses[3])
    assert not np.allclose(inverses[3]["2"]["A"], inverses[0]["2"]["A"])


def _ggn(params, x, y):
    """``J^T H J`` by autodiff: the definition."""
    flat, unravel = ravel_pytree(params)
    out = lambda f: MODEL.apply(unravel(f), x).reshape(-1)
    jac = jax.jacobian(out)(flat)
    shape = MODEL.apply(params, x).shape
    h = jax.hessian(lambda o: XENT.value(o.reshape(shape), y))(out(flat))
    return jac.T @ h @ jac


def test_diag_ggn_preconditioner_is_grad_over_the_damped_diagonal(x64):
    params, x, y = _problem()
    pre = optimizers.scale_by_diag_ggn(MODEL, XENT, damping=0.05)

    @_jit
    def run(params):
        g = _grad(params, x, y)
        return g, pre.update(g, pre.init(params), params, x=x, y=y)[0], _ggn(params, x, y)

    g, p, ggn = run(params)
    flat = lambda t: np.asarray(ravel_pytree(t)[0])
    np.testing.assert_allclose(flat(p), flat(g) / (np.diag(ggn) + 0.05), rtol=1e-10)


@pytest.mark.slow       # two adapted steps and two explicit GGNs: one larger compile
def test_quadratic_model_step_is_the_2x2_solve_on_the_explicit_ggn(x64):
    params, x, y = _problem()
    x2, y2 = _problem(b=4, seed=7)[1:]
    pre = optimizers.scale_by_diag_ggn(MODEL, XENT, damping=0.05)
    adapted = optimizers.with_quadratic_model(pre, MODEL, XENT, damping=0.05)

    @_jit
    def run(params):
        g = _grad(params, x, y)
        p = pre.update(g, pre.init(params), params, x=x, y=y)[0]
        step1, s1 = adapted.update(g, adapted.init(params), params, x=x, y=y)
        moved = optax.apply_updates(params, step1)
        g2 = _grad(moved, x2, y2)
        step2, s2 = adapted.update(g2, s1, moved, x=x2, y=y2)
        return (g, p, _ggn(params, x, y), step1, s1, g2, _ggn(moved, x2, y2), step2, s2,
                pre.update(g2, s1.inner, moved, x=x2, y=y2)[0])

    g, p, ggn, step1, s1, g2, ggn2, step2, s2, p2 = run(params)
    flat = lambda t: np.asarray(ravel_pytree(t)[0])
    # step 1: no previous step, alpha = -g.D / D^T C D with D = -P g, C = G + 0.05 I
    c = ggn + 0.05 * np.eye(len(ggn))
    d = -flat(p)
    alpha = -flat(g) @ d / (d @ c @ d)
    np.testing.assert_allclose(flat(step1), alpha * d, rtol=1e-9)
    assert float(s1.mu) == 0.0
    # step 2: alpha, mu from the 2x2 system on the explicit GGN at the moved params
    c2 = ggn2 + 0.05 * np.eye(len(ggn2))
    d2, prev = -flat(p2), flat(step1)
    m = np.array([[d2 @ c2 @ d2, d2 @ c2 @ prev], [prev @ c2 @ d2, prev @ c2 @ prev]])
    am = np.linalg.solve(m, -np.array([flat(g2) @ d2, flat(g2) @ prev]))
    np.testing.assert_allclose([float(s2.alpha), float(s2.mu)], am, rtol=1e-8)
    np.testing.assert_allclose(flat(step2), am[0] * d2 + am[1] * prev, rtol=1e-8, atol=1e-14)


@pytest.mark.slow       # fit compiles an epoch of K-FAC steps with the adapted step
def test_fit_by_name_trains_and_the_step_passes_the_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
    y = jnp.asarray((x[:, 0] + x[:, 1] > 0).astype(np.int32) + 2 * (x[:, 2] > 0))
    model = L.serial(L.dense(8), L.activation("relu"), L.dense(4))
    _, params = model.init(jax.random.key(0), (None, 6))
    r = train.fit(model, params, (x, y), XENT, "kfac", epochs=3, batch_size=16)
    losses_ = [h["train_loss"] for h in r.history]
    assert losses_[-1] < 0.7 * losses_[0], losses_
    assert r.config["optimizer"] == "kfac" and r.config["learning_rate"] == 1.0
    assert int(r.opt_state[0].inner.count) == 12           # 3 epochs x 4 batches
    from funnn.privacy import DP
    with pytest.raises(ConfigError, match="DP-SGD"):
        train.fit(model, params, (x, y), XENT, "kfac", batch_size=16, dp=DP(1.0, 1.0))


def test_bad_input_is_named():
    ln = L.serial(L.dense(4), L.layer_norm(), L.dense(3))
    _, params = ln.init(jax.random.key(0), (None, 2))
    with pytest.raises(ConfigError, match=r"layer 1 \(layer_norm.*fallback='gradient'"):
        optimizers.kfac(ln, XENT).init(params)
    # the documented fallback: layer_norm's gradient passes through unpreconditioned
    opt = optimizers.scale_by_kfac(ln, XENT, fallback="gradient")
    x, y = jnp.ones((3, 2)), jnp.zeros(3, jnp.int32)
    g = jax.tree.map(jnp.ones_like, params)
    out = _jit(lambda g, p: opt.update(g, opt.init(p), p, x=x, y=y)[0])(g, params)
    assert all(np.all(np.asarray(v) == 1) for v in jax.tree.leaves(out[1]))
    with pytest.raises(ConfigError, match="needs the batch"):
        opt.update(g, None, params)
    with pytest.raises(StateError):
        optimizers.kfac(L.serial(L.dense(2), L.batch_norm()), XENT)
    for kw, match in [({"damping": 0}, "damping"), ({"decay": 1.0}, "decay"),
                      ({"inverse_every": 0}, "inverse_every"), ({"fallback": "x"}, "fallback"),
                      ({"convention": "kfc"}, "convention"),
                      ({"adapt": False, "momentum": 1.5}, "momentum")]:
        with pytest.raises(ConfigError, match=match):
            optimizers.kfac(MODEL, XENT, **kw)
    with pytest.raises(ConfigError, match="no closed-form Hessian"):
        optimizers.diag_ggn(MODEL, lambda p, y: jnp.sum(p))
    with pytest.raises(ConfigError, match="pass model= and loss="):
        train.get_optimizer("kfac", 0.1)


@pytest.mark.slow       # two models, two compiles
def test_conv_and_single_layer_models_precondition_by_their_factors(x64):
    """Convolutions (``W (kh, kw, cin, cout)`` as ``(kh kw cin, cout)``, the patches' order)
    and a model that is one layer (``<root>``), against the Kronecker solve on the factors of
    :func:`funnn.curvature.kfac_factors` (checked against their definitions there)."""
    conv = L.serial(L.conv2d(3, (2, 2)), L.activation("tanh"), L.flatten(), L.dense(4))
    rng = np.random.default_rng(0)
    for model, shape, get in [(conv, (None, 3, 3, 2), lambda t: t[0]),
                              (L.dense(4), (None, 3), lambda t: t)]:
        _, params = model.init(jax.random.key(0), shape)
        x = jnp.asarray(rng.normal(size=(3,) + shape[1:]))
        y = jnp.asarray(rng.integers(0, 4, size=3))
        opt = optimizers.scale_by_kfac(model, XENT, convention="kflr", damping=0.01,
                                       pi_damping=False)

        @_jit
        def run(params, x, y, model=model, opt=opt):
            g = jax.grad(lambda p: XENT.value(model.apply(p, x), y))(params)
            return (g, opt.update(g, opt.init(params), params, x=x, y=y)[0],
                    curvature.kfac_factors(model, XENT)(params, x, y))

        g, got, factors = run(params, x, y)
        a, gm = (np.asarray(m) for m in factors["0" if model is conv else "<root>"].values())
        w = np.asarray(get(g)["W"])
        v = np.vstack([w.reshape(-1, w.shape[-1]), np.asarray(get(g)["b"])[None]])
        want = np.linalg.solve(np.kron(a + 0.1 * np.eye(len(a)), gm + 0.1 * np.eye(len(gm))),
                               v.reshape(-1))
        u = get(got)
        np.testing.assert_allclose(
            np.vstack([np.asarray(u["W"]).reshape(-1, w.shape[-1]), np.asarray(u["b"])[None]])
            .reshape(-1), want, rtol=1e-9, atol=1e-13)
