"""The ``curvature`` suite: each quantity of :mod:`funnn.curvature` against one plain backward.

One group per network, on a batch of the shipped 8x8 digits (float32, softmax cross-entropy):

- ``mlp``: 64-128-128-10 ReLU (``tiny``: 64-16-10);
- ``cnn``: conv 8 (3x3, SAME) -> ReLU -> max-pool 2 -> conv 16 -> ReLU -> max-pool 2 ->
  dense 10.

The baseline is one plain manual backward (``funnn.manual.value_and_grad``) at the same batch;
every other row's ratio is its cost in plain backwards. Rows are named ``quantity: how``:

- funnn's rules (:mod:`funnn.curvature`): ``batch_stats``, ``diag_ggn`` (exact),
  ``diag_ggn_mc`` (one sample), ``kfac_factors`` (``kfac``, one sample; ``kflr``, exact),
  ``ggn_vp``, ``hvp``;
- the autodiff routes: ``vmap`` of per-example ``jax.grad`` (gradient statistics; with sampled
  labels, the MC diagonal), per-example ``jax.jacrev`` with ``jax.hessian`` of the loss (the
  exact diagonal GGN), ``jax.jvp`` and ``jax.vjp`` around the loss's Hessian (the GGN-vector
  product) and ``jax.jvp`` of ``jax.grad`` (the Hessian-vector product);
- BackPACK on PyTorch where installed (``pip install -e '.[peers]'``), on the same network
  with the same weights: ``Variance`` + ``SumGradSquared``, ``DiagGGNExact``, ``DiagGGNMC``,
  ``KFAC``, ``KFLR``, ``ggn_vector_product``, ``hessian_vector_product``, and PyTorch's own
  plain backward for scale.

Targets (issue 21, on a CPU): ``batch_stats`` and ``diag_ggn_mc`` at most 2 plain backwards,
``kfac_factors`` at most 1.5, ``ggn_vp`` at most 3 and faster than ``jax.jvp`` of
``jax.grad``; every quantity faster than BackPACK's. The measured figures are in the
benchmarking tutorial.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from funnn import core, losses, manual
from funnn import curvature as C
from funnn import data as funnn_data
from funnn import layers as L
from funnn.bench.harness import Case, Unavailable

__all__ = ["curvature_suite", "problem", "funnn_builds", "autodiff_builds", "backpack_builds",
           "torch_net"]

XENT = losses.softmax_cross_entropy
# (batch, networks) by size
_SIZES = {"tiny": (8, ("mlp:16",)), "quick": (128, ("mlp", "cnn")),
          "full": (1024, ("mlp", "cnn"))}


def _model(arch: str):
    if arch.startswith("mlp"):
        h = int(arch.split(":")[1]) if ":" in arch else 128
        hidden = [L.dense(h), L.activation("relu")] * (1 if ":" in arch else 2)
        return L.serial(*hidden, L.dense(10))
    return L.serial(L.conv2d(8, (3, 3), padding="SAME"), L.activation("relu"),
                    L.max_pool((2, 2)), L.conv2d(16, (3, 3), padding="SAME"),
                    L.activation("relu"), L.max_pool((2, 2)), L.flatten(), L.dense(10))


def _title(arch: str) -> str:
    if arch.startswith("mlp"):
        h = arch.split(":")[1] if ":" in arch else "128-128"
        return f"mlp 64-{h}-10"
    return "cnn 8x8 c8-c16"


@functools.lru_cache(maxsize=8)
def problem(arch: str, batch: int):
    """``(model, params, x, y, v, key)``: float32 params, the first ``batch`` training digits
    (flat for the MLP, ``(8, 8, 1)`` images for the CNN), a params-shaped vector ``v``."""
    model = _model(arch)
    ds = funnn_data.load_digits("train", flatten=arch.startswith("mlp"))
    x, y = jnp.asarray(ds.x[:batch], jnp.float32), jnp.asarray(ds.y[:batch])
    shape = (None,) + tuple(x.shape[1:])

    @jax.jit                       # one program, not one per eager op of the initialisers
    def made(key):
        params = jax.tree.map(lambda a: a.astype(jnp.float32), model.init(key, shape)[1])
        v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=jnp.float32))
                         .reshape(a.shape), params)
        return params, v

    params, v = made(jax.random.key(0))
    return model, params, x, y, v, jax.random.key(1)


# --------------------------------------------------------------------------- funnn


def funnn_builds(model, params, x, y, v, key) -> dict[str, Callable]:
    """``{row: build}`` for the baseline and funnn's quantities."""
    def b(fn, *args):
        return lambda: (core.jit(fn), args)

    xy = (params, x, y)
    return {
        "backward: funnn manual value_and_grad": b(manual.value_and_grad(model, XENT), *xy),
        "batch_stats: funnn": b(C.batch_stats(model, XENT), *xy),
        "diag_ggn: funnn (exact)": b(C.diag_ggn(model, XENT), *xy),
        "diag_ggn_mc: funnn (1 sample)": b(
            lambda p, x, y, k: C.diag_ggn_mc(model, XENT)(p, x, y, key=k), *xy, key),
        "kfac_factors: funnn kfac (1 sample)": b(
            lambda p, x, y, k: C.kfac_factors(model, XENT, convention="kfac")(p, x, y, key=k),
            *xy, key),
        "kfac_factors: funnn kflr (exact)": b(C.kfac_factors(model, XENT), *xy),
        "ggn_vp: funnn": b(C.ggn_vp(model, XENT), *xy, v),
        "hvp: funnn (jax.jvp of the manual grad)": b(C.hvp(model, XENT), *xy, v),
    }


