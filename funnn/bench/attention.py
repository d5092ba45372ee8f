"""The ``attention`` suite: multi-head self-attention, forward + backward, by sequence length.

Every implementation computes the same thing: ``y = attention(x W_q, x W_k, x W_v) W_o`` with
``H`` heads of 64 (fewer and smaller on a CPU), causal, no biases, and its gradients with
respect to the four projections and ``x`` for a fixed output gradient ``dy``:

- ``softmax(QK^T)V, jax.grad`` (the baseline): the textbook formula under ``jax.grad``;
- ``jax.nn.dot_product_attention`` (XLA) and, on a GPU in bfloat16/float16, its cuDNN kernel;
- ``funnn autodiff``: ``jax.grad`` of the layer's ``apply`` (cuDNN on a GPU in bfloat16);
- ``funnn manual chunked`` / ``funnn manual materialized``: the hand-written backward with
  each residual strategy (``O(T)`` or ``O(T^2)`` memory);
- ``torch SDPA`` (where installed): ``scaled_dot_product_attention`` with the same projections,
  on the GPU when there is one.

FLOPs are a nominal count, the same for every row, in the convention FlashAttention reports:
the four projections ``2 B T F^2`` each forward and twice that backward; attention
``4 B H T S D`` forward (half of it when causal) and 2.5 times that backward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from funnn import core
from funnn import layers as L
from funnn.bench.harness import Case, NotApplicable, Unavailable

__all__ = ["attention_suite", "attention_flops"]

_SIZES = {"tiny": ((32,), 2, 8, 2), "quick": ((256, 512), 4, 32, 2),
          "full": ((256, 1024, 4096), 16, 64, None)}


def attention_flops(b: int, t: int, heads: int, d: int, causal: bool = True) -> float:
    """Nominal FLOPs of self-attention forward + backward (see the module docstring)."""
    f = heads * d
    proj = 4 * 2 * b * t * f * f
    attn = 4 * b * heads * t * t * d * (0.5 if causal else 1.0)
    return 3 * proj + 3.5 * attn


def _inputs(b, t, f, dtype):
    rng = np.random.default_rng(t)
    x = jnp.asarray(rng.standard_normal((b, t, f)), dtype)
    dy = jnp.asarray(rng.standard_normal((b, t, f)), dtype)
    ws = {n: jnp.asarray(rng.standard_normal((f, f)) / math.sqrt(f), dtype)
          for n in ("W_q", "W_k", "W_v", "W_o")}
    return x, dy, ws


def _plain(heads, how):
    """``y`` from params and ``x`` with the attention core written plainly or by jax."""

    def core(q, k, v):
        b, t, f = q.shape
        d = f // heads
        q, k, v = (a.reshape(b, t, heads, d) for a in (q, k, v))
        if how == "plain":
            s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
            p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype)
            o = jnp.einsum("bhts,bshd->bthd", p, v)
        else:
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                             implementation=None if how == "xla" else how)
        return o.reshape(b, t, f)

    def forward(ws, x):
        return core(x @ ws["W_q"], x @ ws["W_k"], x @ ws["W_v"]) @ ws["W_o"]

    return forward


def _grad_of(forward):
    def step(ws, x, dy):
        _, pullback = jax.vjp(forward, ws, x)
        return pullback(dy)
    return core.jit(step)


def _case_builds(b, t, heads, d, dtype):
    f = heads * d

    def jax_build(how):
        def build():
            if how == "cudnn" and (jax.default_backend() != "gpu"
                                   or dtype not in ("bfloat16", "float16")):
                raise NotApplicable("cuDNN attention: a GPU and bfloat16/float16 only")
            x, dy, ws = _inputs(b, t, f, dtype)
            return _grad_of(_plain(heads, how)), (ws, x, dy)
        return build

    def funnn_build(impl, block=None):
        layer = L.multi_head_attention(heads, causal=True, use_bias=False,
                                       implementation="auto" if impl == "autodiff" else impl,
                                       block_size=block)

        def build():
            x, dy, ws = _inputs(b, t, f, dtype)
            if impl == "autodiff":
                return _grad_of(lambda p, x: layer.apply(p, x)), (ws, x, dy)

            def step(p, x, dy):
                _, res = layer.forward(p, x)
                return layer.backward(p, res, dy)
            return core.jit(step), (ws, x, dy)
        return build

    def torch_build():
        try:
            import torch
        except ImportError:
            raise Unavailable("torch (pip install -e '.[peers]')") from None
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}[dtype]
        x, dy, ws = _inputs(b, t, f, "float32")
        to = lambda a, grad: torch.tensor(np.asarray(a), dtype=tdt, device=dev,
                                          requires_grad=grad)
        tx, tdy = to(x, True), to(dy, False)
        tw = {n: to(w, True) for n, w in ws.items()}
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run():
            q, k, v = ((tx @ tw[n]).view(b, t, heads, d).transpose(1, 2)
                       for n in ("W_q", "W_k", "W_v"))
            o = sdpa(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, f)
            y = o @ tw["W_o"]
            grads = torch.autograd.grad(y, [tx, *tw.values()], tdy)
            if dev == "cuda":
                torch.cuda.synchronize()
            return grads
        return run, ()

    blocks = {f"funnn manual chunked, block {n}": funnn_build("chunked", n)
              for n in (128, 1024) if n < t}
    return {
        "softmax(QK^T)V, jax.grad": jax_build("plain"),
        "jax dot_product_attention (xla)": jax_build("xla"),
        "jax dot_product_attention (cudnn)": jax_build("cudnn"),
        "funnn autodiff": funnn_build("autodiff"),
        "funnn manual chunked": funnn_build("chunked"),
        "funnn manual materialized": funnn_build("materialized"),
        "torch SDPA": torch_build,
    } | (blocks if dtype != "float32" else {})


def attention_suite(size: str) -> list[list[Case]]:
    """Self-attention forward + backward by sequence length (see the module docstring)."""
    seqs, heads, d, batch = _SIZES[size]
    gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if gpu and size == "full" else "float32"
    groups = []
    for t in seqs:
        b = batch or max(1, 16384 // t)          # about the same number of tokens per row
        name = f"attention causal {heads}x{d} seq {t} b{b} {dtype}"
        flops = attention_flops(b, t, heads, d)
        cases = []
        for impl, build in _case_builds(b, t, heads, d, dtype).items():
            torch_row = impl == "torch SDPA"
            cases.append(Case("attention", name, impl, b, dtype, build,
                              baseline=impl.startswith("softmax"), jit=not torch_row,
                              flops=flops, samples=b * t,
                              note="flops: nominal count (module docstring)"
                              if impl.startswith("softmax") else ""))
        groups.append(cases)
    return groups
