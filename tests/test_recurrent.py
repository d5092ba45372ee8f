"""Recurrent layers: numpy-loop references, manual BPTT vs autodiff vs finite differences,
masks, per-example vmap, shapes and errors. All in float64 (conftest enables x64)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funnn import layers as L
from funnn.core import ConfigError, DTypeError, ShapeError
from funnn.layers.recurrent import gru, lstm, rnn

CELLS = {"rnn": rnn, "lstm": lstm, "gru": gru}
B, T, D, H = 2, 4, 3, 3                       # the shared small shape (one compile per config)
MASKS = ["none", "mask", "lengths"]
# The tests compile many tiny programs; LLVM's optimisations cost more than they save here.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --------------------------------------------------------------------------- helpers


def _params(layer, d, seed, scale=0.6):
    """Random normal params with the shapes init gives (non-zero biases); no compile."""
    shapes = jax.eval_shape(lambda k: layer.init(k, (None, None, d))[1], jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape)), shapes)


def _mask(mode, b, t, rng):
    """``None``, a random 0/1 mask ``(b, t)`` (int), or random lengths ``(b,)`` in ``[0, t]``."""
    if mode == "none":
        return None
    if mode == "mask":
        return jnp.asarray(rng.integers(0, 2, (b, t)), dtype=jnp.int32)
    return jnp.asarray(rng.integers(0, t + 1, (b,)), dtype=jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-12)


def _grad_check(layer, p, x, mask, dy, train, seed=0):
    """Manual backward == jax.vjp of apply (rel 1e-10), both == a central difference on a
    random direction (rtol 1e-6), forward(...)[0] == apply(...); one jitted program."""
    masked = mask is not None
    rng = np.random.default_rng(seed)
    vp = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
    vx = jnp.asarray(rng.normal(size=x.shape))

    @_jit
    def run(p, x, mask, dy, vp, vx):
        wrap = (lambda x: (x, mask)) if masked else (lambda x: x)
        y, res = layer.forward(p, wrap(x), train=train)
        dp, dx = layer.backward(p, res, dy)
        ya, vjp = jax.vjp(lambda p, x: layer.apply(p, wrap(x), train=train), p, x)

        def loss(s):                                # L(p + s v_p, x + s v_x), L = sum(y * dy)
            ps, xs = jax.tree.map(lambda a, v: a + s * v, (p, x), (vp, vx))
            return jnp.sum(layer.apply(ps, wrap(xs), train=train) * dy)

        e = 1e-6
        lp, lm = jax.vmap(loss)(jnp.array([e, -e]))
        return y, ya, dp, dx, vjp(dy), (lp - lm) / (2 * e)

    y, ya, dp, dx, (ap, ax), fd = run(p, x, mask, dy, vp, vx)
    assert _rel(y, ya) < 1e-12
    if masked:
        assert isinstance(dx, tuple) and len(dx) == 2 and dx[1] is None
        dx = dx[0]
    assert jax.tree.structure(dp) == jax.tree.structure(p)
    for (name, a), b in zip(jax.tree_util.tree_flatten_with_path(dp)[0], jax.tree.leaves(ap)):
        assert a.shape == b.shape and _rel(a, b) < 1e-10, (layer.name, name, _rel(a, b))
    assert dx.shape == x.shape and _rel(dx, ax) < 1e-10, (layer.name, "dx", _rel(dx, ax))
    manual = sum(jnp.vdot(a, v) for a, v in zip(jax.tree.leaves(dp), jax.tree.leaves(vp)))
    np.testing.assert_allclose(manual + jnp.vdot(dx, vx), fd, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- gradients

# Every cell sees both outputs, both mask forms, no mask, and both train values.
OPTIONS = [(True, "none", False), (True, "mask", True), (False, "none", True),
           (False, "lengths", False)]


@pytest.mark.parametrize("seq,mode,train", OPTIONS,
                         ids=["seq-nomask-infer", "seq-mask-train", "last-nomask-train",
                              "last-lengths-infer"])
@pytest.mark.parametrize("kind", CELLS)
def test_manual_equals_autodiff_and_fd(kind, seq, mode, train):
    layer = CELLS[kind](H, return_sequences=seq, masked=mode != "none")
    rng = np.random.default_rng(0)
    p = _params(layer, D, 1)
    x = jnp.asarray(rng.normal(size=(B, T, D)))
    mask = {"none": None, "mask": jnp.array([[1, 0, 1, 1], [0, 1, 1, 0]]),
            "lengths": jnp.array([T - 1, 2])}[mode]             # holes and padded tails
    dy = jnp.asarray(rng.normal(size=(B, T, H) if seq else (B, H)))
    _grad_check(layer, p, x, mask, dy, train)


@pytest.mark.slow
@pytest.mark.parametrize("kind", CELLS)
def test_unroll_gives_the_same_layer(kind):
    """unroll=3 (T=4: one full block and a remainder step) and unroll=True: gradients still
    agree three ways, and the output equals the rolled loop's (float64, to rounding)."""
    rng = np.random.default_rng(8)
    mask = jnp.array([[1, 0, 1, 1], [1, 1, 1, 0]])
    x = jnp.asarray(rng.normal(size=(B, T, D)))
    dy = jnp.asarray(rng.normal(size=(B, T, H)))
    rolled = CELLS[kind](H, masked=True)
    p = _params(rolled, D, 9)
    for unroll in (3, True):
        layer = CELLS[kind](H, masked=True, unroll=unroll)
        _grad_check(layer, p, x, mask, dy, train=False)
        got, want = _jit(lambda p, x: (layer.apply(p, x), rolled.apply(p, x)))(p, (x, mask))
        assert _rel(got, want) < 1e-12


