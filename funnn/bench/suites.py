"""The benchmark suites: lists of :class:`~funnn.bench.harness.Case` groups.

Architectures (random data of the stated shapes; nothing is downloaded):

- ``mlp``: 784-512-512-10 ReLU network, softmax cross-entropy.
- ``cnn``: 28x28x1 -> conv 32 (3x3, SAME) -> ReLU -> max-pool 2 -> conv 64 -> ReLU ->
  max-pool 2 -> dense 10.
- ``lstm``: LSTM(128) over 28 steps of 28 features, last state -> dense 10.
- ``wide``: 4096-4096-4096-4096-10 ReLU network (the ``roofline`` suite: big enough to reach
  a GPU's matmul peak; narrower at the small sizes).

Every training step is Adam (1e-3). ``bfloat16`` rows are mixed precision: float32 master
weights, the layers computing in bfloat16 (funnn's ``precision="bf16"`` policy; the pure-JAX
step casts its parameters to bfloat16 inside the differentiated function, the same thing
written by hand). Their fraction of peak is against the measured bfloat16 peak.

The ``attention`` suite times multi-head self-attention forward + backward (gradients of
the projections and of ``x``) at sequence lengths 256 to 4096: funnn's two hand-written
strategies and its autodiff path (cuDNN on a GPU in bfloat16), against softmax(QK^T)V written
plainly under ``jax.grad``, ``jax.nn.dot_product_attention`` (XLA, and cuDNN on a GPU) and,
where installed, PyTorch's ``scaled_dot_product_attention``.

The ``curvature`` suite (:mod:`funnn.bench.curvature`) times each quantity of
:mod:`funnn.curvature` in plain backwards of the same network and batch, against the autodiff
routes and BackPACK on PyTorch.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funnn import autodiff, control, core, losses, manual, parallel, precision, train
from funnn import data as funnn_data
from funnn import layers as L
from funnn.bench import peers
from funnn.bench.attention import attention_suite
from funnn.bench.curvature import curvature_suite
from funnn.bench.harness import Case, NotApplicable, _analyse
from funnn.core import ConfigError

__all__ = ["SUITES", "SIZES", "build", "mlp_flops", "lstm_flops", "cnn_flops", "step_flops",
           "data_for", "trains"]

LR = 1e-3
XENT = losses.softmax_cross_entropy


# --------------------------------------------------------------------------- data, models


@functools.lru_cache(maxsize=32)
def data_for(arch: str, batch: int, dtype: str = "float32"):
    """Fixed random inputs and labels for ``arch`` (numpy, so every library can take them)."""
    rng = np.random.default_rng(batch)
    shape = (batch, _width(arch)) if arch.startswith("wide") else {
        "mlp": (batch, 784), "cnn": (batch, 28, 28, 1), "lstm": (batch, 28, 28)}[arch]
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return jnp.asarray(x, dtype), jnp.asarray(y)


WIDE = 4096


def _width(arch: str) -> int:
    """``"wide"`` is ``WIDE`` units; ``"wide:N"`` is ``N`` (the small sizes of the suites)."""
    return int(arch.split(":")[1]) if ":" in arch else WIDE


def funnn_model(arch: str):
    if arch.startswith("wide"):
        n = _width(arch)
        return L.serial(L.dense(n), L.activation("relu"), L.dense(n),
                        L.activation("relu"), L.dense(n), L.activation("relu"), L.dense(10))
    if arch == "mlp":
        return L.serial(L.dense(512), L.activation("relu"), L.dense(512), L.activation("relu"),
                        L.dense(10))
    if arch == "cnn":
        return L.serial(L.conv2d(32, (3, 3), padding="SAME"), L.activation("relu"),
                        L.max_pool((2, 2)), L.conv2d(64, (3, 3), padding="SAME"),
                        L.activation("relu"), L.max_pool((2, 2)), L.flatten(), L.dense(10))
    return L.serial(L.lstm(128, return_sequences=False), L.dense(10))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def _optimizer(name: str):
    return optax.adam(LR) if name == "adam" else optax.sgd(LR)


def _funnn_step(arch: str, engine: str, batch: int, dtype: str, optimizer: str = "adam"):
    def build():
        model = funnn_model(arch)
        x, y = data_for(arch, batch, dtype)
        _, params = model.init(jax.random.key(0), (None,) + tuple(x.shape[1:]))
        if dtype == "bfloat16":          # mixed precision: float32 master weights
            model = precision.apply_policy(model, "bf16")
        opt = _optimizer(optimizer)
        step = train.make_step(model, XENT, opt, engine)
        ts = train.TrainState(params, opt.init(params), None)
        return core.jit(lambda ts, x, y: step(ts, x, y, None)), (ts, x, y)
    return build


def _xent(logits, y):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _pure_params(arch: str, x, dtype):
    """Plain-JAX parameters with the same shapes and initialisation scale as funnn's."""
    k = iter(jax.random.split(jax.random.key(0), 8))
    def he(shape, fan_in):
        return (jax.random.normal(next(k), shape) * (2.0 / fan_in) ** 0.5).astype(dtype)
    if arch == "mlp" or arch.startswith("wide"):
        dims = (x.shape[-1], 512, 512, 10) if arch == "mlp" else (_width(arch),) * 4 + (10,)
        return [(he((a, b), a), jnp.zeros(b, dtype)) for a, b in itertools.pairwise(dims)]
    if arch == "cnn":
        return [(he((3, 3, 1, 32), 9), jnp.zeros(32, dtype)),
                (he((3, 3, 32, 64), 288), jnp.zeros(64, dtype)),
                (he((7 * 7 * 64, 10), 3136), jnp.zeros(10, dtype))]
    f, h = x.shape[-1], 128
    return [(he((f, 4 * h), f), he((h, 4 * h), h), jnp.zeros(4 * h, dtype)),
            (he((h, 10), h), jnp.zeros(10, dtype))]


