"""Timing one implementation: per call or in blocks, its peak memory, a profiler trace.

Two ways to time ``calls`` calls of a step:

- ``"per-call"``: ``perf_counter`` -> call -> wait for the result, each call alone. On a CPU
  the step runs in the calling thread anyway, and every sample is one call.
- ``"blocked"``: ``perf_counter`` -> ``calls`` calls dispatched back to back -> wait for all
  of them; one sample is the block's time over ``calls`` (as ``torch.utils.benchmark``'s
  ``blocked_autorange`` does). On an accelerator a sub-millisecond step otherwise measures
  dispatch latency, not throughput; the per-call latency is then reported on its own.

Peak memory: on a GPU ``device.memory_stats()["peak_bytes_in_use"]`` (the process's peak so
far, as the backend reports it); on a Linux CPU the process's resident high-water mark is
reset (``/proc/self/clear_refs``), one call runs, and the new high-water mark above the
resident size before the call is the step's transient peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

__all__ = ["TIMINGS", "resolve_timing", "time_samples", "latency", "peak_memory", "trace"]

TIMINGS = ("auto", "per-call", "blocked")


def resolve_timing(timing: str) -> str:
    """``"auto"``: blocked on an accelerator, per call on a CPU."""
    if timing not in TIMINGS:
        raise ValueError(f"timing: expected one of {', '.join(TIMINGS)}, got {timing!r}")
    if timing == "auto":
        return "per-call" if jax.default_backend() == "cpu" else "blocked"
    return timing


def time_samples(call: Callable, args: tuple, calls: int, timing: str) -> list[float]:
    """Seconds per call of ``calls`` calls: one sample per call, or one for the block."""
    if timing == "blocked":     # waits for the last result: one stream runs calls in order
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call(*args)   # earlier results are dropped: a step may donate its buffers
        jax.block_until_ready(out)
        return [(time.perf_counter() - t0) / calls]
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(call(*args))
        out.append(time.perf_counter() - t0)
    return out


def latency(call: Callable, args: tuple) -> float:
    """Seconds of one call waited for on its own (dispatch included)."""
    t0 = time.perf_counter()
    jax.block_until_ready(call(*args))
    return time.perf_counter() - t0


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(call: Callable, args: tuple) -> tuple[int | None, str | None]:
    """``(bytes, source)`` of the peak memory of one call, or ``(None, None)`` where the
    backend reports none."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        jax.block_until_ready(call(*args))
        stats = dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return (int(peak), "device peak_bytes_in_use (process peak so far)") if peak \
            else (None, None)
    before = _status_kb("VmRSS")
    if before is None or not _reset_high_water():
        return None, None
    jax.block_until_ready(call(*args))
    hwm = _status_kb("VmHWM")
    if hwm is None:
        return None, None
    return max(0, hwm - before), "cpu: resident high-water mark above the resident size before"


def trace(call: Callable, args: tuple, path: str, calls: int = 3) -> str:
    """Write a ``jax.profiler`` trace of ``calls`` calls to ``path`` (Perfetto, TensorBoard)."""
    with jax.profiler.trace(path):
        for _ in range(calls):
            jax.block_until_ready(call(*args))
    return path
