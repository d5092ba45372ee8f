"""Aim a projectile by gradient descent through an Euler simulation.

A projectile leaves the origin at speed `v` and angle `theta`; explicit Euler steps
of `dt` integrate gravity `g` and quadratic drag `k |u| u` (`u` the velocity) for
`N` steps, and the loss is half the squared miss from a target `(X, Y)` at the
final time `T = N dt`. The simulation is a `lax.scan`; `jax.grad` differentiates
the whole trajectory.

Derivatives checked against:

- without drag, the closed form of Euler's scheme: `x_N = N dt v cos(theta)`,
  `y_N = N dt v sin(theta) - g dt^2 N(N-1)/2`, so `dL/dtheta = e_x (-N dt v sin) +
  e_y (N dt v cos)` and `dL/dv = e_x N dt cos + e_y N dt sin` (`e` the miss);
- with drag, the tangent-linear Euler scheme written by hand (the step's Jacobian
  with `d(|u| u_x)/du_x = |u| + u_x^2/|u|`, `d(|u| u_x)/du_y = u_x u_y/|u|`) in plain
  numpy;
- central finite differences.

Adam on `(theta, v)` then hits the target to well under a micrometre; without drag
it recovers the closed-form aim.

Run: python examples/programs/projectile.py
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # for _compare.py

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

from _compare import central_difference, check, compare, show  # noqa: E402

G, DT, N = 9.81, 0.02, 100
TARGET = (30.0, 5.0)


def simulate(theta, v, k):
    """Final (x, y) after N Euler steps from the origin, drag coefficient k."""
    def step(s, _):
        x, y, ux, uy = s
        speed = jnp.sqrt(ux ** 2 + uy ** 2)
        return (x + ux * DT, y + uy * DT, ux - k * speed * ux * DT,
                uy - (G + k * speed * uy) * DT), None

    (x, y, _, _), _ = lax.scan(step, (0.0, 0.0, v * jnp.cos(theta), v * jnp.sin(theta)),
                               None, length=N)
    return x, y


@jax.jit
def loss(params, k, target=TARGET):
    """Half the squared miss at time N dt."""
    x, y = simulate(params[0], params[1], k)
    return 0.5 * ((x - target[0]) ** 2 + (y - target[1]) ** 2)


def grad_by_hand_no_drag(theta, v, target=TARGET):
    """dL/dtheta, dL/dv from the closed form of Euler's scheme without drag."""
    t = N * DT
    x, y = t * v * np.cos(theta), t * v * np.sin(theta) - G * DT ** 2 * N * (N - 1) / 2
    ex, ey = x - target[0], y - target[1]
    return (ex * -t * v * np.sin(theta) + ey * t * v * np.cos(theta),
            ex * t * np.cos(theta) + ey * t * np.sin(theta))


def grad_by_tangent_euler(theta, v, k, target=TARGET):
    """dL/dtheta, dL/dv by the hand-derived tangent-linear Euler scheme (numpy)."""
    s = np.array([0.0, 0.0, v * np.cos(theta), v * np.sin(theta)])
    ds = np.array([[0.0, 0.0], [0.0, 0.0],                       # columns: d/dtheta, d/dv
                   [-v * np.sin(theta), np.cos(theta)], [v * np.cos(theta), np.sin(theta)]])
    for _ in range(N):
        ux, uy = s[2], s[3]
        sp = np.hypot(ux, uy)
        jac = np.eye(4)
        jac[0, 2] = jac[1, 3] = DT
        jac[2, 2] -= k * DT * (sp + ux * ux / sp)
        jac[2, 3] -= k * DT * ux * uy / sp
        jac[3, 2] -= k * DT * ux * uy / sp
        jac[3, 3] -= k * DT * (sp + uy * uy / sp)
        s = s + DT * np.array([ux, uy, -k * sp * ux, -G - k * sp * uy])
        ds = jac @ ds
    miss = s[:2] - np.asarray(target)
    return tuple(miss @ ds[:2])


def aim(k, steps=600, lr=0.2, start=(0.6, 15.0)):
    """Adam on (theta, v) through the simulation; returns the params and the loss history."""
    opt = optax.adam(lr)
    p0 = jnp.array(start)

    def step(carry, _):
        p, state = carry
        value, g = jax.value_and_grad(loss)(p, k)
        upd, state = opt.update(g, state)
        return (optax.apply_updates(p, upd), state), value

    (p, _), hist = jax.jit(lambda p: lax.scan(step, (p, opt.init(p)), None, length=steps))(p0)
    return p, hist


def main():
    rows = []
    theta, v = 0.7, 20.0
    for k in (0.0, 0.02):
        hand = grad_by_hand_no_drag(theta, v) if k == 0 else grad_by_tangent_euler(theta, v, k)
        auto = jax.jit(jax.grad(loss))(jnp.array([theta, v]), k)
        fd_t = central_difference(lambda t, k=k: loss(jnp.array([t, v]), k), theta)
        fd_v = central_difference(lambda s, k=k: loss(jnp.array([theta, s]), k), v)
        rows.append(compare(f"drag {k:g}: dL/dtheta", auto[0], hand[0], fd_t, 1e-10, 1e-7))
        rows.append(compare(f"drag {k:g}: dL/dv", auto[1], hand[1], fd_v, 1e-10, 1e-7))
    show(rows)
    # the two hand derivations agree where both apply (no drag): the oracle checks itself
    oracle_gap = np.subtract(grad_by_tangent_euler(theta, v, 0.0), grad_by_hand_no_drag(theta, v))

    results = {}
    t = N * DT
    vx, vy = TARGET[0] / t, (TARGET[1] + G * DT ** 2 * N * (N - 1) / 2) / t
    closed = (np.arctan2(vy, vx), np.hypot(vx, vy))
    print(f"\naiming at {TARGET} at t = {t:g} s by Adam through the simulation:")
    for k in (0.0, 0.02):
        p, hist = aim(k)
        x, y = simulate(p[0], p[1], k)
        miss = float(np.hypot(x - TARGET[0], y - TARGET[1]))
        results[k] = {"theta": float(p[0]), "v": float(p[1]), "miss": miss,
                      "loss_first": float(hist[0]), "loss_last": float(hist[-1])}
        print(f"  drag {k:g}: theta = {float(p[0]):.6f} rad, v = {float(p[1]):.6f} m/s, "
              f"miss {miss:.2e} m (loss {float(hist[0]):.3g} -> {float(hist[-1]):.3g})")
    print(f"  closed form without drag: theta = {closed[0]:.6f}, v = {closed[1]:.6f}")

    check(rows)
    assert np.max(np.abs(oracle_gap)) < 1e-10
    for r in results.values():
        assert r["miss"] < 1e-6
    assert abs(results[0.0]["theta"] - closed[0]) < 1e-4
    assert abs(results[0.0]["v"] - closed[1]) < 1e-3
    assert results[0.02]["v"] > results[0.0]["v"]            # drag needs a harder throw
    return {"rows": rows, "aim": results, "closed_form": closed}


if __name__ == "__main__":
    main()
