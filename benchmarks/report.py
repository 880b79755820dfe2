"""Benchmark reports: the JSON record, a markdown summary and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .cases import OPS

MB = 1 << 20


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1))


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def goal_rows(kernels: list[dict]) -> list[dict]:
    """Measured ratios against the project's goals, over every shape, dtype and layout."""
    rows = []
    direction = "forward+backward"
    for op, spec in OPS.items():
        eager, compiled, copy = spec.eager_goal, spec.compile_goal, spec.copy_goal
        entries = [r[direction] for r in kernels if r["op"] == op and "speedup_vs_eager" in r.get(direction, {})]
        if not entries:
            continue
        speedups = [e["speedup_vs_eager"] for e in entries]
        row = dict(op=op, direction=direction, cases=len(entries), eager_goal=eager,
                   speedup_vs_eager_geomean=_geomean(speedups), speedup_vs_eager_min=min(speedups))
        versus_compile = [e["speedup_vs_compile"] for e in entries if "speedup_vs_compile" in e]
        if versus_compile:
            row.update(compile_goal=compiled, speedup_vs_compile_geomean=_geomean(versus_compile),
                       speedup_vs_compile_min=min(versus_compile))
        fractions = [e["fraction_of_copy"] for e in entries]
        row.update(copy_goal=copy, fraction_of_copy_median=sorted(fractions)[len(fractions) // 2])
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Benchmarks: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
             f"`python -m benchmarks{' --quick' if report['quick'] else ''}`.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    if report.get("goals"):
        lines += ["## Goals (measured side by side in this run)", "",
                  "| op | direction | cases | vs eager (geomean / min) | vs compile (geomean / min) | of copy bandwidth (median) |",
                  "|---|---|---|---|---|---|"]
        for g in report["goals"]:
            compiled = (f"{g['speedup_vs_compile_geomean']:.2f}x / {g['speedup_vs_compile_min']:.2f}x"
                        if "speedup_vs_compile_geomean" in g else "-")
            lines.append(f"| {g['op']} | {g['direction']} | {g['cases']} | {g['speedup_vs_eager_geomean']:.2f}x / "
                         f"{g['speedup_vs_eager_min']:.2f}x (goal {g['eager_goal']}x) | {compiled} | "
                         f"{100 * g['fraction_of_copy_median']:.0f}% |")
        lines.append("")
    if report.get("kernels_gpu"):
        lines += ["## Kernels (ms, median of do_bench with L2 flushed)", "",
                  "| case | direction | eager | compile | fused | vs eager | vs compile | fused GB/s | of copy |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["kernels_gpu"]:
            for direction in ("forward", "backward", "forward+backward"):
                e = r[direction]
                ms = [f"{e[i]['ms']:.3f}" if "ms" in e[i] else "error" for i in ("eager", "compile", "fused")]
                lines.append(
                    f"| {r['label']} | {direction} | {' | '.join(ms)} | "
                    f"{e.get('speedup_vs_eager', float('nan')):.2f}x | {e.get('speedup_vs_compile', float('nan')):.2f}x | "
                    f"{e['fused'].get('gbps', float('nan')):.0f} | {100 * e.get('fraction_of_copy', float('nan')):.0f}% |")
        lines.append("")
    if report.get("models_gpu"):
        lines += ["## Training step", "", "| network | implementation | dtype | layout | images/s | peak MB |",
                  "|---|---|---|---|---|---|"]
        for r in report["models_gpu"]:
            if "error" in r:
                lines.append(f"| {r['network']} | {r['implementation']} | {r['dtype']} | {r['layout']} | error | {r['error'][:60]} |")
            else:
                lines.append(f"| {r['network']} | {r['implementation']} | {r['dtype']} | {r['layout']} | "
                             f"{r['images_per_s']:.0f} | {r['peak_bytes'] / MB:.0f} |")
        lines.append("")
    if report.get("anytime_gpu"):
        lines += ["## Anytime inference latency (ms)", "", "| network | implementation | dtype | mode | k | ms |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['network']} | {r['implementation']} | {r['dtype']} | {r['mode']} | {r['k']} | {r['ms']:.3f} |"
                  for r in report["anytime_gpu"]]
        lines.append("")
    if report.get("kernels_cpu"):
        lines += ["## Per op: bytes saved for backward and kernel launches (exact, fake tensors)", "",
                  "Launches: fused = Triton launches + ATen kernels; eager = ATen kernels "
                  "(ops that launch at least one kernel). Minimal bytes: forward+backward.", "",
                  "| case | saved eager MB | saved fused MB | ratio | launches fwd eager / fused | "
                  "launches bwd eager / fused | minimal MB |", "|---|---|---|---|---|---|---|"]
        for r in report["kernels_cpu"]:
            e, f = r["eager"], r["fused"]
            lines.append(
                f"| {r['label']} | {e['saved_bytes'] / MB:.1f} | {f['saved_bytes'] / MB:.1f} | "
                f"{r['saved_ratio_fused_to_eager']:.2f} | {_launches(e['launches_forward'])} / "
                f"{_launches(f['launches_forward'])} | {_launches(e['launches_backward'])} / "
                f"{_launches(f['launches_backward'])} | {r['minimal_bytes']['forward+backward'] / MB:.1f} |")
        lines.append("")
    if report.get("steps"):
        lines += ["## One training step: activation bytes saved for backward and kernel launches", "",
                  "Parameters excluded; fp32, NCHW; exact on fake tensors.", "",
                  "| network | batch | implementation | saved MB | vs eager | launches forward | launches backward |",
                  "|---|---|---|---|---|---|---|"]
        for s in report["steps"]:
            for implementation, m in s["implementations"].items():
                ratio = f"{m['saved_ratio_to_eager']:.2f}x" if "saved_ratio_to_eager" in m else "1.00x"
                lines.append(f"| {s['network']} | {s['batch']} | {implementation} | "
                             f"{m['saved_activation_bytes'] / MB:.1f} | {ratio} | {_launches(m['launches_forward'])} | "
                             f"{_launches(m['launches_backward'])} |")
        lines.append("")
    if report.get("skip"):
        lines += ["## skip_dropped: convolution work and training step (side by side, same seed)", "",
                  "| network | batch | device | conv samples: skip / dense | step ms dense | step ms skip | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["skip"]:
            lines.append(f"| {r['network']} | {r['batch']} | {r['device']} | {r['conv_sample_fraction']:.3f} | "
                         f"{r['fused']['step_ms']:.0f} | {r['fused+skip']['step_ms']:.0f} | {r['speedup']:.2f}x |")
        lines.append("")
    if report.get("cpu_times"):
        lines += ["## CPU wall times of the eager reference (CPU, not GPU performance)", "",
                  "| what | ms (median) |", "|---|---|"]
        lines += [f"| {t['what']} | {t['ms']:.1f} |" for t in report["cpu_times"]]
        lines.append("")
    return "\n".join(lines)


def _launches(counts: dict) -> str:
    return str(counts["aten"]) if not counts["triton"] else f"{counts['triton']}+{counts['aten']}"


def plots(report: dict, stem: Path) -> list[Path]:
    """Speedup per op and shape, and fraction of copy bandwidth (GPU runs)."""
    kernels = report.get("kernels_gpu") or []
    if not kernels:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in kernels if "speedup_vs_eager" in r["forward+backward"]]
    labels = [r["label"] for r in rows]
    for key, title, suffix in (
        ("speedup_vs_eager", "forward+backward speedup over eager", "speedup"),
        ("fraction_of_copy", "forward+backward fraction of copy bandwidth", "roofline"),
    ):
        fig, ax = plt.subplots(figsize=(10, max(4, 0.18 * len(rows))))
        values = [r["forward+backward"].get(key, 0) for r in rows]
        ax.barh(range(len(rows)), values, color="tab:blue")
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{title} ({report['environment']['device']})")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{suffix}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
