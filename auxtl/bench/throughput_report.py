"""The throughput benchmark's text table, header, markdown and examples/s plot, from its
rows and metadata."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
COLUMNS = ("model", "dtype", "kind", "batch", "ex/step", "median ms", "min-max ms", "ex/s",
           "step img/s", "input img/s", "bound", "GFLOP/step", "TFLOP/s", "MFU %")


def _rate(value) -> str:
    return f"{value:.1f}" if value else "n/a"


def _cells(row: dict) -> list[str]:
    flops, achieved, mfu = row["flops_per_step"], row["achieved_flops_per_s"], row["mfu"]
    return [row["model"], row["dtype"], row["kind"], str(row["batch_size"]),
            str(row["examples_per_step"]), f"{row['step_time_median_s'] * 1e3:.2f}",
            f"{row['step_time_min_s'] * 1e3:.1f}-{row['step_time_max_s'] * 1e3:.1f}",
            f"{row['examples_per_s']:.1f}", _rate(row.get("step_images_per_s")),
            _rate(row.get("input_images_per_s")), row.get("bound") or "-",
            f"{flops / 1e9:.3f}" if flops else "n/a",
            f"{achieved / 1e12:.4f}" if achieved else "n/a",
            f"{mfu * 100:.2f}" if mfu is not None else "n/a"]


def ok_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows that measured (no "error" field)."""
    return [r for r in rows if "error" not in r]


def format_errors(rows: Sequence[dict]) -> list[str]:
    """One "FAILED model dtype kind (batch N): first line of the error" per failed row."""
    return [f"FAILED {r['model']} {r['dtype']} {r['kind']} (batch {r['batch_size']}): "
            f"{r['error'].splitlines()[0][:200]}" for r in rows if "error" in r]


def format_table(rows: Sequence[dict]) -> str:
    """The measured rows as an aligned text table (COLUMNS), then the failures."""
    cells = [list(COLUMNS)] + [_cells(r) for r in ok_rows(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for index, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + format_errors(rows) + input_lines(rows))


def input_lines(rows: Sequence[dict]) -> list[str]:
    """One line per model on its input pipeline: what it gathered from, or why it
    failed, and a shape note where the input images differ from the step's."""
    lines, seen = [], set()
    for r in rows:
        if r["model"] in seen or ("input_source" not in r and "input_error" not in r):
            continue
        seen.add(r["model"])
        if "input_error" in r:
            lines.append(f"input {r['model']}: FAILED {r['input_error'].splitlines()[0][:200]}")
            continue
        lines.append(f"input {r['model']}: {r['input_pipeline']} from {r['input_source']}, "
                     f"batch {r['batch_size']}: {r['input_images_per_s']:.1f} img/s"
                     + (f"; {r['input_note']}" if r.get("input_note") else ""))
    return lines


def format_header(meta: dict) -> str:
    """Backend, devices, JAX version, step counts, CPU-kernel settings (on CPU) and the
    peak per dtype: the lines printed above the table."""
    env = meta["environment"]
    lines = [f"backend: {env['backend']} ({env['device_kind']}, {meta['config']['devices']} of "
             f"{env['devices_available']} device(s)), jax {env['jax_version']}; median of "
             f"{meta['config']['steps']} steps after {meta['config']['warmup']} warm-up"]
    if env["backend"] == "cpu":
        kernels = env.get("cpu_kernels") or {}
        lines.append("CPU kernels (auxtl.cpu): " + "; ".join(
            f"{name}: {state}" for name, state in kernels.items()))
        if any(state in ("available", "active") for state in kernels.values()):
            lines.append("MFU counts model FLOPs (direct convolutions); a fast convolution "
                         "algorithm does fewer multiply-adds, so MFU can pass 100%")
    for dtype, peak in meta["peaks"].items():
        lines.append(f"peak {dtype}: {peak['flops_per_s'] / 1e12:.3f} TFLOP/s per device "
                     f"({peak['source']}: {peak['detail']}; {peak['precision']})")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], meta: dict) -> str:
    """throughput.md: the header, the measured rows as a markdown table, the failures
    and a note on how FLOPs and MFU are counted."""
    lines = ["# auxtl throughput", "", "```", format_header(meta), "```", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in ok_rows(rows)]
    lines += [""] + [f"- {line}" for line in format_errors(rows)] if format_errors(rows) else []
    lines += [""] + [f"- {line}" for line in input_lines(rows)] if input_lines(rows) else []
    lines += ["", "step img/s: images the step consumes per second; input img/s: images the "
              "pretraining loop's in-memory input path (batch_indices, process_slice, put_batch, "
              "waited for) delivers per second; bound: the slower of the two (cached_features "
              "starts from features: no bound).", "", "ex/step: examples per step (pretrain: 4 rotations per image). FLOPs from "
              "XLA's cost analysis of the compiled step (auxtl.cpu's convolution kernels counted "
              "as the direct convolutions they compute: model FLOPs, so with a fast algorithm's "
              "fewer multiply-adds MFU can pass 100%); MFU = achieved FLOP/s / peak."]
    return "\n".join(lines) + "\n"


def plot_examples_per_s(rows: Sequence[dict], path: pathlib.Path, title: str) -> None:
    """Horizontal bars of examples/s, one per row, grouped by model and dtype (log scale
    when the values span more than 30x)."""
    # matplotlib is imported here, not at the top: it is an optional, heavy dependency
    # that only the plot needs.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    groups = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows))
    colors = plt.get_cmap("tab10")
    height = 0.8 / max(len(kinds), 1)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.28 * len(rows) + 0.2 * len(groups)))
    for k, kind in enumerate(kinds):
        ys, xs = [], []
        for g, (model, dtype) in enumerate(groups):
            for r in rows:
                if (r["model"], r["dtype"], r["kind"]) == (model, dtype, kind):
                    ys.append(g + (k - (len(kinds) - 1) / 2) * height)
                    xs.append(r["examples_per_s"])
        bars = ax.barh(ys, xs, height=height, color=colors(k), label=kind)
        ax.bar_label(bars, labels=[f"{x:,.0f}" for x in xs], fontsize=6, padding=2)
    values = [r["examples_per_s"] for r in rows]
    log_scale = max(values) / max(min(values), 1e-12) > 30
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([f"{m}\n{d}" for m, d in groups])
    ax.invert_yaxis()
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlim(right=max(values) * (3 if log_scale else 1.15))
    ax.set_xlabel("examples / s" + (" (log scale)" if log_scale else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