def pure_forward(arch: str, params, x):
    """The network written directly in ``jax.numpy``/``lax``: the zero-overhead reference."""
    if arch == "mlp" or arch.startswith("wide"):
        for w, b in params[:-1]:
            x = jax.nn.relu(x @ w + b)
        return x @ params[-1][0] + params[-1][1]
    if arch == "cnn":
        for w, b in params[:2]:
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + b)
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                      "VALID")
        return x.reshape(x.shape[0], -1) @ params[2][0] + params[2][1]
    (wx, wh, b), (wo, bo) = params
    h0 = jnp.zeros((x.shape[0], wh.shape[0]), x.dtype)
    xw = jnp.einsum("btf,fg->tbg", x, wx) + b

    def cell(carry, xw_t):
        h, c = carry
        i, f, g, o = jnp.split(xw_t + h @ wh, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), None

    (h, _), _ = jax.lax.scan(cell, (h0, h0), xw)
    return h @ wo + bo


def _pure_step(arch: str, batch: int, dtype: str, optimizer: str = "adam"):
    def build():
        x, y = data_for(arch, batch, dtype)
        params = _pure_params(arch, x, "float32")        # float32 master weights
        tx = _optimizer(optimizer)

        def objective(p, x, y):
            if dtype != "float32":                       # mixed precision, by hand
                p = _cast(p, dtype)
            return _xent(pure_forward(arch, p, x.astype(dtype)), y)

        @core.jit
        def step(state, x, y):
            p, s = state
            loss, g = jax.value_and_grad(objective)(p, x, y)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss
        return step, ((params, tx.init(params)), x, y)
    return build


def _peer_step(peer: str, arch: str, batch: int, dtype: str):
    def build():
        x, y = data_for(arch, batch, dtype)
        return peers.PEERS[peer](arch, x, y, jnp.dtype(dtype))
    return build


def trains(fn, args, steps: int = 10) -> None:
    """Raise unless ``steps`` updates on one batch lower its loss (the step really trains):
    the best of the last three losses must beat the first (Adam's first steps on random labels
    may rise before they fall)."""
    state, rest = args[0], args[1:]
    seen: list[float] = []
    for _ in range(steps):
        state, loss = fn(state, *rest)
        seen.append(float(loss))
    first, best = seen[0], min(seen[-3:])
    if not (np.isfinite(seen[-1]) and best < first):
        raise AssertionError(f"does not train: losses {', '.join(f'{v:.4g}' for v in seen)} "
                             f"in {steps} steps")


# --------------------------------------------------------------------------- FLOP counts


def mlp_flops(batch: int, dims=(784, 512, 512, 10)) -> int:
    """Matmul FLOPs of one MLP training step: forward ``2 B n m`` per layer, backward twice
    that (weight and input gradients), except no input gradient for the first layer."""
    fwd = sum(2 * batch * a * b for a, b in itertools.pairwise(dims))
    return 3 * fwd - 2 * batch * dims[0] * dims[1]


