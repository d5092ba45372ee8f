"""The same training steps in other libraries: Flax (linen and NNX), Equinox, PyTorch.

Each builder returns ``(fn, args)`` with ``fn(state, x, y) -> (state, loss)``, the
architecture, data, dtype and optimizer (Adam, 1e-3) of funnn's own step, or
raises :class:`~funnn.bench.harness.Unavailable` when the library is missing
(``pip install -e ".[peers]"``). Flax NNX and Equinox are timed through their
own ``nnx.jit`` / ``eqx.filter_jit``, as their users call them: the per-call
Python work of those wrappers is part of what the benchmark shows. Flax linen and Equinox
compile with the XLA options funnn's own steps and the pure-JAX baseline use
(:func:`funnn.core.compiler_options`: on CPU, XLA's own convolutions), so the rows differ by
the libraries, not by XLA settings; ``nnx.jit`` takes no options (its rows are MLPs, which the
options do not touch).

PyTorch is loaded with ``OMP_WAIT_POLICY=PASSIVE`` (unless set already): its OpenMP threads
otherwise spin after each call and slow whatever JAX row runs next (two identical pure-JAX rows
read 0.49-0.60x each other with spinning torch threads in the group). The policy and the
thread count are recorded in ``bench.json``'s ``env``.
"""

from __future__ import annotations

import functools

import numpy as np

from funnn.bench.harness import Unavailable
from funnn.core import compiler_options, jit

__all__ = ["linen", "nnx", "equinox", "torch_eager", "torch_func_per_example", "PEERS"]

LR = 1e-3


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise Unavailable(f"{module} (pip install -e '.[peers]')") from None


