"""Benchmarks shipped with auxtl, runnable on CPU, GPU and TPU.

throughput: step time, examples/s, XLA FLOPs and MFU of pretraining, frozen-prefix,
cached-features and inference steps (`auxtl.bench.throughput.main(argv)`).
transfer: label-efficiency sweep of pretraining sources x budgets x evaluation modes
(`auxtl.bench.transfer.main(argv)`).
peaks: the device peak FLOP/s that MFU divides by (vendor table or a measured matmul).
torch_reference: the paired PyTorch comparison of `throughput --compare-torch`.
"""


from auxtl.errors import InputError


class BenchError(InputError):
    """A benchmark that cannot run as asked (bad flags or data, missing interpreter, ...);
    an auxtl InputError, so `auxtl` prints it as a one-line usage error."""
