"""The layer examples: a CNN on the digits and a GRU on running parity, both engines.

examples/ is not a package, so the scripts are loaded by file path and their main() run
with reduced settings. Oracles written here, independent of funnn: a numpy forward pass of
the trained CNNs (3x3 "SAME" correlation loops, 2x2 max-pool by reshape, batch-norm with
the running statistics), a numpy GRU (PyTorch's equations) and the parity by a numpy loop.
"""


import jax
import numpy as np
import pytest
from example_loader import load

from funnn import layers as L


@pytest.fixture(scope="module")
def cnn_ex():
    return load("cnn_digits")


@pytest.fixture(scope="module")
def rnn_ex():
    return load("rnn_sequence")


# --------------------------------------------------------------------------- numpy oracles


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _conv3x3_same(x, w, b=None):
    """y[n,i,j,o] = sum_{di,dj,c} xpad[n,i+di,j+dj,c] w[di,dj,c,o] (+ b): a correlation."""
    _n, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(xp[:, di:di + h, dj:dj + wd, :] @ w[di, dj] for di in range(3) for dj in range(3))
    return y if b is None else y + b


def _pool2(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _relu(x):
    return np.maximum(x, 0.0)


def numpy_cnn(p, x):
    """conv-relu-pool twice, flatten (row-major NHWC), dense: logits."""
    p, x = _np(p), np.asarray(x, np.float64)
    h = _pool2(_relu(_conv3x3_same(x, p[0]["W"], p[0]["b"])))
    h = _pool2(_relu(_conv3x3_same(h, p[3]["W"], p[3]["b"])))
    return h.reshape(len(h), -1) @ p[7]["W"] + p[7]["b"]


def numpy_cnn_bn(p, state, x, eps=1e-5):
    """The batch-norm/dropout CNN at inference: running statistics, dropout the identity."""
    p, state, x = _np(p), _np(state), np.asarray(x, np.float64)

    def bn(h, i):
        s = state[i]
        return (h - s["mean"]) / np.sqrt(s["var"] + eps) * p[i]["gamma"] + p[i]["beta"]

    h = _pool2(_relu(bn(_conv3x3_same(x, p[0]["W"]), 1)))
    h = _pool2(_relu(bn(_conv3x3_same(h, p[4]["W"]), 5)))
    return h.reshape(len(h), -1) @ p[10]["W"] + p[10]["b"]


def numpy_gru_logits(p, x):
    """h_t = (1 - z) n + z h_{t-1}; r, z, n as PyTorch's GRU; then the dense head per step."""
    g, d = _np(p[0]), _np(p[1])
    sig = lambda a: 1 / (1 + np.exp(-a))
    x = np.asarray(x, np.float64)
    hidden = g["W_h"].shape[0]
    h, out = np.zeros((x.shape[0], hidden)), []
    for t in range(x.shape[1]):
        xr, xz, xn = np.split(x[:, t] @ g["W_x"] + g["b_x"], 3, axis=-1)
        hr, hz, hn = np.split(h @ g["W_h"] + g["b_h"], 3, axis=-1)
        r, z = sig(xr + hr), sig(xz + hz)
        n = np.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        out.append(h @ d["W"] + d["b"])
    return np.stack(out, axis=1)


def numpy_parity(bits):
    """Running parity by counting: y_t = (number of ones in bits[:t+1]) mod 2."""
    return np.array([[int(sum(row[:t + 1])) % 2 for t in range(len(row))] for row in bits])


# --------------------------------------------------------------------------- cheap checks


def test_cnn_shapes_follow_the_docstring(cnn_ex):
    assert L.out_shape(cnn_ex.cnn(), cnn_ex.IN_SHAPE) == (None, 10)
    assert L.out_shape(cnn_ex.cnn_bn(), cnn_ex.IN_SHAPE) == (None, 10)
    assert L.out_shape(L.serial(*[l for _, l in cnn_ex.cnn().children[:6]]),
                       (None, 8, 8, 1)) == (None, 2, 2, 32)


def test_parity_data_is_the_running_parity(rnn_ex):
    x, y = rnn_ex.parity_data(jax.random.key(3), 40, 12)
    bits = np.asarray(x)[..., 0].astype(int)
    assert x.shape == (40, 12, 1) and y.shape == (40, 12) and set(np.unique(bits)) == {0, 1}
    np.testing.assert_array_equal(np.asarray(y), numpy_parity(bits))
    np.testing.assert_array_equal(rnn_ex.numpy_parity(x), numpy_parity(bits))


# --------------------------------------------------------------------------- the CNN


@pytest.mark.slow        # ~20 s on 2 cores, nearly all of it compiling (4 fits' worth)
def test_cnn_digits_both_engines_and_batch_norm(cnn_ex, run_bound):
    r = cnn_ex.main(epochs=3, min_accuracy=0.85)
    hist_a, hist_m = r["history"]["autodiff"], r["history"]["manual"]
    assert len(hist_a) == len(hist_m) == 3
    loss_a = np.array([h["train_loss"] for h in hist_a])
    loss_m = np.array([h["train_loss"] for h in hist_m])
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-4)          # float32 trajectories
    assert loss_a[-1] < loss_a[0] / 3
    for ha, hm in zip(hist_a, hist_m):                             # at most one test image apart
        assert abs(ha["eval_accuracy"] - hm["eval_accuracy"]) <= 1 / 360 + 1e-6
    assert r["param_gap"] < 1e-3

    # the reported test accuracy is the accuracy of a numpy forward pass of the trained CNN
    x_test, y_test = (np.asarray(a) for a in r["test"])
    logits = numpy_cnn(r["params"], x_test)
    acc = float(np.mean(logits.argmax(-1) == y_test))
    assert acc == pytest.approx(r["accuracy"]["manual"], abs=1 / 360 + 1e-6)
    assert acc >= 0.85 and r["accuracy"]["autodiff"] >= 0.85

    # batch-norm + dropout: evaluated with the running statistics fit threaded through
    bn_logits = numpy_cnn_bn(r["bn_params"], r["bn_state"], x_test)
    bn_acc = float(np.mean(bn_logits.argmax(-1) == y_test))
    assert bn_acc == pytest.approx(r["bn_accuracy"], abs=1 / 360 + 1e-6)
    assert bn_acc >= 0.85
    for i, c in ((1, 16), (5, 32)):
        s = r["bn_state"][i]
        assert s["mean"].shape == s["var"].shape == (c,)
        assert np.all(np.asarray(s["var"]) > 0) and np.max(np.abs(np.asarray(s["mean"]))) > 1e-2
    assert all(s is None for i, s in enumerate(r["bn_state"]) if i not in (1, 5))

    report = r["report"]
    assert report.ok and report.method == "full"
    assert {l.path for l in report.leaves} >= {"0.W", "1.gamma", "1.beta", "4.W", "10.W"}
    assert max(l.rel_err["manual~fd"] for l in report.leaves) < 1e-6


