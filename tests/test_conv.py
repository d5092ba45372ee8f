"""conv1d / conv2d: numpy-loop reference, manual vs autodiff vs finite differences, vmap, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from funnn.core import ConfigError, DTypeError, ShapeError
from funnn.layers.conv import conv1d, conv2d

KEY = jax.random.key(0)


# --------------------------------------------------------------------------- references


def same_pads(sizes, k, s, d):
    """TensorFlow's SAME rule, written out: out = ceil(n / s), the odd pad on the high side."""
    pads = []
    for n, ki, si, di in zip(sizes, k, s, d):
        e = di * (ki - 1) + 1
        total = max((-(-n // si) - 1) * si + e - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def np_conv(x, w, b, stride, pads, dilation, groups):
    """Direct loops: y[n, o, co] = b[co] + sum_{k, i} xpad[n, o s + k d, g C_in/g + i] w[k, i, co]
    with g = co // (C_out/g) the group of output channel co."""
    x, w = np.asarray(x), np.asarray(w)
    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
    k, (cin_g, cout) = w.shape[:nd], w.shape[-2:]
    cout_g = cout // groups
    out = [(xp.shape[1 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    y = np.zeros((x.shape[0], *out, cout))
    for n, o, co in itertools.product(range(x.shape[0]), itertools.product(*map(range, out)),
                                      range(cout)):
        g = co // cout_g
        acc = 0.0 if b is None else float(b[co])
        for kk in itertools.product(*map(range, k)):
            pos = tuple(o[i] * stride[i] + kk[i] * dilation[i] for i in range(nd))
            for i in range(cin_g):
                acc += xp[(n,) + pos + (g * cin_g + i,)] * w[kk + (i, co)]
        y[(n,) + o + (co,)] = acc
    return y


def tup(v, nd):
    return (v,) * nd if isinstance(v, int) else tuple(v)


def reference(layer_opts, nd, params, x):
    k = params["W"].shape[:nd]
    s, d = tup(layer_opts.get("stride", 1), nd), tup(layer_opts.get("dilation", 1), nd)
    pad = layer_opts.get("padding", "VALID")
    pads = ([(0, 0)] * nd if pad == "VALID" else same_pads(x.shape[1:-1], k, s, d) if pad == "SAME"
            else [(pad, pad)] * nd if isinstance(pad, int) else pad)
    return np_conv(x, params["W"], params.get("b"), s, pads, d, layer_opts.get("groups", 1))


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if a.size else 0.0


def check_gradients(layer, params, x, rng, fd=True):
    """Manual backward == jax.vjp(apply) to 1e-10 relative, and == central finite differences.

    Everything for one case runs in one jitted program (one compile per shape, not one per op).
    """
    y = jax.eval_shape(layer.apply, params, x)
    dy = jnp.asarray(rng.normal(size=y.shape))
    vp = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    vx = jnp.asarray(rng.normal(size=x.shape))
    eps = 1e-6

    @jax.jit
    def run(params, x, dy, vp, vx):
        y, res = layer.forward(params, x)
        manual = layer.backward(params, res, dy)
        auto = jax.vjp(layer.apply, params, x)[1](dy)

        def loss(t):
            p = jax.tree.map(lambda a, v: a + t * v, params, vp)
            return jnp.sum(layer.apply(p, x + t * vx) * dy)

        return y, layer.apply(params, x), manual, auto, (loss(eps) - loss(-eps)) / (2 * eps)

    y, y_apply, (dp, dx), (dp_a, dx_a), fd_dir = run(params, x, dy, vp, vx)
    np.testing.assert_array_equal(y, y_apply)                       # forward(...)[0] == apply
    assert jax.tree.structure(dp) == jax.tree.structure(params)
    for (path, g), g_a in zip(jax.tree_util.tree_leaves_with_path(dp), jax.tree.leaves(dp_a)):
        assert g.shape == g_a.shape and rel_err(g, g_a) < 1e-10, (path, rel_err(g, g_a))
    assert dx.shape == x.shape and rel_err(dx, dx_a) < 1e-10, rel_err(dx, dx_a)
    if fd:
        man_dir = sum(np.vdot(g, v) for g, v in zip(jax.tree.leaves(dp), jax.tree.leaves(vp)))
        np.testing.assert_allclose(man_dir + np.vdot(dx, vx), fd_dir, rtol=1e-6, atol=1e-9)
    return y, dy, dp


def check_per_example(layer, params, x, dy, dp):
    """vmap over examples (each keeps a batch axis of 1) == a Python loop, manual and autodiff."""
    def manual(xi, dyi):
        return layer.backward(params, layer.forward(params, xi)[1], dyi)

    def auto(xi, dyi):
        return jax.vjp(layer.apply, params, xi)[1](dyi)

    xs, dys = x[:, None], dy[:, None]
    loop = [jax.jit(manual)(xs[i], dys[i]) for i in range(x.shape[0])]
    loop = jax.tree.map(lambda *a: np.stack(a), *loop)
    got = jax.jit(lambda xs, dys: (jax.vmap(manual)(xs, dys), jax.vmap(auto)(xs, dys)))(xs, dys)
    for g in got:
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(loop)):
            assert rel_err(a, b) < 1e-10
    # the per-example kernel gradients sum to the batch gradient
    np.testing.assert_allclose(loop[0]["W"].sum(0), dp["W"], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the option grid

# (nd, features, kernel, options, input shape): every padding mode, stride 1/2 (and mixed),
# dilation 1/2, groups 1/2/depthwise, with and without bias, 1-D and 2-D, plus the awkward
# geometries: rows no window reaches (stride > leftover), padding wider than the kernel.
CASES = [
    (2, 4, 3, {}, (2, 5, 5, 3)),
    (2, 3, 3, dict(stride=2, padding="SAME"), (2, 5, 6, 2)),
    (2, 2, (2, 3), dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(2, 1), groups=2,
                        use_bias=False), (2, 6, 5, 4)),
    (2, 4, 2, dict(padding="SAME", dilation=2, groups=4), (1, 5, 4, 4)),
    (2, 2, 3, dict(stride=2), (2, 6, 6, 2)),
    (2, 2, 2, dict(stride=3, padding=((4, 0), (1, 3)), use_bias=False), (1, 5, 4, 2)),
    (1, 4, 3, {}, (2, 7, 3)),
    (1, 6, 3, dict(stride=2, padding="SAME", dilation=2, groups=3), (2, 7, 3)),
    (1, 2, 2, dict(stride=2, padding=1, dilation=2, use_bias=False), (2, 6, 2)),
]
IDS = [f"{nd}d-{kw}" for nd, _, _, kw, _ in CASES]


LOWERINGS = ["patches", "native"]


def build(case, seed=0, lowering="auto"):
    """The layer, its init out_shape (traced only: no compile), numpy-drawn params, x, rng."""
    nd, features, k, opts, shape = case
    layer = (conv1d if nd == 1 else conv2d)(features, k, lowering=lowering, **opts)
    box = []
    jax.eval_shape(lambda key: box.append(layer.init(key, (None,) + shape[1:])[0]), KEY)
    rng = np.random.default_rng(seed)
    params = {"W": rng.normal(size=tup(k, nd) + (shape[-1] // opts.get("groups", 1), features))}
    if opts.get("use_bias", True):
        params["b"] = rng.normal(size=(features,))
    params = jax.tree.map(jnp.asarray, params)
    return layer, box[0], params, jnp.asarray(rng.normal(size=shape)), rng


def check_case(case, seed, fd=True, lowering="auto"):
    nd, _, _, opts, _ = case
    layer, out_shape, params, x, rng = build(case, seed, lowering)
    y, dy, dp = check_gradients(layer, params, x, rng, fd=fd)
    np.testing.assert_allclose(y, reference(opts, nd, params, x), rtol=1e-12, atol=1e-12)
    assert out_shape == (None,) + y.shape[1:]
    return layer, params, x, dy, dp


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_case_numpy_reference_and_gradients(case, lowering):
    layer, params, x, dy, dp = check_case(case, seed=1, lowering=lowering)
    if x.shape[0] > 1 and case[0] == 2:       # 2-D batched cases: per-example gradients too
        check_per_example(layer, params, x, dy, dp)


@pytest.mark.parametrize("case, lowering", [(CASES[7], "native"), (CASES[8], "patches")],
                         ids=["groups3-native", "patches"])
def test_per_example_vmap_1d(case, lowering):
    layer, params, x, dy, dp = check_case(case, seed=2, lowering=lowering)
    check_per_example(layer, params, x, dy, dp)


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_jit_equals_eager_and_lax_same(lowering):
    layer, _, params, x, _rng = build(CASES[1], lowering=lowering)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), layer.apply(params, x),
                               rtol=1e-13)
    # lax's own "SAME" string agrees with the padding the layer computes
    ref = jax.lax.conv_general_dilated(x, params["W"], (2, 2), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layer.apply(params, x), ref + params["b"], rtol=1e-13)


@pytest.mark.parametrize("lowering", [pytest.param("patches", marks=pytest.mark.slow), "native"])
def test_shift_equivariance(lowering):
    """One filter at every position: shifting the input shifts the output. Rolled by
    ``(d, e)``, the outputs that see no wrapped pixel equal the unshifted ones moved by
    ``(d, e)``; with circular padding (wrap the input by ``k - 1``) all of them do, for
    negative shifts too. A stride of 2 keeps it for even shifts (the output moves by half)
    and breaks it for odd ones."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 2)))
    params = {"W": jnp.asarray(rng.normal(size=(3, 2, 2, 3))),
              "b": jnp.asarray(rng.normal(size=(3,)))}
    apply = jax.jit(conv2d(3, (3, 2), lowering=lowering).apply)   # one compile per shape
    y = apply(params, x)                                         # (2, 5, 5, 3)
    assert y.dtype == jnp.float64
    d, e = 2, 1
    y_rolled = apply(params, jnp.roll(x, (d, e), axis=(1, 2)))
    np.testing.assert_allclose(y_rolled[:, d:, e:], y[:, :-d, :-e], rtol=1e-12, atol=1e-12)
    assert not np.allclose(y_rolled[:, :d], y[:, -d:])           # the wrapped rows differ

    def wrap(a):
        return jnp.pad(a, ((0, 0), (0, 2), (0, 1), (0, 0)), mode="wrap")

    y_circ = apply(params, wrap(x))                              # (2, 7, 6, 3): circular
    for shift in [(d, e), (-3, 4), (1, -1)]:
        got = apply(params, wrap(jnp.roll(x, shift, axis=(1, 2))))
        np.testing.assert_allclose(got, jnp.roll(y_circ, shift, axis=(1, 2)),
                                   rtol=1e-12, atol=1e-12)

    strided = jax.jit(conv2d(3, (3, 2), stride=2, lowering=lowering).apply)
    ys = strided(params, x)
    for shift, equal in [(2, True), (1, False)]:
        got = strided(params, jnp.roll(x, shift, axis=1))[:, 1:]
        assert np.allclose(got, ys[:, :-1], rtol=1e-12, atol=1e-12) is equal, shift


@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=["groups2", "groups1"])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_float32_input_gradients_keep_dtypes(case, lowering):
    """float32 x with float64 params: manual cotangents have the primals' dtypes, as autodiff's."""
    layer, _, params, x, rng = build(case, lowering=lowering)
    x = x.astype(jnp.float32)
    dy = jnp.asarray(rng.normal(size=jax.eval_shape(layer.apply, params, x).shape))
    man, auto = jax.jit(lambda p, x, dy: (layer.backward(p, layer.forward(p, x)[1], dy),
                                          jax.vjp(layer.apply, p, x)[1](dy)))(params, x, dy)
    assert jax.tree.map(lambda a: a.dtype, man) == jax.tree.map(lambda a: a.dtype, auto)
    assert man[1].dtype == jnp.float32 and man[0]["W"].dtype == jnp.float64
    np.testing.assert_allclose(man[1], auto[1], rtol=1e-5, atol=1e-5)


@st.composite
def conv_configs(draw):
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, features = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    s = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    d = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["VALID", "SAME", "pairs"]))
    pads = (tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nd))
            if mode == "pairs" else mode)
    lohi = pads if mode == "pairs" else ((0, 0),) * nd
    sizes = tuple(draw(st.integers(max(1, di * (ki - 1) + 1 - lo - hi), 7))
                  for ki, di, (lo, hi) in zip(k, d, lohi))
    opts = dict(stride=s, padding=pads, dilation=d, groups=groups, use_bias=draw(st.booleans()))
    return nd, features, k, opts, (draw(st.integers(1, 2)),) + sizes + (c_in,)


@pytest.mark.slow
@given(conv_configs(), st.integers(0, 2**31 - 1), st.sampled_from(LOWERINGS))
def test_property_random_options(case, seed, lowering):
    check_case(case, seed, lowering=lowering)


@pytest.mark.slow
@given(conv_configs(), st.integers(0, 2**31 - 1))
def test_property_lowerings_agree(case, seed):
    """patches and native: the same forward, manual gradients and autodiff gradients to float64
    precision (groups > 1 runs natively under both names, which must also agree)."""
    layer_p, _, params, x, rng = build(case, seed, "patches")
    layer_n = build(case, seed, "native")[0]
    dy = jnp.asarray(rng.normal(size=jax.eval_shape(layer_p.apply, params, x).shape))

    @jax.jit
    def run(params, x, dy):
        def both(layer):
            return (layer.apply(params, x), layer.backward(params, layer.forward(params, x)[1], dy),
                    jax.vjp(layer.apply, params, x)[1](dy))
        return both(layer_p), both(layer_n)

    got_p, got_n = run(params, x, dy)
    for a, b in zip(jax.tree.leaves(got_p), jax.tree.leaves(got_n)):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12, rel_err(a, b)


def test_params_and_names():
    assert conv2d(32, 3, stride=2).name == "conv2d(32, 3x3, stride=2)"
    assert conv2d(32, 3, lowering="patches").name == "conv2d(32, 3x3, lowering=patches)"
    assert conv2d(32, 3, lowering="auto").name == conv2d(32, 3).name
    assert (conv1d(8, 5, padding="same", use_bias=False).name
            == "conv1d(8, 5, padding=SAME, no bias)")
    shape, params = conv2d(8, (3, 2), groups=2).init(KEY, (-1, 8, 8, 4))
    assert shape == (None, 6, 7, 8) and params["W"].shape == (3, 2, 2, 8)
    assert params["W"].dtype == jnp.float64
    # glorot_uniform over HWIO: fan_in = KH KW C_in/groups = 12, fan_out = KH KW C_out = 48
    limit = np.sqrt(6 / (12 + 48))
    assert np.abs(params["W"]).max() <= limit and np.abs(params["W"]).max() > 0.9 * limit
    np.testing.assert_array_equal(params["b"], 0)
    no_bias = jax.eval_shape(lambda k: conv1d(3, 2, use_bias=False).init(k, (None, 5, 2))[1], KEY)
    assert set(no_bias) == {"W"} and no_bias["W"].shape == (2, 2, 3)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make, words", [
    (lambda: conv2d(4, 3, stride=0), "stride"),
    (lambda: conv2d(4, 3, dilation=(1, 0)), "dilation"),
    (lambda: conv2d(4, (3, 3, 3)), "kernel_size"),
    (lambda: conv2d(4, 3, groups=3), "groups"),
    (lambda: conv2d(0, 3), "features"),
    (lambda: conv2d(4, 3, padding="FULL"), "padding"),
    (lambda: conv2d(4, 3, padding=((1, 1),)), "padding"),
    (lambda: conv1d(4, 3, padding=-1), "padding"),
    (lambda: conv2d(4, 3, lowering="im2col"), "lowering must be one of 'auto', 'patches', "
                                              "'native'"),
])
def test_config_errors(make, words):
    with pytest.raises(ConfigError, match=words) as err:
        make()
    assert str(err.value).startswith("conv")


def test_shape_errors_name_the_layer():
    layer = conv2d(4, 3, dilation=3)
    name = "conv2d(4, 3x3, dilation=3)"
    with pytest.raises(ShapeError, match=r"kernel extent 7 .* padded input size 5") as err:
        layer.init(KEY, (None, 5, 9, 2))                     # dilated kernel counts
    assert str(err.value).startswith(name)
    with pytest.raises(ShapeError, match="rank 4"):
        conv2d(4, 3).init(KEY, (None, 5, 5))
    with pytest.raises(ShapeError, match="divisible by groups=2"):
        conv2d(4, 1, groups=2).init(KEY, (None, 5, 5, 3))
    for shape, axis in (((None, 8, 8, None), 3), ((None, None, 8, 3), 1), ((2, 8, None, 3), 2)):
        with pytest.raises(ShapeError, match=rf"^conv2d\(4, 3x3\): init shape .* no size on "
                                             rf"axis {axis}; only the batch axis may be None"):
            conv2d(4, 3).init(KEY, shape)
    with pytest.raises(ShapeError, match=r"^conv1d\(4, 3\): init shape \(None, 5, None\)"):
        conv1d(4, 3).init(KEY, (None, 5, None))

    params = {"W": jnp.ones((3, 3, 3, 4)), "b": jnp.zeros(4)}
    x = jnp.ones((2, 5, 5, 3))
    with pytest.raises(ShapeError, match=r"conv2d\(4, 3x3\): expected input channels 3, got 2"):
        conv2d(4, 3).apply(params, x[..., :2])
    with pytest.raises(ShapeError, match=r"rank 4 \(batch, H, W, channels\), got shape \(5, 5,"):
        conv2d(4, 3).apply(params, x[0])                    # (H, W, C): missing the batch
    with pytest.raises(ShapeError, match="kernel extent 3"):
        conv2d(4, 3).apply(params, x[:, :2])                # smaller than the kernel
    with pytest.raises(ShapeError, match="kernel extent 3"):
        jax.jit(conv2d(4, 3).apply)(params, x[:, :2])       # caught while tracing under jit
    with pytest.raises(ShapeError, match="rank 3"):
        conv1d(4, 3).forward({"W": jnp.ones((3, 3, 4)), "b": jnp.ones(4)}, x)
    with pytest.raises(ShapeError, match="kernel W has shape"):
        conv2d(4, 2).apply(params, x)                       # params of another layer
    with pytest.raises(DTypeError, match="floating"):
        conv2d(4, 3).apply(params, x.astype(jnp.int32))
