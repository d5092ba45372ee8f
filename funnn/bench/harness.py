"""The timing harness: honest medians, the device's own limits, and the roofline.

A benchmark group is a list of :class:`Case`\\ s, implementations of the same step
(funnn's engines, pure JAX, peers). :func:`run_group` prepares each one (compile
timed on its own, XLA's cost and memory analysis of the compiled program, a check
that it trains), warms it up, then times them in *interleaved* rounds, so drift
on a noisy machine hits every implementation alike, and reports the median, min
and max with ratios to the group's baseline, all from one process.

:func:`measure_peaks` measures this device's ceilings in the same run: matmul
FLOP/s per dtype (float32 at XLA's default and at highest precision, bfloat16)
and memory bandwidth (a large elementwise pass). Each row then reads as a point
on the roofline: achieved FLOP/s, its fraction of the peak for its dtype, and
arithmetic intensity (FLOPs per byte accessed).

XLA's cost analysis counts the body of a loop (``scan``, ``while``) once, not
once per trip; cases with loops give a hand count in ``Case.flops`` instead and
say so in ``flops_source``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from funnn import core

__all__ = ["Case", "Unavailable", "run_group", "measure_peaks", "environment", "format_table",
           "write_outputs", "timeit", "interleave", "fill_fraction", "ROW_FIELDS"]

ROW_FIELDS = ("suite", "name", "impl", "batch", "dtype", "median_s", "min_s", "max_s",
              "flops", "bytes", "flops_source", "achieved_flops_per_s", "fraction_of_peak",
              "intensity", "ratio", "compile_s", "memory_bytes", "samples_per_s", "status",
              "note")


class Unavailable(Exception):
    """An optional implementation cannot run here (a peer library is not installed)."""


@dataclasses.dataclass
class Case:
    """One implementation of one benchmark.

    ``build()`` returns ``(fn, args)``: ``fn(*args)`` runs one step. With ``jit``,
    ``fn`` is a ``jax.jit`` function, compiled and analysed ahead of time; otherwise
    it is called as is (eager JAX, PyTorch) and its first call counts as compile.
    ``check(fn, args)`` (optional) raises if the implementation does not train.
    ``flops``: a hand count overriding XLA's (loops); ``flops_from``: take the FLOPs
    of another impl of the same group (a peer running the same architecture).
    """

    suite: str
    name: str
    impl: str
    batch: int
    dtype: str
    build: Callable[[], tuple[Callable, tuple]]
    baseline: bool = False
    jit: bool = True
    flops: float | None = None
    flops_from: str | None = None
    check: Callable | None = None
    samples: int | None = None      # examples processed per call, for samples/s
    note: str = ""


def environment() -> dict:
    """The versions, device and settings the figures were measured on."""
    try:
        d = jax.devices()[0]
        device = f"{d.device_kind} ({d.platform})"
    except RuntimeError as err:
        device = f"unavailable ({err})"
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device": device,
           "device_count": jax.device_count(), "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "x64": bool(getattr(jax.config, "jax_enable_x64", False)),
           "default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision",
                                                   None)),
           # what funnn.jit adds for this backend (the steps and the JAX baselines use it)
           "xla_compiler_options": core.compiler_options()}
    for mod in ("optax", "flax", "equinox", "torch"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def _sync(out) -> None:
    jax.block_until_ready(out)


def timeit(fn: Callable, *args, repeats: int = 50, warmup: int = 3) -> dict:
    """Median, min and max seconds of ``fn(*args)`` after ``warmup`` calls (one impl alone).

    The first call is timed on its own as ``first`` (compile plus one run).
    """
    t0 = time.perf_counter()
    _sync(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        _sync(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _sync(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "first": first, "repeats": repeats}


def interleave(runs: dict[str, Callable[[], Any]], rounds: int, repeats: int,
               warmup: int = 3) -> tuple[dict, dict]:
    """Time zero-argument ``runs`` in interleaved rounds (each must block until done).

    Returns ``(times, round_medians)``: every call's seconds and each round's median, by name.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict = {k: [] for k in runs}
    round_medians: dict = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t0)
            times[k] += ts
            round_medians[k].append(statistics.median(ts))
    return times, round_medians


def _is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
        "out of memory" in text.lower()


def _status(err: BaseException) -> str:
    if isinstance(err, Unavailable):
        return f"not installed: {err}"
    if _is_oom(err):
        return "out of memory: skipped"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"error: {type(err).__name__}: {first[:160]}"


@dataclasses.dataclass
class _Prepared:
    case: Case
    call: Callable | None = None
    args: tuple = ()
    compile_s: float | None = None
    flops: float | None = None
    bytes: float | None = None
    memory: int | None = None
    flops_source: str | None = None
    status: str = "ok"
    times: list = dataclasses.field(default_factory=list)


