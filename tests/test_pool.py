"""max_pool / avg_pool / global_avg_pool: numpy-loop references, manual vs autodiff vs finite
differences, arg-max ties, vmap, errors, and a small conv/pool network through both engines."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from funnn.core import ConfigError, DTypeError, ShapeError
from funnn.layers.conv import conv2d
from funnn.layers.pool import avg_pool, global_avg_pool, max_pool

KEY = jax.random.key(0)


# --------------------------------------------------------------------------- references


def resolve(sizes, k, s, padding):
    """Explicit (lo, hi) pairs; SAME written out as TensorFlow defines it."""
    nd = len(sizes)
    if padding == "VALID":
        return [(0, 0)] * nd
    if padding == "SAME":
        out = []
        for n, ki, si in zip(sizes, k, s):
            total = max((-(-n // si) - 1) * si + ki - n, 0)
            out.append((total // 2, total - total // 2))
        return out
    return [(padding, padding)] * nd if isinstance(padding, int) else list(padding)


def np_pool(x, k, s, pads, op, include_pad=False):
    """Direct loops. Returns y and, for op="max", the x index of each window's first maximum."""
    x = np.asarray(x)
    nd = x.ndim - 2
    sizes = x.shape[1:-1]
    out = [(sizes[i] + pads[i][0] + pads[i][1] - k[i]) // s[i] + 1 for i in range(nd)]
    y = np.zeros((x.shape[0], *out, x.shape[-1]))
    where = {}
    for n, o, c in itertools.product(range(x.shape[0]), itertools.product(*map(range, out)),
                                     range(x.shape[-1])):
        best, arg, total, count = -np.inf, None, 0.0, 0
        for kk in itertools.product(*map(range, k)):                  # row-major window order
            pos = tuple(o[i] * s[i] + kk[i] - pads[i][0] for i in range(nd))
            if all(0 <= p < n_ for p, n_ in zip(pos, sizes)):
                v = x[(n,) + pos + (c,)]
                total, count = total + v, count + 1
                if v > best:                                           # strict: first max wins
                    best, arg = v, pos
        if op == "max":
            y[(n,) + o + (c,)] = best
            where[(n,) + o + (c,)] = (n,) + arg + (c,)
        else:
            y[(n,) + o + (c,)] = total / (np.prod(k) if include_pad else count)
    return y, where


def np_max_pool_grad(x_shape, where, dy):
    """Every dy[o] goes to its window's first maximum."""
    dx = np.zeros(x_shape)
    for o, i in where.items():
        dx[i] += dy[o]
    return dx


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if a.size else 0.0


def run_all(layer, x, dy, vx, eps=1e-6):
    """One jitted program: forward, apply, manual backward, vjp of apply, central difference."""
    def loss(t):
        return jnp.sum(layer.apply({}, x + t * vx) * dy)

    def f(x, dy):
        y, res = layer.forward({}, x)
        return (y, layer.apply({}, x), layer.backward({}, res, dy),
                jax.vjp(layer.apply, {}, x)[1](dy), (loss(eps) - loss(-eps)) / (2 * eps))
    return jax.jit(f)(x, dy)


def check_layer(layer, x, rng, y_ref=None, dx_ref=None):
    """Manual == autodiff (1e-10), == finite differences, forward == apply, shapes == init."""
    out_shape, params = layer.init(None, (None,) + x.shape[1:])
    assert params == {}
    y_shape = jax.eval_shape(lambda x: layer.apply({}, x), x).shape
    assert out_shape == (None,) + y_shape[1:]
    dy = jnp.asarray(rng.normal(size=y_shape))
    vx = jnp.asarray(rng.normal(size=x.shape))
    y, y_apply, (dp, dx), (dp_a, dx_a), fd = run_all(layer, x, dy, vx)
    np.testing.assert_array_equal(y, y_apply)
    assert dp == {} and dp_a == {} and dx.shape == x.shape
    assert rel_err(dx, dx_a) < 1e-10, rel_err(dx, dx_a)
    np.testing.assert_allclose(np.vdot(dx, vx), fd, rtol=1e-6, atol=1e-9)
    if y_ref is not None:
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    if dx_ref is not None:
        np.testing.assert_allclose(dx, dx_ref(np.asarray(dy)), rtol=1e-12, atol=1e-12)
    return dy


def check_per_example(layer, x, dy):
    """vmap over examples (batch axis of 1 each) == a loop, for the manual and autodiff paths."""
    def manual(xi, dyi):
        return layer.backward({}, layer.forward({}, xi)[1], dyi)[1]

    def auto(xi, dyi):
        return jax.vjp(lambda x: layer.apply({}, x), xi)[1](dyi)[0]

    xs, dys = x[:, None], dy[:, None]
    one = jax.jit(manual)
    loop = np.stack([one(xs[i], dys[i]) for i in range(x.shape[0])])
    got = jax.jit(lambda a, b: (jax.vmap(manual)(a, b), jax.vmap(auto)(a, b)))(xs, dys)
    for g in got:
        assert rel_err(g, loop) < 1e-10


def distinct(rng, shape):
    """Values at least 0.01 apart: no ties, and finite differences never cross a kink."""
    return jnp.asarray(rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 - 0.3)


# --------------------------------------------------------------------------- the option grid

# (window, options, input shape): VALID with rows no window reaches, SAME with 1-D (ndim=1)
# and 2-D int windows, overlapping windows (stride 1), mixed strides with explicit asymmetric pads.
CASES = [
    ((2, 2), {}, (2, 5, 6, 3)),
    (3, dict(stride=2, padding="SAME", ndim=1), (2, 7, 3)),
    ((3, 2), dict(stride=(1, 2), padding=((2, 1), (0, 1))), (2, 5, 6, 2)),
    ((2, 2), dict(stride=1, padding="SAME"), (1, 4, 5, 2)),
    (3, dict(stride=2, padding="SAME"), (2, 7, 5, 2)),
    ((2,), dict(stride=1, padding=1), (2, 6, 2)),
]
IDS = [f"{w}-{kw}-{len(shape) - 2}d" for w, kw, shape in CASES]


def geometry(window, opts, shape):
    nd = len(shape) - 2
    k = (window,) * nd if isinstance(window, int) else window
    s = opts.get("stride", k)
    s = (s,) * nd if isinstance(s, int) else s
    return k, s, resolve(shape[1:-1], k, s, opts.get("padding", "VALID"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_max_pool_reference_and_gradients(case):
    window, opts, shape = case
    rng = np.random.default_rng(0)
    x = distinct(rng, shape)
    y_ref, where = np_pool(x, *geometry(window, opts, shape), "max")
    layer = max_pool(window, **opts)
    dy = check_layer(layer, x, rng, y_ref, lambda dy: np_max_pool_grad(shape, where, dy))
    if shape[0] > 1 and len(shape) == 4:
        check_per_example(layer, x, dy)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("include", [False, True], ids=["exclude_pad", "include_pad"])
def test_avg_pool_reference_and_gradients(case, include):
    window, opts, shape = case
    if include and opts.get("padding", "VALID") == "VALID":
        pytest.skip("no padding: both counts agree")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=shape))
    y_ref, _ = np_pool(x, *geometry(window, opts, shape), "avg", include)
    layer = avg_pool(window, count_include_pad=include, **opts)
    dy = check_layer(layer, x, rng, y_ref)
    if shape[0] > 1 and len(shape) == 4 and not include:
        check_per_example(layer, x, dy)


@st.composite
def pool_configs(draw):
    nd = draw(st.sampled_from([1, 2]))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 2)] * nd)))
    mode = draw(st.sampled_from(["VALID", "SAME", "pairs"]))
    pads = (tuple((draw(st.integers(0, ki - 1)), draw(st.integers(0, ki - 1))) for ki in k)
            if mode == "pairs" else mode)
    lohi = pads if mode == "pairs" else ((0, 0),) * nd
    sizes = tuple(draw(st.integers(max(1, ki - lo - hi), 7)) for ki, (lo, hi) in zip(k, lohi))
    shape = (draw(st.integers(1, 2)),) + sizes + (draw(st.integers(1, 3)),)
    opts = dict(padding=pads) if stride is None else dict(padding=pads, stride=stride)
    return k, opts, shape, draw(st.sampled_from(["max", "avg", "avg_include_pad"]))


