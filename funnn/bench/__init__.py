"""Benchmarks of what a device does with a network: engines, peers, the roofline.

``funnn bench`` and the scripts in ``benchmarks/`` call :func:`run`::

    report = bench.run(["engines", "peers"], quick=True, out_dir="bench-out")
    print(report["table"])          # also bench.json and roofline.png in out_dir

Figures are medians of interleaved rounds in one process, ratios to the group's
baseline (pure JAX where there is one), FLOPs and bytes from XLA's cost analysis
(hand counts where loops hide them), and fractions of this device's *measured*
peaks. Speed is never asserted in tests; the harness itself is tested.
"""

from __future__ import annotations

from collections.abc import Sequence

from funnn.bench.harness import (
    ROW_FIELDS,
    Case,
    Unavailable,
    environment,
    fill_fraction,
    format_table,
    measure_peaks,
    run_group,
    timeit,
    write_outputs,
)
from funnn.bench.suites import SIZES, SUITES, build

__all__ = ["run", "SUITES", "SIZES", "Case", "Unavailable", "run_group", "measure_peaks",
           "environment", "format_table", "write_outputs", "timeit", "ROW_FIELDS",
           "fill_fraction"]


def run(suites: Sequence[str] = ("engines",), *, quick: bool = False, size: str | None = None,
        out_dir: str | None = None, peers: Sequence[str] | None = None,
        rounds: int | None = None, per_round: int | None = None,
        progress: bool | None = None, peaks: bool = True) -> dict:
    """Run the named suites; return ``{"env", "peaks", "results", "table", "files"}``.

    ``quick`` (``size="quick"``): small sizes, 3 rounds of 3 calls, under 2 minutes
    on a 2-core CPU; default ``size="full"``: sizes for accelerators, 7 rounds of 5;
    ``size="tiny"``: the smallest shapes, one round (the tests use it). ``peers``
    restricts the peer libraries (names in ``funnn.bench.peers.PEERS``). With
    ``out_dir``, ``bench.json`` and ``roofline.png`` are written there.
    """
    size = size or ("quick" if quick else "full")
    groups = build(suites, size, list(peers) if peers is not None else None)
    rounds = rounds or {"tiny": 1, "quick": 3, "full": 7}[size]
    per_round = per_round or {"tiny": 1, "quick": 3, "full": 5}[size]
    env = environment()
    env.update(size=size, rounds=rounds, per_round=per_round, suites=list(suites))
    total = sum(len(g) * (1 + rounds) for g in groups)
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="bench", unit="step", leave=False,
              disable=None if progress is None else not progress) as bar:
        found_peaks = measure_peaks(size) if peaks else None
        rows = []
        for g in groups:
            rows += run_group(g, rounds=rounds, per_round=per_round,
                              progress=lambda n: bar.update(n))
    if found_peaks:
        fill_fraction(rows, found_peaks)
    table = format_table(rows, env, found_peaks)
    files = write_outputs(out_dir, env, found_peaks, rows) if out_dir else []
    return {"env": env, "peaks": found_peaks, "results": rows, "table": table, "files": files}
