"""Time one CNN training step: funnn (autodiff and manual engines) against PyTorch eager.

    python benchmarks/cnn_cpu.py [--rounds 5] [--repeats 20] [--threads 2] [--lowering auto]

Model (issue 9): x (128, 28, 28, 1) -> conv2d(32, 3x3, SAME) -> relu -> max_pool 2x2 ->
conv2d(64, 3x3, SAME) -> relu -> max_pool 2x2 -> flatten -> dense(10), softmax
cross-entropy, Adam(1e-3), float32. PyTorch: the same layers in NCHW (``nn.Conv2d(...,
padding=1)``, ``nn.MaxPool2d(2)``, ...), ``torch.set_num_threads(threads)``. Each round
times ``repeats`` steps of every contender in turn (interleaved, so machine noise hits all
alike) after warm-up; the report gives each contender's median over all timed steps, the
spread of the per-round medians, the median of the per-round ratios to torch, and the
compiled step's XLA temp buffer size. ``--lowering`` picks the conv lowering
(``auto``, ``patches`` or ``native``; see ``funnn/layers/conv.py``). Without an
importable torch only funnn is timed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import funnn
from funnn import layers as L
from funnn import losses
from funnn.bench.harness import interleave
from funnn.train import TrainState, make_step

B, HW, C = 128, 28, 10


def funnn_step(engine, lowering, x, y):
    opts = {} if lowering == "auto" else {"lowering": lowering}
    model = L.serial(L.conv2d(32, (3, 3), padding="SAME", **opts),
                     L.activation("relu"), L.max_pool((2, 2)),
                     L.conv2d(64, (3, 3), padding="SAME", **opts),
                     L.activation("relu"), L.max_pool((2, 2)), L.flatten(), L.dense(C))
    _, params = model.init(jax.random.key(0), (None, HW, HW, 1))
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    opt = optax.adam(1e-3)
    state = {"ts": TrainState(params, opt.init(params), None)}
    t0 = time.perf_counter()
    step = funnn.jit(make_step(model, losses.softmax_cross_entropy, opt, engine)).lower(
        state["ts"], x, y, None).compile()
    jax.block_until_ready(step(state["ts"], x, y, None))
    compile_s = time.perf_counter() - t0
    temp = step.memory_analysis()
    temp_mb = temp.temp_size_in_bytes / 2**20 if temp is not None else float("nan")

    def run():
        state["ts"], loss = step(state["ts"], x, y, None)
        jax.block_until_ready(loss)

    return run, compile_s, temp_mb


def torch_step(x, y, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64 * 7 * 7, C))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())      # NHWC -> NCHW
    yt = torch.from_numpy(np.array(y)).long()
    lossf = nn.CrossEntropyLoss()

    def run():
        opt.zero_grad()
        loss = lossf(net(xt), yt)
        loss.backward()
        opt.step()
        loss.item()

    return run, torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lowering", default="auto", choices=["auto", "patches", "native"])
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args()

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, HW, HW, 1), np.float32))
    y = jnp.asarray(rng.integers(0, C, B))
    runs, temps = {}, {}
    for engine in ("autodiff", "manual"):
        runs[engine], compile_s, temps[engine] = funnn_step(engine, a.lowering, x, y)
        print(f"compile+first step {engine}: {compile_s:.2f} s; XLA temp buffer "
              f"{temps[engine]:.1f} MiB")
    versions = f"jax {jax.__version__}, optax {optax.__version__}, funnn {funnn.__version__}"
    if not a.no_torch:
        try:
            runs["torch"], torch = torch_step(x, y, a.threads)
            versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
        except ImportError:
            print("torch is not importable: timing funnn only")
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind}; {platform.processor() or platform.machine()}"
          f"; {versions}")
    print(f"model: conv2d(32,3x3,SAME)-relu-max_pool2-conv2d(64,3x3,SAME)-relu-max_pool2-"
          f"dense({C}); x ({B}, {HW}, {HW}, 1) float32, Adam; conv lowering {a.lowering!r}; "
          f"{a.rounds} rounds x {a.repeats} steps, interleaved")

    times, round_medians = interleave(runs, a.rounds, a.repeats)      # 3 warm-up calls each

    med = {k: statistics.median(v) for k, v in times.items()}
    for k in runs:
        rm = round_medians[k]
        ratio = ""
        if "torch" in med:
            per_round = statistics.median(r / t for r, t in zip(rm, round_medians["torch"]))
            ratio = f"  {med[k] / med['torch']:.2f}x torch (per-round ratio median {per_round:.2f})"
        print(f"{k:>9}: median {med[k] * 1e3:7.2f} ms  (round medians {min(rm) * 1e3:.2f}"
              f"..{max(rm) * 1e3:.2f} ms){ratio}")


if __name__ == "__main__":
    main()
