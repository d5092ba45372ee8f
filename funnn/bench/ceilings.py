"""This device's ceilings, measured honestly, and each row's place under them.

FLOP/s: the best matmul rate over several sizes and repeats per dtype (a ceiling is the
best seen, not the typical). On a CPU ``float32`` and ``float32_highest`` are one figure
(XLA's CPU matmul has one precision), measured once and reported under both keys.

Bandwidth: ``x * -1`` into its own donated buffer, calls chained in blocks between
synchronisations, so no fresh output is allocated per call (allocation was what the
earlier figure measured); bytes are one read and one write. A read-only reduction
(``sum(x)``) is the second figure.

A row's ``fraction_of_measured_peak`` above 1 is never a fact: the row gets a
``peak_flag`` naming the likely cause. An optional datasheet peak (``peak_tflops`` or the
small table of known devices below) gives ``mfu`` beside it, labelled with its source.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

__all__ = ["measure_peaks", "fill_fraction", "datasheet_peaks", "DATASHEET"]

DATASHEET = {   # dense (no sparsity) peak TFLOP/s by device-kind substring, first match wins
    "H100 PCIe": {"float32": 51.0, "bfloat16": 756.0},
    "H100": {"float32": 67.0, "bfloat16": 989.0},
    "H200": {"float32": 67.0, "bfloat16": 989.0},
    "A100": {"float32": 19.5, "bfloat16": 312.0},
    "L4": {"float32": 30.3, "bfloat16": 121.0},
}


def _best_rate(f, arg, work: float, repeats: int, block: int) -> float:
    """``work / seconds`` of the fastest block of ``block`` chained calls (``f`` maps its
    argument to a new one of the same shape)."""
    x = f(arg)
    jax.block_until_ready(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(block):
            x = f(x)
        jax.block_until_ready(x)
        best = min(best, (time.perf_counter() - t0) / block)
    return work / best


def probe_options(xla_flags: str) -> dict:
    """Compile options of the ceiling probes. They measure the machine, not a setting: they
    compile with XLA's own defaults (backend optimisation level 3, the CPU fusion emitters)
    even where ``XLA_FLAGS`` changes them for the program under test (the test suite compiles
    at level 0, where an unvectorised copy runs at a sixth of the bandwidth, and with the older
    CPU loop emitters). The emitter option is named only where ``XLA_FLAGS`` names it, so an
    XLA that predates it is never handed it."""
    opts: dict = {"xla_backend_optimization_level": 3}
    if "xla_cpu_use_fusion_emitters" in xla_flags:
        opts["xla_cpu_use_fusion_emitters"] = True
    return opts


_PROBE = probe_options(os.environ.get("XLA_FLAGS", ""))


def _matmul_peak(sizes, dtype, precision, repeats: int) -> float:
    best = 0.0
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.random.normal(ka, (n, n), dtype)
        b = (jax.random.normal(kb, (n, n), jnp.float32) / n ** 0.5).astype(dtype)
        f = jax.jit(lambda a, b=b: jnp.matmul(a, b, precision=precision),
                    compiler_options=_PROBE)
        best = max(best, _best_rate(f, a, 2.0 * n ** 3, repeats, block=2 if n >= 1024 else 8))
    return best


def _bandwidth(count: int, repeats: int) -> tuple[float, float]:
    x = jnp.ones((count,), jnp.float32)
    flip = jax.jit(lambda x: x * -1.0, donate_argnums=0, compiler_options=_PROBE)
    copy_rate = _best_rate(flip, x, 2.0 * 4 * count, repeats, block=4)
    y = jnp.ones((count,), jnp.float32)
    read = jax.jit(lambda y: jnp.sum(y), compiler_options=_PROBE)
    jax.block_until_ready(read(y))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [read(y) for _ in range(4)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t0) / 4)
    return copy_rate, 4.0 * count / best


def measure_peaks(size: str = "full") -> dict:
    """This device's measured ceilings: matmul FLOP/s per dtype and bytes/s of memory.

    Sizes: matmuls of 2048 to 8192 on an accelerator at ``size="full"``, 256 to 1024 on a
    CPU or at ``quick``, 128 and 256 at ``tiny`` (tests); arrays of 1 GB, 64 MB, 16 MB.
    """
    cpu = jax.default_backend() == "cpu"
    small = size != "full" or cpu
    sizes, reps = ((128, 256), 3) if size == "tiny" else \
        ((256, 512, 1024), 5) if small else ((2048, 4096, 8192), 10)
    hi = jax.lax.Precision.HIGHEST
    f32 = _matmul_peak(sizes, jnp.float32, None, reps)
    peaks = {"matmul_sizes": list(sizes), "float32": f32,
             "float32_highest": f32 if cpu else _matmul_peak(sizes, jnp.float32, hi, reps),
             "float32_note": "one figure on a CPU (one matmul precision)" if cpu else
             "float32 at XLA's default precision; float32_highest at Precision.HIGHEST",
             "bfloat16": _matmul_peak(sizes, jnp.bfloat16, None, reps)}
    count = (4 if size == "tiny" else 16 if small else 256) * 2 ** 20   # float32 elements
    copy_rate, read_rate = _bandwidth(count, reps)
    peaks.update(bandwidth_bytes_per_s=copy_rate, bandwidth_read_bytes_per_s=read_rate,
                 bandwidth_array_bytes=4 * count,
                 bandwidth_note="x * -1 into its donated buffer (read + write); "
                                "read-only: sum(x)")
    return peaks


def datasheet_peaks(device_kind: str, peak_tflops: float | None = None) -> dict | None:
    """Datasheet FLOP/s per dtype: ``peak_tflops`` for every dtype when given, else the
    table's entry for ``device_kind`` (None when unknown). Carries its ``source``."""
    if peak_tflops is not None:
        if not peak_tflops > 0:
            raise ValueError(f"peak_tflops: expected a positive number, got {peak_tflops}")
        return {"float32": peak_tflops * 1e12, "bfloat16": peak_tflops * 1e12,
                "source": f"--peak-tflops {peak_tflops:g}"}
    for key, table in DATASHEET.items():
        if key in device_kind:
            return {k: v * 1e12 for k, v in table.items()} | {"source": f"datasheet {key}"}
    return None


def _flag(row: dict) -> str:
    src = row.get("flops_source") or ""
    if "nominal" in (row.get("note") or "") or src.startswith("hand"):
        return ("above the measured peak: the FLOP count is by hand and may count work the "
                "compiled step skips, or the peak was under-measured on a noisy machine")
    return "above the measured peak: the peak was under-measured (a noisy or too small peak run)"


def fill_fraction(rows: list[dict], peaks: dict, datasheet: dict | None = None) -> None:
    """Set each row's ``fraction_of_measured_peak`` (flagged above 1) and, with a
    ``datasheet``, its ``mfu`` against the datasheet peak for its dtype."""
    for r in rows:
        rate = r.get("achieved_flops_per_s")
        peak = peaks.get(r.get("dtype") or "")
        if rate and peak:
            r["fraction_of_measured_peak"] = rate / peak
            if rate > peak:
                r["peak_flag"] = _flag(r)
        sheet = (datasheet or {}).get(r.get("dtype") or "")
        if rate and sheet and datasheet is not None:
            r["mfu"], r["mfu_source"] = rate / sheet, datasheet["source"]