# --------------------------------------------------------------------------- the GRU


@pytest.mark.slow        # ~10 s on 2 cores, mostly compiling two fits
def test_rnn_parity_both_engines(rnn_ex):
    r = rnn_ex.main(epochs=3, compare=False, min_accuracy=0.97)
    loss_a = np.array([h["train_loss"] for h in r["history"]["autodiff"]])
    loss_m = np.array([h["train_loss"] for h in r["history"]["manual"]])
    assert len(loss_a) == 3 and r["rtol"] == 1e-9
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-9)          # float64 trajectories
    assert loss_a[-1] < 0.2 < 0.6 < loss_a[0]                      # off the 50% plateau (ln 2)

    # a numpy GRU with the trained params gives the same logits; its accuracy vs numpy parity
    x_test, _ = r["test"]
    bits = np.asarray(x_test)[..., 0].astype(int)
    truth = numpy_parity(bits)
    logits = numpy_gru_logits(r["params"], x_test)
    np.testing.assert_allclose(logits, np.asarray(r["model"].apply(r["params"], x_test)),
                               rtol=1e-9, atol=1e-9)
    acc = float(np.mean(logits.argmax(-1) == truth))
    assert acc == pytest.approx(r["accuracy"]["manual"], abs=1e-12)
    assert acc >= 0.97 and r["accuracy"]["autodiff"] >= 0.97

    x_long, _ = r["long"]
    assert x_long.shape[1] == 4 * x_test.shape[1]
    long_truth = numpy_parity(np.asarray(x_long)[..., 0].astype(int))
    long_acc = float(np.mean(numpy_gru_logits(r["params"], x_long).argmax(-1) == long_truth))
    assert long_acc == pytest.approx(r["long_accuracy"]["manual"], abs=1e-12)
    assert long_acc >= 0.9


# --------------------------------------------------------------------------- transformer sort


def test_transformer_sort_data_is_sorted_and_padded():
    ex = load("transformer_sort")
    ids, onehot, lengths = (np.asarray(a) for a in ex.make_data(64, 0))
    for row, target, n in zip(ids, onehot, lengths):
        assert np.all(row[n:] == ex.PAD) and np.all(row[:n] < ex.DIGITS)
        assert np.all(target[n:] == 0)                               # padding: no target
        np.testing.assert_array_equal(np.argmax(target[:n], -1), np.sort(row[:n]))


@pytest.mark.slow
def test_transformer_sorts_held_out_sequences(run_bound):
    """The masked transformer of examples/transformer_sort.py reaches >= 99% exact-sequence
    accuracy on held-out sequences with the hand-written backward under bfloat16 (the harder
    of the example's settings: 99.70% after 400 steps; the engines' gradients are compared
    elsewhere); its predictions at valid positions do not depend on what the padding holds."""
    ex = load("transformer_sort")
    with jax.enable_x64(False):
        r = ex.train("manual", "bf16", steps=400, log=lambda s: None)
        assert r["accuracy"] >= 0.99, r["accuracy"]
        ids, _, lengths = ex.make_data(256, 7)
        model, params = r["model"], r["params"]
        other = np.where(np.arange(ex.T) < np.asarray(lengths)[:, None], ids, 3)
        a = np.argmax(np.asarray(model.apply(params, ids, lengths=lengths)), -1)
        b = np.argmax(np.asarray(model.apply(params, other, lengths=lengths)), -1)
        valid = np.arange(ex.T) < np.asarray(lengths)[:, None]
        np.testing.assert_array_equal(a[valid], b[valid])