# --------------------------------------------------------------------------- autodiff


def _per_example_grads(model, params, x, y):
    def one(xi, yi):
        return jax.grad(lambda p: XENT.value(model.apply(p, xi[None]), yi[None]))(params)
    return jax.vmap(one)(x, y)


def _stats_autodiff(model, params, x, y):
    g = _per_example_grads(model, params, x, y)
    mean = jax.tree.map(lambda a: a.mean(0), g)
    return mean, jax.tree.map(lambda a: (a * a).sum(0), g), jax.tree.map(lambda a: a.var(0), g)


def _diag_mc_autodiff(model, params, x, y, key):
    """Per-example gradients at labels drawn from the model's own softmax, squared: ``1/B
    sum_i g_i(y~)^2``, the MC diagonal (mean reduction)."""
    logits = model.apply(params, x)
    ys = jax.random.categorical(key, logits, axis=-1)
    g = _per_example_grads(model, params, x, ys)
    return jax.tree.map(lambda a: (a * a).sum(0) / x.shape[0], g)


def _diag_exact_autodiff(model, params, x, y):
    """``diag(sum_i J_i^T H_i J_i)`` by per-example ``jax.jacrev`` of the logits and
    ``jax.hessian`` of the loss term (``1/B`` of the mean reduction included)."""
    b = x.shape[0]

    def one(xi, yi):
        jac = jax.jacrev(lambda p: model.apply(p, xi[None])[0])(params)          # (C, *leaf)
        z = model.apply(params, xi[None])[0]
        h = jax.hessian(lambda z: XENT.value(z[None], yi[None]))(z) / b          # (C, C)
        return jax.tree.map(lambda j: jnp.einsum("c...,cd,d...->...", j, h, j), jac)

    return jax.tree.map(lambda a: a.sum(0), jax.vmap(one)(x, y))


def _ggn_vp_autodiff(model, params, x, y, v):
    """``J^T H_L J v``: ``jax.jvp`` of the network, ``jax.jvp`` of ``jax.grad`` of the loss on
    the logits, ``jax.vjp`` of the network."""
    out, jv = jax.jvp(lambda p: model.apply(p, x), (params,), (v,))
    hjv = jax.jvp(jax.grad(lambda z: XENT.value(z, y)), (out,), (jv,))[1]
    return jax.vjp(lambda p: model.apply(p, x), params)[1](hjv)[0]


def _hvp_autodiff(model, params, x, y, v):
    grad = jax.grad(lambda p: XENT.value(model.apply(p, x), y))
    return jax.jvp(grad, (params,), (v,))[1]


def autodiff_builds(model, params, x, y, v, key) -> dict[str, Callable]:
    """``{row: build}`` for the autodiff routes (``jax.grad``, ``vmap``, ``jacrev``, ...)."""
    def b(fn, *args):
        return lambda: (core.jit(functools.partial(fn, model)), args)

    xy = (params, x, y)
    return {
        "backward: jax.value_and_grad": lambda: (core.jit(jax.value_and_grad(
            lambda p, x, y: XENT.value(model.apply(p, x), y))), xy),
        "batch_stats: vmap(jax.grad)": b(_stats_autodiff, *xy),
        "diag_ggn: vmap(jax.jacrev) + jax.hessian": b(_diag_exact_autodiff, *xy),
        "diag_ggn_mc: vmap(jax.grad), sampled labels": b(_diag_mc_autodiff, *xy, key),
        "ggn_vp: jax.jvp + loss Hessian + jax.vjp": b(_ggn_vp_autodiff, *xy, v),
        "hvp: jax.jvp of jax.grad": b(_hvp_autodiff, *xy, v),
    }


# --------------------------------------------------------------------------- BackPACK