def _analyse(compiled) -> tuple:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    flops = cost.get("flops")
    nbytes = cost.get("bytes accessed")
    memory = None
    try:
        m = compiled.memory_analysis()
        memory = int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                     - m.alias_size_in_bytes)
    except (AttributeError, TypeError, RuntimeError):
        pass
    return (float(flops) if flops is not None and flops > 0 else None,
            float(nbytes) if nbytes is not None and nbytes > 0 else None, memory)


def _prepare(case: Case, warmup: int) -> _Prepared:
    p = _Prepared(case)
    try:
        fn, args = case.build()
        t0 = time.perf_counter()
        if case.jit:
            jitted: Any = fn
            compiled = jitted.lower(*args).compile()
            p.compile_s = time.perf_counter() - t0
            p.flops, p.bytes, p.memory = _analyse(compiled)
            p.flops_source = "xla"
            p.call = compiled
        else:
            _sync(fn(*args))
            p.compile_s = time.perf_counter() - t0
            p.call = fn
        if case.flops is not None:   # a loop: XLA's bytes count its body once too
            p.flops, p.bytes, p.flops_source = float(case.flops), None, "hand count"
        p.args = tuple(args)
        if case.check is not None:
            case.check(p.call, p.args)
        for _ in range(warmup):
            _sync(p.call(*p.args))
    except Exception as err:
        p.status, p.call = _status(err), None
    return p


def run_group(cases: Sequence[Case], *, rounds: int = 5, per_round: int = 5, warmup: int = 2,
              progress: Callable[[int], Any] | None = None) -> list[dict]:
    """Time ``cases`` in interleaved rounds; one row per case (see ``ROW_FIELDS``).

    ``ratio`` is each median over the baseline case's (the first ``baseline=True``
    case that ran, else the first that ran). An impl that fails (not installed,
    out of memory, an error) gets a row with its ``status`` and no timings; the
    others still run. ``progress(n)`` is called as work completes.
    """
    tick = progress or (lambda n: None)
    prepared = []
    for c in cases:
        prepared.append(_prepare(c, warmup))
        tick(1)
    live = [p for p in prepared if p.call is not None]
    for _ in range(rounds):
        for p in live:
            if p.call is None:
                continue
            try:
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    _sync(p.call(*p.args))
                    p.times.append(time.perf_counter() - t0)
            except Exception as err:
                p.status, p.call = _status(err), None
        tick(len(live))
    by_impl = {p.case.impl: p for p in prepared}
    for p in prepared:
        src = by_impl.get(p.case.flops_from) if p.case.flops_from else None
        if src is not None and p.flops is None:
            p.flops, p.bytes = src.flops, src.bytes
            p.flops_source = f"from {src.case.impl}" + (f" ({src.flops_source})"
                                                       if src.flops_source else "")
    timed = [p for p in prepared if p.times and p.status == "ok"]
    base = next((p for p in timed if p.case.baseline), timed[0] if timed else None)
    base_med = statistics.median(base.times) if base is not None else None
    return [_row(p, base_med) for p in prepared]


def _row(p: _Prepared, base_med: float | None) -> dict:
    c = p.case
    row: dict = dict.fromkeys(ROW_FIELDS)
    row.update(suite=c.suite, name=c.name, impl=c.impl, batch=c.batch, dtype=c.dtype,
               compile_s=p.compile_s, flops=p.flops, bytes=p.bytes, memory_bytes=p.memory,
               flops_source=p.flops_source, status=p.status, note=c.note or None)
    if p.times and p.status == "ok":
        med = statistics.median(p.times)
        row.update(median_s=med, min_s=min(p.times), max_s=max(p.times),
                   ratio=med / base_med if base_med else None)
        if p.flops:
            row["achieved_flops_per_s"] = p.flops / med
        if p.flops and p.bytes:
            row["intensity"] = p.flops / p.bytes
        if c.samples:
            row["samples_per_s"] = c.samples / med
    return row


# --------------------------------------------------------------------------- peaks


def _peak_matmul(n: int, dtype, precision, repeats: int) -> float:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    return 2.0 * n ** 3 / timeit(f, a, b, repeats=repeats, warmup=2)["min"]


def measure_peaks(size: str = "full") -> dict:
    """This device's measured ceilings: matmul FLOP/s per dtype and bytes/s of memory.

    A peak is the best of its repeats (the ceiling, not the typical), so on a busy
    machine a row's median can still come close to it.
    Sizes: 8192 square matmuls and a 1 GB array read and written once on an
    accelerator at ``size="full"``; 1024 and 64 MB on a CPU or at ``quick``;
    256 and 4 MB at ``tiny`` (tests).
    """
    small = size != "full" or jax.default_backend() == "cpu"
    n, reps = (256, 2) if size == "tiny" else (1024, 5) if small else (8192, 20)
    hi = jax.lax.Precision.HIGHEST
    peaks = {"matmul_size": n,
             "float32": _peak_matmul(n, jnp.float32, None, reps),
             "float32_highest": _peak_matmul(n, jnp.float32, hi, reps),
             "bfloat16": _peak_matmul(n, jnp.bfloat16, None, reps)}
    count = (1 if size == "tiny" else 16 if small else 256) * 2 ** 20   # float32 elements
    x = jnp.ones((count,), jnp.float32)
    f = jax.jit(lambda x: x * 2.0)
    best = timeit(f, x, repeats=reps, warmup=2)["min"]
    peaks["bandwidth_bytes_per_s"] = 2.0 * 4 * count / best
    peaks["bandwidth_array_bytes"] = 4 * count
    return peaks


