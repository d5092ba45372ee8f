"""funnn's gradient engines against the same step in pure JAX (and peers), one process.

    python benchmarks/engines.py [--suite engines,peers] [--quick] [--out bench-out]

The same code as ``funnn bench``: the device, versions and load, this device's measured
peaks, rounds in random order with a hidden A/A copy of each baseline, ratios within each
group with 95% intervals, FLOP/s and the fraction of the peak; ``--out`` writes bench.json
(format ``funnn.bench/2``) and roofline.png. Compare two runs with
``funnn bench compare OLD NEW``.
"""

import sys

from funnn import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *(sys.argv[1:] or ["--suite", "engines,peers", "--quick"])]))
