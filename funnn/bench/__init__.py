"""Benchmarks of what a device does with a network: engines, peers, the roofline.

``funnn bench`` and the scripts in ``benchmarks/`` call :func:`run`; :func:`steps` times
your own step functions the same way::

    report = bench.run(["engines", "peers"], quick=True, out_dir="bench-out")
    print(report["table"])          # also bench.json and roofline.png in out_dir

Each group's implementations run in rounds, in an order drawn from a recorded seed; the
baseline runs twice per round (the second time as a hidden A/A control, the group's noise
floor). A row's ratio is the median of its per-round ratios to the baseline with a 95%
bootstrap interval; rows whose interval is wider than ±10% are marked noisy. Training-step
FLOPs are hand counts (matrix products), other rows XLA's cost analysis, each labelled in
``flops_source``; fractions are of this device's *measured* peaks (and of a datasheet peak
where one is known). ``bench.compare`` compares two runs. Speed is never asserted in tests;
the harness and its statistics are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from funnn.bench import compare
from funnn.bench.ceilings import datasheet_peaks
from funnn.bench.env import finish
from funnn.bench.harness import (
    ROW_FIELDS,
    Case,
    NotApplicable,
    Unavailable,
    _check_counts,
    environment,
    fill_fraction,
    format_table,
    measure_peaks,
    run_group,
    timeit,
    write_outputs,
)
from funnn.bench.output import FORMAT, check_out_dir, group_summaries
from funnn.bench.suites import SIZES, SUITES, build

__all__ = ["run", "steps", "SUITES", "SIZES", "Case", "Unavailable", "NotApplicable",
           "run_group", "measure_peaks", "environment", "format_table", "write_outputs",
           "timeit", "ROW_FIELDS", "fill_fraction", "compare", "FORMAT", "DEFAULTS"]

DEFAULTS = {"tiny": (3, 1), "quick": (7, 3), "full": (11, 5)}
"""``(rounds, calls per round)`` by size."""


def _groups_report(groups: list[list[Case]], *, size: str, rounds: int, per_round: int,
                   seed: int, out_dir: str | None, overwrite: bool, progress: bool | None,
                   peaks: bool, timing: str, trace: str | None,
                   peak_tflops: float | None, extra_env: dict) -> dict:
    """Time ``groups`` and build the report (shared by :func:`run` and :func:`steps`)."""
    _check_counts(rounds, per_round, "bench")
    if out_dir:
        check_out_dir(out_dir, overwrite)          # before any timing
    env = environment() | extra_env
    env.update(size=size, rounds=rounds, per_round=per_round, seed=seed, timing=timing)
    total = sum((len(g) + 1) * (1 + rounds) for g in groups)
    trace_to = (trace, f"{out_dir or 'bench-trace'}/trace") if trace else None
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="bench", unit="step", leave=False,
              disable=None if progress is None else not progress) as bar:
        found_peaks = measure_peaks(size) if peaks else None
        rows: list[dict] = []
        for i, g in enumerate(groups):
            rows += run_group(g, rounds=rounds, per_round=per_round, seed=seed + i,
                              timing_mode=timing, trace=trace_to,
                              progress=lambda n: bar.update(n))
    sheet = datasheet_peaks(env["device"], peak_tflops)
    if found_peaks:
        fill_fraction(rows, found_peaks, sheet)
    env = finish(env)
    table = format_table(rows, env, found_peaks)
    files = write_outputs(out_dir, env, found_peaks, rows) if out_dir else []
    return {"format": FORMAT, "env": env, "peaks": found_peaks,
            "groups": group_summaries(rows), "results": rows, "table": table, "files": files}


def run(suites: Sequence[str] = ("engines",), *, quick: bool = False, size: str | None = None,
        out_dir: str | None = None, peers: Sequence[str] | None = None,
        rounds: int | None = None, per_round: int | None = None,
        progress: bool | None = None, peaks: bool = True, seed: int | None = None,
        overwrite: bool = False, timing: str = "auto", trace: str | None = None,
        peak_tflops: float | None = None) -> dict:
    """Run the named suites; return ``{"format", "env", "peaks", "groups", "results",
    "table", "files"}``.

    ``quick`` (``size="quick"``): small sizes, 7 rounds of 3 calls (a round's median of 3
    calls shrugs off one call the OS preempted; of 2 it would be their mean); default
    ``size="full"``: sizes for accelerators, 11 rounds of 5; ``size="tiny"``: the smallest
    shapes, 3 rounds of 1 (the tests). ``peers`` restricts the peer libraries. ``seed``
    draws the order within each round (default: from the clock; recorded in ``env``).
    With ``out_dir``, ``bench.json`` and ``roofline.png`` are written there; an existing
    ``bench.json`` is refused unless ``overwrite``. ``timing``: ``"auto"``, ``"per-call"``
    or ``"blocked"``. ``trace``: a profiler trace of the first row whose ``"name: impl"``
    contains it. ``peak_tflops``: a datasheet peak for MFU (else a table of known devices).
    """
    size = size or ("quick" if quick else "full")
    suites = list(suites)
    if not suites:
        from funnn.core import ConfigError
        raise ConfigError(f"bench: expected at least one suite; valid: {', '.join(SUITES)}",
                          ("bench",))
    groups = build(suites, size, list(peers) if peers is not None else None)
    r0, p0 = DEFAULTS.get(size, DEFAULTS["full"])
    seed = int(time.time()) % 2 ** 31 if seed is None else seed
    return _groups_report(groups, size=size, rounds=r0 if rounds is None else rounds,
                          per_round=p0 if per_round is None else per_round, seed=seed,
                          out_dir=out_dir, overwrite=overwrite, progress=progress, peaks=peaks,
                          timing=timing, trace=trace, peak_tflops=peak_tflops,
                          extra_env={"suites": suites})


def _builder(fn: Callable, args: tuple) -> Callable[[], tuple[Callable, tuple]]:
    return lambda: (fn, args)


def steps(fns: Mapping[str, Callable | tuple[Callable, tuple]], args: tuple = (), *,
          baseline: str | None = None, jit: bool = False,
          flops: float | Mapping[str, float] | None = None, name: str = "my step",
          batch: int = 1, dtype: str = "float32", rounds: int = 8, per_round: int = 3,
          seed: int = 0, out_dir: str | None = None, overwrite: bool = False,
          peaks: bool = False, progress: bool | None = False, timing: str = "auto",
          trace: str | None = None, peak_tflops: float | None = None) -> dict:
    """Time your own step functions as one group; the same report as :func:`run`.

    ``fns`` maps a name to ``fn`` (called as ``fn(*args)``) or to ``(fn, its_args)``.
    A ``jax.jit`` function is compiled and analysed ahead of time (FLOPs and bytes from XLA;
    a loop in it is flagged unless ``flops`` gives a count); ``jit=True`` jits plain
    functions first; other functions are timed as they are. ``baseline``: the name the
    others are compared with (default: the first). ``flops``: one count for all, or by name.
    ``peaks=True`` also measures this device's ceilings (a few seconds) for the roofline.
    """
    import jax

    if not fns:
        raise ValueError("bench.steps: expected at least one step function, got none")
    if baseline is not None and baseline not in fns:
        raise ValueError(f"bench.steps: baseline {baseline!r} is not one of {list(fns)}")
    cases = []
    for impl, item in fns.items():
        fn, fargs = item if isinstance(item, tuple) else (item, args)
        fn = jax.jit(fn) if jit and not hasattr(fn, "lower") else fn
        count = flops.get(impl) if isinstance(flops, Mapping) else flops
        cases.append(Case("steps", name, impl, batch, dtype, _builder(fn, tuple(fargs)),
                          baseline=impl == (baseline or next(iter(fns))),
                          jit=hasattr(fn, "lower"), flops=count))
    return _groups_report([cases], size="tiny" if not peaks else "quick", rounds=rounds,
                          per_round=per_round, seed=seed, out_dir=out_dir, overwrite=overwrite,
                          progress=progress, peaks=peaks, timing=timing, trace=trace,
                          peak_tflops=peak_tflops, extra_env={"suites": ["steps"]})
