"""Laplace posteriors (:mod:`funnn.laplace`) and calibration (:mod:`funnn.calibration`) in
float64 on a tiny MLP, against dense definitions: ``G = J^T H_L J`` by ``jax.jacobian`` and the
softmax Hessian written out, ``Sigma = (H + delta I)^-1`` by ``np.linalg.inv``, the evidence
by ``slogdet`` on a grid of prior precisions; and against laplace-torch where installed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from funnn import calibration, curvature, losses
from funnn import laplace as LA
from funnn import layers as L
from funnn.core import ConfigError, ShapeError

XENT = losses.softmax_cross_entropy
MODEL = L.serial(L.dense(5), L.activation("tanh"), L.dense(3))
N, D, C = 12, 4, 3


@pytest.fixture(scope="module")
def setup():
    _, params = MODEL.init(jax.random.key(0), (None, D))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(a + 0.5 * rng.normal(size=a.shape)), params)
    x = jnp.asarray(rng.normal(size=(N, D)))
    y = jnp.asarray(rng.integers(0, C, size=N))
    return params, x, y


@pytest.fixture(scope="module")
def dense(setup):
    """``(G, J (N, C, P), K-FAC factors)``: ``G = sum_i J_i^T (diag p_i - p_i p_i^T) J_i`` over
    the flat params, and the summed loss's factors from :func:`funnn.curvature.kfac_factors`."""
    params, x, y = setup
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def ggn(flat):
        jac = jax.jacobian(lambda f: MODEL.apply(unravel(f), x))(flat)
        p = jax.nn.softmax(MODEL.apply(unravel(flat), x), -1)
        h = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
        return jnp.einsum("icp,icd,idq->pq", jac, h, jac), jac

    g, jac = ggn(flat)
    kfac = jax.jit(curvature.kfac_factors(MODEL, XENT.with_reduction("sum")))(params, x, y)
    return np.asarray(g), np.asarray(jac), jax.tree.map(np.asarray, kfac)


def _layer_block(params, path, flat_index):
    """Flat-params indices of a layer's ``[W; b]`` rows, row-major ``(in + 1, out)``."""
    layer = LA._at(params, path)
    w, b = np.asarray(flat_index(path, "W")), np.asarray(flat_index(path, "b"))
    return np.concatenate([w.reshape(-1, layer["W"].shape[-1]), b[None]], 0).ravel()


def _indexer(params):
    idx = jax.tree.map(lambda a: np.zeros(a.shape, int), params)
    leaves, tree = jax.tree.flatten(idx)
    start, out = 0, []
    for leaf in leaves:
        out.append(np.arange(start, start + leaf.size).reshape(leaf.shape))
        start += leaf.size
    idx = jax.tree.unflatten(tree, out)
    return lambda path, name: LA._at(idx, path)[name]


@pytest.fixture(scope="module")
def posteriors(setup):
    params, x, y = setup
    return {(s, st): LA.laplace(MODEL, XENT, params, (x, y), subset=s, structure=st,
                                prior_precision=None, batch_size=6)
            for s in LA.SUBSETS for st in LA.STRUCTURES}


def _dense_precision(post, params, dense):
    """``(indices into the flat params, H over them)`` as the posterior holds it."""
    ggn, _, kfac = dense
    at = _indexer(params)
    if post.structure == "diag":
        idx = np.concatenate([np.ravel(at(p, k)) for p in post.paths for k in ("W", "b")])
        return idx, np.diag(np.diag(ggn)[idx])
    idx = np.concatenate([_layer_block(params, p, at) for p in post.paths])
    blocks = []
    for p in post.paths:
        f = kfac[p]
        blocks.append(np.kron(f["A"], f["G"]))
    h = np.zeros((idx.size, idx.size))
    o = 0
    for blk in blocks:
        h[o:o + len(blk), o:o + len(blk)] = blk
        o += len(blk)
    return idx, h


def test_diag_precision_is_the_ggn_diagonal_plus_the_prior(setup, posteriors, dense):
    params, x, y = setup
    ggn = dense[0]
    at = _indexer(params)
    post = posteriors[("all", "diag")]          # fitted 6 examples at a time
    assert post.paths == ("0", "2") and posteriors[("last_layer", "diag")].paths == ("2",)
    d = post.prior_precision
    for path in post.paths:
        for k in ("W", "b"):
            np.testing.assert_allclose(post.curvature[path][k] + d,
                                       np.diag(ggn)[at(path, k)] + d, rtol=1e-10)
    nll = XENT.with_reduction("sum").value(MODEL.apply(params, x), y)
    np.testing.assert_allclose(post.nll, nll, rtol=1e-12)


