"""A bouncing ball: the gradient through a conditional collision, with and without the event time.

A ball falls from height `h0` (at rest) under gravity `g` and bounces on the floor
with restitution `e` (the speed after a bounce is `e` times the speed before). Each
step of `dt` is exact free flight unless the ball would pass below the floor; then
`lax.cond` takes the collision branch: it solves `y + v t - g t^2/2 = 0` for the
impact time `t* = (v + sqrt(v^2 + 2 g y)) / g`, reflects the velocity, and flies the
rest of the step. The gradient flows through `t*`, which depends on `h0`.

By hand, for `T` between the first and second bounce: impact at `t1 = sqrt(2 h0/g)`
with speed `v1 = g t1`; with `tau = T - t1`,

    y(T) = e v1 tau - g tau^2 / 2,
    dy/de  = v1 tau,
    dy/dh0 = tau (1 + e) / t1 - e          (using dt1/dh0 = 1/(g t1), dv1/dh0 = 1/t1).

Autodiff through the event-aware simulation matches these to ~1e-12 and finite
differences to ~1e-7. The naive program, which just flips the velocity at the first
step found below the floor, also has a gradient, and finite differences agree with
it, but it is the derivative of the wrong (time-discretised) program: its `dy/dh0`
is off by O(1) because the impact time it sees is stuck on the grid of steps.
Newton's method on `e` (with the autodiff derivative) then finds the restitution
that puts the ball at a chosen height at time `T`.

Run: python examples/programs/bouncing_ball.py
"""

import os
import sys
from functools import partial

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # for _compare.py

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from _compare import central_difference, check, compare, show  # noqa: E402

G, DT, N = 9.81, 0.01, 120          # T = 1.2 s


def _free(y, v, t):
    return y + v * t - G * t * t / 2, v - G * t


def step_event(s, e):
    """One step of dt: free flight, or (lax.cond) flight to the floor, bounce, flight."""
    y, v = s
    y_free, v_free = _free(y, v, DT)

    def bounce(s):
        y, v = s
        disc = v * v + 2 * G * y
        t_hit = (v + jnp.sqrt(jnp.where(disc > 0, disc, 1.0))) / G   # safe under vmap
        v_up = -e * (v - G * t_hit)
        return _free(0.0, v_up, DT - t_hit)

    return lax.cond(y_free < 0, bounce, lambda _: (y_free, v_free), s)


def step_naive(s, e):
    """Free flight, and if below the floor: flip and damp the velocity, mirror the height."""
    y, v = s
    y_free, v_free = _free(y, v, DT)
    hit = y_free < 0
    return jnp.where(hit, -y_free, y_free), jnp.where(hit, -e * v_free, v_free)


@partial(jax.jit, static_argnames=("step", "n"))
def height(h0, e, step=step_event, n=N):
    """Height after n steps from rest at h0."""
    (y, _), _ = lax.scan(lambda s, _: (step(s, e), None), (h0, 0.0 * h0), None, length=n)
    return y


def by_hand(h0, e, t=N * DT):
    """(y(T), dy/dh0, dy/de) for T between the first and second bounce."""
    t1 = np.sqrt(2 * h0 / G)
    v1, tau = G * t1, t - t1
    assert 0 < tau < 2 * e * v1 / G, "T must fall between the first and second bounce"
    return e * v1 * tau - G * tau ** 2 / 2, tau * (1 + e) / t1 - e, v1 * tau


def main():
    rows, value_gap = [], []
    for h0, e in ((2.0, 0.8), (1.5, 0.6)):
        y, dh, de = by_hand(h0, e)
        g = jax.jit(jax.grad(height, argnums=(0, 1)))(h0, e)
        value_gap.append(abs(float(height(h0, e)) - y))
        rows.append(compare(f"h0={h0:g} e={e:g}: dy/dh0", g[0], dh,
                            central_difference(lambda t, e=e: height(t, e), h0), 1e-10, 1e-7))
        rows.append(compare(f"h0={h0:g} e={e:g}: dy/de", g[1], de,
                            central_difference(lambda t, h0=h0: height(h0, t), e), 1e-10, 1e-7))
    show(rows)
    print(f"simulated y(T) vs by hand: largest gap {max(value_gap):.1e}")

    h0, e = 2.0, 0.8
    naive = {"y": float(height(h0, e, step_naive)),
             "dy/dh0": float(jax.grad(height)(h0, e, step_naive)),
             "fd": central_difference(lambda t: height(t, e, step_naive), h0)}
    truth = by_hand(h0, e)
    print(f"\nnaive bounce (no event time) at h0={h0:g}: y(T) = {naive['y']:.6f} "
          f"(true {truth[0]:.6f}), dy/dh0 = {naive['dy/dh0']:.6f} autodiff, "
          f"{naive['fd']:.6f} finite diff., true {truth[1]:.6f}")

    heights = jnp.array([1.5, 2.0, 2.5])
    batched = jax.jit(jax.vmap(jax.grad(height), in_axes=(0, None)))(heights, e)
    exact = np.array([by_hand(float(h), e)[1] for h in heights])
    print(f"vmap over h0 = {np.asarray(heights)}: dy/dh0 = {np.asarray(batched)}, "
          f"by hand {exact}")

    target = 0.9                                 # Newton on e: y(T; e) = target
    e_k, dy_de = 0.5, jax.jit(jax.value_and_grad(height, argnums=1))
    for _ in range(8):
        y, d = dy_de(h0, e_k)
        e_k = float(e_k - (y - target) / d)
    t1 = np.sqrt(2 * h0 / G)
    tau = N * DT - t1
    e_exact = (target + G * tau ** 2 / 2) / (G * t1 * tau)
    print(f"restitution for y(T) = {target}: Newton {e_k:.12f}, by hand {e_exact:.12f}")

    check(rows)
    assert max(value_gap) < 1e-12
    np.testing.assert_allclose(batched, exact, rtol=1e-10)
    assert abs(naive["dy/dh0"] - naive["fd"]) < 1e-5        # consistent with itself ...
    assert abs(naive["dy/dh0"] - truth[1]) > 0.1            # ... but not with the physics
    assert abs(e_k - e_exact) < 1e-10
    return {"rows": rows, "value_gap": max(value_gap), "naive": naive, "batched": batched,
            "restitution": e_k}


if __name__ == "__main__":
    main()
