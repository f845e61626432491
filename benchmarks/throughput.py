"""Throughput and MFU of auxtl's steps: a thin wrapper around `auxtl.bench.throughput`.

Same flags as `auxtl bench throughput` (see `--help`); runs unchanged on CPU, GPU or TPU.

    python benchmarks/throughput.py --models small_cnn,resnet18 --steps 10 --out runs/bench
    python benchmarks/throughput.py --models resnet50 --dtypes bfloat16 --compare-torch \
        --torch-python /opt/torch311/bin/python
"""

from __future__ import annotations

import sys

from auxtl.bench import BenchError
from auxtl.bench.throughput import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BenchError as error:
        sys.exit(f"error: {error}")