def fill_fraction(rows: list[dict], peaks: dict) -> None:
    """Set each row's ``fraction_of_peak`` from its achieved FLOP/s and its dtype's peak."""
    for r in rows:
        peak = peaks.get(r.get("dtype") or "")
        if r.get("achieved_flops_per_s") and peak:
            r["fraction_of_peak"] = r["achieved_flops_per_s"] / peak


# --------------------------------------------------------------------------- output


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else format(v, spec)


def format_table(rows: list[dict], env: dict | None = None, peaks: dict | None = None) -> str:
    """A plain-text table grouped by benchmark, with the environment and peaks on top."""
    lines = []
    if env:
        lines.append(f"{env['device']}; jax {env['jax']}"
                     + "".join(f", {m} {env[m]}" for m in ("flax", "equinox", "torch")
                               if env.get(m)))
    if peaks:
        lines.append(f"measured peaks: float32 {peaks['float32'] / 1e9:.1f} GFLOP/s "
                     f"(highest precision {peaks['float32_highest'] / 1e9:.1f}), bfloat16 "
                     f"{peaks['bfloat16'] / 1e9:.1f} GFLOP/s, memory "
                     f"{peaks['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    lines.append("medians of interleaved rounds; ratio to the group's first row marked *")
    w = max([26] + [len(r["impl"]) + 1 for r in rows])
    head = (f"  {'impl':<{w}}{'median ms':>11}{'min ms':>9}{'ratio':>7}{'GFLOP/s':>10}"
            f"{'% peak':>8}{'FLOP/B':>8}{'compile s':>10}  status")
    group = None
    for r in rows:
        if (r["suite"], r["name"]) != group:
            group = (r["suite"], r["name"])
            lines += ["", f"[{r['suite']}] {r['name']}", head]
        ms = None if r["median_s"] is None else 1e3 * r["median_s"]
        mn = None if r["min_s"] is None else 1e3 * r["min_s"]
        gf = None if r["achieved_flops_per_s"] is None else r["achieved_flops_per_s"] / 1e9
        pk = None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"]
        mark = "*" if r["ratio"] is not None and abs(r["ratio"] - 1.0) < 1e-12 else " "
        status = r["status"] if r["status"] != "ok" else (
            f"{r['samples_per_s']:.0f} samples/s" if r.get("samples_per_s") else "")
        lines.append(f"{mark} {r['impl']:<{w}}{_fmt(ms, '.3f'):>11}{_fmt(mn, '.3f'):>9}"
                     f"{_fmt(r['ratio'], '.2f'):>7}{_fmt(gf, '.2f'):>10}{_fmt(pk, '.1f'):>8}"
                     f"{_fmt(r['intensity'], '.1f'):>8}{_fmt(r['compile_s'], '.2f'):>10}  "
                     f"{status}")
    return "\n".join(lines)


def write_outputs(out_dir: str, env: dict, peaks: dict | None, rows: list[dict]) -> list[str]:
    """Write ``bench.json`` (env, peaks, results) and, with matplotlib, ``roofline.png``."""
    from funnn import _files

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.json")
    _files.write_json(path, {"format": "funnn.bench/1", "env": env, "peaks": peaks,
                             "results": rows})
    written = [path]
    png = os.path.join(out_dir, "roofline.png")
    if peaks and _roofline(png, peaks, rows):
        written.append(png)
    return written


def _roofline(path: str, peaks: dict, rows: list[dict]) -> bool:
    from funnn import _files

    plt = _files.pyplot()
    if plt is None:
        return False

    pts = [r for r in rows if r.get("intensity") and r.get("achieved_flops_per_s")]
    lo = min([r["intensity"] for r in pts] + [0.1]) / 2
    hi = max([r["intensity"] for r in pts] + [1000.0]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    bw = peaks["bandwidth_bytes_per_s"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("float32", "-"), ("bfloat16", "--")):
        ax.plot(xs, [min(peaks[key], bw * x) for x in xs], style, color="k",
                label=f"{key} ceiling ({peaks[key] / 1e9:.0f} GFLOP/s, {bw / 1e9:.0f} GB/s)")
    for i, r in enumerate(pts):
        ax.scatter(r["intensity"], r["achieved_flops_per_s"], s=18, color=f"C{i % 10}",
                   label=f"{r['name']}: {r['impl']}"[:60])
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)",
           ylabel="achieved FLOP/s", title="roofline (measured ceilings)")
    ax.legend(fontsize=5, loc="lower right", ncol=2)
    fig.tight_layout()
    _files.write_figure(path, fig, dpi=110)
    return True
