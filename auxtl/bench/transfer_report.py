"""The transfer benchmark's markdown tables and accuracy-vs-labels plot, from its JSON."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

from auxtl.bench.transfer_cells import reference_for
from auxtl.bench.transfer_config import MODES, PUBLISHED_ROTNET, SCRATCH

MODE_TITLES = {"linear": "linear probe", "knn": "k-NN", "head": "frozen trunk + new head",
               "staged": "staged unfreezing"}


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def format_cell(c: dict) -> str:
    """'mean ± half-width (Δ +d [lo, hi])'; a single seed or no reference drops the parts."""
    text = f"{c['mean']:.3f}"
    if not math.isnan(c["low"]):
        text += f" ± {(c['high'] - c['low']) / 2:.3f}"
    d = c.get("difference")
    if d:
        bounds = "" if math.isnan(d["low"]) else f" [{_signed(d['low'])}, {_signed(d['high'])}]"
        text += f" (Δ {_signed(d['mean'])}{bounds})"
    return text


def _budgets(result: dict) -> list:
    return list(result["config"]["budgets"])


def _budget_label(budget, result: dict) -> str:
    if budget == "all":
        return f"all (~{result['subsets']['all']['x']:.0f})"
    return str(budget)


def _rows(cells: Sequence[dict], modes: Sequence[str]) -> list[tuple[str, str]]:
    keys = list(dict.fromkeys((c["mode"], c["source"]) for c in cells))
    return sorted(keys, key=lambda k: (modes.index(k[0]), k[1] == SCRATCH,
                                       k[1] == "random", keys.index(k)))


def results_table(result: dict) -> str:
    """Rows source x mode, columns budgets."""
    cells = result["cells"]
    budgets = _budgets(result)
    index = {(c["mode"], c["source"], c["budget"]): c for c in cells}
    lines = ["| mode (Δ vs) | source | " + " | ".join(_budget_label(b, result) for b in budgets)
             + " |", "|---|---|" + "---:|" * len(budgets)]
    for mode, source in _rows(cells, list(MODES)):
        layer = next((c.get("layer") for c in cells if c["mode"] == mode and c.get("layer")),
                     None)
        name = MODE_TITLES[mode] + (f" @{layer}" if layer else "")
        row = [format_cell(index[(mode, source, b)]) if (mode, source, b) in index else "—"
               for b in budgets]
        lines.append(f"| {name} (vs {reference_for(mode)}) | {source} | " + " | ".join(row)
                     + " |")
    return "\n".join(lines)


def depth_table(result: dict) -> str:
    """Linear-probe accuracy at every depth (mean over seeds), one row per source x depth."""
    cells = result["linear_by_depth"]
    if not cells:
        return ""
    budgets = _budgets(result)
    index = {(c["source"], c["layer"], c["budget"]): c for c in cells}
    keys = list(dict.fromkeys((c["source"], c["layer"]) for c in cells))
    lines = ["| source | depth | " + " | ".join(_budget_label(b, result) for b in budgets)
             + " |", "|---|---|" + "---:|" * len(budgets)]
    for source, layer in keys:
        row = [f"{index[(source, layer, b)]['mean']:.3f}" if (source, layer, b) in index else "—"
               for b in budgets]
        lines.append(f"| {source} | {layer} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def published_table(result: dict) -> str:
    """Gidaris et al. 2018 beside our scratch and rotation cells, in percent."""
    budgets = [b for b in _budgets(result) if b in PUBLISHED_ROTNET["scratch"]]
    if not budgets:
        return ""
    index = {(c["mode"], c["source"], c["budget"]): c for c in result["cells"]}
    lines = ["| | " + " | ".join(map(str, budgets)) + " |", "|---|" + "---:|" * len(budgets)]
    for name, values in PUBLISHED_ROTNET.items():
        lines.append(f"| published {name} | " + " | ".join(f"{values[b]:.2f}" for b in budgets)
                     + " |")
    for mode, source in (("head", SCRATCH), ("head", "rotation"), ("staged", "rotation")):
        if any((mode, source, b) in index for b in budgets):
            label = "scratch" if source == SCRATCH else f"rotation, {MODE_TITLES[mode]}"
            lines.append(f"| ours: {label} | " + " | ".join(
                f"{100 * index[(mode, source, b)]['mean']:.2f}" if (mode, source, b) in index
                else "—" for b in budgets) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    cfg, data, env = result["config"], result["data"], result["environment"]
    skipped = {n: s["reason"] for n, s in result["sources"].items() if s["status"] != "ok"}
    seconds = result["timings_s"]["total"]
    lines = [
        "# auxtl transfer benchmark", "",
        f"Data `{data['spec']}`: pool {data['pool_size']} images (pretraining and labeled "
        f"subsets), test {data['test_size']} ({data['test_split']}), {data['num_classes']} "
        f"classes. Trunk `{cfg['model']}` {cfg['model_overrides'] or ''}, pretrained "
        f"{cfg['pretrain_steps']} steps (batch {cfg['pretrain_batch_size']}); reuse the lowest "
        f"{cfg['reuse']} layers. {len(cfg['seeds'])} seeds; {env['backend']} "
        f"({env['device_kind']}), jax {env['jax_version']}; {seconds / 60:.1f} min.", "",
        "Test accuracy, mean ± 95% t half-width over seeds, and (Δ mean [95% CI]) the paired "
        "difference to the reference with the same seed and labeled subset: scratch for the "
        "trained modes, the frozen random trunk for the probes. Fixed step budgets "
        f"(probe {cfg['probe_steps']} full-batch steps, head {cfg['head_steps']}, staged "
        f"+{cfg['staged_steps']} with the top {cfg['unfreeze']} reused layers at "
        f"{cfg['staged_lr_scale']}x lr, scratch {cfg['head_steps'] + cfg['staged_steps']}, "
        f"batch {cfg['batch_size']}); nothing is selected on the test split. Columns: labeled "
        "images per class.", "",
        results_table(result), ""]
    if skipped:
        lines += ["Skipped: " + "; ".join(f"`{n}` ({r})" for n, r in skipped.items()), ""]
    published = published_table(result) if cfg.get("published") else ""
    if published:
        lines += ["## Beside the published numbers (CIFAR-10, % test accuracy)", "",
                  "Gidaris et al. 2018 (RotNet), as tabulated by Qi and Luo; 'ours: rotation, "
                  "frozen trunk + new head' is our analogue of 'RotNet + conv'.", "",
                  published, ""]
    depths = depth_table(result)
    if depths:
        lines += ["## Linear probe at every depth (mean over seeds)", "", depths, ""]
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    """Accuracy vs labels per class (log x), one line per source with its interval band,
    one subplot per mode."""
    # matplotlib is imported here, not at the top: it is an optional, heavy dependency
    # that only the plot needs.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    modes = [m for m in MODES if any(c["mode"] == m for c in cells)]
    sources = list(dict.fromkeys(c["source"] for c in cells))
    colors = {s: plt.get_cmap("tab10" if len(sources) <= 10 else "tab20")(i)
              for i, s in enumerate(sources)}
    budgets = _budgets(result)
    xs = {b: result["subsets"][str(b)]["x"] for b in budgets}
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 4.0), sharey=True,
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for source in sources:
            points = sorted((xs[c["budget"]], c) for c in cells
                            if c["mode"] == mode and c["source"] == source)
            if not points:
                continue
            x = [p[0] for p in points]
            style = "--" if source in (SCRATCH, "random") else "-"
            ax.plot(x, [p[1]["mean"] for p in points], style, marker="o", ms=3,
                    color=colors[source], label=source)
            low = [p[1]["low"] if not math.isnan(p[1]["low"]) else p[1]["mean"] for p in points]
            high = [p[1]["high"] if not math.isnan(p[1]["high"]) else p[1]["mean"]
                    for p in points]
            ax.fill_between(x, low, high, color=colors[source], alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_xticks([xs[b] for b in budgets])
        ax.set_xticklabels([_budget_label(b, result) for b in budgets], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("labeled images per class")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8,
               frameon=False)
    env = result["environment"]
    fig.suptitle(f"auxtl transfer on {result['data']['spec']}: mean and 95% interval over "
                 f"{len(result['config']['seeds'])} seeds ({env['device_kind']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.03 * (len(labels) > 6), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
