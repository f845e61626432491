"""The transfer benchmark's markdown tables and accuracy-vs-labels plot, from its JSON."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

from auxtl.bench.transfer_cells import reference_for
from auxtl.bench.transfer_config import (AUTO, BEST, MODES, PUBLISHED_ROTNET, RANDOM, SCRATCH,
                                         TRAINED_MODES)

MODE_TITLES = {"linear": "linear probe", "knn": "k-NN", "head": "frozen trunk + new head",
               "staged": "staged unfreezing", "finetune": "fine-tune all",
               BEST: "best mode (val)"}
ROW_MODES = MODES + (BEST,)


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
                                       k[1] == RANDOM, k[1] == AUTO, keys.index(k)))


def _title(mode: str, cells: Sequence[dict]) -> str:
    if mode in ("linear", "knn"):
        return MODE_TITLES[mode] + " @val-chosen depth"
    return MODE_TITLES[mode]


def headline_table(result: dict) -> str:
    """Per budget: scratch, `auto` (source and mode chosen on validation per seed) and each
    trained source's validation-chosen mode, with the paired difference to scratch."""
    cells = [c for c in result["cells"] if c["mode"] == BEST]
    if not cells:
        return ""
    budgets = _budgets(result)
    index = {(c["source"], c["budget"]): c for c in cells}
    sources = [AUTO] + [s for s in result.get("trained_sources", [])] + [SCRATCH]
    lines = ["| source (mode chosen on validation) | " + " | ".join(
        _budget_label(b, result) for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for source in sources:
        if not any((source, b) in index for b in budgets):
            continue
        label = {AUTO: "**auto**: best source and mode on validation",
                 SCRATCH: "scratch (rate chosen on validation)"}.get(source, source)
        lines.append(f"| {label} | " + " | ".join(
            format_cell(index[(source, b)]) if (source, b) in index else "—"
            for b in budgets) + " |")
    return "\n".join(lines)


def pretraining_table(result: dict) -> str:
    """Each source's pretraining: steps, epochs, examples seen, wall-clock, held-out loss."""
    lines = ["| source | steps | epochs | examples seen | wall-clock (s) | held-out metrics |",
             "|---|---:|---:|---:|---:|---|"]
    for name, info in result["sources"].items():
        if info.get("kind") != "pretrained":
            continue
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in (info.get("eval") or {}).items())
        cached = " (cached)" if info.get("cached") else ""
        epochs = f"{info['epochs']:.3g}" if info.get("epochs") else "—"
        lines.append(f"| {name} | {info.get('steps')} | {epochs} | "
                     f"{info.get('examples_seen') or '—'} | {info.get('pretrain_s', 0):.0f}"
                     f"{cached} | {metrics} |")
    return "\n".join(lines)


def results_table(result: dict) -> str:
    """Rows source x mode, columns budgets."""
    cells = result["cells"]
    budgets = _budgets(result)
    index = {(c["mode"], c["source"], c["budget"]): c for c in cells}
    lines = ["| mode (Δ vs) | source | " + " | ".join(_budget_label(b, result) for b in budgets)
             + " |", "|---|---|" + "---:|" * len(budgets)]
    for mode, source in _rows(cells, list(ROW_MODES)):
        name = _title(mode, cells)
        row = [format_cell(index[(mode, source, b)]) if (mode, source, b) in index else "—"
               for b in budgets]
        lines.append(f"| {name} (vs {reference_for(mode)}) | {source} | " + " | ".join(row)
                     + " |")
    return "\n".join(lines)


def depth_table(result: dict) -> str:
    """Probe test accuracy at every depth (mean over seeds; linear / k-NN), one row per
    source x depth, and how many seeds validation sent to that depth."""
    cells = result["probe_by_depth"]
    if not cells:
        return ""
    budgets = _budgets(result)
    index = {(c["source"], c["mode"], c["layer"], c["budget"]): c for c in cells}
    chosen = {(c["source"], c["mode"], c["budget"]): c["layer"] for c in result["cells"]
              if c["mode"] in ("linear", "knn")}
    keys = list(dict.fromkeys((c["source"], c["layer"]) for c in cells))
    lines = ["| source | depth | " + " | ".join(_budget_label(b, result) for b in budgets)
             + " |", "|---|---|" + "---:|" * len(budgets)]
    for source, layer in keys:
        row = []
        for b in budgets:
            parts = []
            for mode in ("linear", "knn"):
                c = index.get((source, mode, layer, b))
                if c:
                    picked = chosen.get((source, mode, b), []).count(layer)
                    parts.append(f"{c['mean']:.3f}" + (f"<sup>{picked}</sup>" if picked else ""))
            row.append(" / ".join(parts) or "—")
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


def _recipe_line(cfg: dict) -> str:
    budget = (f"{cfg['pretrain_steps']} steps" if cfg.get("pretrain_steps")
              else f"{cfg['pretrain_epochs']:g} epochs")
    opt = cfg["pretrain_optimizer"]
    scales = lambda xs: ", ".join(f"{x:g}" for x in xs) + "x"  # noqa: E731
    head = ("a linear classifier on their pooled output" if cfg.get("top", "drop") == "drop"
            else "the source's upper layers, fresh, and a linear classifier")
    start = " started as the ridge probe (LP-FT)" if cfg.get("head_init") == "ridge" else ""
    return (f"Pretraining: {budget} per source, batch {cfg['pretrain_batch_size']}, "
            f"{opt['name']} lr {opt['learning_rate']:g} ({opt['schedule']}, warmup "
            f"{opt['warmup_steps']} steps). Trained modes reuse the lowest {cfg['reuse']} "
            f"layers under {head}{start}: head {cfg['head_epochs']} epochs with them frozen, "
            f"then {cfg['tune_epochs']} epochs with the top {cfg['unfreeze']} unfrozen at "
            f"{cfg['tune_lr_scale']:g}x lr (staged) or all of them at "
            f"{scales(cfg.get('finetune_lr_scales', [cfg['tune_lr_scale']]))} lr (finetune, "
            f"rate chosen on validation); scratch {cfg['head_epochs'] + cfg['tune_epochs']} "
            f"epochs at {scales(cfg['scratch_lr_scales'])} lr (chosen on validation). Base lr "
            f"{cfg['learning_rate']:g}, adamw, batch {cfg['batch_size']}, augmentation "
            f"{cfg['augment']}, {cfg['schedule']} schedule per phase (warmup {cfg['warmup']:g}), "
            f"an epoch one pass over the labeled images but at least "
            f"{cfg['min_steps_per_epoch']} and at most {cfg.get('max_steps_per_epoch')} steps, "
            f"the best validation epoch kept.")


def markdown(result: dict) -> str:
    cfg, data, env = result["config"], result["data"], result["environment"]
    skipped = {n: s["reason"] for n, s in result["sources"].items() if s["status"] != "ok"}
    seconds = result["timings_s"]["total"]
    machine = env.get("cpu") or env.get("device_kind")
    val = ", ".join(f"{b}: {result['subsets'][str(b)]['val_size']}" for b in _budgets(result))
    lines = [
        "# auxtl transfer benchmark", "",
        f"Data `{data['spec']}`: pool {data['pool_size']} images (pretraining, labeled "
        f"training and validation subsets), test {data['test_size']} ({data['test_split']}), "
        f"{data['num_classes']} classes. Trunk `{cfg['model']}` {cfg['model_overrides'] or ''}. "
        f"{len(cfg['seeds'])} seeds; {env['backend']} ({machine}), jax {env['jax_version']}; "
        f"{seconds / 60:.1f} min in all.", "",
        _recipe_line(cfg), "",
        f"Every choice is made on a labeled validation set shared by the seeds of a budget "
        f"(validation images by budget: {val}): probe strength, k and depth, the kept epoch, "
        "the mode, the source and scratch's rate. The test split only scores. Cells: test "
        "accuracy, mean ± 95% t half-width over seeds, and (Δ mean [95% CI]) the paired "
        "difference to the reference with the same seed and labeled subset: scratch for "
        "the trained modes, the frozen random trunk for the probes. Columns: labeled "
        "images per class.", ""]
    headline = headline_table(result)
    if headline:
        lines += ["## Does pretraining pay? (vs an equally tuned scratch baseline)", "",
                  headline, ""]
    lines += ["## Pretraining", "", pretraining_table(result), "",
              "Loss curves: `pretraining.png` beside this file; each source's "
              "`sources/<name>/metrics.jsonl` in the run folder.", "",
              "## Every mode", "", results_table(result), ""]
    trained = result.get("trained_sources")
    if trained is not None:
        lines += [f"Trained modes ran for: {', '.join(trained)} (the pretrained sources whose "
                  f"linear probe validates best).", ""]
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
        lines += ["## Probes at every depth (test, mean over seeds: linear / k-NN; "
                  "superscript: seeds whose validation chose that depth)", "", depths, ""]
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
    modes = [m for m in (BEST, "linear", "knn") + TRAINED_MODES
             if any(c["mode"] == m for c in cells)]
    sources = list(dict.fromkeys(c["source"] for c in cells))
    colors = {s: plt.get_cmap("tab10" if len(sources) <= 10 else "tab20")(i)
              for i, s in enumerate(sources)}
    budgets = _budgets(result)
    xs = {b: result["subsets"][str(b)]["x"] for b in budgets}
    columns = min(3, len(modes))
    rows = math.ceil(len(modes) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows + 0.6),
                             sharey=True, squeeze=False)
    for ax in list(axes.flat)[len(modes):]:
        ax.axis("off")
    for ax, mode in zip(axes.flat, modes):
        for source in sources:
            points = sorted((xs[c["budget"]], c) for c in cells
                            if c["mode"] == mode and c["source"] == source)
            if not points:
                continue
            x = [p[0] for p in points]
            style = "--" if source in (SCRATCH, RANDOM) else "-"
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
    for row in axes:
        row[0].set_ylabel("test accuracy")
    legend = {}
    for ax in axes.flat:                       # every source once, from whichever panel has it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = list(legend)
    fig.legend(list(legend.values()), labels, loc="lower center",
               ncol=min(len(labels), 6), fontsize=8, frameon=False)
    env = result["environment"]
    fig.suptitle(f"auxtl transfer on {result['data']['spec']}: mean and 95% interval over "
                 f"{len(result['config']['seeds'])} seeds ({env['device_kind']})", fontsize=10)
    fig.tight_layout(rect=(0, (0.08 + 0.03 * (len(labels) > 6)) / rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pretraining(result: dict, path: pathlib.Path) -> None:
    """Each pretrained source's training loss against examples seen (one panel per source:
    the tasks' losses differ in scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {n: s for n, s in result["sources"].items() if s.get("loss_curve")}
    if not curves:
        return
    columns = min(4, len(curves))
    rows = math.ceil(len(curves) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    batch = result["config"]["pretrain_batch_size"]
    for ax, (name, info) in zip(axes.flat, curves.items()):
        steps, losses = zip(*info["loss_curve"])
        ax.plot([s * batch for s in steps], losses, lw=1.2)
        ax.set_title(f"{name} ({info.get('pretrain_s', 0):.0f} s)", fontsize=9)
        ax.set_xlabel("examples seen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    axes[0][0].set_ylabel("training loss", fontsize=8)
    fig.suptitle(f"pretraining loss per source on {result['data']['spec']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
