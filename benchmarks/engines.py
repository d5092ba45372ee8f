"""Time one training step per gradient engine, jit vs eager, against pure JAX.

    python benchmarks/engines.py [--model mlp] [--batch-size 128] [--repeats 200]

Prints the device and versions, medians of many repeats after warm-up (compile
time reported separately as 'first'), and ratios measured in the same run.
"""

import argparse

from funnn import bench

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=200)
    a = p.parse_args()
    print(bench.format_table(bench.engine_table(a.model, a.batch_size, a.repeats)))
