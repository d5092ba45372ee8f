"""Activations: closed-form derivatives vs autodiff vs finite differences (float64),
hand-written VJPs vs jax.vjp, ranges, kink conventions, numerical stability, lookup."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from funnn import activations as A
from funnn.core import ConfigError

ELEMENTWISE = [a for a in A.ALL if a.elementwise]
LAST_AXIS = [a for a in A.ALL if not a.elementwise]
ids = lambda a: a.name

# 16 float64 points in [-30, 30], kept 1e-3 away from the kinks at 0
off_kink = hnp.arrays(np.float64, (16,),
                      elements=st.floats(-30, 30).filter(lambda v: abs(v) > 1e-3))

_autodiff = {}


def autodiff_df(act):
    """jax.grad of act.f, vmapped and jitted once per activation (the oracle)."""
    if act.name not in _autodiff:
        _autodiff[act.name] = jax.jit(jax.vmap(jax.grad(act.f)))
    return _autodiff[act.name]


def central_diff(f, x, h=1e-5):
    return (f(x + h) - f(x - h)) / (2 * h)


# --------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize("act", ELEMENTWISE, ids=ids)
@given(x=off_kink)
def test_df_equals_autodiff(act, x):
    x = jnp.asarray(x)
    np.testing.assert_allclose(act.df(x), autodiff_df(act)(x), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("act", ELEMENTWISE, ids=ids)
@given(x=off_kink)
def test_df_equals_finite_differences(act, x):
    x = jnp.asarray(x)
    np.testing.assert_allclose(act.df(x), central_diff(act.f, x), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("act", [A.elu.with_params(alpha=0.5), A.isru.with_params(alpha=3.0),
                                 A.leaky_relu.with_params(alpha=0.2)], ids=ids)
def test_df_with_other_parameters(act):
    x = jnp.linspace(-6.0, 6.0, 24) + 0.01
    np.testing.assert_allclose(act.df(x), autodiff_df(act)(x), rtol=1e-10)
    np.testing.assert_allclose(act.df(x), central_diff(act.f, x), rtol=1e-6, atol=1e-9)


# left-side derivative at the kinks, the true derivative where f is smooth at 0
AT_ZERO = {"identity": 1.0, "binary_step": 0.0, "sigmoid": 0.25, "tanh": 1.0, "arctan": 1.0,
           "softsign": 1.0, "isru(alpha=1.0)": 1.0, "relu": 0.0, "leaky_relu(alpha=0.01)": 0.01,
           "prelu(alpha=0.25)": 0.25, "elu(alpha=1.0)": 1.0, "softplus": 0.5, "gelu": 0.5,
           "gelu_tanh": 0.5, "silu": 0.5}


def test_at_zero_table_is_complete():
    assert set(AT_ZERO) == {a.name for a in ELEMENTWISE}


@pytest.mark.parametrize("act", ELEMENTWISE, ids=ids)
def test_derivative_at_zero_convention(act):
    """df(0) is the documented value, and jax.grad of f picks the same side."""
    assert float(act.df(0.0)) == AT_ZERO[act.name]
    assert float(jax.grad(act.f)(0.0)) == AT_ZERO[act.name]


def test_kink_conventions_with_parameters():
    assert float(A.elu.with_params(alpha=0.5).df(0.0)) == 0.5           # left side alpha e^0
    assert float(A.leaky_relu.with_params(alpha=0.2).df(0.0)) == 0.2
    assert float(jax.grad(A.elu.with_params(alpha=0.5).f)(0.0)) == 0.5
    assert float(A.binary_step(0.0)) == 1.0 and float(A.binary_step(-1e-300)) == 0.0
    assert float(A.relu.df(1e-300)) == 1.0 and float(A.relu.df(-1e-300)) == 0.0
    assert float(jax.grad(jax.nn.relu)(0.0)) == float(A.relu.df(0.0))


def test_seed_table_formulas():
    """The derivative forms written in the seed notes, by hand."""
    x = jnp.linspace(-4.0, 4.0, 17)
    s, t, e = A.sigmoid(x), A.tanh(x), A.elu(x)
    np.testing.assert_allclose(A.sigmoid.df(x), s * (1 - s), rtol=1e-14)
    # df is computed as (1 - t)(1 + t): the same value, fewer digits lost at large |x|
    np.testing.assert_allclose(A.tanh.df(x), 1 - t ** 2, rtol=1e-13)
    np.testing.assert_allclose(A.arctan.df(x), 1 / (x ** 2 + 1), rtol=1e-14)
    np.testing.assert_allclose(A.softsign.df(x), 1 / (1 + abs(x)) ** 2, rtol=1e-14)
    np.testing.assert_allclose(A.isru.df(x), (1 / np.sqrt(1 + x ** 2)) ** 3, rtol=1e-13)
    np.testing.assert_allclose(A.elu.df(x), np.where(x < 0, e + 1.0, 1.0), rtol=1e-13)
    np.testing.assert_allclose(A.softplus.df(x), 1 / (1 + np.exp(-x)), rtol=1e-14)
    assert float(A.sigmoid.df(0.0)) == 0.25 and float(A.tanh.df(0.0)) == 1.0


# --------------------------------------------------------------------------- values


def test_values_against_numpy_references():
    x = np.linspace(-8.0, 8.0, 33)
    refs = {
        "identity": x, "binary_step": (x >= 0).astype(float), "sigmoid": sp.expit(x),
        "tanh": np.tanh(x), "arctan": np.arctan(x), "softsign": x / (1 + abs(x)),
        "isru(alpha=1.0)": x / np.sqrt(1 + x * x), "relu": np.maximum(x, 0),
        "leaky_relu(alpha=0.01)": np.where(x >= 0, x, 0.01 * x),
        "prelu(alpha=0.25)": np.where(x >= 0, x, 0.25 * x),
        "elu(alpha=1.0)": np.where(x >= 0, x, np.exp(x) - 1), "softplus": np.logaddexp(0, x),
        "gelu": 0.5 * x * (1 + sp.erf(x / math.sqrt(2))),
        "gelu_tanh": 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
        "silu": x * sp.expit(x),
    }
    assert set(refs) == {a.name for a in ELEMENTWISE}
    for act in ELEMENTWISE:
        np.testing.assert_allclose(act(x), refs[act.name], rtol=1e-12, atol=1e-15,
                                   err_msg=act.name)
    z = x.reshape(3, 11)
    np.testing.assert_allclose(A.softmax(z), sp.softmax(z, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(A.log_softmax(z), sp.log_softmax(z, axis=-1), rtol=1e-12)


@pytest.mark.parametrize("act", A.ALL + (A.isru.with_params(alpha=4.0),
                                         A.elu.with_params(alpha=2.0)), ids=ids)
def test_outputs_lie_in_range(act):
    x = jnp.concatenate([jnp.linspace(-60.0, 60.0, 2401), jnp.array([-1e4, -1.0, 0.0, 1e4])])
    y = np.asarray(act(x.reshape(-1, 5)) if not act.elementwise else act(x))
    if isinstance(act.range, frozenset):
        assert set(np.unique(y)) == set(act.range)
    else:
        lo, hi = act.range
        assert lo < hi and np.all(y >= lo) and np.all(y <= hi), (y.min(), y.max())
        if math.isfinite(lo):                       # the bound is tight: approached on the grid
            assert y.min() - lo < 0.01
        if math.isfinite(hi):
            assert hi - y.max() < 0.01 or act.name == "softmax"
    if act.name == "softmax":
        np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-14)


# --------------------------------------------------------------------------- backprop


@jax.jit
def _backprop_both_ways(x, dy):
    """{name: (hand-written backprop, jax.vjp)} for every activation, in one compile."""
    return {a.name: (a.backprop(x, dy), jax.vjp(a.f, x)[1](dy)[0]) for a in A.ALL}


@pytest.mark.slow
def test_backprop_equals_vjp():
    kx, kd = jax.random.split(jax.random.key(0))
    x = 3 * jax.random.normal(kx, (3, 5), jnp.float64)
    x = x.at[0, 0].set(0.0)                          # a kink: both take the same side
    dy = jax.random.normal(kd, (3, 5), jnp.float64)
    got = _backprop_both_ways(x, dy)
    assert set(got) == {a.name for a in A.ALL}
    for name, (manual, auto) in got.items():
        np.testing.assert_allclose(manual, auto, rtol=1e-10, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("act", LAST_AXIS, ids=ids)
def test_jacobian_equals_jacfwd_and_finite_differences(act):
    x = 2 * jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)
    jac = act.df(x)
    assert jac.shape == (3, 4, 4)
    np.testing.assert_allclose(jac, jax.vmap(jax.jacfwd(act.f))(x), rtol=1e-10, atol=1e-14)
    eye = np.eye(4)
    for j in range(4):                              # column j: d f / d x_j
        fd = central_diff(lambda h: act.f(x + h * eye[j]), 0.0)
        np.testing.assert_allclose(jac[:, :, j], fd, rtol=1e-6, atol=1e-9)
    # a single example (no batch axis) works too
    np.testing.assert_allclose(act.df(x[0]), jac[0], rtol=1e-14)


# --------------------------------------------------------------------------- stability


STABLE = (A.sigmoid, A.softplus, A.elu, A.silu, A.tanh)


@jax.jit
def _three_ways(x):
    """{name: (f, df, jax.grad of f)} at the points x, in one compile per dtype."""
    return {a.name: (a(x), a.df(x), jax.vmap(jax.grad(a.f))(x)) for a in STABLE}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_stability_at_large_inputs(dtype):
    x = jnp.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype)
    e100 = sp.expit(-100.0)
    expect = {   # (f, f') at x; None: whatever the other path gives (only finiteness checked)
        "sigmoid": ([0, e100, 0.5, 1, 1], [0, e100, 0.25, 0, 0]),
        "softplus": ([0, np.exp(-100.0), math.log(2), 100, 1e4], [0, e100, 0.5, 1, 1]),
        "elu(alpha=1.0)": ([-1, -1, 0, 100, 1e4], [0, np.exp(-100.0), 1, 1, 1]),
        "silu": ([0, -100 * e100, 0, 100, 1e4], [0, None, 0.5, 1, 1]),
        "tanh": ([-1, -1, 0, 1, 1], [0, 0, 1, 0, 0]),
    }
    tiny = np.finfo(dtype).tiny
    for name, (f, df, grad) in _three_ways(x).items():
        f_ref, df_ref = expect[name]
        for got, ref, what in [(f, f_ref, "f"), (df, df_ref, "df"), (grad, df_ref, "grad")]:
            assert got.dtype == dtype and np.all(np.isfinite(got)), (name, what, got)
            ref = np.array([got[1] if r is None else r for r in ref], np.float64)
            ref = np.where(abs(ref) < tiny, 0.0, ref)         # below float32's range: 0
            # jax's expm1 rule (ans + 1) cancels for x << 0: autodiff gets elu'(-100) = 0
            atol = np.finfo(dtype).eps if what == "grad" else tiny
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=atol, err_msg=f"{name} {what}")
    z = jnp.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype)
    np.testing.assert_allclose(A.softmax(z), [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(A.log_softmax(z), [[0, -2e4, -1e4], [-math.log(3)] * 3], rtol=1e-6)
    dy = jnp.ones_like(z)
    for act in LAST_AXIS:
        for got in (act.df(z), act.backprop(z, dy), jax.vjp(act.f, z)[1](dy)[0]):
            assert np.all(np.isfinite(got)), act.name


@pytest.mark.parametrize("act", A.ALL, ids=ids)
def test_dtype_is_kept(act):
    x = jnp.linspace(-2.0, 2.0, 6, dtype=jnp.float32).reshape(2, 3)
    for out in (act(x), act.df(x), act.backprop(x, jnp.ones_like(x))):
        assert out.dtype == jnp.float32, act.name


# --------------------------------------------------------------------------- lookup and API


def test_get_by_name_alias_and_parameters():
    assert A.get("tanh") is A.tanh and A.get("TANH") is A.tanh
    assert A.get("logistic") is A.sigmoid and A.get("swish") is A.silu
    assert A.get("elu") is A.elu and A.elu.name == "elu(alpha=1.0)"
    e = A.get("elu", alpha=0.5)
    assert e.name == "elu(alpha=0.5)" and e.params == (("alpha", 0.5),)
    assert A.get("elu(alpha=0.5)") is e and A.elu.with_params(alpha=0.5) is e
    assert A.get(e.name) == e and hash(A.get(e.name)) == hash(e)
    assert A.get(A.tanh) is A.tanh and A.tanh.with_params() is A.tanh
    assert A.get("leaky_relu").params == (("alpha", 0.01),)
    np.testing.assert_allclose(e(jnp.array([-1.0, 2.0])), [0.5 * (math.exp(-1) - 1), 2.0])
    assert [a.name.split("(")[0] for a in A.ALL] == list(A.names()[:len(A.ALL)])
    assert len({a.name for a in A.ALL}) == len(A.ALL)


@pytest.mark.parametrize("bad, words", [
    ("nope", ["unknown activation 'nope'", "tanh", "elu", "softmax"]),
    ("tanh(alpha=2)", ["'tanh' has no parameters"]),
    ("elu(beta=2)", ["unknown parameter", "alpha"]),
    ("elu(alpha)", ["key=value"]),
    ("isru(alpha=0)", ["alpha must be a finite number > 0"]),
    ("elu(alpha=nan)", ["finite"]),
    (3, ["valid names"]),
])
def test_get_errors(bad, words):
    with pytest.raises(ConfigError) as err:
        A.get(bad)
    for w in words:
        assert w in str(err.value)


def test_plain_python_inputs_and_jit():
    assert float(A.tanh(0.5)) == pytest.approx(math.tanh(0.5), rel=1e-15)
    np.testing.assert_allclose(A.relu([-1.0, 2.0]), [0.0, 2.0])

    @jax.jit
    def f(x):
        return A.elu(x) + A.elu.df(x)
    np.testing.assert_allclose(f(jnp.array([-1.0, 1.0])), [math.exp(-1) - 1 + math.exp(-1), 2.0])
    g = jax.jit(lambda act, x: act(x), static_argnums=0)   # Activation is hashable
    np.testing.assert_allclose(g(A.get("elu", alpha=0.5), jnp.array([-1.0])),
                               [0.5 * (math.exp(-1) - 1)])
    assert repr(A.tanh) == "Activation(tanh)" and "f'" in A.tanh.formula
