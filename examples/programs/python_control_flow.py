"""Python `if`, `for` and recursion under `jax.grad`, what `jit` says about them, and the fixes.

`jax.grad` traces a function with concrete values, so ordinary Python control flow
just works: each call differentiates the branch it took and the iterations it ran.

- The conditional of the notes, `f(x) = x**2 if x > 0 else -x`: `f'(x) = 2x` or `-1`.
- A `for` loop: a polynomial by Horner's rule, `p'(x) = sum_i i c_i x^(i-1)`, and
  `n` repeated squarings, `d/dx x^(2^n) = 2^n x^(2^n - 1)`.
- Recursion: `x^n` by exponentiation by squaring (`n x^(n-1)`), and halving until
  `|x| < 1`, a depth that depends on the data (`x / 2^k`, derivative `2^-k`).

Under `jit` the arguments are abstract tracers: `if x > 0` raises
`TracerBoolConversionError`, `range(n)` a `TracerIntegerConversionError`. The fixes:
`lax.cond`/`jnp.where` for a data-dependent branch, `static_argnums` for a loop count
fixed per call, and `funnn.control.bounded_while` for a data-dependent loop that must
still reverse-differentiate.

Run: python examples/programs/python_control_flow.py
"""

import os
import sys
from functools import partial

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # for _compare.py

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from _compare import central_difference, check, compare, show  # noqa: E402
from funnn.control import bounded_while  # noqa: E402

COEFFS = (1.0, -2.0, 0.5, 3.0)          # p(x) = 1 - 2x + 0.5x^2 + 3x^3


def f(x):
    """The conditional of the notes: x**2 if x > 0 else -x."""
    if x > 0:
        return x ** 2
    return -x


def horner(x, coeffs=COEFFS):
    """p(x) = c0 + c1 x + ... + cn x^n by Horner's rule: a Python for loop."""
    y = 0.0
    for c in reversed(coeffs):
        y = y * x + c
    return y


def repeated_squaring(x, n):
    """x^(2^n) by n squarings."""
    for _ in range(n):
        x = x * x
    return x


def power(x, n):
    """x^n by recursive exponentiation by squaring (n a Python int >= 0)."""
    if n == 0:
        return 1.0
    half = power(x * x, n // 2)
    return half * x if n % 2 else half


def halvings(x):
    """Halve until |x| < 1, recursively: returns x / 2^k with k data-dependent."""
    if abs(x) < 1:
        return x
    return halvings(x / 2)


# ---- the jit-compatible versions


@jax.jit
def f_cond(x):
    """f with lax.cond: only the taken branch runs (per example under vmap both run)."""
    return lax.cond(x > 0, lambda x: x ** 2, lambda x: -x, x)


@partial(jax.jit, static_argnames="max_steps")
def halvings_while(x, max_steps=64):
    """halvings as a bounded while loop: jit-able and reverse-differentiable."""
    out = bounded_while(lambda x: jnp.abs(x) >= 1, lambda x: x / 2, x, max_steps)
    return out.state


def _jit_error(fn, *args, **kw):
    """The name of the exception jit(fn) raises on args, or None."""
    try:
        jax.jit(fn, **kw)(*args)
    except Exception as e:  # noqa: BLE001 - we report what jit says
        return type(e).__name__
    return None


def main():
    rows = []
    for x in (3.0, -2.0):
        hand = 2 * x if x > 0 else -1.0
        rows.append(compare(f"if: f'({x:g})", jax.grad(f)(x), hand, central_difference(f, x)))
        rows.append(compare(f"lax.cond jit: f'({x:g})", jax.grad(f_cond)(x), hand,
                            central_difference(f_cond, x)))
    x = 0.7
    dp = sum(i * c * x ** (i - 1) for i, c in enumerate(COEFFS) if i)
    rows.append(compare("for (Horner): p'(0.7)", jax.grad(horner)(x), dp,
                        central_difference(horner, x)))
    n = 3
    sq = lambda x: repeated_squaring(x, n)  # noqa: E731
    rows.append(compare("for (squaring): d x^8 at 1.1", jax.grad(sq)(1.1),
                        2 ** n * 1.1 ** (2 ** n - 1), central_difference(sq, 1.1)))
    sq_jit = jax.jit(jax.grad(repeated_squaring), static_argnums=1)
    rows.append(compare("static_argnums jit: same", sq_jit(1.1, n), 2 ** n * 1.1 ** 7,
                        central_difference(sq, 1.1)))
    pw = lambda x: power(x, 11)  # noqa: E731
    rows.append(compare("recursion: d x^11 at 0.9", jax.grad(pw)(0.9), 11 * 0.9 ** 10,
                        central_difference(pw, 0.9)))
    for x in (0.5, 5.0, -37.0):
        k = 0
        while abs(x) / 2 ** k >= 1:
            k += 1
        rows.append(compare(f"recursion: halvings'({x:g})", jax.grad(halvings)(x), 2.0 ** -k,
                            central_difference(halvings, x)))
        rows.append(compare("bounded_while jit: same", jax.grad(halvings_while)(x),
                            2.0 ** -k, central_difference(halvings_while, x)))
    show(rows)

    errors = {"if under jit": _jit_error(f, 3.0),
              "range(n) under jit": _jit_error(repeated_squaring, 1.1, 3),
              "recursion under jit": _jit_error(halvings, 5.0),
              "range(n), static_argnums=1": _jit_error(repeated_squaring, 1.1, 3,
                                                       static_argnums=1)}
    print("\nwhat jit says:")
    for what, e in errors.items():
        print(f"  {what:28s} -> {e or 'works'}")

    check(rows)
    assert errors["if under jit"] == "TracerBoolConversionError"
    assert errors["range(n) under jit"] == "TracerIntegerConversionError"
    assert errors["recursion under jit"] == "TracerBoolConversionError"
    assert errors["range(n), static_argnums=1"] is None
    return {"rows": rows, "jit_errors": errors}


if __name__ == "__main__":
    main()