def cnn_flops(batch: int) -> int:
    """Multiply-add FLOPs of the digits-shaped CNN step: each 3x3 SAME convolution
    ``2 B H W C_in C_out 9`` forward, twice that backward (no input gradient for the first),
    and the dense head as :func:`mlp_flops`."""
    c1 = 2 * batch * 28 * 28 * 1 * 32 * 9
    c2 = 2 * batch * 14 * 14 * 32 * 64 * 9
    head = 2 * batch * 7 * 7 * 64 * 10
    return 3 * c1 - c1 + 3 * c2 + 3 * head


def step_flops(arch: str, batch: int) -> int:
    """The hand count for one training step of ``arch`` (GPU libraries run matrix products and
    convolutions as custom calls that XLA's cost analysis does not count, so the step rows
    use this count on every backend)."""
    if arch == "mlp":
        return mlp_flops(batch)
    if arch.startswith("wide"):
        return mlp_flops(batch, (_width(arch),) * 4 + (10,))
    if arch == "cnn":
        return cnn_flops(batch)
    return lstm_flops(batch)


def lstm_flops(batch: int, steps: int = 28, feat: int = 28, hidden: int = 128) -> int:
    """Matmul FLOPs of the LSTM step (XLA counts a scan body once, so this is by hand):
    gates ``2 B (F + H) 4H`` per time step forward, twice that backward (no dx)."""
    gates = 2 * batch * (feat + hidden) * 4 * hidden * steps
    head = 2 * batch * hidden * 10
    return 3 * gates - 2 * batch * feat * 4 * hidden * steps + 3 * head


# --------------------------------------------------------------------------- suites


def _step_group(suite, arch, batch, dtype, impls, check=True, optimizer="adam") -> list[Case]:
    name = f"{arch} b{batch} {dtype}" + ("" if optimizer == "adam" else f" {optimizer}")
    flops = step_flops(arch, batch)
    cases = []
    for impl in impls:
        if impl == "pure JAX":
            build = _pure_step(arch, batch, dtype, optimizer)
        elif impl.startswith("funnn "):
            build = _funnn_step(arch, impl.split()[1], batch, dtype, optimizer)
        else:
            build = _peer_step(impl, arch, batch, dtype)
        jit = impl == "pure JAX" or impl.startswith("funnn ") or impl == "flax-linen"
        cases.append(Case(suite, name, impl, batch, dtype, build, baseline=impl == "pure JAX",
                          jit=jit, flops=flops, flops_from=None if jit else "pure JAX",
                          check=trains if check else None, samples=batch))
    return cases


_Sizes = dict[str, dict[str, tuple[int, ...]]]
_ENGINE_SIZES: _Sizes = {
    "tiny": {"mlp": (8,), "cnn": (8,), "lstm": (8,)},
    "quick": {"mlp": (32, 128), "cnn": (32,), "lstm": (32,)},
    "full": {"mlp": (32, 128, 1024, 8192), "cnn": (32, 128, 1024), "lstm": (32, 128, 1024)}}
_PEER_SIZES: _Sizes = {
    "tiny": {"mlp": (8,)}, "quick": {"mlp": (128,), "cnn": (32,), "lstm": (32,)},
    "full": {"mlp": (128, 1024), "cnn": (128,), "lstm": (128,)}}


def engines(size: str) -> list[list[Case]]:
    """funnn's three engines against pure JAX: MLP, CNN, LSTM; batch and dtype sweeps."""
    impls = ["pure JAX", "funnn autodiff", "funnn manual", "funnn bridge"]
    sizes = _ENGINE_SIZES[size]
    dtypes = ("float32", "bfloat16") if size == "full" else ("float32",)
    groups = [_step_group("engines", a, b, d, impls, check=False)
              for d in dtypes for a, bs in sizes.items() for b in bs]
    if size == "quick":
        groups.append(_step_group("engines", "mlp", 128, "bfloat16", impls, check=False))
    return groups


