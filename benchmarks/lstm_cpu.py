"""Time one LSTM training step: funnn (autodiff and manual engines) against PyTorch eager.

    python benchmarks/lstm_cpu.py [--rounds 5] [--repeats 20] [--threads 2] [--unroll 1]

Model: ``serial(lstm(128, return_sequences=False), dense(10))`` on inputs of shape
(128, 28, 28), softmax cross-entropy, Adam(1e-3), float32; PyTorch: ``nn.LSTM(28, 128,
batch_first=True)`` + ``nn.Linear(128, 10)`` on the last hidden state, same loss and
optimizer, ``torch.set_num_threads(threads)``. Each round times ``repeats`` steps of
every contender in turn (interleaved, so machine noise hits all alike) after warm-up;
the report gives each contender's median over all timed steps, the spread of the
per-round medians, and the ratios to torch. Compile time is printed separately, and the
load average before and after (other processes on a 2-core machine move every number;
PyTorch's OpenMP threads suffer more from them than XLA's). ``--unroll`` is passed to
``lstm``; torch is optional (if it is not importable, funnn is timed alone).
"""

from __future__ import annotations

import argparse
import os
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

B, T, D, H, C = 128, 28, 28, 128, 10


def funnn_step(engine, x, y, unroll):
    model = L.serial(L.lstm(H, return_sequences=False, unroll=unroll), L.dense(C))
    _, params = model.init(jax.random.key(0), (None, T, D))
    opt = optax.adam(1e-3)
    step = funnn.jit(make_step(model, losses.softmax_cross_entropy, opt, engine))
    state = {"ts": TrainState(params, opt.init(params), None)}
    key = jax.random.key(1)
    t0 = time.perf_counter()
    jax.block_until_ready(step(state["ts"], x, y, key))
    compile_s = time.perf_counter() - t0

    def run():
        state["ts"], loss = step(state["ts"], x, y, key)
        jax.block_until_ready(loss)

    return run, compile_s


def torch_step(x, y, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(D, H, batch_first=True), torch.nn.Linear(H, C)
    params = list(lstm.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()
    lossf = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad()
        out, _ = lstm(xt)
        loss = lossf(head(out[:, -1]), yt)
        loss.backward()
        opt.step()
        loss.item()

    return run, torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--unroll", type=lambda v: v == "True" or int(v), default=1,
                   help="lstm(unroll=...): an int, or True to unroll fully")
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, T, D), np.float32))
    y = jnp.asarray(rng.integers(0, C, B))
    runs = {}
    for engine in ("autodiff", "manual"):
        runs[engine], compile_s = funnn_step(engine, x, y, a.unroll)
        print(f"compile+first step {engine}: {compile_s:.2f} s")
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
    print(f"model: lstm({H}, return_sequences=False, unroll={a.unroll}) + dense({C}); "
          f"x ({B}, {T}, {D}) float32, Adam; {a.rounds} rounds x {a.repeats} steps, interleaved")

    times, round_medians = interleave(runs, a.rounds, a.repeats)      # 3 warm-up calls each

    med = {k: statistics.median(v) for k, v in times.items()}
    for k in runs:
        rm = round_medians[k]
        ratio = f"  {med[k] / med['torch']:.2f}x torch" if "torch" in med else ""
        print(f"{k:>9}: median {med[k] * 1e3:7.2f} ms  (round medians {min(rm) * 1e3:.2f}"
              f"..{max(rm) * 1e3:.2f} ms){ratio}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