@pytest.mark.slow
@given(pool_configs(), st.integers(0, 2**31 - 1))
def test_property_random_options(config, seed):
    window, opts, shape, op = config
    rng = np.random.default_rng(seed)
    x = distinct(rng, shape)
    y_ref, where = np_pool(x, *geometry(window, opts, shape), op[:3], op == "avg_include_pad")
    if op == "max":
        check_layer(max_pool(window, **opts), x, rng, y_ref,
                    lambda dy: np_max_pool_grad(shape, where, dy))
    else:
        check_layer(avg_pool(window, count_include_pad=op != "avg", **opts), x, rng, y_ref)


def test_avg_pool_border_counts():
    """SAME, 1-D, window 3 on [1, 2, 3]: windows {pad,1,2} {1,2,3} {2,3,pad}."""
    x = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    exclude = avg_pool(3, stride=1, padding="SAME", ndim=1).apply({}, x)
    include = avg_pool(3, stride=1, padding="SAME", count_include_pad=True, ndim=1).apply({}, x)
    np.testing.assert_allclose(exclude.ravel(), [1.5, 2.0, 2.5])
    np.testing.assert_allclose(include.ravel(), [1.0, 2.0, 5.0 / 3.0])


@pytest.mark.parametrize("shape, window, opts", [
    ((2, 6, 1), 3, dict(stride=1, padding="SAME", ndim=1)),
    ((1, 4, 5, 2), (2, 3), dict(stride=1)),
])
def test_max_pool_ties_first_max_gets_all(shape, window, opts):
    """Many ties (values in {0, 1, 2}): manual, autodiff (eager and jit) and the loop reference
    all send each window's gradient to its first maximum in row-major order."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(0, 3, size=shape).astype(np.float64))
    layer = max_pool(window, **opts)
    y, res = layer.forward({}, x)
    dy = jnp.asarray(rng.normal(size=y.shape))
    _, where = np_pool(x, *geometry(window, opts, shape), "max")
    expect = np_max_pool_grad(shape, where, np.asarray(dy))
    manual = layer.backward({}, res, dy)[1]
    auto = jax.vjp(lambda x: layer.apply({}, x), x)[1](dy)[0]
    auto_jit = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply({}, x) * dy)))(x)
    for got in (manual, auto, auto_jit):
        np.testing.assert_allclose(got, expect, rtol=1e-14, atol=1e-14)


def test_max_pool_gradient_is_not_select_and_scatter_and_keeps_int8():
    """The CPU-slow select_and_scatter is avoided (apply is a select over window views), and the
    manual path keeps an int8 window index, not x, as its residual."""
    layer = max_pool((2, 2))
    x = jnp.zeros((2, 4, 4, 3), jnp.float32)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: layer.apply({}, x).sum()))(x))
    assert "select_and_scatter" not in jaxpr and "reduce_window" not in jaxpr
    _, res = layer.forward({}, x)
    leaves = jax.tree.leaves(res)
    assert [(a.dtype, a.shape) for a in leaves] == [(jnp.int8, (2, 2, 2, 3))]


def test_max_pool_nan_propagates():
    """A NaN in a window makes its maximum NaN (as lax.max) and takes that window's gradient."""
    x = jnp.array([1.0, np.nan, 3.0, 0.0, 2.0, 1.0]).reshape(1, 6, 1)
    layer = max_pool(2, ndim=1)
    y, res = layer.forward({}, x)
    np.testing.assert_array_equal(y.ravel(), [np.nan, 3.0, 2.0])
    np.testing.assert_array_equal(layer.apply({}, x), y)
    dx = layer.backward({}, res, jnp.ones_like(y))[1]
    np.testing.assert_array_equal(dx.ravel(), [0, 1, 1, 0, 1, 0])
    auto = jax.grad(lambda x: layer.apply({}, x).sum())(x)
    np.testing.assert_array_equal(auto, dx)


