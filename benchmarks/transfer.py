"""Label-efficiency sweep: a thin wrapper around `auxtl.bench.transfer`.

Same flags as `auxtl bench transfer` (see `--help`); runs unchanged on CPU, GPU or TPU.

    python benchmarks/transfer.py                                # mnist5k defaults, 2 CPU cores
    python benchmarks/transfer.py --tiny --out runs/bench_transfer_tiny
    python benchmarks/transfer.py --full --data cifar10:/data/cifar-10-batches-py   # GPU
"""

from __future__ import annotations

import sys

from auxtl.bench import BenchError
from auxtl.bench.transfer import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BenchError as error:
        sys.exit(f"error: {error}")
