"""The timing harness: interleaved rounds in random order, a hidden A/A control, intervals.

A benchmark group is a list of :class:`Case`\\ s, implementations of the same step
(funnn's engines, pure JAX, peers). :func:`run_group` prepares each one (compile timed on
its own, XLA's cost and memory analysis of the compiled program, a check that it trains),
warms it up, then times them in *rounds*: each round runs every implementation's calls once,
in an order drawn from a recorded seed, so drift on a noisy machine hits all of them alike
and no implementation always follows the same neighbour.

The baseline is timed twice per round, the second time as a hidden duplicate (the *A/A*
row): its ratio to the baseline should be 1, and its interval is the group's noise floor.
Each row keeps every sample and every round's median; its ratio is the median of its
per-round ratios with a bootstrap 95% interval (:mod:`funnn.bench.stats`).

XLA's cost analysis counts the body of a loop (``scan``, ``while``) once, not once per
trip; cases with loops give a hand count in ``Case.flops`` (the row says so in
``flops_source``), and a jitted step with a loop and no hand count gets a ``flops_flag``.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from funnn.bench import stats, timing
from funnn.bench.ceilings import fill_fraction, measure_peaks
from funnn.bench.env import environment
from funnn.bench.output import ROW_FIELDS, format_table, write_outputs
from funnn.core import ConfigError

__all__ = ["Case", "Unavailable", "NotApplicable", "run_group", "measure_peaks",
           "environment", "format_table", "write_outputs", "timeit", "interleave",
           "fill_fraction", "ROW_FIELDS", "AA_SUFFIX"]

AA_SUFFIX = " [A/A copy]"


class Unavailable(Exception):
    """An optional implementation cannot run here (a peer library is not installed)."""


class NotApplicable(Unavailable):
    """The implementation does not apply here (cuDNN on a CPU, 8 devices on one)."""


@dataclasses.dataclass
class Case:
    """One implementation of one benchmark.

    ``build()`` returns ``(fn, args)``: ``fn(*args)`` runs one step. With ``jit``,
    ``fn`` is a ``jax.jit`` function, compiled and analysed ahead of time; otherwise
    it is called as is (eager JAX, PyTorch) and its first call counts as compile.
    ``check(fn, args)`` (optional) raises if the implementation does not train.
    ``flops``: a hand count overriding XLA's (loops); ``flops_from``: take the FLOPs
    and bytes of another impl of the same group (a peer running the same architecture);
    ``bytes``: a hand count of bytes moved (a number, or a function computing it).
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
    bytes: float | Callable[[], float] | None = None   # a hand count (or its computation)


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
    if isinstance(err, NotApplicable):
        return f"not applicable: {err}"
    if isinstance(err, Unavailable):
        return f"not installed: {err}"
    if _is_oom(err):
        return "out of memory: skipped"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"error: {type(err).__name__}: {first[:160]}"


@dataclasses.dataclass
class _Prepared:
    case: Case
    impl: str = ""
    role: str = "row"                     # "baseline", "aa" (the hidden duplicate), "row"
    call: Callable | None = None
    args: tuple = ()
    compile_s: float | None = None
    flops: float | None = None
    bytes: float | None = None
    memory: int | None = None
    flops_source: str | None = None
    bytes_source: str | None = None
    flops_flag: str | None = None
    status: str = "ok"
    times: list = dataclasses.field(default_factory=list)
    rounds: list = dataclasses.field(default_factory=list)
    latency: list = dataclasses.field(default_factory=list)
    memory_peak: tuple = (None, None)
    trace: str | None = None


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


LOOP_FLAG = "the jitted body has a loop: XLA counts its body once; pass flops= for a true count"


def _compile(p: _Prepared, fn, args) -> None:
    lowered = fn.lower(*args)
    loop = "stablehlo.while" in lowered.as_text()
    compiled = lowered.compile()
    p.flops, p.bytes, p.memory = _analyse(compiled)
    p.flops_source = "xla"
    p.bytes_source = "xla (loop body counted once: a lower bound)" if loop else "xla"
    if loop and p.case.flops is None:
        p.flops_flag = LOOP_FLAG
    p.call = compiled