@pytest.mark.parametrize("layer", [max_pool(2, ndim=1), avg_pool(2, padding="SAME", ndim=1),
                                   global_avg_pool()],
                         ids=lambda l: l.name)
def test_float32_stays_float32(layer):
    x = jnp.arange(10, dtype=jnp.float32).reshape(1, 5, 2)
    y, res = layer.forward({}, x)
    dx = layer.backward({}, res, jnp.ones_like(y))[1]
    assert y.dtype == dx.dtype == jnp.float32


def test_hand_computed_1d():
    x = jnp.array([1.0, 3.0, 3.0, 0.0, 3.0, 3.0]).reshape(1, 6, 1)
    layer = max_pool(3, stride=1, ndim=1)
    y, res = layer.forward({}, x)
    np.testing.assert_array_equal(y.ravel(), [3, 3, 3, 3])
    dx = layer.backward({}, res, jnp.ones_like(y))[1]
    np.testing.assert_array_equal(dx.ravel(), [0, 2, 1, 0, 1, 0])   # windows pick 1, 1, 2, 4
    y = avg_pool((2,)).apply({}, x)
    np.testing.assert_array_equal(y.ravel(), [2, 1.5, 3])


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 4, 5, 3)])
def test_global_avg_pool(shape):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=shape))
    layer = global_avg_pool()
    n = np.prod(shape[1:-1])
    dx_ref = lambda dy: np.broadcast_to(dy.reshape((shape[0],) + (1,) * (len(shape) - 2)
                                                   + (shape[-1],)) / n, shape)
    dy = check_layer(layer, x, rng, np.asarray(x).reshape(shape[0], -1, shape[-1]).mean(1), dx_ref)
    check_per_example(layer, x, dy)


