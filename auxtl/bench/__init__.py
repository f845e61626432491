"""Benchmarks shipped with auxtl, runnable on CPU, GPU and TPU.

throughput: step time, examples/s, XLA FLOPs and MFU of pretraining, frozen-prefix,
cached-features and inference steps, with the input pipeline's images/s beside the
step's and which bounds (`auxtl.bench.throughput.main(argv)`).
transfer: label-efficiency sweep of pretraining sources x budgets x evaluation modes
(`auxtl.bench.transfer.main(argv)`).
peaks: the device peak FLOP/s that MFU divides by (vendor table or a measured matmul).
torch_reference: the paired PyTorch comparison of `throughput --compare-torch`.

Modules, each importing only those before it:
  machine             what a run ran on; the bench's only calls into the CPU kernels
  throughput_cases    BenchConfig, Case, build_cases
  throughput_timing   compile_case, FLOP counts, timed_calls, time_case
  throughput_input    the input pipeline's rate: BatchIteratorFactory (the seam a
                      streaming pipeline plugs into), in_memory_batches, time_input
  throughput_measure  measure, run_benchmark
  throughput_report   format_table, format_header, markdown_table, plot_examples_per_s
  torch_reference     the PyTorch comparison (torch_step.py runs in its own interpreter)
  throughput          the command line
  transfer_config     TransferBenchConfig, presets, constants
  transfer_data       BenchData, labeled subsets
  transfer_sources    sources: pretraining, the random trunk, loading checkpoints
  transfer_cells      one cell's statistics, paired differences
  transfer_probes     linear and k-NN probes
  transfer_trained    head, staged and scratch training
  transfer_report     markdown tables and plot
  transfer            run_sweep and the command line
"""


from auxtl.errors import InputError


class BenchError(InputError):
    """A benchmark that cannot run as asked (bad flags or data, missing interpreter, ...);
    an auxtl InputError, so `auxtl` prints it as a one-line usage error."""
