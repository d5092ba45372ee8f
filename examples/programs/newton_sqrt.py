"""Newton's (Babylonian) square root, differentiated three ways: d sqrt(a)/da = 1 / (2 sqrt a).

The iteration `x <- (x + a/x) / 2` converges to `sqrt(a)` quadratically. Its
derivative with respect to `a` can be taken

1. through an unrolled Python loop of `n` iterations (plain backpropagation through
   the program): the derivative converges to `1/(2 sqrt a)` as fast as the value does
   (the table of errors per iteration shows it);
2. through `funnn.control.bounded_while`, a data-dependent loop (stop when
   `|x^2 - a| <= 1e-13 a`) that reverse-differentiates under `jit` and `vmap`;
3. by `funnn.control.fixed_point`, which never differentiates the iterations: the
   implicit function theorem at `x* = f(a, x*)` gives
   `dx*/da = (df/da) / (1 - df/dx) = (1/(2x*)) / (1 - 0)`.

All three agree with `1/(2 sqrt a)` to ~1e-12 and with central finite differences to
~1e-8. Starting point: `x0 = a`.

Run: python examples/programs/newton_sqrt.py
"""

import os
import sys
from functools import partial

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # for _compare.py

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _compare import central_difference, check, compare, show  # noqa: E402
from funnn.control import bounded_while, fixed_point  # noqa: E402


def babylon(a, x):
    """One Newton step for x^2 = a."""
    return (x + a / x) / 2


def sqrt_unrolled(a, n=12):
    """n Newton steps as a Python for loop (backprop through every step)."""
    x = a
    for _ in range(n):
        x = babylon(a, x)
    return x


@partial(jax.jit, static_argnames="max_steps")
def sqrt_while(a, max_steps=64):
    """Newton steps until |x^2 - a| <= 1e-13 a, as a bounded_while loop."""
    out = bounded_while(lambda x: jnp.abs(x * x - a) > 1e-13 * a, lambda x: babylon(a, x),
                        a, max_steps)
    return out.state


@jax.jit
def sqrt_fixed_point(a):
    """The fixed point of x = (x + a/x)/2, differentiated implicitly."""
    return fixed_point(babylon, a, a, tol=1e-14).x


def main(values=(2.0, 10.0, 0.3)):
    rows = []
    for a in values:
        hand = 1 / (2 * np.sqrt(a))
        for label, fn in (("unrolled", sqrt_unrolled), ("bounded_while", sqrt_while),
                          ("fixed_point", sqrt_fixed_point)):
            auto = jax.jit(jax.grad(fn))(a)
            rows.append(compare(f"{label}: d sqrt({a:g})", auto, hand,
                                central_difference(fn, a), rtol=1e-12, fd_rtol=1e-8))
    show(rows)

    a = 10.0
    print(f"\nthrough n unrolled iterations at a = {a:g} (x0 = a):")
    print(f"{'n':>3}  {'|x_n - sqrt a|':>15}  {'|dx_n/da - 1/(2 sqrt a)|':>25}")
    trace = []
    for n in range(1, 9):
        x, dx = jax.value_and_grad(sqrt_unrolled)(a, n)
        trace.append((n, abs(float(x) - np.sqrt(a)), abs(float(dx) - 1 / (2 * np.sqrt(a)))))
        print(f"{n:3d}  {trace[-1][1]:15.3e}  {trace[-1][2]:25.3e}")

    batch = jnp.array([0.5, 2.0, 9.0, 1e4])
    batched = {"bounded_while": jax.jit(jax.vmap(jax.grad(sqrt_while)))(batch),
               "fixed_point": jax.jit(jax.vmap(jax.grad(sqrt_fixed_point)))(batch)}
    exact = 1 / (2 * np.sqrt(np.asarray(batch)))
    print(f"\nvmap over a = {np.asarray(batch)}: 1/(2 sqrt a) = {exact}")
    for k, v in batched.items():
        print(f"  {k:14s} {np.asarray(v)}")

    check(rows)
    assert trace[-1][2] < 1e-12 and trace[0][2] > 1e-2      # the derivative converges too
    for v in batched.values():
        np.testing.assert_allclose(v, exact, rtol=1e-12)
    return {"rows": rows, "trace": trace, "batched": batched}


if __name__ == "__main__":
    main()