def roofline_suite(size: str) -> list[list[Case]]:
    """The wide MLP (``WIDE`` units, 3 hidden layers) at large batches, float32 and bfloat16
    mixed precision, Adam and plain SGD: how close a training step gets to the device's
    measured matmul peak, and what the optimizer's memory-bound update costs."""
    batches = {"tiny": (8,), "quick": (256,), "full": (8192, 16384)}[size]
    optimizers = ("adam",) if size == "tiny" else ("adam", "sgd")
    arch = {"tiny": "wide:64", "quick": "wide:1024", "full": "wide"}[size]
    impls = ["pure JAX", "funnn autodiff", "funnn manual"]
    groups = []
    for dtype in ("float32", "bfloat16"):
        for b in batches:
            for opt in optimizers:
                cases = _step_group("roofline", arch, b, dtype, impls, check=False,
                                    optimizer=opt)
                groups.append(cases)
    return groups


def peer_suite(size: str, names=None) -> list[list[Case]]:
    """The same steps in pure JAX, funnn, Flax linen/NNX, Equinox and PyTorch eager."""
    chosen = list(peers.PEERS) if names is None else names
    table = {"mlp": ["flax-linen", "flax-nnx", "equinox", "torch"],
             "cnn": ["flax-linen", "equinox", "torch"], "lstm": ["torch"]}
    sizes = _PEER_SIZES[size]
    groups = []
    for arch, bs in sizes.items():
        impls = ["pure JAX", "funnn autodiff", "funnn manual"] + \
            [p for p in table[arch] if p in chosen]
        groups += [_step_group("peers", arch, b, "float32", impls) for b in bs]
    return groups


def jit_suite(size: str) -> list[list[Case]]:
    """jit vs op-by-op eager for a small network: the cost of dispatch."""
    batch, arch = 32, "mlp"
    small = L.serial(L.dense(32), L.activation("relu"), L.dense(10))

    def funnn_build(jit):
        def build():
            x, y = data_for(arch, batch)
            x = x[:, :64]
            _, params = small.init(jax.random.key(0), (None, 64))
            opt = optax.adam(LR)
            step = train.make_step(small, XENT, opt, "autodiff")
            ts = train.TrainState(params, opt.init(params), None)
            fn = lambda ts, x, y: step(ts, x, y, None)
            return (core.jit(fn) if jit else fn), (ts, x, y)
        return build

    name = "mlp 64-32-10 b32 float32"
    return [[Case("jit", name, "funnn autodiff (jit)", batch, "float32", funnn_build(True),
                  baseline=True, samples=batch),
             Case("jit", name, "funnn autodiff (eager)", batch, "float32", funnn_build(False),
                  jit=False, flops_from="funnn autodiff (jit)", samples=batch,
                  note="op-by-op dispatch")]]