@pytest.mark.slow
@settings(max_examples=9)
@given(kind=st.sampled_from(sorted(CELLS)), b=st.integers(1, 3), t=st.integers(1, 5),
       d=st.integers(1, 3), h=st.integers(1, 4), seq=st.booleans(),
       mode=st.sampled_from(MASKS), train=st.booleans(), seed=st.integers(0, 2**16))
def test_gradients_property(kind, b, t, d, h, seq, mode, train, seed):
    layer = CELLS[kind](h, return_sequences=seq, masked=mode != "none")
    rng = np.random.default_rng(seed)
    p = _params(layer, d, seed)
    x = jnp.asarray(rng.normal(size=(b, t, d)))
    dy = jnp.asarray(rng.normal(size=(b, t, h) if seq else (b, h)))
    _grad_check(layer, p, x, _mask(mode, b, t, rng), dy, train, seed)


@pytest.mark.parametrize("kind,seq,mode", [("rnn", False, "none"), ("lstm", True, "lengths"),
                                           ("gru", False, "mask")])
def test_per_example_gradients_vmap(kind, seq, mode):
    """vmap over examples (batch axis of 1 each) == a loop == vmap of jax.grad."""
    masked = mode != "none"
    layer = CELLS[kind](H, return_sequences=seq, masked=masked)
    rng = np.random.default_rng(1)
    p = _params(layer, D, 2)
    x = jnp.asarray(rng.normal(size=(B + 1, T, D)))
    m = jnp.array([T, 1, 0]) if mode == "lengths" else jnp.array(
        [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]])
    dy = jnp.asarray(rng.normal(size=(B + 1, T, H) if seq else (B + 1, H)))
    wrap = (lambda x, m: (x, m)) if masked else (lambda x, m: x)

    def manual(p, x, m, dy):                          # one example: x (1, T, D)
        _y, res = layer.forward(p, wrap(x, m))
        return layer.backward(p, res, dy)[0]

    def auto(p, x, m, dy):
        return jax.grad(lambda p: jnp.sum(layer.apply(p, wrap(x, m)) * dy))(p)

    args = (x[:, None], m[:, None], dy[:, None])
    g_vmap, g_auto = _jit(lambda *a: (jax.vmap(manual, (None, 0, 0, 0))(*a),
                                         jax.vmap(auto, (None, 0, 0, 0))(*a)))(p, *args)
    one = _jit(manual)
    for i in range(B + 1):
        g_i = one(p, *(a[i] for a in args))
        for a, v, w in zip(jax.tree.leaves(g_i), jax.tree.leaves(g_vmap), jax.tree.leaves(g_auto)):
            assert _rel(v[i], a) < 1e-12 and _rel(w[i], a) < 1e-10
    if masked:                                        # fully masked example: no gradient
        assert all(np.all(v[2] == 0) for v in jax.tree.leaves(g_vmap))


