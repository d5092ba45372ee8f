"""funnn's gradient engines against the same step in pure JAX (and peers), one process.

    python benchmarks/engines.py [--suite engines,peers] [--quick] [--out bench-out]

The same code as ``funnn bench``: the device and versions, this device's measured
peaks, medians of interleaved rounds, ratios within each group, FLOP/s and the
fraction of the peak; ``--out`` writes bench.json and roofline.png.
"""

import sys

from funnn import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *(sys.argv[1:] or ["--suite", "engines,peers", "--quick"])]))
