"""The microbenchmark suite at full size, written where the docs page reads it.

    python benchmarks/microbench.py                          # about 7 minutes on 2 CPU cores
    python benchmarks/microbench.py --sections ratios --problems ridge

Writes benchmarks/results/microbench/bench.{json,md}. It is `bilevel bench --out
benchmarks/results/microbench`: every `bilevel bench` option works here too.
"""

import pathlib
import sys

from bilevel.__main__ import main

if __name__ == "__main__":
    out = pathlib.Path(__file__).parent / "results" / "microbench"
    sys.exit(main(["bench", "--out", str(out), *sys.argv[1:]]))