# --------------------------------------------------------------------------- numpy references


def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def _np_step(kind, p, x, h, c):
    """One step of each cell, written directly from the textbook equations."""
    if kind == "rnn":
        return np.tanh(x @ p["W_xh"] + h @ p["W_hh"] + p["b"]), c
    n = h.shape[0]
    if kind == "lstm":
        z = x @ p["W_x"] + h @ p["W_h"] + p["b"]
        i, f = _sig(z[:n]), _sig(z[n:2 * n])
        g, o = np.tanh(z[2 * n:3 * n]), _sig(z[3 * n:])
        c = f * c + i * g
        return o * np.tanh(c), c
    wx, wh, bx, bh = p["W_x"], p["W_h"], p["b_x"], p["b_h"]
    r = _sig(x @ wx[:, :n] + bx[:n] + h @ wh[:, :n] + bh[:n])
    z = _sig(x @ wx[:, n:2 * n] + bx[n:2 * n] + h @ wh[:, n:2 * n] + bh[n:2 * n])
    nn = np.tanh(x @ wx[:, 2 * n:] + bx[2 * n:] + r * (h @ wh[:, 2 * n:] + bh[2 * n:]))
    return (1 - z) * nn + z * h, c


def _np_run(kind, p, x, mask, hidden):
    """Python loops over batch and time; a masked step is skipped (state kept, output 0)."""
    p = {k: np.asarray(v) for k, v in p.items()}
    ys, last = np.zeros(x.shape[:2] + (hidden,)), np.zeros((x.shape[0], hidden))
    for b in range(x.shape[0]):
        h, c = np.zeros(hidden), np.zeros(hidden)
        for t in range(x.shape[1]):
            if mask is None or mask[b, t]:
                h, c = _np_step(kind, p, x[b, t], h, c)
                ys[b, t] = h
        last[b] = h
    return ys, last