def test_kfac_posterior_holds_the_summed_kronecker_factors(posteriors, dense):
    post = posteriors[("all", "kfac")]
    full = dense[2]
    for path, k in post.curvature.items():
        got = np.kron(k.qa @ np.diag(k.a) @ k.qa.T, k.qg @ np.diag(k.g) @ k.qg.T)
        np.testing.assert_allclose(got, np.kron(full[path]["A"], full[path]["G"]),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", LA.STRUCTURES)
def test_evidence_and_its_optimum_against_a_grid(setup, posteriors, dense, structure):
    params = setup[0]
    post = posteriors[("last_layer", structure)]
    idx, h = _dense_precision(post, params, dense)
    flat = np.asarray(ravel_pytree(params)[0])[idx]
    grid = np.geomspace(1e-3, 1e3, 601)

    def evidence(d):
        logdet = np.linalg.slogdet(h + d * np.eye(len(h)))[1]
        return (-float(post.nll) - d * flat @ flat / 2 + len(h) / 2 * np.log(d) - logdet / 2)

    dense = np.array([evidence(d) for d in grid])
    np.testing.assert_allclose(LA.log_marginal_likelihood(post, grid), dense, rtol=1e-10)
    best = int(np.argmax(dense))
    assert 0 < best < len(grid) - 1
    assert grid[best - 1] <= float(post.prior_precision) <= grid[best + 1]
    assert float(post.log_marginal) >= dense[best] - 1e-12


@pytest.mark.parametrize("structure", LA.STRUCTURES)
def test_logit_covariance_against_the_dense_posterior(setup, posteriors, dense, structure):
    params, x, _ = setup
    post = posteriors[("all", structure)]
    idx, h = _dense_precision(post, params, dense)
    jac = dense[1]
    sigma = np.linalg.inv(h + float(post.prior_precision) * np.eye(len(h)))
    mean, cov = LA.logit_moments(post, x)
    np.testing.assert_allclose(mean, MODEL.apply(params, x), rtol=1e-12)
    np.testing.assert_allclose(cov, jac[:, :, idx] @ sigma @ jac[:, :, idx].transpose(0, 2, 1),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.slow          # ~2.3 CPU-s of compiles; the dense layers' case stays fast
def test_kfac_logit_covariance_of_a_convolution():
    """A convolution's ``[W; b]`` is ``W`` reshaped to ``(kh kw c_in, c_out)`` with ``b`` last,
    in the order of its patches: ``J Sigma J^T`` against the dense block-diagonal posterior
    built from :func:`funnn.curvature.kfac_factors`."""
    model = L.serial(L.conv2d(2, (2, 2)), L.activation("tanh"), L.flatten(), L.dense(C))
    _, params = model.init(jax.random.key(0), (None, 3, 3, 1))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 1)))
    y = jnp.asarray(rng.integers(0, C, size=4))
    post = LA.laplace(model, XENT, params, (x, y), subset="all", structure="kfac",
                      prior_precision=0.5)
    factors = jax.jit(curvature.kfac_factors(model, XENT.with_reduction("sum")))(params, x, y)
    at = _indexer(params)
    idx = np.concatenate([_layer_block(params, p, at) for p in post.paths])
    h = np.zeros((idx.size, idx.size))
    o = 0
    for p in post.paths:
        blk = np.kron(factors[p]["A"], factors[p]["G"])
        h[o:o + len(blk), o:o + len(blk)] = blk
        o += len(blk)
    sigma = np.linalg.inv(h + 0.5 * np.eye(len(h)))
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jit(jax.jacobian(lambda f: model.apply(unravel(f), x)))(flat))[:, :, idx]
    _, cov = LA.logit_moments(post, x)
    np.testing.assert_allclose(cov, jac @ sigma @ jac.transpose(0, 2, 1), rtol=1e-9,
                               atol=1e-12)


def test_probit_and_sampled_predictives_agree(setup, posteriors):
    params, x, _ = setup
    post = posteriors[("last_layer", "kfac")]
    probit = post.predictive(x)
    mc = post.predictive(x, method="samples", key=jax.random.key(0), samples=20000)
    np.testing.assert_allclose(probit.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(mc.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(mc, probit, atol=0.03)        # probit is an approximation
    assert np.abs(mc - jax.nn.softmax(MODEL.apply(params, x))).max() > 0.05   # not the MAP's


@pytest.mark.parametrize("structure", LA.STRUCTURES)
def test_posterior_samples_have_the_posterior_covariance(setup, posteriors, dense, structure):
    params = setup[0]
    post = posteriors[("last_layer", structure)]
    idx, h = _dense_precision(post, params, dense)
    sigma = np.linalg.inv(h + float(post.prior_precision) * np.eye(len(h)))
    drawn = LA.sample(post, jax.random.key(1), 20000)
    flat = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(drawn))
    np.testing.assert_array_equal(flat[:, :25], np.broadcast_to(ravel_pytree(params)[0][:25],
                                                                (20000, 25)))   # layer 0 fixed
    np.testing.assert_allclose(flat[:, idx].mean(0), ravel_pytree(params)[0][idx],
                               atol=0.05 * np.sqrt(np.diag(sigma)).max())
    np.testing.assert_allclose(np.cov(flat[:, idx].T), sigma, atol=0.05 * np.abs(sigma).max())


def test_a_strong_prior_gives_back_the_softmax(setup):
    params, x, y = setup
    post = LA.laplace(MODEL, XENT, params, (x, y), prior_precision=1e12)
    np.testing.assert_allclose(post.predictive(x), jax.nn.softmax(MODEL.apply(params, x)),
                               atol=1e-9)


def test_ece_and_nll_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 1, 0])
    # 2 bins, (0, .5] and (.5, 1]: confidences .9 .8 .7 .55 | .5; right 1 0 1 0 | 1 (argmax 0)
    r = calibration.reliability(probs, labels, bins=2)
    np.testing.assert_array_equal(r.counts, [1, 4])
    np.testing.assert_allclose(r.confidence, [0.5, (0.9 + 0.8 + 0.7 + 0.55) / 4])
    np.testing.assert_allclose(r.accuracy, [1.0, 0.5])
    want = 1 / 5 * 0.5 + 4 / 5 * abs(0.5 - 0.7375)
    assert calibration.expected_calibration_error(probs, labels, bins=2) == pytest.approx(want)
    nll = -np.mean(np.log([0.9, 0.2, 0.7, 0.45, 0.5]))
    assert calibration.nll(probs, labels) == pytest.approx(nll)
    assert np.isnan(calibration.reliability(probs, labels, bins=15).accuracy[0])


