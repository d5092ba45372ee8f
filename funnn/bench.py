"""Benchmark harness: honest timings of training steps.

Every timing: compile separately, warm up, ``block_until_ready``, many repeats,
report the median (and the spread), and ratios measured in the same process.
Used by ``benchmarks/`` and ``funnn bench``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from funnn import data, models, train

__all__ = ["timeit", "engine_table", "format_table", "environment"]


def environment() -> dict:
    """The versions and device the figures were measured on."""
    d = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": f"{d.device_kind} ({d.platform})", "python": platform.python_version()}


def timeit(fn: Callable, *args, repeats: int = 50, warmup: int = 3) -> dict:
    """Median, min and max seconds of ``fn(*args)`` over ``repeats`` runs after ``warmup``.

    The first call is timed on its own as ``first`` (compile plus one run).
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "first": first, "repeats": repeats}


def _pure_jax_mlp_step(lr: float):
    """The same MLP step written by hand in plain JAX: the zero-overhead reference."""

    def loss(params, x, y):
        (w1, b1), (w2, b2) = params
        h = jax.nn.relu(x @ w1 + b1)
        logits = h @ w2 + b2
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    def step(params, x, y):
        g = jax.grad(loss)(params, x, y)
        return jax.tree_util.tree_map(lambda p, d: p - lr * d, params, g)

    return step


def engine_table(model: str = "mlp", batch_size: int = 128, repeats: int = 50) -> list:
    """Time one SGD step of a recipe's model: each engine jitted, eager, and pure JAX.

    Rows: ``{"name", "median_ms", "min_ms", "first_ms", "ratio"}``; ``ratio`` is the
    median over the fastest jitted funnn engine's median (for the ``pure JAX`` row:
    over autodiff's, so 1.0 means no overhead).
    """
    recipe = models.get(model)
    tr, _ = data.load("digits")
    x, y = models.prepare(recipe, tr)
    n = min(batch_size, int(x.shape[0]))
    x, y = x[:n], y[:n]
    net = recipe.build(10)
    _, params = net.init(jax.random.key(0), (None,) + tuple(x.shape[1:]))
    opt = optax.sgd(0.01)
    rows = []
    key = jax.random.key(1)
    for engine in train.ENGINES:
        step = train.make_step(net, recipe.loss, opt, engine)
        ts = train.TrainState(params, opt.init(params), None)
        jitted = jax.jit(step)
        r = timeit(jitted, ts, x, y, key, repeats=repeats)
        rows.append({"name": f"{engine} (jit)", **_ms(r)})
        if engine == "autodiff":
            r = timeit(step, ts, x, y, key, repeats=max(3, repeats // 10), warmup=1)
            rows.append({"name": f"{engine} (eager)", **_ms(r)})
    if model == "mlp":
        p = ((params[0]["W"], params[0]["b"]), (params[2]["W"], params[2]["b"]))
        r = timeit(jax.jit(_pure_jax_mlp_step(0.01)), p, x, y, repeats=repeats)
        rows.append({"name": "pure JAX (jit)", **_ms(r)})
    base = next(r["median_ms"] for r in rows if r["name"] == "autodiff (jit)")
    for r in rows:
        r["ratio"] = r["median_ms"] / base
    return rows


def _ms(r: dict) -> dict:
    return {"median_ms": 1e3 * r["median"], "min_ms": 1e3 * r["min"],
            "first_ms": 1e3 * r["first"]}


def format_table(rows: list) -> str:
    """A plain-text table of :func:`engine_table` rows, with the environment on top."""
    env = environment()
    head = f"{env['device']}, jax {env['jax']}; median of repeats, ratio to autodiff (jit)"
    lines = [head, f"{'step':<18}{'median ms':>11}{'min ms':>9}{'first ms':>10}{'ratio':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<18}{r['median_ms']:>11.3f}{r['min_ms']:>9.3f}"
                     f"{r['first_ms']:>10.1f}{r['ratio']:>8.2f}")
    return "\n".join(lines)
