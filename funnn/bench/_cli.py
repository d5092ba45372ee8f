"""The ``funnn bench`` command line: its arguments and what it does with them.

``funnn bench [--suite ...] [--quick] [--out DIR] ...`` runs suites;
``funnn bench compare OLD NEW [--fail-above 5%]`` compares two runs (exit 1 on a regression).
Kept here, beside the harness, so that ``funnn/cli.py`` only wires the subcommand in.
"""

from __future__ import annotations

import argparse

from funnn.core import ConfigError

__all__ = ["add", "suite_names", "main", "SUITE_HELP"]

SUITE_HELP = ("engines, peers, jit, per-example, control, epoch, parallel (1, 2, 4, 8 devices; "
              "on a CPU, 8 simulated ones), attention, roofline, or all")


def add(b: argparse.ArgumentParser, positive_int) -> None:
    """The arguments of ``funnn bench`` (and of ``funnn bench compare OLD NEW``)."""
    b.add_argument("compare", nargs="*", metavar="compare OLD NEW",
                   help="compare two runs (bench.json files or the folders holding them): "
                        "each matched row's change with its 95%% interval; exit 1 when a row "
                        "is slower beyond --fail-above with confidence")
    b.add_argument("--fail-above", default="5%", metavar="PCT",
                   help="compare: the slow-down that fails, e.g. 5%% (default)")
    b.add_argument("--by", default="ratio", choices=["ratio", "time"],
                   help="compare: per-round ratios to each group's baseline (default; robust "
                        "to machine load) or seconds per call")
    b.add_argument("--suite", default="engines",
                   help=f"comma-separated: {SUITE_HELP} (default: engines)")
    b.add_argument("--quick", action="store_true",
                   help="small sizes, 7 rounds of 3 calls (the six README suites in under "
                        "3 minutes on a 2-core CPU); the default sizes are for accelerators")
    b.add_argument("--peers", default=None,
                   help="comma-separated peers for the peers suite: flax-linen, flax-nnx, "
                        "equinox, torch (default: all; missing ones are marked rows)")
    b.add_argument("--rounds", type=positive_int, default=None,
                   help="rounds (default 7 quick, 11 full): more rounds, firmer intervals")
    b.add_argument("--per-round", type=positive_int, default=None, metavar="N",
                   help="calls per implementation per round (default 3 quick, 5 full)")
    b.add_argument("--seed", type=int, default=None,
                   help="seed of the order within rounds (default: from the clock; recorded)")
    b.add_argument("--timing", default="auto", choices=["auto", "per-call", "blocked"],
                   help="per call, or blocks of calls between synchronisations (auto: "
                        "blocked on accelerators)")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="write bench.json and roofline.png there (validated before timing)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing DIR/bench.json (refused otherwise)")
    b.add_argument("--trace", default=None, metavar="ROW",
                   help="write a jax.profiler trace of the first row whose 'name: impl' "
                        "contains ROW to DIR/trace (Perfetto, TensorBoard)")
    b.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                   help="datasheet peak for MFU beside the measured-peak fraction (default: "
                        "a small table of known devices)")
    b.add_argument("--json", action="store_true", help="print bench.json's content")


def suite_names(args) -> list[str]:
    """The suites ``--suite`` names; an empty list is an error."""
    from funnn.bench.suites import SUITES

    if args.compare:
        return []
    if args.suite.strip() == "all":
        return list(SUITES)
    names = [s.strip() for s in args.suite.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--suite: expected at least one of {', '.join(SUITES)}, "
                          f"got {args.suite!r}", ("bench",))
    return names


def main(args) -> int:
    """Run ``funnn bench`` with parsed ``args``; the exit code."""
    from funnn import _files, bench

    if args.compare:
        if len(args.compare) != 3 or args.compare[0] != "compare":
            raise ConfigError(f"expected 'funnn bench compare OLD NEW', got "
                              f"{' '.join(args.compare)!r}", ("bench",))
        return bench.compare.main(args.compare[1], args.compare[2], args.fail_above,
                                  as_json=args.json, by=args.by)
    peers = None if args.peers is None else [p.strip() for p in args.peers.split(",")]
    report = bench.run(suite_names(args), quick=args.quick, out_dir=args.out, peers=peers,
                       rounds=args.rounds, per_round=args.per_round, seed=args.seed,
                       overwrite=args.overwrite, timing=args.timing, trace=args.trace,
                       peak_tflops=args.peak_tflops, progress=None)
    if args.json:
        print(_files.strict_json({k: report[k] for k in ("format", "env", "peaks", "groups",
                                                          "results")}, indent=2))
    else:
        print(report["table"])
    for path in report["files"]:
        print(f"wrote {path}")
    return 0
