"""Benchmarks shipped with auxtl, runnable on CPU, GPU and TPU.

throughput: step time, examples/s, XLA FLOPs and MFU of pretraining, frozen-prefix,
cached-features and inference steps (`auxtl.bench.throughput.main(argv)`).
peaks: the device peak FLOP/s that MFU divides by (vendor table or a measured matmul).
"""