def _prepare(case: Case, warmup: int) -> _Prepared:
    p = _Prepared(case, impl=case.impl)
    try:
        fn, args = case.build()
        t0 = time.perf_counter()
        if case.jit:
            _compile(p, fn, args)
            p.compile_s = time.perf_counter() - t0
        else:
            jax.block_until_ready(fn(*args))
            p.compile_s = time.perf_counter() - t0
            p.call = fn
        if case.flops is not None:
            p.flops, p.flops_source = float(case.flops), "hand count"
        if case.bytes is not None:
            p.bytes = float(case.bytes() if callable(case.bytes) else case.bytes)
            p.bytes_source = "hand count"
        p.args = tuple(args)
        call: Any = p.call
        if case.check is not None:
            case.check(call, p.args)
        for _ in range(warmup):
            jax.block_until_ready(call(*p.args))
    except Exception as err:
        p.status, p.call = _status(err), None
    return p


def _check_counts(rounds: int, per_round: int, where: str) -> None:
    for name, v in (("rounds", rounds), ("per_round", per_round)):
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"{where}: expected {name} >= 1, got {v!r}", ("bench",))


def _time_rounds(live: list[_Prepared], rounds: int, per_round: int, how: str,
                 rng: random.Random, tick: Callable[[int], Any]) -> None:
    """Every live implementation's calls once per round, in an order drawn from ``rng``."""
    for _ in range(rounds):
        order = list(live)
        rng.shuffle(order)
        for p in order:
            if p.call is None:
                continue
            try:
                ts = timing.time_samples(p.call, p.args, per_round, how)
                if how == "blocked":
                    p.latency.append(timing.latency(p.call, p.args))
            except Exception as err:
                p.status, p.call = _status(err), None
                continue
            p.times += ts
            p.rounds.append(statistics.median(ts))
        tick(len(live))


def _borrow_counts(prepared: list[_Prepared]) -> None:
    """``flops_from``: FLOPs and bytes of another implementation in the same group."""
    by_impl = {p.impl: p for p in prepared}
    for p in prepared:
        src = by_impl.get(p.case.flops_from) if p.case.flops_from else None
        if src is None:
            continue
        label = f"from {src.impl}"
        if p.flops is None and src.flops is not None:
            p.flops = src.flops
            p.flops_source = label + (f" ({src.flops_source})" if src.flops_source else "")
        if p.bytes is None and src.bytes is not None:
            p.bytes = src.bytes
            p.bytes_source = label + (f" ({src.bytes_source})" if src.bytes_source else "")


def _pick_baseline(prepared: list[_Prepared]) -> tuple[_Prepared | None, str | None]:
    """The first ``baseline=True`` case that runs, else the first that runs; and a note
    when the intended baseline failed and the group was re-based."""
    ready = [p for p in prepared if p.call is not None]
    wanted = next((p for p in prepared if p.case.baseline), None)
    base = next((p for p in ready if p.case.baseline), ready[0] if ready else None)
    note = None
    if wanted is not None and base is not None and base is not wanted:
        note = (f"baseline {wanted.impl!r} did not run ({wanted.status}); "
                f"ratios are to {base.impl!r}")
    return base, note