def test_names_and_shapes():
    assert max_pool((2, 2)).name == "max_pool(2x2)"
    assert (avg_pool(3, stride=2, padding="SAME", count_include_pad=True).name
            == "avg_pool(3x3, stride=2, padding=SAME, count_include_pad)")
    assert max_pool(2).name == "max_pool(2x2)"                # an int window is 2-D by default
    assert max_pool(2, ndim=1).name == max_pool((2,)).name == "max_pool(2)"
    assert avg_pool(2, stride=(1,)).name == "avg_pool(2, stride=1)"   # a 1-tuple stride: 1-D
    assert max_pool((2, 2)).init(None, (-1, 7, 7, 3)) == ((None, 3, 3, 3), {})
    assert max_pool(2).init(None, (None, 7, 7, 3)) == ((None, 3, 3, 3), {})
    assert max_pool(2, ndim=1).init(None, (None, 7, 3)) == ((None, 3, 3), {})
    assert max_pool(2, ndim=3).init(None, (None, 4, 5, 6, 1)) == ((None, 2, 2, 3, 1), {})
    assert avg_pool(2, padding="SAME").init(None, (None, 7, 5, 3)) == ((None, 4, 3, 3), {})
    assert global_avg_pool().init(None, (None, 7, 5, 3)) == ((None, 3), {})
    assert global_avg_pool().init(None, (None, None, None, 3)) == ((None, 3), {})  # averaged away


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make, words", [
    (lambda: max_pool(0), "window"),
    (lambda: max_pool((2, 2), stride=(1,)), "stride"),
    (lambda: avg_pool((2, 2), stride=0), "stride"),
    (lambda: avg_pool(2, padding="FULL"), "padding"),
    (lambda: max_pool(2, padding=2), "smaller than the window"),
    (lambda: max_pool((3, 3), padding=((1, 3), (0, 0))), "smaller than the window"),
    (lambda: max_pool(2, ndim=0), "ndim"),
    (lambda: avg_pool(2, ndim=True), "ndim"),
    (lambda: max_pool((2, 2), ndim=1), "window"),               # ndim contradicts the window
    (lambda: avg_pool(2, stride=(1, 1), ndim=3), "stride"),
])
def test_config_errors(make, words):
    with pytest.raises(ConfigError, match=words) as err:
        make()
    assert "_pool" in str(err.value).split(":")[0]