def _xent(logits, y):
    import jax
    import jax.numpy as jnp
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def linen(arch: str, x, y, dtype):
    """Flax linen: ``Module.apply`` under ``jax.grad``, optax Adam, ``jax.jit``."""
    _need("flax")
    import flax.linen as nn
    import jax
    import optax

    if arch == "mlp":
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = nn.relu(nn.Dense(512, dtype=dtype, param_dtype=dtype)(x))
                x = nn.relu(nn.Dense(512, dtype=dtype, param_dtype=dtype)(x))
                return nn.Dense(10, dtype=dtype, param_dtype=dtype)(x)
    elif arch == "cnn":
        class Net(nn.Module):  # type: ignore[no-redef]
            @nn.compact
            def __call__(self, x):
                for c in (32, 64):
                    x = nn.relu(nn.Conv(c, (3, 3), padding="SAME", dtype=dtype,
                                        param_dtype=dtype)(x))
                    x = nn.max_pool(x, (2, 2), (2, 2))
                return nn.Dense(10, dtype=dtype, param_dtype=dtype)(x.reshape(x.shape[0], -1))
    else:
        raise Unavailable(f"no Flax linen {arch} in the peer suite")
    net = Net()
    params = net.init(jax.random.key(0), x[:1])
    tx = optax.adam(LR)

    @jit                                  # jax.jit with funnn's compiler options
    def step(state, x, y):
        params, opt_state = state
        loss, g = jax.value_and_grad(lambda p: _xent(net.apply(p, x), y))(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step, ((params, tx.init(params)), x, y)


def nnx(arch: str, x, y, dtype):
    """Flax NNX: ``nnx.Linear`` modules, ``nnx.Optimizer``, ``nnx.jit``."""
    _need("flax")
    import optax
    from flax import nnx as fx

    if arch != "mlp":
        raise Unavailable(f"no Flax NNX {arch} in the peer suite")

    class Net(fx.Module):
        def __init__(self, rngs):
            self.l1 = fx.Linear(x.shape[-1], 512, dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.l2 = fx.Linear(512, 512, dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.l3 = fx.Linear(512, 10, dtype=dtype, param_dtype=dtype, rngs=rngs)

        def __call__(self, x):
            return self.l3(fx.relu(self.l2(fx.relu(self.l1(x)))))

    model = Net(fx.Rngs(0))
    opt = fx.Optimizer(model, optax.adam(LR), wrt=fx.Param)

    @fx.jit
    def train_step(model, opt, x, y):
        loss, g = fx.value_and_grad(lambda m: _xent(m(x), y))(model)
        opt.update(model, g)
        return loss

    def step(state, x, y):
        return state, train_step(state[0], state[1], x, y)

    return step, ((model, opt), x, y)


def equinox(arch: str, x, y, dtype):
    """Equinox: ``eqx.nn`` layers, ``eqx.filter_value_and_grad``, ``eqx.filter_jit``."""
    eqx = _need("equinox")
    import jax
    import optax

    k = jax.random.split(jax.random.key(0), 3)
    if arch == "mlp":
        layers = [eqx.nn.Linear(x.shape[-1], 512, key=k[0], dtype=dtype),
                  eqx.nn.Linear(512, 512, key=k[1], dtype=dtype),
                  eqx.nn.Linear(512, 10, key=k[2], dtype=dtype)]

        def forward(m, x):
            h = jax.nn.relu(jax.vmap(m[0])(x))
            return jax.vmap(m[2])(jax.nn.relu(jax.vmap(m[1])(h)))
    elif arch == "cnn":
        layers = [eqx.nn.Conv2d(1, 32, 3, padding=1, key=k[0], dtype=dtype),
                  eqx.nn.Conv2d(32, 64, 3, padding=1, key=k[1], dtype=dtype),
                  eqx.nn.Linear(64 * (x.shape[1] // 4) * (x.shape[2] // 4), 10, key=k[2],
                                dtype=dtype)]
        pool = eqx.nn.MaxPool2d(2, 2)

        def one(m, x):                                   # x: (H, W, 1) -> channels first
            h = pool(jax.nn.relu(m[0](x.transpose(2, 0, 1))))
            h = pool(jax.nn.relu(m[1](h)))
            return m[2](h.reshape(-1))

        def forward(m, x):
            return jax.vmap(lambda xi: one(m, xi))(x)
    else:
        raise Unavailable(f"no Equinox {arch} in the peer suite")
    tx = optax.adam(LR)
    opt_state = tx.init(eqx.filter(layers, eqx.is_array))

    @functools.partial(eqx.filter_jit, compiler_options=compiler_options() or None)
    def train_step(m, opt_state, x, y):
        loss, g = eqx.filter_value_and_grad(lambda m: _xent(forward(m, x), y))(m)
        updates, opt_state = tx.update(g, opt_state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), opt_state, loss

    def step(state, x, y):
        m, s, loss = train_step(state[0], state[1], x, y)
        return (m, s), loss

    return step, ((layers, opt_state), x, y)


def _torch():
    import os
    import sys

    if "torch" not in sys.modules:      # read once, when libgomp starts: before torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = _need("torch")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch, dev


def _torch_net(torch, arch: str, x):
    nn = torch.nn
    if arch == "mlp":
        return nn.Sequential(nn.Linear(x.shape[-1], 512), nn.ReLU(), nn.Linear(512, 512),
                             nn.ReLU(), nn.Linear(512, 10))
    if arch == "cnn":
        side = x.shape[1] // 4
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(64 * side * side, 10))
    if arch == "lstm":
        lstm, out = nn.LSTM(x.shape[-1], 128, batch_first=True), nn.Linear(128, 10)

        class LastState(nn.Module):  # type: ignore[name-defined]  # torch is optional, untyped
            def forward(self, x):
                return x[1][0][-1]                # (output, (h_n, c_n)) -> h_n of the last layer
        return nn.Sequential(lstm, LastState(), out)
    raise Unavailable(f"no PyTorch {arch} in the peer suite")


def _to_torch(torch, dev, arch, x, y, dtype):
    xt = torch.from_numpy(np.asarray(x, np.float32).copy())
    if arch == "cnn":
        xt = xt.permute(0, 3, 1, 2).contiguous()     # NHWC -> NCHW
    tdt = torch.bfloat16 if str(np.dtype(dtype)) == "bfloat16" else torch.float32
    return xt.to(dev, tdt), torch.from_numpy(np.asarray(y, np.int64)).to(dev), tdt


def torch_eager(arch: str, x, y, dtype):
    """PyTorch eager: ``nn`` modules, ``torch.optim.Adam``, forward/backward/step per call."""
    torch, dev = _torch()
    xt, yt, tdt = _to_torch(torch, dev, arch, x, y, dtype)
    net = _torch_net(torch, arch, x).to(dev, tdt)
    opt = torch.optim.Adam(net.parameters(), LR)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step(state, x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        sync()
        return state, loss.detach()

    return step, (None, xt, yt)


def torch_func_per_example(x, y, dtype):
    """Per-example gradients of the MLP with ``torch.func.vmap(grad(functional_call))``."""
    torch, dev = _torch()
    from torch.func import functional_call, grad, vmap

    xt, yt, tdt = _to_torch(torch, dev, "mlp", x, y, dtype)
    net = _torch_net(torch, "mlp", x).to(dev, tdt)
    params = {k: v.detach() for k, v in net.named_parameters()}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def loss(p, xi, yi):
        out = functional_call(net, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out.float(), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def run(p, x, y):
        g = per_example(p, x, y)
        sync()
        return g

    return run, (params, xt, yt)


PEERS = {"flax-linen": linen, "flax-nnx": nnx, "equinox": equinox, "torch": torch_eager}
