"""Control flow that `jit` compiles: cond, switch, where, fori_loop, scan, while_loop.

Under `jit` a branch or a loop must be a `lax` primitive (or `jnp.where`), and each
differentiates as follows (derivatives checked against hand-worked values and
central finite differences):

- `lax.cond(x > 0, x**2, -x)`: the derivative of the branch taken, `2x` or `-1`.
- `lax.switch(i, [x**3, sin x, exp(x-1)], x)` with `i` from `x`: `3x^2`, `cos x`, `exp(x-1)`.
- `jnp.where(x > 0, sqrt(x), 0)`: both branches are evaluated, and the gradient of
  the unused one is multiplied by zero; `0 * inf` and `0 * nan` are NaN, so the
  gradient at `x <= 0` is NaN (the trap). The safe pattern feeds the unused branch a
  harmless input: `sqrt(where(x > 0, x, 1))`, and the gradient is the true `0`.
- `lax.fori_loop` with static bounds is a scan: compound growth `x (1 + r)^n` has
  `d/dr = n x (1 + r)^(n-1)`.
- `lax.scan` of `h_t = a h_{t-1} + x_t`: `dh_t/da = h_{t-1} + a dh_{t-1}/da` (a hand
  recursion in plain Python) and `dh_T/dx_0 = a^(T-1)`.
- `lax.while_loop` (multiply by 1.5 until above 10): forward mode (`jax.jvp`) works
  and gives `1.5^k`; reverse mode (`jax.grad`) raises a `ValueError`; the fix is
  `funnn.control.bounded_while`, which reverse-differentiates to the same `1.5^k`.

Run: python examples/programs/structured_control_flow.py
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # for _compare.py

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from _compare import central_difference, check, compare, show  # noqa: E402
from funnn.control import bounded_while  # noqa: E402


@jax.jit
def f_cond(x):
    """x**2 if x > 0 else -x, with lax.cond."""
    return lax.cond(x > 0, lambda x: x ** 2, lambda x: -x, x)


@jax.jit
def g_switch(x):
    """x**3 for x < 0, sin x on [0, 1), exp(x - 1) from 1: lax.switch on a computed index."""
    i = jnp.asarray(x >= 0, int) + jnp.asarray(x >= 1, int)
    return lax.switch(i, [lambda x: x ** 3, jnp.sin, lambda x: jnp.exp(x - 1)], x)


def sqrt_or_zero_trap(x):
    """where(x > 0, sqrt(x), 0): the gradient is NaN for x <= 0."""
    return jnp.where(x > 0, jnp.sqrt(x), 0.0)


def sqrt_or_zero_safe(x):
    """The double-where pattern: the unused branch sees a harmless input."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


@jax.jit
def growth(r, x0=100.0, n=10):
    """x0 (1 + r)^n by a fori_loop with static bounds."""
    return lax.fori_loop(0, n, lambda _, x: x * (1 + r), x0)


XS = np.array([0.5, -1.0, 2.0, 0.25, 1.5])


@jax.jit
def linear_recurrence(a, xs=XS):
    """h_T of h_t = a h_{t-1} + x_t, h_0 = 0, by lax.scan."""
    h, _ = lax.scan(lambda h, x: (a * h + x, None), 0.0, xs)
    return h


@jax.jit
def grow_until(x):
    """Multiply by 1.5 while x <= 10 (lax.while_loop)."""
    return lax.while_loop(lambda x: x <= 10, lambda x: x * 1.5, x)


@jax.jit
def grow_until_bounded(x):
    """The same loop with bounded_while: reverse-mode works."""
    return bounded_while(lambda x: x <= 10, lambda x: x * 1.5, x, max_steps=100).state


def main():
    rows = []
    for x in (3.0, -2.0):
        rows.append(compare(f"cond: f'({x:g})", jax.grad(f_cond)(x),
                            2 * x if x > 0 else -1.0, central_difference(f_cond, x)))
    for x, hand in ((-0.5, 3 * 0.25), (0.5, np.cos(0.5)), (2.0, np.exp(1.0))):
        rows.append(compare(f"switch: g'({x:g})", jax.grad(g_switch)(x), hand,
                            central_difference(g_switch, x)))
    trap = {x: float(jax.grad(sqrt_or_zero_trap)(x)) for x in (-1.0, 0.0, 4.0)}
    for x, hand in ((-1.0, 0.0), (4.0, 0.25)):
        rows.append(compare(f"where, safe: d({x:g})", jax.grad(sqrt_or_zero_safe)(x), hand,
                            central_difference(sqrt_or_zero_safe, x)))
    safe_at_0 = float(jax.grad(sqrt_or_zero_safe)(0.0))     # one-sided: no finite difference
    r, n, x0 = 0.05, 10, 100.0
    rows.append(compare("fori_loop: d growth/dr", jax.grad(growth)(r),
                        n * x0 * (1 + r) ** (n - 1), central_difference(growth, r)))

    a = 0.8
    h, dh = 0.0, 0.0                              # hand recursion: forward sensitivity
    for x in XS:
        h, dh = a * h + x, h + a * dh
    rows.append(compare("scan: dh_T/da", jax.grad(linear_recurrence)(a), dh,
                        central_difference(linear_recurrence, a)))
    d_xs = jax.grad(lambda xs: linear_recurrence(a, xs))(jnp.asarray(XS))
    rows.append(compare("scan: dh_T/dx_0", d_xs[0], a ** (len(XS) - 1),
                        central_difference(lambda t: linear_recurrence(a, np.r_[t, XS[1:]]),
                                           XS[0])))

    x = 1.3
    k = 0
    while x * 1.5 ** k <= 10:
        k += 1
    _, jvp = jax.jvp(grow_until, (x,), (1.0,))
    rows.append(compare("while_loop, forward mode", jvp, 1.5 ** k,
                        central_difference(grow_until, x)))
    try:
        jax.grad(grow_until)(x)
        reverse_error = None
    except ValueError as e:
        reverse_error = str(e).split(" Try")[0]
    rows.append(compare("bounded_while, reverse mode", jax.grad(grow_until_bounded)(x),
                        1.5 ** k, central_difference(grow_until_bounded, x)))
    show(rows)
    print(f"\njnp.where trap, grad of where(x > 0, sqrt(x), 0): {trap}")
    print(f"safe pattern at 0: {safe_at_0}")
    print(f"while_loop under jax.grad: ValueError: {reverse_error}")

    check(rows)
    assert np.isnan(trap[-1.0]) and np.isnan(trap[0.0]) and trap[4.0] == 0.25
    assert safe_at_0 == 0.0
    assert reverse_error is not None and "Reverse-mode" in reverse_error
    return {"rows": rows, "trap": trap, "reverse_error": reverse_error}


if __name__ == "__main__":
    main()