def per_example_suite(size: str) -> list[list[Case]]:
    """Per-example gradients and clipping, 784-512-512-10 MLP.

    Group 1, per-example gradients: ``vmap(grad)`` (baseline), funnn's engines under
    ``vmap``, ``manual.per_example_value_and_grad`` (batched hand-written rules),
    ``manual.per_example_grad_norms`` (norms only, nothing materialised), a Python loop of
    jitted single-example gradients, and ``torch.func``.
    Group 2, the clipped mean gradient (DP-SGD's): ``vmap(grad)`` + clip + mean (baseline),
    ``manual.clipped_value_and_grad`` (norms, then one batch backward with scaled deltas),
    and a plain batch gradient (manual and autodiff engines) for scale.
    """
    batch = {"tiny": 4, "quick": 32, "full": 128}[size]
    x, y = data_for("mlp", batch)
    model = funnn_model("mlp")
    _, params = model.init(jax.random.key(0), (None, 784))
    name = f"per-example grads mlp b{batch} float32"
    clip_name = f"clipped mean grad mlp b{batch} float32"
    clip = 1.0

    def vg(engine):
        f = (autodiff if engine == "autodiff" else manual).value_and_grad(model, XENT)
        return core.jit(jax.vmap(f, in_axes=(None, 0, 0)))

    def single_loss(p, xi, yi):
        return XENT.value(model.apply(p, xi[None]), yi[None])

    def pure_build():
        return core.jit(jax.vmap(jax.grad(single_loss), in_axes=(None, 0, 0))), (params, x, y)

    def loop_build():
        one = core.jit(autodiff.value_and_grad(model, XENT))

        def run(p, x, y):
            return [one(p, x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]
        return run, (params, x, y)

    def reusing_build():
        g = manual.jit_reusing(manual.per_example_value_and_grad(model, XENT))
        state = {"out": g(params, x, y)}

        def run(p, x, y):
            state["out"] = g(p, x, y, out=state["out"])
            return state["out"]
        return run, (params, x, y)

    def vmap_clip_build():
        def clipped(p, x, y):
            g = jax.vmap(jax.grad(single_loss), in_axes=(None, 0, 0))(p, x, y)
            sq = sum(jnp.sum(jnp.square(leaf).reshape(batch, -1), 1)
                     for leaf in jax.tree.leaves(g))
            factor = jnp.minimum(1.0, clip / jnp.sqrt(sq))
            return jax.tree.map(lambda leaf: jnp.tensordot(factor, leaf, axes=1) / batch, g)
        return core.jit(clipped), (params, x, y)

    def plain_build(engine):
        f = (autodiff if engine == "autodiff" else manual).value_and_grad(model, XENT)
        return lambda: (core.jit(f), (params, x, y))

    per_ex = [
        Case("per-example", name, "vmap(jax.grad)", batch, "float32", pure_build,
             baseline=True, samples=batch),
        Case("per-example", name, "funnn autodiff under vmap", batch, "float32",
             lambda: (vg("autodiff"), (params, x[:, None], y[:, None])), samples=batch),
        Case("per-example", name, "funnn manual under vmap", batch, "float32",
             lambda: (vg("manual"), (params, x[:, None], y[:, None])), samples=batch),
        Case("per-example", name, "funnn per_example_value_and_grad", batch, "float32",
             lambda: (core.jit(manual.per_example_value_and_grad(model, XENT)), (params, x, y)),
             samples=batch, note="batched hand-written rules"),
        Case("per-example", name, "funnn per_example_value_and_grad, reusing buffers", batch,
             "float32", reusing_build, jit=False,
             flops_from="funnn per_example_value_and_grad", samples=batch,
             note="manual.jit_reusing: the previous result's buffers are donated"),
        Case("per-example", name, "funnn per_example_grad_norms", batch, "float32",
             lambda: (core.jit(manual.per_example_grad_norms(model, XENT)), (params, x, y)),
             samples=batch, note="norms only: ||x_i|| ||delta_i||"),
        Case("per-example", name, "python loop of jitted grads", batch, "float32", loop_build,
             jit=False, flops_from="vmap(jax.grad)", samples=batch),
        Case("per-example", name, "torch.func vmap(grad)", batch, "float32",
             lambda: peers.torch_func_per_example(x, y, jnp.float32), jit=False,
             flops_from="vmap(jax.grad)", samples=batch)]
    clipped = [
        Case("per-example", clip_name, "vmap(jax.grad) + clip + mean", batch, "float32",
             vmap_clip_build, baseline=True, samples=batch),
        Case("per-example", clip_name, "funnn clipped_value_and_grad", batch, "float32",
             lambda: (core.jit(manual.clipped_value_and_grad(model, XENT, clip)),
                      (params, x, y)), samples=batch, note="ghost clipping"),
        Case("per-example", clip_name, "funnn manual value_and_grad (no clipping)", batch,
             "float32", plain_build("manual"), samples=batch, note="plain batch gradient"),
        Case("per-example", clip_name, "funnn autodiff value_and_grad (no clipping)", batch,
             "float32", plain_build("autodiff"), samples=batch, note="plain batch gradient")]
    return [per_ex, clipped]


def control_suite(size: str) -> list[list[Case]]:
    """Reverse mode through a loop: scan, unrolled, bounded_while, checkpointed scan."""
    n = {"tiny": 8, "quick": 50, "full": 500}[size]   # unrolled: one copy of the body per step
    s0 = jnp.linspace(0.1, 1.0, 64)
    name = f"grad through a {n}-step loop, state 64"

    def body(w):
        return lambda s: s + 0.01 * jnp.sin(w * s)

    def scan_f(w):
        return jnp.sum(jax.lax.scan(lambda s, _: (body(w)(s), None), s0, length=n)[0])

    def unrolled_f(w):
        return jnp.sum(jax.lax.scan(lambda s, _: (body(w)(s), None), s0, length=n,
                                    unroll=True)[0])

    def while_f(w):
        r = control.bounded_while(lambda c: c[1] < n, lambda c: (body(w)(c[0]), c[1] + 1),
                                  (s0, 0), n)
        return jnp.sum(r.state[0])

    def ckpt_f(w):
        return jnp.sum(control.checkpointed_scan(lambda s, _: (body(w)(s), None), s0,
                                                 length=n)[0])

    def case(impl, f, baseline=False):
        return Case("control", name, impl, 1, "float32",
                    lambda: (core.jit(jax.grad(f)), (jnp.float32(1.5),)), baseline=baseline,
                    flops=4.0 * 64 * n * 3, note="memory_bytes: compiled footprint")
    return [[case("lax.scan", scan_f, True), case("lax.scan unroll=True", unrolled_f),
             case("control.bounded_while", while_f), case("control.checkpointed_scan", ckpt_f)]]


def epoch_suite(size: str) -> list[list[Case]]:
    """A whole epoch of the MLP: ``fit``'s one jitted scan vs a per-batch Python loop."""
    batch, num = {"tiny": (8, 32), "quick": (128, 2048), "full": (128, 16384)}[size]
    model = funnn_model("mlp")
    x, y = data_for("mlp", num)
    _, params = model.init(jax.random.key(0), (None, 784))
    opt = optax.adam(LR)
    nb = num // batch
    name = f"epoch of mlp, {num} examples, batch {batch}"
    key = jax.random.key(3)

    def scan_build():
        run = train.make_epoch(model, XENT, opt, "autodiff", batch, num)

        def epoch(ts, x, y):        # the epoch donates its state: hand it a fresh copy
            return run(jax.tree_util.tree_map(jnp.copy, ts), x, y, key)
        return epoch, (train.TrainState(params, opt.init(params), None), x, y)

    def loop_build():
        step = core.jit(train.make_step(model, XENT, opt, "autodiff"))
        order = core.jit(lambda k: funnn_data.epoch_order(k, num, batch))

        def epoch(ts, x, y):
            idx = order(key)
            for i in range(nb):
                ts, _ = step(ts, x[idx[i]], y[idx[i]], jax.random.fold_in(key, i))
            return ts
        return epoch, (train.TrainState(params, opt.init(params), None), x, y)

    flops = mlp_flops(batch) * nb

    @functools.cache
    def epoch_bytes():        # XLA's count for one step, times the steps of the epoch
        step = core.jit(train.make_step(model, XENT, opt, "autodiff"))
        ts = train.TrainState(params, opt.init(params), None)
        compiled = step.lower(ts, x[:batch], y[:batch], key).compile()
        return nb * (_analyse(compiled)[1] or 0.0)

    return [[Case("epoch", name, "fit: one jitted scan", batch, "float32", scan_build,
                  baseline=True, jit=False, flops=flops, samples=nb * batch,
                  bytes=epoch_bytes),
             Case("epoch", name, "python loop of jitted steps", batch, "float32", loop_build,
                  jit=False, flops=flops, samples=nb * batch, bytes=epoch_bytes)]]


def _dp_step(n: int, sharding: str, batch: int, ref: dict):
    """One Adam step of the MLP on an ``n``-device mesh; ``ref`` gets the 1-device step."""
    def build():
        have = jax.local_device_count()
        if have < n:
            raise NotApplicable(f"{n} devices wanted, this process has {have}; on a CPU set "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        model = funnn_model("mlp")
        x, y = data_for("mlp", batch)
        _, params = model.init(jax.random.key(0), (None, 784))
        opt = optax.adam(LR)
        step = train.make_step(model, XENT, opt, "autodiff")
        ts = train.TrainState(params, opt.init(params), None)
        plan = parallel.plan(parallel.make_mesh(n), params, sharding)
        sh = train.TrainState(plan.params, plan.like(ts.opt_state), None)

        def sharded(ts, x, y):
            rows = plan.rows
            return step(ts, jax.lax.with_sharding_constraint(x, rows),
                        jax.lax.with_sharding_constraint(y, rows), None)

        ref.update(one=(core.jit(lambda ts, x, y: step(ts, x, y, None)), (ts, x, y)))
        fn = core.jit(sharded, in_shardings=(sh, plan.rows, plan.rows),
                     out_shardings=(sh, plan.replicated))
        placed = train.TrainState(*(plan.place(t, s) for t, s in zip(ts, sh)))
        return fn, (placed, plan.place(x, plan.rows), plan.place(y, plan.rows))
    return build


def _same_as_one_device(ref: dict):
    """Raise unless the sharded step gives the 1-device step's parameters (1e-5 relative)."""
    def check(fn, args):
        one, one_args = ref["one"]
        (want, _), (got, _) = one(*one_args), fn(*args)
        for a, b in zip(jax.tree_util.tree_leaves(want.params),
                        jax.tree_util.tree_leaves(got.params)):
            a, b = np.asarray(a), np.asarray(b)
            if float(np.linalg.norm(a - b)) > 1e-5 * max(float(np.linalg.norm(a)), 1e-30):
                raise AssertionError("the sharded step differs from the 1-device step")
    return check


def _allreduce(n: int):
    """``psum`` over ``data`` of one gradient-sized tree per device: the collective alone."""
    def build():
        if jax.local_device_count() < n:
            raise NotApplicable(f"{n} devices wanted, this process has "
                                f"{jax.local_device_count()}")
        mesh = parallel.make_mesh(n)
        _, params = funnn_model("mlp").init(jax.random.key(0), (None, 784))
        per_device = jax.tree_util.tree_map(
            lambda a: np.broadcast_to(np.asarray(a), (n,) + a.shape), params)
        spread = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA))
        grads = jax.tree_util.tree_map(lambda a: jax.device_put(a, spread), per_device)
        psum = jax.shard_map(lambda g: jax.tree_util.tree_map(
            lambda a: jax.lax.psum(a, parallel.DATA), g), mesh=mesh,
            in_specs=jax.sharding.PartitionSpec(parallel.DATA),
            out_specs=jax.sharding.PartitionSpec())
        return core.jit(psum), (grads,)
    return build


