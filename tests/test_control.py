"""funnn.control: bounded_while, fixed_point, checkpointed_scan, memory_report.

Oracles: Python loops run eagerly, unrolled loops differentiated by jax.grad,
closed forms ((I - A)^-1 b, 1/(2 sqrt a)), and central finite differences in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

from funnn.control import (
    FixedPointResult,
    WhileResult,
    bounded_while,
    checkpointed_scan,
    fixed_point,
    memory_report,
)
from funnn.core import ConfigError, DTypeError, ShapeError


def fd(f, x, h=1e-6):
    """Central finite difference of a scalar function, as a float."""
    return (float(f(x + h)) - float(f(x - h))) / (2 * h)


# --------------------------------------------------------------------------- bounded_while


def newton_while(a, max_steps=50):
    """sqrt(a) by Newton steps until |x^2 - a| <= 1e-13 a; state (x, steps)."""
    return bounded_while(lambda s: jnp.abs(s[0] ** 2 - a) > 1e-13 * a,
                         lambda s: ((s[0] + a / s[0]) / 2, s[1] + 1), (a, 0), max_steps)


def newton_python(a):
    """The same loop in Python: (x, steps)."""
    x, k = a, 0
    while abs(x * x - a) > 1e-13 * a:
        x, k = (x + a / x) / 2, k + 1
    return x, k


newton_x = jax.jit(lambda a: newton_while(a).state[0])       # compiled once, shared
newton_dx = jax.jit(jax.grad(lambda a: newton_while(a).state[0]))


@pytest.mark.parametrize("a", [0.3, 2.0, 50.0])
def test_bounded_while_matches_python_loop_and_unrolled_gradient(a):
    out = jax.jit(newton_while)(a)
    x, k = newton_python(a)
    assert isinstance(out, WhileResult)
    assert float(out.state[0]) == pytest.approx(x, rel=1e-15) and int(out.state[1]) == k
    assert not bool(out.hit_max)

    def unrolled(a):
        x = a
        for _ in range(k):
            x = (x + a / x) / 2
        return x

    g = float(newton_dx(a))
    assert g == pytest.approx(float(jax.grad(unrolled)(a)), rel=1e-14)
    assert g == pytest.approx(1 / (2 * np.sqrt(a)), rel=1e-12)
    assert g == pytest.approx(fd(newton_x, a), rel=1e-7)


def test_bounded_while_composes_with_jit_vmap_grad_jvp():
    f = lambda a: newton_while(a).state[0]
    a = jnp.array([0.5, 2.0, 9.0, 1e3])
    batched = jax.jit(jax.vmap(jax.grad(f)))(a)
    looped = np.array([newton_dx(float(t)) for t in a])
    np.testing.assert_allclose(batched, looped, rtol=1e-14)
    np.testing.assert_allclose(batched, 1 / (2 * np.sqrt(a)), rtol=1e-12)
    _, tangent = jax.jvp(f, (2.0,), (1.0,))
    assert float(tangent) == pytest.approx(1 / (2 * np.sqrt(2.0)), rel=1e-12)
    steps = jax.vmap(lambda t: newton_while(t).state[1])(a)
    assert [int(s) for s in steps] == [newton_python(float(t))[1] for t in a]


def test_bounded_while_hit_max_flag():
    grow = lambda x, n: bounded_while(lambda x: x < 8.0, lambda x: 2 * x, x, n)
    out = grow(1.0, 3)                       # 1 -> 2 -> 4 -> 8: stops exactly at max_steps
    assert float(out.state) == 8.0 and not bool(out.hit_max)
    out = grow(1.0, 2)                       # cut off: the result of 2 iterations, flagged
    assert float(out.state) == 4.0 and bool(out.hit_max)
    assert float(jax.grad(lambda x: grow(x, 2).state)(1.0)) == 4.0    # d(4x)/dx, truthfully
    out = jax.jit(jax.vmap(lambda x: grow(x, 2)))(jnp.array([1.0, 3.0, 9.0]))
    np.testing.assert_array_equal(out.state, [4.0, 12.0, 9.0])
    np.testing.assert_array_equal(out.hit_max, [True, False, False])


def test_bounded_while_strict_raises():
    grow = lambda x: bounded_while(lambda x: x < 8.0, lambda x: 2 * x, x, 2,
                                   strict=True)
    with pytest.raises(ConfigError, match=r"bounded_while: .*max_steps=2"):
        grow(1.0)
    assert float(grow(3.0).state) == 12.0                       # no error when it stops
    with pytest.raises(jax.errors.JaxRuntimeError, match="max_steps=2"):  # under jit: at run time
        jax.block_until_ready(jax.jit(grow)(1.0))


def test_bounded_while_pytree_state_and_no_retrace():
    traces = []

    def body(s):
        traces.append(1)
        return {"x": s["x"] * 0.5, "n": s["n"] + 1, "hist": s["hist"].at[s["n"] % 3].set(s["x"])}

    init = {"x": jnp.float64(10.0), "n": jnp.int32(0), "hist": jnp.zeros(3)}
    run = jax.jit(lambda s: bounded_while(lambda s: s["x"] > 1.0, body, s, 10))
    out = run(init)
    assert int(out.state["n"]) == 4 and float(out.state["x"]) == 0.625
    np.testing.assert_array_equal(out.state["hist"], [10.0 * 0.5 ** 3, 5.0, 2.5])
    count = len(traces)
    run({**init, "x": jnp.float64(3.0)})
    assert len(traces) == count                                  # compiled once


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_bounded_while_rejects_bad_max_steps(bad):
    with pytest.raises(ConfigError, match="max_steps"):
        bounded_while(lambda x: x < 1.0, lambda x: x * 2, 0.5, bad)


def test_bounded_while_rejects_changed_state():
    with pytest.raises(ShapeError, match=r"structure.*PyTreeDef"):
        bounded_while(lambda s: s[0] < 1.0, lambda s: (s[0] * 2,), (0.5, 0), 5)
    with pytest.raises(ShapeError, match=r"leaf <root> came out as float64\[3\], expected "
                                         r"float64\[\]"):
        bounded_while(lambda x: jnp.all(x < 1.0), lambda x: x * jnp.ones(3), 0.5, 5)
    with pytest.raises(ShapeError, match=r"float32.*expected float64"):
        bounded_while(lambda x: x < 1.0, lambda x: (x * 2).astype(jnp.float32), 0.5, 5)
    with pytest.raises(ShapeError, match="scalar bool"):
        bounded_while(lambda x: x < 1.0, lambda x: x * 2, jnp.zeros(2) + 0.5, 5)
    with pytest.raises(DTypeError, match="scalar bool"):
        bounded_while(lambda x: x - 1.0, lambda x: x * 2, 0.5, 5)


def _grow_cond(x):
    return x <= 10.0


grow_lax = jax.jit(lambda x0, r: lax.while_loop(_grow_cond, lambda x: x * r, x0))
grow_bounded = jax.jit(lambda x0, r: bounded_while(_grow_cond, lambda x: x * r, x0, 100))
grow_bounded_dx = jax.jit(jax.grad(lambda x0, r: grow_bounded(x0, r).state))


@given(x0=st.floats(0.5, 20.0), rate=st.floats(1.2, 3.0))
def test_bounded_while_equals_lax_while_loop(x0, rate):
    out = grow_bounded(x0, rate)
    assert float(out.state) == float(grow_lax(x0, rate)) and not bool(out.hit_max)
    k = 0
    while x0 * rate ** k <= 10.0:
        k += 1
    assert float(grow_bounded_dx(x0, rate)) == pytest.approx(rate ** k, rel=1e-13)


# --------------------------------------------------------------------------- fixed_point


A = np.array([[0.3, -0.2, 0.1], [0.1, 0.4, 0.0], [-0.2, 0.1, 0.25]])
B = np.array([1.0, -2.0, 0.5])
V = np.array([0.7, -1.3, 2.0])               # L = v . x*


def linear_map(p, x):
    return p["A"] @ x + p["b"]


def test_fixed_point_linear_closed_form_and_unrolled():
    params = {"A": jnp.asarray(A), "b": jnp.asarray(B)}
    out = fixed_point(linear_map, params, jnp.zeros(3))
    assert isinstance(out, FixedPointResult) and bool(out.converged)
    xstar = np.linalg.solve(np.eye(3) - A, B)
    np.testing.assert_allclose(out.x, xstar, rtol=1e-9)
    assert float(out.residual) <= 1e-10 * (1 + np.max(np.abs(xstar)))
    assert 0 < int(out.iterations) < 200

    loss = jax.jit(lambda p: V @ fixed_point(linear_map, p, jnp.zeros(3), tol=1e-14).x)
    g = jax.jit(jax.grad(loss))(params)
    u = np.linalg.solve((np.eye(3) - A).T, V)             # by hand: u = (I - A)^-T v
    np.testing.assert_allclose(g["b"], u, rtol=1e-10, atol=1e-12)     # accuracy set by tol
    np.testing.assert_allclose(g["A"], np.outer(u, xstar), rtol=1e-10, atol=1e-12)

    def unrolled(p):
        x, _ = lax.scan(lambda x, _: (linear_map(p, x), None), jnp.zeros(3), None, length=200)
        return V @ x

    gu = jax.jit(jax.grad(unrolled))(params)
    for k in ("A", "b"):
        np.testing.assert_allclose(g[k], gu[k], rtol=1e-10, atol=1e-12)
    e = np.zeros_like(A)
    e[1, 2] = 1.0
    num = fd(lambda t: loss({"A": A + t * e, "b": B}), 0.0)
    assert float(g["A"][1, 2]) == pytest.approx(num, rel=1e-7)


@pytest.mark.slow
def test_fixed_point_composes_with_jit_vmap_and_closures():
    sqrt_fp = lambda a: fixed_point(lambda a, x: (x + a / x) / 2, a, a).x
    a = jnp.array([0.5, 2.0, 9.0, 1e4])
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(sqrt_fp)))(a), 1 / (2 * np.sqrt(a)),
                               rtol=1e-10)
    res = jax.vmap(lambda a: fixed_point(lambda a, x: (x + a / x) / 2, a, a))(a)
    assert res.converged.shape == (4,) and bool(res.converged.all())

    def closed(c):                             # c enters through a closure, not params
        return fixed_point(lambda p, x: 0.5 * x + c * p, 1.0, jnp.float64(0.0), tol=1e-14).x

    assert float(jax.jit(jax.grad(closed))(3.0)) == pytest.approx(2.0, rel=1e-12)   # x* = 2cp
    dx0 = jax.grad(lambda x0: fixed_point(linear_map, {"A": A, "b": B}, x0).x.sum())(
        jnp.ones(3))
    np.testing.assert_array_equal(dx0, np.zeros(3))            # x* does not depend on x0


def test_fixed_point_pytree_state():
    f = lambda p, s: {"u": jnp.tanh(p * s["v"]), "v": 0.5 * s["u"] + 1.0}
    out = fixed_point(f, 0.8, {"u": jnp.zeros(()), "v": jnp.zeros(())}, tol=1e-14)
    assert bool(out.converged)
    u, v = float(out.x["u"]), float(out.x["v"])
    assert u == pytest.approx(np.tanh(0.8 * v), abs=1e-13) and v == pytest.approx(0.5 * u + 1)
    u_of = jax.jit(lambda p: fixed_point(f, p, {"u": jnp.zeros(()), "v": jnp.zeros(())},
                                         tol=1e-14).x["u"])
    assert float(jax.jit(jax.grad(u_of))(0.8)) == pytest.approx(fd(u_of, 0.8), rel=1e-7)


def test_fixed_point_float32_default_tolerance():
    out = fixed_point(lambda a, x: (x + a / x) / 2, jnp.float32(2.0), jnp.float32(1.0))
    assert out.x.dtype == jnp.float32 and bool(out.converged)
    assert float(out.x) == pytest.approx(np.sqrt(2.0), rel=1e-6)


@pytest.mark.slow
def test_fixed_point_nonconvergence_is_reported_never_silent():
    diverge = lambda a, x: 2.0 * x + a
    out = fixed_point(diverge, 1.0, 1.0)
    assert not bool(out.converged) and int(out.iterations) == 200
    assert np.isnan(float(jax.grad(lambda a: fixed_point(diverge, a, 1.0).x)(1.0)))
    with pytest.raises(ConfigError, match=r"fixed_point: no fixed point within max_iter=200"):
        fixed_point(diverge, 1.0, 1.0, strict=True)
    with pytest.raises(jax.errors.JaxRuntimeError, match="no fixed point"):
        jax.block_until_ready(jax.jit(lambda a: fixed_point(diverge, a, 1.0, strict=True).x)(1.0))
    with pytest.raises(ConfigError, match="no fixed point"):
        jax.vmap(lambda a: fixed_point(diverge, a, 1.0, strict=True).x)(jnp.ones(2))
    # a NaN stops the iteration at once, unconverged
    out = fixed_point(lambda a, x: jnp.log(x - a), 1.0, 0.5)
    assert not bool(out.converged) and int(out.iterations) < 3
    # forward converges, the adjoint gets too few iterations: the gradient is NaN, not wrong
    slow = lambda a, x: 0.95 * x + a
    assert bool(fixed_point(slow, 1.0, 0.0, max_iter=2000).converged)
    g = jax.grad(lambda a: fixed_point(slow, a, 0.0, max_iter=2000, adjoint_max_iter=3).x)(1.0)
    assert np.isnan(float(g))
    g = jax.grad(lambda a: fixed_point(slow, a, 0.0, max_iter=2000).x)(1.0)
    assert float(g) == pytest.approx(20.0, rel=1e-8)              # d(a / 0.05)/da


def test_fixed_point_rejects_bad_input():
    with pytest.raises(ShapeError, match=r"f\(params, x\).*float64\[2\], expected float64\[\]"):
        fixed_point(lambda p, x: x * jnp.ones(2), 1.0, 0.0)
    with pytest.raises(ShapeError, match="structure"):
        fixed_point(lambda p, x: (x, x), 1.0, 0.0)
    with pytest.raises(DTypeError, match="floating"):
        fixed_point(lambda p, x: x, 1, 0)
    with pytest.raises(ConfigError, match="max_iter"):
        fixed_point(lambda p, x: x / 2, 1.0, 0.0, max_iter=0)
    with pytest.raises(ConfigError, match="tol"):
        fixed_point(lambda p, x: x / 2, 1.0, 0.0, tol=0.0)


# --------------------------------------------------------------------------- checkpointing


def _rnn_step(c, x):
    c = jnp.tanh(0.9 * c + x)
    return c, c ** 2


@pytest.mark.parametrize("n,segments", [(1, None), (16, None), (23, 4)])
def test_checkpointed_scan_equals_scan(n, segments):
    ckpt = lambda f, c, xs: checkpointed_scan(f, c, xs, segments=segments)

    @jax.jit
    def both(c, xs):
        loss = lambda scan: lambda c, xs: scan(_rnn_step, c, xs)[1].sum()
        return ((lax.scan(_rnn_step, c, xs), jax.grad(loss(lax.scan), (0, 1))(c, xs)),
                (ckpt(_rnn_step, c, xs), jax.grad(loss(ckpt), (0, 1))(c, xs)))

    want, got = both(0.3, jnp.sin(jnp.arange(n, dtype=jnp.float64)))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13)


def test_checkpointed_scan_length_only_and_errors():
    f = lambda c, _: (c * 1.01, c)
    c, ys = checkpointed_scan(f, 1.0, length=50)
    assert float(c) == pytest.approx(1.01 ** 50) and ys.shape == (50,)
    with pytest.raises(ConfigError, match="give xs or length"):
        checkpointed_scan(f, 1.0)
    with pytest.raises(ShapeError, match="leading axis 5"):
        checkpointed_scan(f, 1.0, {"a": jnp.zeros(5), "b": jnp.zeros(4)})
    with pytest.raises(ConfigError, match="segments"):
        checkpointed_scan(f, 1.0, length=5, segments=0)


def test_memory_report_checkpointed_uses_less():
    w = jnp.eye(8) * 0.5

    def loss(scan, w):
        h, _ = scan(lambda h, _: (jnp.tanh(h @ w), None), jnp.ones(8), None, length=400)
        return h.sum()

    plain = memory_report(jax.grad(lambda w: loss(lax.scan, w)), w)
    ckpt = memory_report(jax.grad(lambda w: loss(checkpointed_scan, w)), w)
    if plain is None:
        pytest.skip("this backend reports no memory analysis")
    assert set(plain) == {"temp", "argument", "output", "alias", "peak"}
    assert plain["argument"] == 8 * 8 * 8 and plain["output"] == 8 * 8 * 8
    assert plain["temp"] > 400 * 8 * 8                    # 400 saved states of 8 float64
    assert ckpt["temp"] < plain["temp"] / 4


def test_memory_report_none_when_unavailable(monkeypatch):
    monkeypatch.setattr(jax.stages.Compiled, "memory_analysis", lambda self: None)
    assert memory_report(lambda x: x * 2, jnp.ones(3)) is None
