"""The device check's results: what each stage's outputs say (summaries; an expected
output missing turns a stage's ok into failed) and results.md. Standard library only,
like `device_check.py` beside it."""

from __future__ import annotations

import json
import pathlib
import re


def tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def throughput_summary(path: pathlib.Path) -> tuple[dict | None, str | None]:
    """The pretrain row of a throughput.json (None and why when it did not measure)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return None, f"no throughput.json: {error}"
    rows = [r for r in result.get("results", []) if r.get("kind") == "pretrain"]
    if not rows:
        return None, "no pretrain row"
    row = rows[0]
    if "error" in row:
        return None, row["error"].splitlines()[0][:300]
    keys = ("model", "dtype", "batch_size", "examples_per_step", "step_time_median_s",
            "step_images_per_s", "examples_per_s", "input_images_per_s", "bound",
            "flops_per_step", "achieved_flops_per_s", "peak_flops_per_s", "peak_source",
            "peak_precision", "peak_detail", "mfu", "compile_s", "device_kind",
            "input_source", "input_error")
    return {k: row.get(k) for k in keys if k in row}, None


def first_match(path: pathlib.Path, pattern: str) -> str | None:
    match = re.search(pattern, tail(path, 200), re.MULTILINE)
    return match.group(0).strip() if match else None


def check_outputs(record: dict, out: pathlib.Path) -> None:
    """Adds the stage's summary; an expected output missing turns an ok into failed."""
    name = record["name"]
    log = pathlib.Path(record["log"])
    problem = None
    if name.startswith("throughput_"):
        record["summary"], problem = throughput_summary(out / name / "throughput.json")
    elif name == "environment":
        try:
            env = json.loads((out / "environment.json").read_text())
            record["summary"] = {k: env.get(k) for k in (
                "backend", "device_kind", "devices_available", "jax_version", "jaxlib_version",
                "flax_version", "python", "peak_table_entry", "nvidia_smi")}
        except (OSError, ValueError) as error:
            problem = f"no environment.json: {error}"
    elif name == "pretrain":
        record["summary"] = {"trained": first_match(log, r"^trained .*$"),
                             "held_out": first_match(log, r"^held-out .*$")}
        if not (out / "pretrain" / "trunk").is_dir():
            problem = "no trunk checkpoint written"
    elif name == "transfer":
        record["summary"] = {"transfer": first_match(log, r"^transfer test accuracy.*$"),
                             "scratch": first_match(log, r"^scratch +test accuracy.*$")}
        if not record["summary"]["transfer"]:
            problem = "no 'transfer test accuracy' line"
    if problem and record["status"] == "ok":
        record.update(status="failed", tail=f"{problem}\n{tail(log)}")
    elif problem:
        record["problem"] = problem


def summary_text(record: dict) -> str:
    """One short line of what a stage found, for the markdown table."""
    summary = record.get("summary") or {}
    if record["name"].startswith("throughput_") and summary:
        mfu = summary.get("mfu")
        return (f"{summary['model']} batch {summary['batch_size']}: step "
                f"{summary['step_images_per_s']:.1f} img/s, input "
                f"{summary.get('input_images_per_s') or 0:.1f} img/s, bound "
                f"{summary.get('bound')}, MFU {'n/a' if mfu is None else f'{mfu * 100:.1f} %'}")
    if record["name"] == "environment" and summary:
        return (f"{summary.get('device_kind')} ({summary.get('backend')}), jax "
                f"{summary.get('jax_version')}, peak table: {summary.get('peak_table_entry')}"
                + (f", nvidia-smi: {summary['nvidia_smi']}" if summary.get('nvidia_smi') else ""))
    if record["name"] == "install":
        return f"auxtl from {record.get('auxtl_file')}"
    return "; ".join(str(v) for v in summary.values() if v)


def markdown(results: dict) -> str:
    meta, lines = results["meta"], ["# auxtl device check", ""]
    env = results.get("environment") or {}
    lines += [f"- mode: {meta['mode']}; budget {meta['budget_s']} s; total "
              f"{meta['total_s']:.1f} s; {'all stages ok' if results['ok'] else 'FAILED'}",
              f"- device: {env.get('device_kind')} ({env.get('backend')}, "
              f"{env.get('devices_available')} device(s)); jax {env.get('jax_version')}, "
              f"jaxlib {env.get('jaxlib_version')}, flax {env.get('flax_version')}, "
              f"python {env.get('python')}; commit {meta.get('commit')}",
              f"- started {meta['started_utc']}"]
    if meta.get("parallel_lanes"):
        lines.append("- the bench lane and the pretrain/transfer lane ran side by side: "
                     "these timings check the plumbing, not the speed")
    lines += ["",
              "| stage | status | seconds | limit s | summary |", "|---|---|---:|---:|---|"]
    for s in results["stages"]:
        text = summary_text(s)[:300] if s["status"] != "skipped" else s.get("tail", "")
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.1f} | "
                     f"{s.get('timeout_s', 0):.0f} | {text.replace('|', '/')} |")
    rows = [s["summary"] for s in results["stages"]
            if s["name"].startswith("throughput_") and s.get("summary")]
    if rows:
        lines += ["", "## Pretraining step (rotation, 4 examples per image)", "",
                  "| model | dtype | batch | step ms | step img/s | input img/s | bound | "
                  "TFLOP/s | peak TFLOP/s | MFU % |", "|---|---|---:|---:|---:|---:|---|---:|"
                  "---:|---:|"]
        for r in rows:
            achieved, peak, mfu = (r.get("achieved_flops_per_s"), r.get("peak_flops_per_s"),
                                   r.get("mfu"))
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['batch_size']} | "
                f"{r['step_time_median_s'] * 1e3:.2f} | {r['step_images_per_s']:.1f} | "
                f"{r['input_images_per_s'] or 0:.1f} | {r.get('bound')} | "
                f"{(achieved or 0) / 1e12:.2f} | {(peak or 0) / 1e12:.1f} "
                f"({r.get('peak_source')}, {r.get('peak_precision')}) | "
                f"{(mfu or 0) * 100:.1f} |")
    failed = [s for s in results["stages"] if s["status"] != "ok"]
    for s in failed:
        lines += ["", f"## {s['name']}: {s['status']}", "", "```", s.get("tail", ""), "```"]
    return "\n".join(lines) + "\n"