def parallel_suite(size: str) -> list[list[Case]]:
    """The MLP's Adam step data-parallel over 1, 2, 4, 8 devices (replicated and fsdp
    parameters), and the gradient all-reduce alone: its ratio is the collective's share
    of the replicated step. Each sharded step is checked against the 1-device step."""
    batch = {"tiny": 16, "quick": 256, "full": 2048}[size]
    counts = [1, 2, 4, 8]
    if size == "tiny":   # the tests: only what this process has
        counts = [n for n in (1, 2) if n <= jax.local_device_count()]
    cpu = jax.default_backend() == "cpu"
    note = (" (CPU-simulated devices share the same cores: shows correctness and overhead, "
            "not speed-up)" if cpu else "")
    groups = []
    for n in counts:
        name = f"mlp b{batch} data-parallel on {n} device{'s' * (n > 1)}{note}"
        ref: dict = {}
        flops = mlp_flops(batch)     # XLA counts one device's share of a sharded program
        cases = [Case("parallel", name, "step, replicated params", batch, "float32",
                      _dp_step(n, "replicated", batch, ref), baseline=True, flops=flops,
                      check=_same_as_one_device(ref), samples=batch)]
        if n > 1:
            ref_f: dict = {}
            cases += [Case("parallel", name, "step, fsdp params", batch, "float32",
                           _dp_step(n, "fsdp", batch, ref_f), check=_same_as_one_device(ref_f),
                           flops=flops, samples=batch),
                      Case("parallel", name, "all-reduce: share of step", batch, "float32",
                           _allreduce(n), flops=0.0,
                           note="the gradient psum alone; its ratio is its share of the step")]
        groups.append(cases)
    return groups