def torch_net(torch, arch: str, params):
    """The network in PyTorch with funnn's weights (``W`` transposed; convolutions ``HWIO ->
    OIHW``; the dense head's rows permuted from NHWC to NCHW flattening)."""
    nn = torch.nn

    def t(a):
        return torch.from_numpy(np.array(a, np.float32))

    def linear(p, rows=None):
        w = np.asarray(p["W"])
        if rows is not None:
            w = w[rows]
        m = nn.Linear(*w.shape)
        m.weight.data, m.bias.data = t(w.T), t(p["b"])
        return m

    def conv(p):
        w = np.asarray(p["W"])
        m = nn.Conv2d(w.shape[2], w.shape[3], w.shape[:2], padding=w.shape[0] // 2)  # SAME, odd
        m.weight.data, m.bias.data = t(w.transpose(3, 2, 0, 1)), t(p["b"])
        return m

    if arch.startswith("mlp"):
        mods: list = []
        for p in params:
            mods += [linear(p), nn.ReLU()] if p else []
        return nn.Sequential(*mods[:-1])
    rows = np.arange(2 * 2 * 16).reshape(2, 2, 16).transpose(2, 0, 1).reshape(-1)
    return nn.Sequential(conv(params[0]), nn.ReLU(), nn.MaxPool2d(2), conv(params[3]),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), linear(params[7], rows))


def _torch_setup(arch, params, x, y):
    from funnn.bench.peers import _torch
    torch, _ = _torch()
    try:
        import backpack
        import backpack.hessianfree.ggnvp
        import backpack.hessianfree.hvp
    except ImportError:
        raise Unavailable("backpack-for-pytorch (pip install -e '.[peers]')") from None
    # BackPACK's hooks fire on module outputs when the input needs no gradient: expected here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    net = backpack.extend(torch_net(torch, arch, params))
    lossf = backpack.extend(torch.nn.CrossEntropyLoss())
    xt = torch.from_numpy(np.array(x, np.float32))
    if xt.ndim == 4:
        xt = xt.permute(0, 3, 1, 2).contiguous()                 # NHWC -> NCHW
    return torch, backpack, net, lossf, xt, torch.from_numpy(np.array(y, np.int64))


def _backpack_build(arch, params, x, y, v, what: str):
    def build():
        torch, bp, net, lossf, xt, yt = _torch_setup(arch, params, x, y)
        ext = bp.extensions
        exts = {"stats": (ext.Variance(), ext.SumGradSquared()), "diag": (ext.DiagGGNExact(),),
                "mc": (ext.DiagGGNMC(),), "kfac": (ext.KFAC(),), "kflr": (ext.KFLR(),),
                "plain": ()}
        plist = list(net.parameters())
        vt = [torch.randn_like(p) for p in plist]

        def run():
            for p in plist:
                p.grad = None
            out = net(xt)
            loss = lossf(out, yt)
            if what == "ggn_vp":
                return bp.hessianfree.ggnvp.ggn_vector_product(loss, out, net, vt)
            if what == "hvp":
                return bp.hessianfree.hvp.hessian_vector_product(loss, plist, vt)
            with bp.backpack(*exts[what]):
                loss.backward()
            return loss
        return run, ()
    return build


def backpack_builds(arch, params, x, y, v) -> dict[str, Callable]:
    """``{row: build}`` for BackPACK's extensions and PyTorch's plain backward."""
    rows = {"backward: torch plain backward": "plain",
            "batch_stats: BackPACK Variance + SumGradSquared": "stats",
            "diag_ggn: BackPACK DiagGGNExact": "diag", "diag_ggn_mc: BackPACK DiagGGNMC": "mc",
            "kfac_factors: BackPACK KFAC": "kfac", "kfac_factors: BackPACK KFLR": "kflr",
            "ggn_vp: BackPACK ggn_vector_product": "ggn_vp",
            "hvp: BackPACK hessian_vector_product": "hvp"}
    return {name: _backpack_build(arch, params, x, y, v, what) for name, what in rows.items()}


# --------------------------------------------------------------------------- suite


_ORDER = ("backward", "batch_stats", "diag_ggn:", "diag_ggn_mc", "kfac_factors", "ggn_vp",
          "hvp")


def curvature_suite(size: str) -> list[list[Case]]:
    """One group per network (see the module docstring): the baseline is one plain manual
    backward at the same batch."""
    batch, archs = _SIZES[size]
    groups = []
    for arch in archs:
        model, params, x, y, v, key = problem(arch, batch)
        builds = (funnn_builds(model, params, x, y, v, key)
                  | autodiff_builds(model, params, x, y, v, key)
                  | backpack_builds(arch, params, x, y, v))
        name = f"curvature {_title(arch)} b{batch} float32"
        ordered = sorted(builds, key=lambda r: next(i for i, q in enumerate(_ORDER)
                                                   if r.startswith(q)))
        groups.append([Case("curvature", name, impl, batch, "float32", builds[impl],
                            baseline=impl == "backward: funnn manual value_and_grad",
                            jit="BackPACK" not in impl and "torch" not in impl, samples=batch)
                       for impl in ordered])
    return groups
