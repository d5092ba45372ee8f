"""The seed examples: each script's main() runs and its claims hold against independent oracles.

examples/ is not a package, so the scripts are loaded by file path. Oracles written
here, independent of funnn: numpy least squares (neuron), a numpy Rosenblatt loop
(perceptron), a numpy transcription of the seed's loop (seed network), a numpy
delta-rule loop (sigmoid network), and numpy matrix products (compress).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from example_loader import load

# --------------------------------------------------------------------------- neuron


def test_neuron_learns_the_least_squares_line():
    ex = load("neuron")
    r = ex.main()
    x, y = (np.asarray(a)[:, 0] for a in ex.make_data())
    (w, b), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)
    assert r["w"] == pytest.approx(w, abs=1e-8) and r["b"] == pytest.approx(b, abs=1e-8)
    assert abs(r["w"] - 3.0) < 0.05 and abs(r["b"] + 1.0) < 0.05
    assert r["grad_err"] < 1e-12
    assert np.all(np.diff(r["losses"]) <= 1e-15)          # gradient descent on a quadratic


# --------------------------------------------------------------------------- perceptron


def _numpy_rosenblatt(x, t, lr=1.0, max_epochs=100):
    """Rosenblatt's rule with the step 1 for z >= 0, from zeros; (w, b, epochs)."""
    w, b = np.zeros(x.shape[1]), 0.0
    for epoch in range(1, max_epochs + 1):
        mistakes = 0
        for xi, ti in zip(x, t):
            err = ti - float(xi @ w + b >= 0)
            w, b = w + lr * err * xi, b + lr * err
            mistakes += err != 0
        if mistakes == 0:
            return w, b, epoch
    raise AssertionError("did not converge")