def test_bad_input_is_named(setup, posteriors):
    params, x, y = setup
    with pytest.raises(ConfigError, match="softmax cross-entropy"):
        LA.laplace(MODEL, losses.mse, params, (x, y))
    with pytest.raises(ConfigError, match="subset"):
        LA.laplace(MODEL, XENT, params, (x, y), subset="first")
    with pytest.raises(ConfigError, match="structure"):
        LA.laplace(MODEL, XENT, params, (x, y), structure="full")
    for bad in (-1.0, 0, float("inf"), "big", True):
        with pytest.raises(ConfigError, match="prior_precision"):
            LA.laplace(MODEL, XENT, params, (x, y), prior_precision=bad)
    norm = L.serial(L.dense(3), L.layer_norm())
    _, pn = norm.init(jax.random.key(0), (None, D))
    with pytest.raises(ConfigError, match="kfac"):
        LA.laplace(norm, XENT, pn, (x, y), structure="kfac")
    with pytest.raises(ConfigError, match="key"):
        posteriors[("last_layer", "diag")].predictive(x, method="samples")
    with pytest.raises(ConfigError, match="method"):
        posteriors[("last_layer", "diag")].predictive(x, method="mc")
    with pytest.raises(ShapeError, match="labels"):
        calibration.expected_calibration_error(np.ones((3, 2)) / 2, np.array([0, 1, 2]))


# --------------------------------------------------------------------------- laplace-torch


def _torch_twin(torch, params, bias):
    net = torch.nn.Sequential(torch.nn.Linear(D, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, C, bias=bias)).double()
    with torch.no_grad():
        for i in (0, 2):
            net[i].weight.copy_(torch.tensor(np.asarray(params[i]["W"]).T))
            if "b" in params[i]:
                net[i].bias.copy_(torch.tensor(np.asarray(params[i]["b"])))
    return net


@pytest.mark.slow
@pytest.mark.parametrize("structure", LA.STRUCTURES)
def test_last_layer_posterior_matches_laplace_torch(setup, structure):
    """laplace-torch's last-layer ``diag``/``kron`` Laplace (its default Curvlinops GGN: the
    exact GGN, K-FAC with exact columns, prior ``N(0, 1/delta)``, temperature 1): the same
    posterior variances, GLM probit predictive and log marginal likelihood. Its K-FAC keeps
    a layer's weight and bias as separate blocks (funnn: one ``[W; b]`` block), so the
    K-FAC comparison uses a last layer without bias, where the two agree exactly."""
    torch = pytest.importorskip("torch")
    laplace_torch = pytest.importorskip("laplace")
    params, x, y = setup
    bias = structure == "diag"
    model = L.serial(L.dense(5), L.activation("tanh"), L.dense(C, use_bias=bias))
    params = (params[0], params[1], {"W": params[2]["W"]} if not bias else params[2])
    net = _torch_twin(torch, params, bias)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))), batch_size=N)
    la = laplace_torch.Laplace(net, "classification", subset_of_weights="last_layer",
                               hessian_structure="kron" if structure == "kfac" else "diag",
                               prior_precision=0.7)
    la.fit(loader)
    post = LA.laplace(model, XENT, params, (x, y), structure=structure, prior_precision=0.7)
    xt = torch.tensor(np.asarray(x))
    want = la(xt, pred_type="glm", link_approx="probit").detach().numpy()
    np.testing.assert_allclose(post.predictive(x), want, rtol=1e-9, atol=1e-12)
    _, cov = LA.logit_moments(post, x)
    np.testing.assert_allclose(cov, la._glm_predictive_distribution(xt)[1].detach().numpy(),
                               rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(post.log_marginal, float(la.log_marginal_likelihood()),
                               rtol=1e-10)
    if structure == "diag":
        h = post.curvature["2"]
        ours = np.concatenate([np.asarray(h["W"]).T.ravel(), np.asarray(h["b"])])
        np.testing.assert_allclose(la.posterior_variance.numpy(), 1 / (ours + 0.7), rtol=1e-9)