def test_shape_errors_name_the_layer():
    x = jnp.zeros((2, 2, 5, 1))
    with pytest.raises(ShapeError, match=r"^max_pool\(3x3\): window extent 3 on spatial axis 0"):
        max_pool((3, 3)).init(None, (None, 2, 5, 1))
    with pytest.raises(ShapeError, match=r"^avg_pool\(3x3\): window extent 3"):
        avg_pool((3, 3)).apply({}, x)
    with pytest.raises(ShapeError, match=r"max_pool\(2x2\): expected input of rank 4"):
        max_pool((2, 2)).apply({}, x[0])                     # (H, W, C): no batch axis
    with pytest.raises(ShapeError, match="rank 3"):
        max_pool((2,)).forward({}, x)                         # 1-D window, 2-D input
    with pytest.raises(ShapeError, match=r"^global_avg_pool: expected input of rank >= 3"):
        global_avg_pool().apply({}, x[:, 0, 0])
    with pytest.raises(ShapeError, match="rank"):
        global_avg_pool().init(None, (None, 4))
    with pytest.raises(DTypeError, match="floating"):
        max_pool((2, 2)).apply({}, x.astype(jnp.int32))


def test_conv_pool_network_manual_equals_autodiff():
    """A small CNN through both gradient engines: every leaf agrees to 1e-10."""
    from funnn import autodiff, losses, manual
    from funnn.layers.combinators import serial
    from funnn.layers.dense import dense

    model = serial(conv2d(4, 3, padding="SAME"), max_pool((2, 2)),
                   conv2d(4, 2, groups=2, use_bias=False), avg_pool(2, stride=1, padding="SAME"),
                   global_avg_pool(), dense(3))
    box = []
    shapes = jax.eval_shape(lambda k: box.append(model.init(k, (None, 6, 6, 2))) or box[0][1], KEY)
    assert box[0][0] == (None, 3)
    rng = np.random.default_rng(5)       # numpy-drawn params: no compile of the random init
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5), shapes)
    x, y = jnp.asarray(rng.normal(size=(2, 6, 6, 2))), jnp.asarray(rng.normal(size=(2, 3)))
    loss = losses.squared_error
    run = jax.jit(lambda p, x, y: (autodiff.value_and_grad(model, loss)(p, x, y),
                                   manual.value_and_grad(model, loss)(p, x, y)))
    (l_a, g_a), (l_m, g_m) = run(params, x, y)
    np.testing.assert_allclose(l_m, l_a, rtol=1e-12)
    for a, m in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_m)):
        assert rel_err(m, a) < 1e-10


@pytest.mark.parametrize("make", [lambda: max_pool(2), lambda: avg_pool(2, padding="SAME")])
def test_int_window_is_2d_and_rejects_unbatched_images(make):
    """A net built for (None, 4, 4, 3) must not read an unbatched (4, 4, 3) image as a batch
    of 4 one-dimensional signals: an int window pools 2-D, other ranks are a ShapeError."""
    layer = make()
    assert layer.init(None, (None, 4, 4, 3))[0] == (None, 2, 2, 3)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 4, 3)))
    name = re.escape(layer.name)
    pat = (rf"^{name}: expected input of rank 4 \(batch, H, W, channels\), got shape "
           rf"\(4, 4, 3\).*x\[None\].*ndim=1")
    for call in (lambda: layer.apply({}, x), lambda: layer.forward({}, x)):
        with pytest.raises(ShapeError, match=pat):
            call()
    with pytest.raises(ShapeError, match=rf"^{name}: init shape \(None, 4, 3\) has rank 3"):
        layer.init(None, (None, 4, 3))
    with pytest.raises(ShapeError, match=r"no size on axis 2; only the batch axis may be None"):
        layer.init(None, (None, 4, None, 3))
    assert layer.apply({}, x[None]).shape == (1, 2, 2, 3)                  # batched: fine


def test_ndim_1_int_window_equals_1_tuple_window():
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 6, 3)))
    for kind in (max_pool, avg_pool):
        np.testing.assert_array_equal(kind(2, ndim=1).apply({}, x), kind((2,)).apply({}, x))
