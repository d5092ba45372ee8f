"""A recurrent program that stops when its state crosses a threshold (integrate and fire).

A tanh cell reads a sequence `x_1, x_2, ...` and stops at the first step where its
state crosses the threshold `theta`:

    h_t = tanh(a h_{t-1} + w x_t + b),  h_0 = 0;   stop at the first t with h_t >= theta.

How many steps it runs depends on the data. The output `h_stop` is differentiable
in `(a, w, b)`; the stopping time is an integer and carries no gradient (its
derivative is zero wherever it is defined, as for any program). By hand, with
`s_t = 1 - h_t^2`:

    dh_t/da = s_t (h_{t-1} + a dh_{t-1}/da),
    dh_t/dw = s_t (x_t + a dh_{t-1}/dw),
    dh_t/db = s_t (1 + a dh_{t-1}/db),

evaluated in plain Python up to the stopping step. The same program runs three ways:
a Python `while` loop (eager `jax.grad`), `funnn.control.bounded_while` (jit, and
vmap over a batch of sequences that stop at different steps), and the hand
recursion above. `bounded_while`'s `hit_max` flags the sequence that never fires
(its result is the state after all of its steps).

Run: python examples/programs/stopping_rule.py
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # for _compare.py

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _compare import central_difference, check, compare, show  # noqa: E402
from funnn.control import bounded_while  # noqa: E402

THETA = 0.6
PARAMS = (0.5, 0.8, -0.2)                    # a, w, b


def make_sequences(n=4, length=24, seed=2):
    """n sequences in [0, 1); the last one is scaled down so that it never fires."""
    xs = np.random.default_rng(seed).uniform(0.0, 1.0, (n, length))
    xs[-1] *= 0.2
    return xs


def run_python(params, xs):
    """The program as written: a Python while loop. Returns (h_stop, steps)."""
    a, w, b = params
    h, t = 0.0, 0
    while t < len(xs) and h < THETA:
        h = jnp.tanh(a * h + w * xs[t] + b)
        t += 1
    return h, t


@jax.jit
def run_bounded(params, xs):
    """The program as a bounded_while: returns (h_stop, steps, never_fired)."""
    a, w, b = params

    def cond(s):
        return s[1] < THETA

    def body(s):
        t, h = s
        return t + 1, jnp.tanh(a * h + w * xs[t] + b)

    (t, h), hit_max = bounded_while(cond, body, (0, jnp.zeros((), xs.dtype)), xs.shape[0])
    return h, t, hit_max


def by_hand(params, xs):
    """h_stop, steps, dh/d(a, w, b) by the hand recursion, and min |h_t - theta| (t <= stop)."""
    a, w, b = params
    h, d, margin = 0.0, np.zeros(3), np.inf
    for t, x in enumerate(xs):  # noqa: B007 - t is the stopping step, returned below
        h_new = np.tanh(a * h + w * x + b)
        d = (1 - h_new ** 2) * (np.array([h, x, 1.0]) + a * d)
        h = h_new
        margin = min(margin, abs(h - THETA))
        if h >= THETA:
            break
    return h, t + 1, d, margin


def main():
    xs = make_sequences()
    p = jnp.array(PARAMS)
    rows, info = [], []
    grad_bounded = jax.jit(jax.grad(lambda p, x: run_bounded(p, x)[0]))
    for i, x in enumerate(xs):
        _, steps, d, margin = by_hand(PARAMS, x)
        auto_py = jax.grad(lambda p, x=x: run_python(p, x)[0])(p)
        auto_bw = grad_bounded(p, jnp.asarray(x))
        _, t_bw, never = run_bounded(p, jnp.asarray(x))
        info.append({"steps": int(t_bw), "steps_python": run_python(PARAMS, x)[1],
                     "steps_hand": steps,
                     "never_fired": bool(never), "margin": margin})
        for j, name in enumerate("awb"):
            def f(v, j=j, x=x):
                q = list(PARAMS)
                q[j] = v
                return run_python(q, x)[0]
            fd = central_difference(f, PARAMS[j])
            rows.append(compare(f"seq {i} (stops at {int(t_bw)}): dh/d{name} python",
                                auto_py[j], d[j], fd, 1e-12, 1e-7))
            rows.append(compare(f"seq {i}: dh/d{name} bounded_while", auto_bw[j], d[j], fd,
                                1e-12, 1e-7))
    show(rows)

    batched = jax.jit(jax.vmap(grad_bounded, in_axes=(None, 0)))(p, jnp.asarray(xs))
    per_example = np.stack([by_hand(PARAMS, x)[2] for x in xs])
    print("\nper sequence: steps run, never fired (hit_max), closest approach to theta "
          "up to the stop:")
    for i, r in enumerate(info):
        print(f"  seq {i}: {r['steps']:2d} steps, never fired: {r['never_fired']}, "
              f"margin {r['margin']:.3g}")
    print(f"vmap over the {len(xs)} sequences: max |grad - by hand| = "
          f"{np.max(np.abs(np.asarray(batched) - per_example)):.1e}")

    check(rows)
    np.testing.assert_allclose(batched, per_example, rtol=1e-12, atol=1e-14)
    for r in info:
        assert r["steps"] == r["steps_python"] == r["steps_hand"]
    assert len({r["steps"] for r in info}) > 1                # data-dependent stopping
    assert [r["never_fired"] for r in info] == [False] * (len(xs) - 1) + [True]
    assert min(r["margin"] for r in info) > 1e-3              # finite differences stay put
    return {"rows": rows, "info": info, "batched": batched}


if __name__ == "__main__":
    main()