def run_group(cases: Sequence[Case], *, rounds: int = 5, per_round: int = 5, warmup: int = 2,
              progress: Callable[[int], Any] | None = None, seed: int = 0,
              timing_mode: str = "auto", aa: bool = True,
              trace: tuple[str, str] | None = None, memory: bool = True) -> list[dict]:
    """Time ``cases`` in rounds of random order; one row per case (see ``ROW_FIELDS``).

    The baseline (the first ``baseline=True`` case that runs, else the first that runs) is
    timed a second time per round as a hidden duplicate, the A/A row (``aa=False`` leaves
    it out). ``seed`` draws each round's order. ``timing_mode``: ``"per-call"``,
    ``"blocked"`` or ``"auto"`` (:mod:`funnn.bench.timing`). ``trace=(pattern, dir)``
    writes a profiler trace of the row whose ``"name: impl"`` contains ``pattern``.
    An impl that fails (not installed, out of memory, an error) gets a row with its
    ``status`` and no timings; the others still run. ``progress(n)`` is called as work
    completes.
    """
    _check_counts(rounds, per_round, "run_group")
    how = timing.resolve_timing(timing_mode)
    tick = progress or (lambda n: None)
    prepared = []
    for c in cases:
        prepared.append(_prepare(c, warmup))
        tick(1)
    _borrow_counts(prepared)
    base, rebased = _pick_baseline(prepared)
    if base is not None:
        base.role = "baseline"
        if aa:
            prepared.append(dataclasses.replace(base, impl=base.impl + AA_SUFFIX, role="aa",
                                                times=[], rounds=[], latency=[]))
    live = [p for p in prepared if p.call is not None]
    _time_rounds(live, rounds, per_round, how, random.Random(seed), tick)
    for p in live:
        if p.call is not None and memory:
            p.memory_peak = timing.peak_memory(p.call, p.args)
        if trace and p.call is not None and p.role != "aa" and \
                trace[0] in f"{p.case.name}: {p.impl}":
            p.trace = timing.trace(p.call, p.args, trace[1])
            trace = None
    ok_base = base if base is not None and base.status == "ok" else None
    return [_row(p, ok_base, how, per_round, seed, rebased) for p in prepared]


def _timing_fields(p: _Prepared, how: str, per_round: int) -> dict:
    t = p.times
    return {"time_median_s": statistics.median(t), "time_iqr_s": stats.iqr(t),
            "time_min_s": min(t), "time_max_s": max(t), "n_samples": len(t),
            "n_rounds": len(p.rounds), "samples_s": list(t), "round_medians_s": list(p.rounds),
            "timing": how, "calls_per_sample": per_round if how == "blocked" else 1,
            "latency_median_s": statistics.median(p.latency) if p.latency else None}


def _row(p: _Prepared, base: _Prepared | None, how: str, per_round: int, seed: int,
         rebased: str | None) -> dict:
    c = p.case
    row: dict = dict.fromkeys(ROW_FIELDS)
    row.update(suite=c.suite, name=c.name, impl=p.impl, role=p.role, batch=c.batch,
               dtype=c.dtype, baseline=base.impl if base is not None else None,
               baseline_note=rebased, order_seed=seed, compile_s=p.compile_s,
               flops_per_call=p.flops, bytes_per_call=p.bytes, flops_source=p.flops_source,
               bytes_source=p.bytes_source, flops_flag=p.flops_flag,
               memory_compiled_bytes=p.memory, memory_peak_bytes=p.memory_peak[0],
               memory_peak_source=p.memory_peak[1], status=p.status, trace=p.trace,
               note=c.note or None)
    if not (p.times and p.status == "ok"):
        return row
    row.update(_timing_fields(p, how, per_round))
    med = row["time_median_s"]
    if p.role == "baseline":
        row.update(ratio_to_baseline=1.0, ratio_ci95=[1.0, 1.0], round_ratios=[1.0] * len(
            p.rounds), noisy=None)
    elif base is not None and len(base.rounds) == len(p.rounds):
        s = stats.ratio_summary(p.rounds, base.rounds, seed)
        row.update(ratio_to_baseline=s["ratio"], ratio_ci95=s["ratio_ci95"],
                   round_ratios=s["round_ratios"], noisy=s["noisy"],
                   verdict=stats.verdict(*s["ratio_ci95"]))
    if p.flops:
        row["achieved_flops_per_s"] = p.flops / med
    if p.flops and p.bytes:
        row["intensity"] = p.flops / p.bytes
    if c.samples:
        row["samples_per_s"] = c.samples / med
    return row
