"""Run by tests/test_parallel.py in a fresh process with 8 simulated CPU devices.

``python tests/_parallel_worker.py OUT.json`` trains tiny models with ``fit`` on one
device and on meshes of 8 (replicated, fsdp, tensor-parallel, per-path rules, megatron), in
float32 and float64 with both engines, DP-SGD on one device and on 8, checks the bad-input
cases, and writes what
it saw as JSON for the test to assert on. XLA_FLAGS must be set before JAX starts,
which is why this is a separate process.
"""

import json
import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# This worker counts XLA compiles; a program found in the test run's shared cache is not one.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax
import numpy as np

from funnn import data, losses, parallel, privacy, train
from funnn import layers as L
from funnn.core import FunnnError

compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)


def rel(a, b) -> float:
    """Largest leaf-wise ||a - b|| / ||b|| over two trees."""
    out = 0.0
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        out = max(out, float(np.linalg.norm(u - v) / max(np.linalg.norm(v), 1e-300)))
    return out


def specs(tree) -> list[str]:
    return [str(a.sharding.spec) for a in jax.tree_util.tree_leaves(tree)]


def run(model, params, xy, dtype, engine, optimizer="sgd", batch_size=32, evaluate=False,
        **kw):
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    x, y = xy
    held_out = (np.asarray(x[:40], dtype), y[:40]) if evaluate else None
    return train.fit(model, params, (np.asarray(x, dtype), y), "softmax_cross_entropy",
                     optimizer, epochs=2, batch_size=batch_size, engine=engine, progress=False,
                     key=jax.random.key(1), eval_data=held_out, **kw)


def error_of(fn) -> str:
    try:
        fn()
    except FunnnError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def main(out_path: str) -> None:
    t0 = time.perf_counter()
    report: dict = {"devices": jax.device_count()}
    tr, _ = data.load("spirals")
    xy = (np.asarray(tr.x)[:256], np.asarray(tr.y)[:256])
    model = L.serial(L.dense(16), L.activation("tanh"), L.dense(8), L.activation("tanh"),
                     L.dense(3))
    _, params = model.init(jax.random.key(0), (None, 2))
    tp = parallel.make_mesh(8, model=2)
    rules = {"0.W": (None, "model"), "2.*": "fsdp", "4.W": ("data", None)}

    for dtype in ("float32", "float64"):
        jax.config.update("jax_enable_x64", dtype == "float64")
        for engine in ("autodiff", "manual"):
            one = run(model, params, xy, dtype, engine, "adam", evaluate=True)
            rows = {}
            layouts = [("replicated", 8), ("fsdp", 8), ("tensor", tp), (rules, tp),
                       ("megatron", tp)]
            if dtype == "float64":      # float32 checks the layouts; float64 the precision
                layouts = layouts[:1]
            elif engine == "manual":    # the rules mix tensor-parallel and fsdp leaves
                layouts = [layouts[0], layouts[3]]
            for sharding, mesh in layouts:
                r = run(model, params, xy, dtype, engine, "adam", mesh=mesh, sharding=sharding,
                        evaluate=sharding == "replicated")   # a split evaluation set too
                rows[str(sharding)] = {
                    "params": rel(r.params, one.params),
                    "opt_state": rel(r.opt_state, one.opt_state),
                    "loss": max(abs(a["train_loss"] - b["train_loss"]) / abs(b["train_loss"])
                                for a, b in zip(r.history, one.history)),
                    "eval": abs(r.history[-1].get("eval_loss", one.history[-1]["eval_loss"])
                                - one.history[-1]["eval_loss"]),
                    "param_specs": specs(r.params), "mu_specs": specs(r.opt_state[0].mu),
                    "dtype": str(jax.tree_util.tree_leaves(r.params)[0].dtype),
                    "mesh": dict(r.params[0]["W"].sharding.mesh.shape)}
            report[f"{dtype} {engine}"] = rows

    jax.config.update("jax_enable_x64", False)
    # dropout and batch-norm: per-step keys and layer state under a split batch (the norm
    # follows the activation: a bias right before it has a zero gradient, pure rounding)
    noisy = L.serial(L.dense(16), L.activation("relu"), L.batch_norm(), L.dropout(0.2),
                     L.dense(3))
    _, p2 = noisy.init(jax.random.key(2), (None, 2))
    a = run(noisy, p2, xy, "float32", "manual")
    b = run(noisy, p2, xy, "float32", "manual", mesh=8)
    report["dropout+batch_norm"] = {"params": rel(b.params, a.params),
                                    "state": rel(b.model_state, a.model_state)}

    # side inputs: a padded causal LM, its key-padding mask split over data with the batch
    from _padded import tiny_lm
    lm, p3, ids, targets, mask = tiny_lm()
    lm_data = (np.tile(ids, (4, 1)), np.tile(targets, (4, 1)), {"mask": np.tile(mask, (4, 1))})
    ce = losses.softmax_cross_entropy.with_ignore_index()
    kw = dict(epochs=2, batch_size=8, key=3, progress=False, eval_data=lm_data)
    a = train.fit(lm, p3, lm_data, ce, "sgd", **kw)
    b = train.fit(lm, p3, lm_data, ce, "sgd", mesh=8, **kw)
    report["padded_lm"] = {"params": rel(b.params, a.params),
                           "loss": abs(b.history[-1]["train_loss"] - a.history[-1]["train_loss"]),
                           "eval": abs(b.history[-1]["eval_loss"] - a.history[-1]["eval_loss"])}

    # DP-SGD on a mesh: the same Poisson rows (padded from 86 to 88, a multiple of 8), noise
    # and accountant as on one device
    dp = privacy.DP(1.0, 1.0)
    a = run(model, params, xy, "float32", "manual", dp=dp)
    b = run(model, params, xy, "float32", "manual", dp=dp, mesh=8)
    report["dp"] = {"params": rel(b.params, a.params),
                    "epsilon": [[h["epsilon"] for h in r.history] for r in (a, b)],
                    "loss": max(abs(u["train_loss"] - v["train_loss"]) for u, v in
                                zip(a.history, b.history))}

    n = report["compiles_before_errors"] = len(compiles)
    report["errors"] = {
        "batch": error_of(lambda: run(model, params, xy, "float32", "autodiff", mesh=8,
                                      batch_size=30)),
        "axis": error_of(lambda: run(model, params, xy, "float32", "autodiff", mesh=tp,
                                     sharding={"0.W": (None, "modle")})),
        "path": error_of(lambda: run(model, params, xy, "float32", "autodiff", mesh=8,
                                     sharding={"7.W": "fsdp"})),
        "indivisible": error_of(lambda: run(model, params, xy, "float32", "autodiff",
                                            mesh=8, sharding={"4.W": (None, "data")})),
        "tensor_without_model_axis": error_of(lambda: run(
            model, params, xy, "float32", "autodiff",
            mesh=jax.sharding.Mesh(np.array(jax.devices()), ("data",)), sharding="tensor")),
        "devices": error_of(lambda: parallel.make_mesh(16)),
    }
    report["compiles_during_errors"] = len(compiles) - n

    report["seconds"] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
