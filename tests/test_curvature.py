"""Curvature and gradient statistics from the hand-written rules (:mod:`funnn.curvature`),
each against its definition computed by autodiff in float64 on small models.

Definitions: ``J`` the Jacobian of the flattened outputs with respect to the flattened params
(``jax.jacobian``), ``H_L`` the Hessian of the batch loss with respect to the outputs
(``jax.hessian``): ``G = J^T H_L J``; the full Hessian by ``jax.hessian`` of the loss; the
per-example gradients by ``vmap`` of ``jax.grad`` over one-example batches; the Kronecker
factors from the layers' inputs (numpy patches for the convolution) and the output deltas by
``jax.vjp`` of the rest of the network.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from funnn import curvature as C
from funnn import layers as L
from funnn import losses
from funnn.core import ConfigError, StateError
from funnn.layers.derived import layer_from_apply

XENT = losses.softmax_cross_entropy
# test programs compile once and run once: XLA's backend optimisations cost more than they save
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# conv1d -> tanh -> flatten -> residual(dense) -> sigmoid -> parallel(dense, dense): 3 logits
LAYERS = (L.conv1d(2, 2), L.activation("tanh"), L.flatten(), L.residual(L.dense(6)),
          L.activation("sigmoid"), L.parallel(L.dense(2), L.dense(1)))
MODEL = L.serial(*LAYERS)


def _setup(model, in_shape, x_shape, out_shape, loss):
    """Params jittered off their init values, normal inputs, targets for ``loss``."""
    _, params = model.init(jax.random.key(0), in_shape)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(a + 0.3 * rng.normal(size=a.shape)), params)
    x = jnp.asarray(rng.normal(size=x_shape))
    k = out_shape[-1]
    if loss.name == "softmax_cross_entropy":
        y = jnp.asarray(rng.integers(0, k, size=out_shape[:-1]))
    elif loss.name == "binary_cross_entropy":
        y = jnp.asarray(rng.uniform(size=out_shape))
    else:
        y = jnp.asarray(rng.normal(size=out_shape))
    return params, x, y


def _definitions(model, loss, params, x, y, full=True):
    """``(J (N, P), H_L (N, N), full Hessian (P, P) or None)`` by autodiff."""
    flat, unravel = ravel_pytree(params)

    def out(fl):
        return model.apply(unravel(fl), x).reshape(-1)

    shape = model.apply(params, x).shape
    jac = jax.jacobian(out)(flat)
    h_out = jax.hessian(lambda o: loss.value(o.reshape(shape), y))(out(flat))
    hess = jax.hessian(lambda fl: loss.value(model.apply(unravel(fl), x), y))(flat) if full \
        else None
    return jac, h_out, hess


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _close(got, want, rtol, what):
    got, want = np.asarray(got), np.asarray(want)
    err = float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-300)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:g}"


@pytest.fixture(scope="module")
def xent():
    """Everything of MODEL with cross-entropy (B = 3), computed in two compiled programs."""
    params, x, y = _setup(MODEL, (None, 4, 2), (3, 4, 2), (3, 3), XENT)
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)),
                     params)
    key = jax.random.key(5)

    @_jit
    def ours(params, x, y, v):
        return dict(ggn=C.ggn_vp(MODEL, XENT)(params, x, y, v),
                    hvp=C.hvp(MODEL, XENT)(params, x, y, v),
                    diag=C.diag_ggn(MODEL, XENT)(params, x, y),
                    mc=C.diag_ggn_mc(MODEL, XENT, samples=3)(params, x, y, key=key),
                    fisher=C.fisher_vp(MODEL, XENT, samples=3)(params, x, y, v, key=key),
                    stats=C.batch_stats(MODEL, XENT)(params, x, y),
                    kflr=C.kfac_factors(MODEL, XENT)(params, x, y),
                    kfac=C.kfac_factors(MODEL, XENT, convention="kfac", samples=3)(
                        params, x, y, key=key))

    @_jit
    def reference(params, x, y):
        jac, h_out, hess = _definitions(MODEL, XENT, params, x, y)

        def one(xi, yi):
            def f(p):
                return XENT.value(MODEL.apply(p, xi[None]), yi[None])
            return f(params), ravel_pytree(jax.grad(f)(params))[0]

        values, per_ex = jax.vmap(one)(x, y)
        out = MODEL.apply(params, x)
        cols = C.loss_sqrt(XENT, out, y)                     # (3 columns, B, K)
        # the layers' inputs, and the output deltas of layers 0 and 3 by jax.vjp of the rest
        hs = [x]
        for layer, p in zip(LAYERS, params):
            hs.append(layer.apply(p, hs[-1]))
        deltas = {}
        for i in (0, 3):
            rest = L.serial(*LAYERS[i + 1:])
            _, pull = jax.vjp(lambda a, i=i, rest=rest: rest.apply(tuple(params[i + 1:]), a),
                              hs[i + 1])
            deltas[i] = jax.vmap(lambda c, pull=pull: pull(c)[0])(cols)
        return dict(jac=jac, h_out=h_out, hess=hess, values=values, per_ex=per_ex, cols=cols,
                    sampled=C.loss_samples(XENT, out, y, key, 3), inputs=hs[:-1],
                    deltas=deltas)

    ref = jax.tree.map(np.asarray, reference(params, x, y))
    return dict(params=params, x=x, y=y, v=v, ours=ours(params, x, y, v),
                ggn=ref["jac"].T @ ref["h_out"] @ ref["jac"], **ref)


@pytest.mark.slow      # the conv network's definitions: one large compile
def test_ggn_vp_hvp_and_exact_diagonal_equal_their_definitions(xent):
    vf, ours = _flat(xent["v"]), xent["ours"]
    _close(_flat(ours["ggn"]), xent["ggn"] @ vf, 1e-9, "ggn_vp")
    _close(_flat(ours["hvp"]), xent["hess"] @ vf, 1e-9, "hvp")
    _close(_flat(ours["diag"]), np.diag(xent["ggn"]), 1e-9, "diag_ggn")
    assert jax.tree.structure(ours["diag"]) == jax.tree.structure(xent["params"])
    # the network's own curvature is not zero here, so the two products differ
    assert np.max(np.abs(_flat(ours["hvp"]) - _flat(ours["ggn"]))) > 1e-3


@pytest.mark.slow      # the conv network's definitions: one large compile
def test_batch_stats_equal_the_statistics_of_vmap_grad(xent):
    stats, g = xent["ours"]["stats"], np.asarray(xent["per_ex"])
    _close(_flat(stats.mean), g.mean(0), 1e-10, "mean")
    _close(_flat(stats.sum_sq), (g * g).sum(0), 1e-10, "sum of squares")
    _close(_flat(stats.variance), g.var(0), 1e-10, "variance")
    np.testing.assert_allclose(stats.values, xent["values"], rtol=1e-12)


@pytest.mark.slow      # the conv network's definitions: one large compile
def test_sampled_fisher_and_diagonal_equal_their_definitions_for_the_same_draws(xent):
    d = xent["sampled"]                                      # (S, B, K), the same key
    jac = np.asarray(xent["jac"]).reshape(3, 3, -1)          # (B, K, P)
    g = np.einsum("bkp,sbk->sbp", jac, d)                    # J_b^T d_sb
    _close(_flat(xent["ours"]["mc"]), (g * g).sum((0, 1)), 1e-9, "diag_ggn_mc")
    jv = np.einsum("bkp,p->bk", jac, _flat(xent["v"]))
    want = np.einsum("sbp,sbk,bk->p", g, d, jv)
    _close(_flat(xent["ours"]["fisher"]), want, 1e-9, "fisher_vp")
    # each draw is (p - onehot(y)) sqrt(1/B / S): its classes sum to 0, none exceeds 1/3
    assert np.allclose(d.sum(-1), 0, atol=1e-12) and np.all(np.abs(d) <= 1 / 3 + 1e-12)


def _patches(x, k):
    """conv1d VALID patches by loops: ``(B, T, k C)`` in ``W.reshape(k C, out)`` order."""
    b, w, _ = x.shape
    return np.stack([np.stack([x[n, t:t + k].reshape(-1) for t in range(w - k + 1)])
                     for n in range(b)])


def _with_bias(a):
    return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], -1)


@pytest.mark.slow      # the conv network's definitions: one large compile
def test_kronecker_factors_equal_their_definitions(xent):
    cols, ins, deltas = xent["cols"], xent["inputs"], xent["deltas"]   # cols: (V, B, K)
    kflr = xent["ours"]["kflr"]
    assert C.factor_conventions(MODEL) == {"0": "kflr/kfc", "3": "kflr", "5.0": "kflr",
                                           "5.1": "kflr"}
    assert sorted(kflr) == sorted(C.factor_conventions(MODEL, "kfac"))
    # conv1d(2, 2) on (B, 4, 2): patches (B, 3, 4) plus the bias column; KFC: G / T
    a = _with_bias(_patches(np.asarray(xent["x"]), 2)).reshape(-1, 5)
    d0 = deltas[0]                                              # (V, B, 3, 2)
    _close(kflr["0"]["A"], a.T @ a / 3, 1e-10, "A conv")
    _close(kflr["0"]["G"], np.einsum("vbti,vbtj->ij", d0, d0) / 3, 1e-10, "G conv")
    # residual(dense(6)): its input is the flatten output; its output delta the residual's
    a3, d3 = _with_bias(ins[3]), deltas[3]
    _close(kflr["3"]["A"], a3.T @ a3 / 3, 1e-10, "A dense")
    _close(kflr["3"]["G"], np.einsum("vbi,vbj->ij", d3, d3), 1e-10, "G dense")
    # the parallel branches: the logits' own columns, split 2 + 1
    a5 = _with_bias(ins[5])
    _close(kflr["5.0"]["A"], a5.T @ a5 / 3, 1e-10, "A branch")
    _close(kflr["5.1"]["G"], np.einsum("vbi,vbj->ij", cols[..., 2:], cols[..., 2:]), 1e-10,
           "G branch")
    # K-FAC's sampled G: the same sums over the sampled deltas
    d = xent["sampled"]
    _close(xent["ours"]["kfac"]["5.0"]["G"], np.einsum("sbi,sbj->ij", d[..., :2], d[..., :2]),
           1e-10, "G sampled")
    _close(xent["ours"]["kfac"]["3"]["A"], kflr["3"]["A"], 1e-12, "A sampled")


@pytest.mark.slow
def test_one_example_kron_of_the_factors_is_the_exact_ggn_block():
    model = L.serial(L.dense(4), L.activation("tanh"), L.dense(3))
    params, x, y = _setup(model, (None, 2), (1, 2), (1, 3), XENT)
    jac, h_out, _, factors = _jit(lambda p: (*_definitions(model, XENT, p, x, y, full=False),
                                             C.kfac_factors(model, XENT)(p, x, y)))(params)
    ggn = np.asarray(jac.T @ h_out @ jac)
    sizes = [a.size for a in jax.tree.leaves(params)]           # 0.W 0.b 1.W 1.b (flat order)
    start = sizes[0] + sizes[1]
    block = ggn[start:, start:]                                 # [W (4, 3) row-major; b (3,)]
    _close(np.kron(factors["2"]["A"], factors["2"]["G"]), block, 1e-10, "kron(A, G)")
    first = ggn[:start, :start]
    _close(np.kron(factors["0"]["A"], factors["0"]["G"]), first, 1e-10, "kron(A, G) layer 0")


@pytest.mark.slow   # ~3 CPU-s; the chunked sums and the errors stay fast
def test_small_mlp_every_quantity_against_its_definition():
    """The fast tier's check: ggn_vp, hvp, diag_ggn, batch_stats and the dense Kronecker
    factors of a dense-tanh-dense network with cross-entropy, in one compiled program."""
    model = L.serial(L.dense(3), L.activation("tanh"), L.dense(3))
    params, x, y = _setup(model, (None, 2), (4, 2), (4, 3), XENT)
    v = jax.tree.map(jnp.ones_like, params)

    @_jit
    def run(params, x, y, v):
        jac, h_out, hess = _definitions(model, XENT, params, x, y)
        per_ex = jax.vmap(lambda xi, yi: ravel_pytree(jax.grad(
            lambda p: XENT.value(model.apply(p, xi[None]), yi[None]))(params))[0])(x, y)
        h = jnp.tanh(x @ params[0]["W"] + params[0]["b"])      # the last dense's input
        cols = C.loss_sqrt(XENT, model.apply(params, x), y)
        d0 = jax.vmap(lambda c: (c @ params[2]["W"].T) * (1 - h * h))(cols)   # by hand
        return (jac.T @ h_out @ jac, hess, per_ex, h, cols, d0,
                C.ggn_vp(model, XENT)(params, x, y, v), C.hvp(model, XENT)(params, x, y, v),
                C.diag_ggn(model, XENT)(params, x, y), C.batch_stats(model, XENT)(params, x, y),
                C.kfac_factors(model, XENT)(params, x, y))

    ggn, hess, g, h, cols, d0, gv, hv, diag, stats, kf = jax.tree.map(
        np.asarray, run(params, x, y, v))
    vf = _flat(v)
    _close(_flat(gv), ggn @ vf, 1e-9, "ggn_vp")
    _close(_flat(hv), hess @ vf, 1e-9, "hvp")
    _close(_flat(diag), np.diag(ggn), 1e-9, "diag_ggn")
    _close(_flat(stats.sum_sq), (g * g).sum(0), 1e-10, "sum of squares")
    _close(_flat(stats.variance), g.var(0), 1e-10, "variance")
    _close(_flat(stats.mean), g.mean(0), 1e-10, "mean")
    a0, a2 = _with_bias(np.asarray(x)), _with_bias(h)
    _close(kf["0"]["A"], a0.T @ a0 / 4, 1e-10, "A first")
    _close(kf["0"]["G"], np.einsum("vbi,vbj->ij", d0, d0), 1e-10, "G first")
    _close(kf["2"]["A"], a2.T @ a2 / 4, 1e-10, "A last")
    _close(kf["2"]["G"], np.einsum("vbi,vbj->ij", cols, cols), 1e-10, "G last")
    assert C.factor_conventions(model, "kfac") == {"0": "kfac", "2": "kfac"}


@pytest.mark.slow          # ~4 CPU s; the block's tangent is in test_jvp's fast tier
def test_ggn_vp_and_diagonal_through_a_transformer_block():
    """The attention and block tangent rules (``J v``) and the block's walk (the diagonal),
    against ``J^T H_L J`` by autodiff; a causal block with rotary positions and key lengths."""
    model = L.serial(L.transformer_block(2, 3, causal=True, rotary=True,
                                         implementation="materialized"), L.dense(3))
    params, x, y = _setup(model, (None, 3, 4), (2, 3, 4), (2, 3, 3), XENT)
    v = jax.tree.map(lambda a: jnp.sin(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)),
                     params)
    lengths = jnp.array([3, 2])

    @_jit
    def run(params, x, y, v):
        flat, unravel = ravel_pytree(params)
        out = model.apply(params, x, lengths=lengths)
        jac = jax.jacobian(lambda f: model.apply(unravel(f), x, lengths=lengths).reshape(-1))(
            flat)
        h_out = jax.hessian(lambda o: XENT.value(o.reshape(out.shape), y))(out.reshape(-1))
        return (jac.T @ h_out @ jac, C.ggn_vp(model, XENT)(params, x, y, v, lengths=lengths),
                C.diag_ggn(model, XENT)(params, x, y, lengths=lengths))

    ggn, gv, diag = jax.tree.map(np.asarray, run(params, x, y, v))
    _close(_flat(gv), ggn @ _flat(v), 1e-9, "ggn_vp")
    _close(_flat(diag), np.diag(ggn), 1e-9, "diag_ggn")


@pytest.mark.slow
@pytest.mark.parametrize("loss", [losses.mse, losses.binary_cross_entropy],
                         ids=lambda l: f"{l.name}-{l.reduction}")
def test_every_loss_on_a_sequence_model(loss, monkeypatch):
    """Outputs with positions (B, T, K): per-position terms must not mix in the exact diagonal;
    dense layers over positions form their per-example gradients in chunks (a budget of 7
    elements: one example at a time)."""
    monkeypatch.setattr(C, "_SQ_BUDGET", 7)
    model = L.serial(L.dense(3), L.activation("tanh"), L.dense(2))
    params, x, y = _setup(model, (None, 3, 2), (2, 3, 2), (2, 3, 2), loss)

    @_jit
    def run(params, x, y, v):
        jac, h_out, hess = _definitions(model, loss, params, x, y)

        def one(xi, yi):
            return jax.grad(lambda p: loss.value(model.apply(p, xi[None]), yi[None]))(params)

        per_ex = jax.vmap(lambda t: ravel_pytree(t)[0])(jax.vmap(one)(x, y))
        return (jac.T @ h_out @ jac, hess, per_ex, C.ggn_vp(model, loss)(params, x, y, v),
                C.hvp(model, loss)(params, x, y, v), C.diag_ggn(model, loss)(params, x, y),
                C.batch_stats(model, loss)(params, x, y))

    v = jax.tree.map(jnp.ones_like, params)
    ggn, hess, per_ex, gv, hv, diag, stats = run(params, x, y, v)
    vf = _flat(v)
    _close(_flat(gv), ggn @ vf, 1e-9, "ggn_vp")
    _close(_flat(hv), hess @ vf, 1e-9, "hvp")
    _close(_flat(diag), np.diag(ggn), 1e-9, "diag_ggn")
    _close(_flat(stats.sum_sq), (np.asarray(per_ex) ** 2).sum(0), 1e-10, "sum of squares")
    _close(_flat(stats.variance), np.asarray(per_ex).var(0), 1e-10, "variance")


def test_sums_of_squares_in_chunks_with_a_padded_last_chunk(monkeypatch):
    monkeypatch.setattr(C, "_SQ_BUDGET", 12)      # m n = 6: 2 examples a chunk, 5 -> 3 chunks
    rng = np.random.default_rng(3)
    a, d = rng.normal(size=(5, 3, 2)), rng.normal(size=(5, 3, 3))
    want = (np.einsum("btm,btn->bmn", a, d) ** 2).sum(0)
    got, one = _jit(lambda a, d: (C.sum_sq_outer(a, d), C.sum_sq_outer(a[:, :1], d[:, :1])))(
        a, d)
    _close(got, want, 1e-12, "chunked")
    _close(one, (np.einsum("bm,bn->bmn", a[:, 0], d[:, 0]) ** 2).sum(0), 1e-12, "T = 1")


def test_clear_errors():
    """Raised while tracing (``jax.eval_shape``: nothing compiles or runs)."""
    derived = layer_from_apply(lambda k, s: (s, {"a": jnp.ones(s[-1])}),
                               lambda p, x, **kw: x * p["a"], name="scaled")
    model = L.serial(L.dense(2), derived)
    params, x, y = _setup(model, (None, 2), (2, 2), (2, 2), XENT)

    def trace(fn, *args, **kw):
        return jax.eval_shape(lambda: fn(*args, **kw))

    with pytest.raises(ConfigError, match=r"serial\[1\].*scaled has no per-example"):
        trace(C.batch_stats(model, XENT), params, x, y)
    with pytest.raises(ConfigError, match=r"serial\[1\].*scaled has no hand-written tangent"):
        trace(C.ggn_vp(model, XENT), params, x, y, params)
    mine = dataclasses.replace(losses.mse, name="my_loss")
    with pytest.raises(ConfigError, match=r"no closed-form Hessian.*my_loss"):
        C.diag_ggn(L.dense(2), mine)
    with pytest.raises(StateError, match="stateful"):
        C.ggn_vp(L.serial(L.dense(2), L.batch_norm()), XENT)
    with pytest.raises(ConfigError, match="convention must be one of"):
        C.kfac_factors(L.dense(2), XENT, convention="kfc")
    p = params[0]
    with pytest.raises(ConfigError, match="PRNG key"):
        trace(C.kfac_factors(L.dense(2), XENT, convention="kfac"), p, x, y)
    with pytest.raises(ConfigError, match="samples must be a positive int"):
        trace(C.diag_ggn_mc(L.dense(2), XENT, samples=0), p, x, y, key=jax.random.key(0))
