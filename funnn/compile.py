"""Compiling: :func:`jit` (``jax.jit`` with the XLA options funnn compiles its steps with),
:func:`compiler_options`, and :func:`jit_reusing` (a jitted function that can write its result
into the buffers of a previous one)."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import jax
import jaxlib
import numpy as np

__all__ = ["compiler_options", "jit", "jit_reusing"]


# XLA options funnn compiles its steps with, per backend, each chosen by measurement.
#
# CPU: XLA (jaxlib 0.10) hands convolutions, matrix products and reductions to the YNNPACK
# library by default. Its convolutions are the slow ones on a 2-core x86 CPU: the 32->64 3x3
# convolution of the digits CNN (batch 128, 14x14) takes 4.6 ms forward and 9.3 ms for the
# kernel gradient, against 2.6 and 3.6 ms in XLA's own (Eigen) convolution; a 64->64 layer at
# 32x32 is 23 / 66 ms against 13 / 33 ms. Of eleven shapes measured (1-3 spatial dims,
# stride, dilation, groups, bfloat16), YNNPACK won only the 1-channel forward (0.7 vs 2.0 ms)
# and the depthwise one (10 vs 14 ms). So funnn keeps YNNPACK for matrix products and
# reductions and lets XLA run convolutions (figures and commands: README, "CPU"). The value
# is jaxlib 0.10's default list less convolutions (the option replaces the whole list), so
# it applies to the jaxlib series it was measured on; other versions compile with XLA's
# defaults until measured (``benchmarks/cnn_cpu.py`` shows the difference).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
_CPU_OPTIONS_JAXLIB = ((0, 10),)                 # (major, minor) series measured


@functools.cache
def _jaxlib_series() -> tuple:
    return tuple(int(p) for p in jaxlib.__version__.split(".")[:2])


@functools.cache
def _accepted(options: tuple) -> bool:
    """Whether this jaxlib compiles with ``options`` (an older or newer XLA may not know them)."""
    if "compiler_options" not in inspect.signature(jax.jit).parameters:
        return False
    try:
        jax.jit(lambda v: v + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except Exception:        # an unknown option or value: compile with XLA's defaults instead
        return False
    return True


def compiler_options(backend: str | None = None) -> dict:
    """The XLA options funnn compiles its jitted steps with on ``backend`` (default: JAX's
    default backend): on CPU, convolutions run in XLA's own kernels rather than YNNPACK's
    (measured above); elsewhere none. Empty on a jaxlib series not yet measured (0.10 is),
    where this jaxlib does not accept the option, or where ``XLA_FLAGS`` already sets it
    (the user's choice wins). Pass it to ``jax.jit`` as
    ``compiler_options=`` for functions you jit yourself, or use :func:`jit`.
    """
    backend = backend or jax.default_backend()
    if (backend != "cpu" or "ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")
            or _jaxlib_series() not in _CPU_OPTIONS_JAXLIB):
        return {}
    return dict(_CPU_OPTIONS) if _accepted(tuple(sorted(_CPU_OPTIONS.items()))) else {}


def jit(fun: Callable, **kwargs: Any) -> Any:
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` for the default backend
    (``compiler_options=`` given here are added to them and win). funnn's training epochs,
    evaluation and benchmarks compile through this; the result is an ordinary jitted function
    (``.lower``, donation and shardings as ``jax.jit``)."""
    options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    if options:
        kwargs["compiler_options"] = options
    return jax.jit(fun, **kwargs)


def jit_reusing(f):
    """:func:`funnn.jit` of ``f`` that can write its result into the buffers of a previous result.

    ``g = jit_reusing(f)``; ``g(*args)`` is ``funnn.jit(f)(*args)``; ``g(*args, out=prev)``
    donates ``prev`` (a result of an earlier call, same shapes) and XLA writes the new result
    into its memory, so ``prev`` is consumed and must not be used again. This matters for
    per-example gradients, whose result is large (``B`` copies of every weight): the 784-512-
    512-10 MLP at batch 128 returns 270 MB, and a fresh buffer of that size is a fresh
    ``mmap`` that the kernel must zero and fault in on every call (measured on a 2-core CPU:
    writing a 205 MB outer product 49 ms into fresh memory, 7.7 ms into a reused buffer).
    """
    fresh = jit(f)
    # keep_unused: the previous result is not read, but it must reach XLA to be aliased
    into = jit(lambda prev, *args, **kwargs: f(*args, **kwargs), donate_argnums=0,
               keep_unused=True)

    def g(*args, out=None, **kwargs):
        return fresh(*args, **kwargs) if out is None else into(out, *args, **kwargs)

    return g