def test_perceptron_tables_and_rosenblatt():
    r = load("perceptron").main()
    x = np.array(list(itertools.product([0, 1], repeat=3)), float)
    # by hand: threshold 5 -> weather; threshold 3 -> weather or (friend and commute)
    go5 = [0, 0, 0, 0, 1, 1, 1, 1]
    go3 = [0, 0, 0, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(r["tables"][5.0], go5)
    np.testing.assert_array_equal(r["tables"][3.0], go3)
    assert r["step_grad"] == 0.0
    for th, t in ((5.0, go5), (3.0, go3)):
        w, b, epochs = _numpy_rosenblatt(x, np.array(t, float))
        got = r["learned"][th]
        np.testing.assert_array_equal(got["W"], w)
        assert got["b"] == b and got["epochs"] == epochs
        np.testing.assert_array_equal(got["out"], t)


# --------------------------------------------------------------------------- seed network


def _seed_loop(steps=1000, lr=0.001):
    """The seed's numpy network, transcribed; per step (w1, b1, w2, b2) and predictions."""
    x = np.array([[4.0, 9.0, 1.0], [2.0, 5.0, 6.0], [1.0, 8.0, 3.0]])
    t = np.dot(x, np.array([[2.0, -1.0, 5.0]]).T)
    w1, b1 = np.array([[0.5, 0.5, 0.5], [0.1, 0.1, 0.1]]), np.array([1.0, 1.0])
    w2, b2 = np.array([[1.0, 1.0]]), np.array([1.0])
    states, preds = [], []
    for _ in range(steps + 1):
        h_lin = np.dot(x, w1.T) + b1
        h = np.tanh(h_lin)
        y = np.dot(h, w2.T) + b2
        states.append((w1, b1, w2, b2))
        preds.append(y[:, 0])
        d_out = y - t
        d_hid = d_out * w2 * (1 - np.tanh(h_lin) ** 2)
        w2, b2 = w2 - lr * d_out.T.dot(h), b2 - lr * d_out.sum(axis=0)
        w1, b1 = w1 - lr * d_hid.T.dot(x), b1 - lr * d_hid.sum(axis=0)
    return states, np.array(preds)


@pytest.fixture(scope="module")
def seed_network():
    ex = load("seed_network")
    return ex, ex.main()


@pytest.mark.slow        # the module fixture runs main(): ~7 s of compiling on 2 cores
def test_seed_network_matches_the_seed_printout(seed_network):
    _, r = seed_network
    np.testing.assert_allclose(r["preds"][0], [2.98367463, 2.98009578, 2.97574147], atol=1e-8)
    assert r["mse"][0] == pytest.approx(119.060003918, abs=1e-8)
    assert r["report"].ok and r["grad_gap"] < 1e-12
    assert r["mse"][-1] < 2.0 and r["seed_after_diff"] < 0.05
    assert r["sharpness"][700] < 2 / 0.001 < r["sharpness"][900]     # edge of stability


@pytest.mark.slow
def test_seed_network_trajectory_matches_numpy(seed_network):
    _, r = seed_network
    _, preds = _seed_loop()
    # the run is well-conditioned for ~800 steps, then a period-2 oscillation grows
    # out of rounding error (see the script's docstring): compare trajectories there
    np.testing.assert_allclose(r["preds"][:800], preds[:800], rtol=1e-10)
    np.testing.assert_allclose(r["preds"][:800], r["preds_autodiff"][:800], rtol=1e-10)


@pytest.mark.slow
def test_seed_network_every_step_matches_numpy(seed_network):
    """Feed every numpy state to funnn's step: the next state agrees, all 1000 steps."""
    ex, _ = seed_network
    states, _ = _seed_loop()
    stack = lambda i: np.stack([s[i] for s in states])
    w1, b1, w2, b2 = map(stack, range(4))
    params = ({"W": w1[:-1].transpose(0, 2, 1), "b": b1[:-1]}, {},      # funnn W = seed W^T
              {"W": w2[:-1].transpose(0, 2, 1), "b": b2[:-1]})
    nxt = jax.jit(jax.vmap(ex.make_step()))(params)
    for got, want in ((nxt[0]["W"], w1[1:].transpose(0, 2, 1)), (nxt[0]["b"], b1[1:]),
                      (nxt[2]["W"], w2[1:].transpose(0, 2, 1)), (nxt[2]["b"], b2[1:])):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- delta rule


def _numpy_delta_rule(params, x, t, lr, iterations):
    """The delta rule in numpy for the 2 -> H -> 1 sigmoid net; the cost per iteration."""
    w1, b1, w2, b2 = (np.array(a) for a in (params[0]["W"], params[0]["b"],
                                            params[2]["W"], params[2]["b"]))
    sig = lambda z: 1 / (1 + np.exp(-z))
    cost = np.empty(iterations)
    for i in range(iterations):
        o_j = sig(x @ w1 + b1)
        o_k = sig(o_j @ w2 + b2)
        cost[i] = 0.5 * np.sum((o_k - t) ** 2)
        d_k = (o_k - t) * o_k * (1 - o_k)
        d_j = o_j * (1 - o_j) * (d_k @ w2.T)
        w2, b2 = w2 - lr * o_j.T @ d_k, b2 - lr * d_k.sum(0)
        w1, b1 = w1 - lr * x.T @ d_j, b1 - lr * d_j.sum(0)
    return cost


@pytest.mark.slow        # two 5000-step runs, a plot: ~6 s
def test_delta_rule_sigmoid_learns_xor(tmp_path):
    ex = load("delta_rule_sigmoid")
    png = tmp_path / "cost.png"
    r = ex.main(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cost = r["cost"]
    assert cost.shape == (5000,) and cost[-1] < cost[0] / 100
    np.testing.assert_array_equal(r["outputs"] > 0.5, [False, True, True, False])
    np.testing.assert_allclose(r["cost_autodiff"], cost, rtol=1e-9)
    assert r["rule_err"] < 1e-12 and r["bug_err"] > 0.1
    _, p0 = ex.build()
    ref = _numpy_delta_rule(p0, np.asarray(ex.X), np.asarray(ex.Y), ex.LR, 5000)
    np.testing.assert_allclose(cost, ref, rtol=1e-9)


# --------------------------------------------------------------------------- compress


@pytest.mark.slow
def test_compress_equals_one_layer():
    ex = load("compress")
    r = ex.main()
    assert r["out_err"] < 1e-12 and r["jac_err"] < 1e-12 and r["tanh_err"] > 1e-2
    # the collapsed (W, b) against numpy products of the large network's params
    (w1, b1), (w2, b2), (w3, b3) = ((np.asarray(p["W"]), np.asarray(p["b"]))
                                    for p in r["params"][::2])
    np.testing.assert_allclose(r["W"], np.linalg.multi_dot([w1, w2, w3]), rtol=1e-12)
    np.testing.assert_allclose(r["b"], (b1 @ w2 + b2) @ w3 + b3, rtol=1e-12, atol=1e-15)
    x = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_allclose(((x @ w1 + b1) @ w2 + b2) @ w3 + b3, x @ r["W"] + r["b"],
                               rtol=1e-12, atol=1e-14)
    assert jnp.asarray(r["W"]).dtype == jnp.float64