SIZES = ("tiny", "quick", "full")
SUITES: dict[str, Callable[[str], list[list[Case]]]] = {
    "engines": engines, "peers": peer_suite, "jit": jit_suite,
    "per-example": per_example_suite, "control": control_suite, "epoch": epoch_suite,
    "parallel": parallel_suite, "attention": attention_suite, "roofline": roofline_suite,
    "curvature": curvature_suite}


def build(names, size: str = "quick", peer_names=None) -> list[list[Case]]:
    """The groups of the named suites at ``size`` (``tiny``: for tests; ``quick``: under two
    minutes on a 2-core CPU; ``full``: accelerators); unknown names are a ConfigError."""
    names = list(names)
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; valid: {', '.join(SIZES)}", ("bench",))
    bad = [n for n in names if n not in SUITES]
    if bad:
        raise ConfigError(f"unknown suite {bad[0]!r}; valid: {', '.join(SUITES)}", ("bench",))
    if peer_names is not None:
        badp = [p for p in peer_names if p not in peers.PEERS]
        if badp:
            raise ConfigError(f"unknown peer {badp[0]!r}; valid: {', '.join(peers.PEERS)}",
                              ("bench",))
    groups = []
    for n in names:
        groups += peer_suite(size, peer_names) if n == "peers" else SUITES[n](size)
    return groups
