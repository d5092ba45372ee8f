"""Reverse mode through a long loop: memory O(n) with lax.scan, O(sqrt n) with checkpointing.

Reverse mode must keep, for every step of a loop, what the backward pass needs
(here the state and `tanh` of each step of `h <- tanh(h W + 0.1)`). A `lax.scan`
of `n` steps therefore holds `O(n)` residuals. `funnn.control.checkpointed_scan`
splits the loop into about `sqrt(n)` segments of `sqrt(n)` steps, each wrapped in
`jax.checkpoint`: the backward pass keeps only the state at segment boundaries and
recomputes one segment at a time, so it holds `O(sqrt n)` residuals, for one extra
forward pass of compute. The gradients are the same numbers.

XLA's compiled memory analysis of `jax.grad` of the loss (state of 64 float64
values, `W` 64x64; `temp` is the scratch memory where the residuals live),
on CPU, jax 0.10.2:

      steps     scan temp   checkpointed temp  segments x steps
        100       155,400              55,816  10 x 10
        400       616,200              76,296  20 x 20
       1600     2,459,400             117,256  40 x 40
       6400     9,832,200             199,176  80 x 80

The plain scan costs 1,536 bytes a step (3 vectors of 64 float64); the
checkpointed one 35,336 + 1,024 (n/k + k) bytes: 64x more steps, 3.6x the memory.
The gradient is checked against finite differences and against the hand-worked
backward recursion `dL/dh_{t-1} = (dL/dh_t * (1 - h_t^2)) W^T`,
`dL/dW = sum_t h_{t-1}^T (dL/dh_t * (1 - h_t^2))` (numpy).

Run: python examples/programs/checkpointed_loop.py
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
from funnn.control import checkpointed_scan, memory_report  # noqa: E402

D = 64


def _step(w):
    return lambda h, _: (jnp.tanh(h @ w + 0.1), None)


def loss_scan(w, h0, n):
    """sum(h_n^2) after n steps of h <- tanh(h W + 0.1), by lax.scan."""
    h, _ = lax.scan(_step(w), h0, None, length=n)
    return jnp.sum(h ** 2)


def loss_checkpointed(w, h0, n):
    """The same loss by checkpointed_scan."""
    h, _ = checkpointed_scan(_step(w), h0, None, length=n)
    return jnp.sum(h ** 2)


def grad_by_hand(w, h0, n):
    """dL/dW by the backward recursion, in numpy."""
    w, hs = np.asarray(w), [np.asarray(h0)]
    for _ in range(n):
        hs.append(np.tanh(hs[-1] @ w + 0.1))
    dh, dw = 2 * hs[-1], np.zeros_like(w)
    for t in range(n, 0, -1):
        da = dh * (1 - hs[t] ** 2)
        dw += np.outer(hs[t - 1], da)
        dh = da @ w.T
    return dw


def problem(seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(D, D)) / np.sqrt(D)), jnp.asarray(rng.normal(size=D))


def main(lengths=(100, 400, 1600, 6400), check_steps=200):
    w, h0 = problem()
    n = check_steps
    g_scan = jax.jit(jax.grad(loss_scan), static_argnums=2)(w, h0, n)
    g_ckpt = jax.jit(jax.grad(loss_checkpointed), static_argnums=2)(w, h0, n)
    hand = grad_by_hand(w, h0, n)
    loss_fd = jax.jit(loss_checkpointed, static_argnums=2)
    rows = []
    for i, j in ((0, 0), (3, 17), (63, 5)):
        def f(t, i=i, j=j):
            return loss_fd(w.at[i, j].set(t), h0, n)
        fd = central_difference(f, w[i, j])
        rows.append(compare(f"n={n}: dL/dW[{i},{j}] checkpointed", g_ckpt[i, j], hand[i, j], fd,
                            1e-10, 1e-7))
        rows.append(compare(f"n={n}: dL/dW[{i},{j}] scan", g_scan[i, j], hand[i, j], fd,
                            1e-10, 1e-7))
    show(rows)
    gap = float(jnp.max(jnp.abs(g_scan - g_ckpt)))
    print(f"max |grad scan - grad checkpointed| over all of W: {gap:.1e}")

    table = []
    print(f"\nXLA memory analysis of jax.grad (state {D} float64, {jax.default_backend()}):")
    print(f"{'steps':>7}  {'scan temp':>12}  {'checkpointed temp':>18}  segments x steps")
    for n in lengths:
        a = memory_report(jax.grad(loss_scan), w, h0, n=n)
        b = memory_report(jax.grad(loss_checkpointed), w, h0, n=n)
        if a is None or b is None:
            print(f"{n:7d}  (this backend reports no memory analysis)")
            continue
        table.append((n, a["temp"], b["temp"]))
        seg = round(np.sqrt(n))
        print(f"{n:7d}  {a['temp']:12,d}  {b['temp']:18,d}  {seg} x {-(-n // seg)}")

    check(rows)
    assert gap < 1e-12
    if len(table) >= 2:
        (n0, s0, c0), (n1, s1, c1) = table[0], table[-1]
        ratio = n1 / n0
        assert (s1 - s0) / s0 > 0.5 * ratio - 1          # plain scan: grows like n
        assert c1 / c0 < 2 * np.sqrt(ratio)              # checkpointed: like sqrt(n)
        assert all(c < s for _, s, c in table)
    return {"rows": rows, "gap": gap, "memory": table}


if __name__ == "__main__":
    main()