@pytest.mark.parametrize("mode", ["none", "mask"])
@pytest.mark.parametrize("kind", CELLS)
def test_matches_numpy_loop(kind, mode):
    rng = np.random.default_rng(3)
    seq_layer = CELLS[kind](H, masked=mode == "mask")
    last_layer = CELLS[kind](H, return_sequences=False, masked=mode == "mask")
    p = _params(seq_layer, D, 4)
    x = rng.normal(size=(B + 1, T + 1, D))
    mask = None if mode == "none" else np.array(
        [[1, 1, 0, 1, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    xin = x if mask is None else (x, mask)
    ys, last = _np_run(kind, p, x, mask, H)
    got_ys, got_last = _jit(lambda p, x: (seq_layer.apply(p, x), last_layer.apply(p, x)))(p, xin)
    np.testing.assert_allclose(got_ys, ys, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got_last, last, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", CELLS)
def test_lengths_mask_semantics(kind):
    """With lengths: padding values are ignored, the last output is the state at each
    sequence's own end, padded outputs and input gradients are zero, bool mask == lengths."""
    layer = CELLS[kind](H, masked=True)
    last_layer = CELLS[kind](H, return_sequences=False, masked=True)
    plain = CELLS[kind](H, return_sequences=False)
    rng = np.random.default_rng(5)
    p = _params(layer, D, 6)
    x = rng.normal(size=(B, T, D))
    n = (2, T)
    junk = x.copy()
    junk[0, 2:] = 1e3                                         # garbage in the padding

    @_jit
    def run(p, x, junk):
        nl = jnp.array(n)
        _, res = layer.forward(p, (junk, nl))
        return (layer.apply(p, (x, nl)), layer.apply(p, (junk, nl)),
                layer.apply(p, (x, jnp.arange(T) < nl[:, None])), last_layer.apply(p, (x, nl)),
                [plain.apply(p, x[i:i + 1, :n[i]])[0] for i in range(B)],
                layer.backward(p, res, jnp.ones((B, T, H)))[1])

    y, y_junk, y_bool, last, prefix, (dx, dmask) = run(p, x, junk)
    np.testing.assert_allclose(layer.apply(p, (x, np.array(n))), y, rtol=1e-14)   # eager == jit
    np.testing.assert_array_equal(y_junk, y)
    np.testing.assert_array_equal(y_bool, y)
    assert np.all(np.asarray(y)[0, 2:] == 0)
    for i in range(B):
        np.testing.assert_allclose(last[i], prefix[i], rtol=1e-12)
    assert dmask is None and np.all(np.asarray(dx)[0, 2:] == 0) and np.any(dx[1, 2:] != 0)


# --------------------------------------------------------------------------- init and shapes


def test_init_params_and_shapes():
    k = jax.random.key(0)
    _, p = rnn(H).init(k, (None, T, D))
    assert {n: v.shape for n, v in p.items()} == {"W_xh": (D, H), "W_hh": (H, H), "b": (H,)}
    assert all(v.dtype == jnp.float64 for v in p.values())        # the default float dtype
    _, p = lstm(H).init(k, (None, T, D))
    assert {n: v.shape for n, v in p.items()} == {"W_x": (D, 4 * H), "W_h": (H, 4 * H),
                                                  "b": (4 * H,)}
    np.testing.assert_array_equal(p["b"], np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)])
    assert np.abs(p["W_x"]).max() <= np.sqrt(6 / (D + 4 * H)) and np.std(p["W_x"]) > 0.1
    blocks = [p["W_h"][:, j * H:(j + 1) * H] for j in range(4)]  # orthogonal, and distinct
    for blk in blocks:
        np.testing.assert_allclose(blk.T @ blk, np.eye(H), atol=1e-12)
    assert not np.allclose(blocks[0], blocks[1])
    _, p = gru(H, dtype=jnp.float32).init(k, (None, T, D))
    assert {n: v.shape for n, v in p.items()} == {
        "W_x": (D, 3 * H), "W_h": (H, 3 * H), "b_x": (3 * H,), "b_h": (3 * H,)}
    assert all(v.dtype == jnp.float32 for v in p.values())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seq", [True, False])
@pytest.mark.parametrize("kind", CELLS)
def test_out_shape_matches_eval_shape(kind, seq, masked):
    layer = CELLS[kind](H, return_sequences=seq, masked=masked)
    k = jax.random.key(0)
    out, p = layer.init(k, (-1, T, D))
    assert out == ((None, T, H) if seq else (None, H))
    assert layer.init(k, (B, None, D))[0] == ((B, None, H) if seq else (B, H))
    if masked:                                                # also ((B, T, D), mask shape)
        assert layer.init(k, ((None, T, D), (None, T)))[0] == out
    x = jax.ShapeDtypeStruct((B, T, D), jnp.float64)
    xin = (x, jax.ShapeDtypeStruct((B, T), jnp.bool_)) if masked else x
    got = jax.eval_shape(layer.apply, p, xin)
    assert got.shape == ((B, T, H) if seq else (B, H)) and got.dtype == jnp.float64


@pytest.mark.slow
def test_with_serial_and_engines():
    """A stacked network's manual gradient (serial of our backward) equals autodiff."""
    import funnn.autodiff
    import funnn.manual
    from funnn import losses
    from funnn.layers.combinators import serial

    model = serial(lstm(3, masked=True), gru(2, return_sequences=False))
    rng = np.random.default_rng(7)
    _, p = model.init(jax.random.key(0), (None, T, D))
    x = (jnp.asarray(rng.normal(size=(B, T, D))), jnp.array([T, 2]))
    y = jnp.asarray(rng.normal(size=(B, 2)))
    lm, gm = _jit(funnn.manual.value_and_grad(model, losses.mse))(p, x, y)
    la, ga = _jit(funnn.autodiff.value_and_grad(model, losses.mse))(p, x, y)
    np.testing.assert_allclose(lm, la, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(gm), jax.tree.leaves(ga)):
        assert _rel(a, b) < 1e-10


# --------------------------------------------------------------------------- errors


def test_config_errors():
    for bad in (0, -2, 2.5, True, "4", None):
        with pytest.raises(ConfigError, match="hidden size"):
            lstm(bad)
    with pytest.raises(ConfigError, match="return_sequences"):
        rnn(3, return_sequences="yes")
    with pytest.raises(ConfigError, match="masked"):
        gru(3, masked=1)
    with pytest.raises(ConfigError, match="dtype"):
        gru(3, dtype=jnp.int32)
    for bad in (0, -1, 2.5, "2", None):
        with pytest.raises(ConfigError, match="unroll must be a positive int"):
            lstm(3, unroll=bad)


@pytest.mark.parametrize("kind", CELLS)
def test_shape_and_dtype_errors(kind):
    layer, masked = CELLS[kind](H), CELLS[kind](H, masked=True)
    name = layer.name
    _, p = layer.init(jax.random.key(0), (None, T, D))
    x = jnp.ones((B, T, D))
    with pytest.raises(ShapeError, match=r"expected input of shape \(batch, time, features\)") as e:
        layer.apply(p, jnp.ones((B, D)))
    assert str(e.value).startswith(f"{name}:") and "x[None]" in str(e.value)
    with pytest.raises(ShapeError, match=r"\(batch, time, features\)"):
        _jit(layer.forward)(p, jnp.ones((B, T, D, 1)))      # raised while tracing
    with pytest.raises(ShapeError, match=f"expected input features {D}, got 5"):
        layer.forward(p, jnp.ones((B, T, 5)))
    with pytest.raises(DTypeError, match="floating"):
        layer.apply(p, jnp.ones((B, T, D), jnp.int32))
    with pytest.raises(ShapeError, match="masked=True"):
        layer.apply(p, (x, jnp.ones((B, T))))
    with pytest.raises(ShapeError, match=r"pair \(x, mask\)"):
        masked.apply(p, x)
    with pytest.raises(ShapeError, match=r"mask of shape \(batch, time\)") as e:
        masked.apply(p, (x, jnp.ones((B, T + 1))))
    assert str(e.value).startswith(f"{masked.name}:")
    with pytest.raises(ShapeError, match="lengths"):
        masked.forward(p, (x, jnp.ones((B + 1,), jnp.int32)))
    with pytest.raises(DTypeError, match="integer"):
        masked.apply(p, (x, jnp.ones((B,))))
    for bad in ((None, D), (None, T, D, 1), 5, ((None, T, D), (None, T))):
        with pytest.raises(ShapeError, match=r"\(batch, time, features\)"):
            layer.init(jax.random.key(0), bad)
    with pytest.raises(ShapeError, match="positive int"):
        layer.init(jax.random.key(0), (None, 0, D))
    _, res = layer.forward(p, x)
    with pytest.raises(ShapeError, match="dy"):
        layer.backward(p, res, jnp.ones((B, H)))


def test_compiles_once():
    layer = lstm(H, return_sequences=False, masked=True)
    _, p = layer.init(jax.random.key(0), (None, T, D))
    traces = []

    @jax.jit
    def step(p, x, n):
        traces.append(1)
        y, res = layer.forward(p, (x, n))
        return layer.backward(p, res, jnp.ones_like(y))[0]

    step(p, jnp.ones((B, T, D)), jnp.array([1, 2]))
    step(p, jnp.zeros((B, T, D)), jnp.array([3, 4]))
    assert len(traces) == 1


@pytest.mark.parametrize("kind", CELLS)
def test_grads_come_back_in_param_and_input_dtypes(kind):
    """Mixed precision both ways (float32 params with float64 x, masked, last state only; and
    float64 params with float32 x, full sequence): each manual gradient has its primal's
    dtype, as autodiff's does (else fit(engine="manual")'s scan carry changes dtype)."""
    rng = np.random.default_rng(11)
    cases = []
    for dt_p, dt_x, seq, masked in ((jnp.float32, jnp.float64, False, True),
                                    (jnp.float64, jnp.float32, True, False)):
        layer = CELLS[kind](H, return_sequences=seq, masked=masked)
        p = jax.tree.map(lambda a: a.astype(dt_p), _params(layer, D, 3))
        x = jnp.asarray(rng.normal(size=(B, T, D)), dt_x)
        cases.append((layer, p, (x, jnp.array([T, 2])) if masked else x))

    @_jit
    def run(ps, xs):
        out = []
        for (layer, _, _), p, x in zip(cases, ps, xs):
            y, res = layer.forward(p, x)
            dy = jnp.cos(y)
            dp, dx = layer.backward(p, res, dy)
            xx = x[0] if isinstance(x, tuple) else x
            wrap = (lambda v: (v, x[1])) if isinstance(x, tuple) else (lambda v: v)
            ap, ax = jax.vjp(lambda p, v: layer.apply(p, wrap(v)), p, xx)[1](dy)
            out.append(((dp, dx[0] if isinstance(dx, tuple) else dx), (ap, ax)))
        return out

    got = run(tuple(c[1] for c in cases), tuple(c[2] for c in cases))
    for (layer, p, x), (manual, auto) in zip(cases, got):
        xx = x[0] if isinstance(x, tuple) else x
        dtypes = lambda t: jax.tree.map(lambda a: a.dtype, t)
        assert dtypes(manual) == dtypes(auto) == (dtypes(p), xx.dtype), layer.name
        for a, b in zip(jax.tree.leaves(manual), jax.tree.leaves(auto)):
            assert _rel(a, b) < 1e-5, layer.name


@pytest.mark.parametrize("kind", CELLS)
def test_init_shape_needs_the_feature_size(kind):
    """Batch and time may be None; the features may not (the params depend on them)."""
    layer = CELLS[kind](H)
    for shape in ((None, None, None), (B, T, None)):
        with pytest.raises(ShapeError, match=rf"^{kind}\({H}\): init shape .* no size on axis 2; "
                                             r"only axes 0, 1 may be None"):
            layer.init(jax.random.key(0), shape)
    with pytest.raises(ShapeError, match="no size on axis 2"):
        CELLS[kind](H, masked=True).init(jax.random.key(0), ((None, T, None), (None, T)))


def test_bidirectional_time_reversal_within_lengths():
    from funnn.layers.recurrent import _reverse_time

    a = jnp.arange(2 * 4 * 1.0).reshape(2, 4, 1)
    np.testing.assert_array_equal(_reverse_time(a, jnp.array([4, 2]))[..., 0],
                                  [[3, 2, 1, 0], [5, 4, 6, 7]])
    np.testing.assert_array_equal(_reverse_time(a, None)[..., 0], [[3, 2, 1, 0], [7, 6, 5, 4]])
    layer = L.bidirectional(L.gru(3, return_sequences=False))
    assert layer.init(jax.random.key(0), (None, 4, 2))[0] == (None, 6)
    assert layer.name == "bidirectional(gru(3, return_sequences=False))"
    with pytest.raises(ConfigError, match="bidirectional needs a Layer"):
        L.bidirectional("lstm")


@pytest.mark.slow   # ~1.5 CPU-s: one compile of both directions and both engines
def test_bidirectional_reverses_within_lengths_and_manual_equals_autodiff():
    """The backward direction of example b sees its first lengths[b] steps reversed (a
    numpy loop as the reference); manual == autodiff in float64; per-example rules too."""
    layer = L.bidirectional(L.rnn(3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 2)))
    lengths = jnp.array([4, 2])
    _, p = layer.init(jax.random.key(0), (None, 4, 2))
    dy = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 6)))

    @_jit
    def run(p, x, dy):
        y, res = layer.forward(p, x, lengths=lengths)
        auto = jax.vjp(lambda p, x: layer.apply(p, x, lengths=lengths), p, x)[1](dy)
        return y, layer.backward(p, res, dy), auto, layer.per_example(p, res, dy)

    y, manual, auto, (per, _) = run(p, x, dy)
    chex.assert_trees_all_close(manual, auto, rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(jax.tree.map(lambda g: g.sum(0), per), manual[0], rtol=1e-10)
    inner = _jit(lambda p, x: L.rnn(3).apply(p, x))
    for b, n in enumerate([4, 2]):
        back = inner(p[1], x[b:b + 1, :n][:, ::-1])[0, ::-1]
        np.testing.assert_allclose(y[b, :n, 3:], back, rtol=1e-12)
        np.testing.assert_allclose(y[b, :n, :3], inner(p[0], x[b:b + 1, :n])[0], rtol=1e-12)
        np.testing.assert_array_equal(y[b, n:], 0.0)
