"""Benchmark reports: the JSON record, a markdown summary (one function per section) and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .cases import OPS

MB = 1 << 20


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1))


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def goal_rows(kernels: list[dict]) -> list[dict]:
    """Measured ratios against each op's goals (cases.OPS), over every shape, dtype and layout."""
    rows = []
    direction = "forward+backward"
    for op, spec in OPS.items():
        entries = [r[direction] for r in kernels if r["op"] == op and "speedup_vs_eager" in r.get(direction, {})]
        if not entries:
            continue
        speedups = [e["speedup_vs_eager"] for e in entries]
        row = dict(op=op, direction=direction, cases=len(entries), eager_goal=spec.eager_goal,
                   speedup_vs_eager_geomean=_geomean(speedups), speedup_vs_eager_min=min(speedups))
        versus_compile = [e["speedup_vs_compile"] for e in entries if "speedup_vs_compile" in e]
        if versus_compile:
            row.update(compile_goal=spec.compile_goal, speedup_vs_compile_geomean=_geomean(versus_compile),
                       speedup_vs_compile_min=min(versus_compile))
        fractions = [e["fraction_of_copy"] for e in entries]
        row.update(copy_goal=spec.copy_goal, fraction_of_copy_median=sorted(fractions)[len(fractions) // 2])
        rows.append(row)
    return rows


def occupancy_rows(audit: list[dict]) -> list[dict]:
    """The compile audit summarised per kernel, architecture and register limit: registers,
    resident warps per SM (the least), spills and flagged configurations."""
    groups = defaultdict(list)
    for row in audit:
        groups[(row["kernel"], row["arch"], bool(row["register_limit"]))].append(row)
    summary = []
    for (kernel, arch, limited), rows in sorted(groups.items()):
        good = [r for r in rows if not r["error"]]
        summary.append(dict(kernel=kernel, arch=arch, register_limit=limited, configurations=len(rows),
                            registers_min=min(r["registers"] for r in good),
                            registers_max=max(r["registers"] for r in good),
                            resident_warps_min=min(r["resident_warps"] for r in good),
                            spill_bytes_max=max(r["spill_bytes"] for r in good),
                            shared_bytes_max=max(r["shared_bytes"] for r in good),
                            flagged=sum(bool(r["problems"]) for r in rows)))
    return summary


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Benchmarks: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
             f"`python -m benchmarks{' --quick' if report['quick'] else ''}"
             f"{' --gpu-only' if report.get('gpu_only') else ''}`.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    for section in (_goals, _kernels_gpu, _training_gpu, _anytime_gpu, _steps, _traffic, _occupancy, _host,
                    _ops_exact, _skip, _cpu_times):
        lines += section(report)
    return "\n".join(lines)


def _table(title: str, intro: list[str], header: list[str], rows: list[list]) -> list[str]:
    lines = [f"## {title}", ""] + ([*intro, ""] if intro else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _goals(report: dict) -> list[str]:
    if not report.get("goals"):
        return []
    rows = []
    for g in report["goals"]:
        compiled = (f"{g['speedup_vs_compile_geomean']:.2f}x / {g['speedup_vs_compile_min']:.2f}x"
                    if "speedup_vs_compile_geomean" in g else "-")
        rows.append([g["op"], g["direction"], g["cases"],
                     f"{g['speedup_vs_eager_geomean']:.2f}x / {g['speedup_vs_eager_min']:.2f}x "
                     f"(goal {g['eager_goal']}x)",
                     compiled, f"{100 * g['fraction_of_copy_median']:.0f}%"])
    return _table("Goals (measured side by side in this run)", [],
                  ["op", "direction", "cases", "vs eager (geomean / min)", "vs compile (geomean / min)",
                   "of copy bandwidth (median)"], rows)


def _kernels_gpu(report: dict) -> list[str]:
    if not report.get("kernels_gpu"):
        return []
    rows = []
    for r in report["kernels_gpu"]:
        for direction in ("forward", "backward", "forward+backward"):
            e = r[direction]
            ms = [f"{e[i]['ms']:.3f}" if "ms" in e[i] else "error" for i in ("eager", "compile", "fused")]
            rows.append([r["label"], direction, *ms, f"{e.get('speedup_vs_eager', float('nan')):.2f}x",
                         f"{e.get('speedup_vs_compile', float('nan')):.2f}x",
                         f"{e['fused'].get('gbps', float('nan')):.0f}",
                         f"{100 * e.get('fraction_of_copy', float('nan')):.0f}%"])
    return _table("Kernels (ms, median of do_bench with L2 flushed)", [],
                  ["case", "direction", "eager", "compile", "fused", "vs eager", "vs compile", "fused GB/s", "of copy"],
                  rows)


def _training_gpu(report: dict) -> list[str]:
    if not report.get("models_gpu"):
        return []
    rows = [[r["network"], r["implementation"], r["dtype"], r["layout"], "error", r["error"][:60]] if "error" in r else
            [r["network"], r["implementation"], r["dtype"], r["layout"], f"{r['images_per_s']:.0f}",
             f"{r['peak_bytes'] / MB:.0f}"] for r in report["models_gpu"]]
    return _table("Training step", [], ["network", "implementation", "dtype", "layout", "images/s", "peak MB"], rows)


def _anytime_gpu(report: dict) -> list[str]:
    if not report.get("anytime_gpu"):
        return []
    rows = [[r["network"], r["implementation"], r["dtype"], r["mode"], r["k"], f"{r['ms']:.3f}"]
            for r in report["anytime_gpu"]]
    return _table("Anytime inference latency (ms)", [], ["network", "implementation", "dtype", "mode", "k", "ms"], rows)


def _launches(counts: dict) -> str:
    return str(counts["aten"]) if not counts["triton"] else f"{counts['triton']}+{counts['aten']}"


def _steps(report: dict) -> list[str]:
    if not report.get("steps"):
        return []
    rows = []
    for s in report["steps"]:
        for implementation, m in s["implementations"].items():
            if "launches_forward" not in m:
                rows.append([s["network"], s["batch"], implementation, "-", "-", "-", "-", "-", len(m["host_reads"])])
                continue
            launches = sum(m[d]["triton"] + m[d]["aten"] for d in ("launches_forward", "launches_backward"))
            rows.append([s["network"], s["batch"], implementation, f"{m['saved_activation_bytes'] / MB:.1f}",
                         f"{m.get('saved_ratio_to_eager', 1.0):.2f}x", _launches(m["launches_forward"]),
                         _launches(m["launches_backward"]), f"{launches} ({m.get('launch_ratio_to_eager', 1.0):.2f}x)",
                         len(m["host_reads"])])
    return _table("One training step: activations saved, kernel launches, device-to-host reads",
                  ["Exact, on fake tensors (fp32, NCHW; parameters excluded). Launches: Triton + kernel-launching "
                   "ATen ops (dropout counts as the CPU decomposes it: three ops forward, one backward). Host "
                   "reads: ops that make the host wait for the device, over forward, backward and the SGD step, "
                   "run on meta tensors. skip_dropped sizes its work from its (host) masks, which fake tensors "
                   "cannot follow: only its host reads are counted."],
                  ["network", "batch", "implementation", "saved MB", "vs eager", "launches forward",
                   "launches backward", "launches (vs eager)", "host reads"], rows)


def _traffic(report: dict) -> list[str]:
    traffic = report.get("traffic")
    if not traffic:
        return []
    rows = []
    for r in traffic["rows"]:
        f, b = r["forward"], r["backward"]
        total = f["fused_bytes"] + b["fused_bytes"]
        minimal = f["minimal_bytes"] + b["minimal_bytes"]
        eager = f["eager_bytes"] + b["eager_bytes"]
        rows.append([r["label"], f"{total / MB:.2f}", f"{minimal / MB:.2f}", f"{total / minimal:.3f}",
                     f"{eager / MB:.2f}", f"{eager / total:.2f}x", f"{f['model_fused_us'] + b['model_fused_us']:.1f}",
                     f"{f['model_eager_us'] + b['model_eager_us']:.1f}"])
    return _table("Memory traffic per op, forward + backward (counted)",
                  ["Fused: the bytes the kernels load and store, counted in the Triton interpreter (distinct "
                   "addresses per launch). Minimal: what the fused design must move. Eager: each kernel-launching "
                   "ATen op of the reference moves its inputs and outputs once (an under-count for cuDNN "
                   f"BatchNorm). Modelled time = bytes / the bandwidth of an {traffic['model_gpu']}: a model, "
                   "not a measurement."],
                  ["case", "fused MB", "minimal MB", "counted / minimal", "eager MB", "eager / fused",
                   "model fused us", "model eager us"], rows)


def _occupancy(report: dict) -> list[str]:
    if not report.get("occupancy"):
        return []
    rows = [[r["kernel"], f"sm_{r['arch']}", "yes" if r["register_limit"] else "no (Inductor)", r["configurations"],
             f"{r['registers_min']}-{r['registers_max']}", r["resident_warps_min"], r["spill_bytes_max"],
             r["shared_bytes_max"], r["flagged"]] for r in report["occupancy"]]
    return _table("Compile audit: registers and occupancy",
                  ["Every configuration the benchmarked shapes launch, compiled for the GPU's tiling, with the "
                   "launch's register limit and without it (as Inductor launches user kernels). Goals: streaming "
                   "kernels 16 resident warps per SM (two 256-thread blocks), reductions 8, no spills."],
                  ["kernel", "arch", "register limit", "configurations", "registers", "least resident warps/SM",
                   "spill bytes", "shared bytes", "flagged"], rows)


def _host(report: dict) -> list[str]:
    host = report.get("host")
    if not host:
        return []
    lines = _table("Host time per op, Triton's launch path counted, beside eager",
                   [f"Forward + backward on one-channel tensors, thread CPU time, fused and eager alternated, "
                    f"best of {host.get('repeats', 7)}: the fused ops on the fake GPU, every launch through Triton's "
                    "launch path (or the direct launch of its compiled variant) up to the C launcher, which only "
                    "reads the pointers; the eager reference for real (its kernels are negligible at this size). "
                    "Neither side includes the CUDA driver's launch. Launches: kernel (arguments) x count."],
                   ["op", "fused us", "eager us", "fused / eager", "launches"],
                   [[r["op"], f"{r['fused_us']:.0f}", f"{r['eager_us']:.0f}", f"{r['fused_over_eager']:.2f}",
                     ", ".join(f"{x['kernel']} ({x['arguments']}) x{x['launches']}" for x in r.get("launches", []))]
                    for r in host["ops"]])
    rows = [[r["network"], r["batch"], r.get("drop_path_per", "sample"),
             *(f"{r[f'{k}_ms']:.2f}" for k in ("eager", "fused", "fused+recompute", "fused+skip")),
             f"{r['fused_over_eager']:.2f}"] for r in host["steps"]]
    return lines + _table("Host time of a training step (ms, one channel wide, Triton's launch path counted)",
                          ["The same drop-path draws on every side (one generator, reset before each repeat)."],
                          ["network", "batch", "drop-path per", "eager", "fused", "fused+recompute", "fused+skip",
                           "fused / eager"], rows)


def _ops_exact(report: dict) -> list[str]:
    if not report.get("kernels_cpu"):
        return []
    rows = []
    for r in report["kernels_cpu"]:
        e, f = r["eager"], r["fused"]
        rows.append([r["label"], f"{e['saved_bytes'] / MB:.1f}", f"{f['saved_bytes'] / MB:.1f}",
                     f"{r['saved_ratio_fused_to_eager']:.2f}",
                     f"{_launches(e['launches_forward'])} / {_launches(f['launches_forward'])}",
                     f"{_launches(e['launches_backward'])} / {_launches(f['launches_backward'])}",
                     f"{r['minimal_bytes']['forward+backward'] / MB:.1f}"])
    return _table("Per op: bytes saved for backward and kernel launches (exact, fake tensors)",
                  ["Launches: fused = Triton launches + ATen kernels; eager = ATen kernels "
                   "(ops that launch at least one kernel). Minimal bytes: forward+backward."],
                  ["case", "saved eager MB", "saved fused MB", "ratio", "launches fwd eager / fused",
                   "launches bwd eager / fused", "minimal MB"], rows)


def _skip(report: dict) -> list[str]:
    if not report.get("skip"):
        return []
    rows = [[r["network"], r["batch"], r["device"], f"{r['conv_sample_fraction']:.3f}", f"{r['fused']['step_ms']:.0f}",
             f"{r['fused+skip']['step_ms']:.0f}", f"{r['speedup']:.2f}x"] for r in report["skip"]]
    return _table("skip_dropped: convolution work and training step (side by side, same seed)", [],
                  ["network", "batch", "device", "conv samples: skip / dense", "step ms dense", "step ms skip",
                   "speedup"], rows)


def _cpu_times(report: dict) -> list[str]:
    if not report.get("cpu_times"):
        return []
    return _table("CPU wall times of the eager reference (CPU, not GPU performance)", [], ["what", "ms (median)"],
                  [[t["what"], f"{t['ms']:.1f}"] for t in report["cpu_times"]])


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
