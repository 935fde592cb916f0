"""Outputs of a benchmark run: speed-up ratios, the printed table, CSV, JSON and PNG plots."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from typing import Dict, List, Sequence

from fusedloss.bench.cases import CRF_OPS, CROSS_ENTROPY_OPS

COLUMNS = (
    "op", "mode", "backend", "shape", "N", "C", "B", "T", "K", "dtype", "device", "device_name",
    "median_ms", "q20_ms", "q80_ms", "min_ms", "repeats", "warmup", "baseline", "speedup",
    "peak_mem_mib", "rel_diff_vs_baseline", "torch_version", "triton_version", "fusedloss_version",
    "num_threads",
)


def _problem(row: Dict) -> tuple:
    return row["op"], row["mode"], row["shape"], row["dtype"], row["device"]


def add_speedups(rows: List[Dict]) -> None:
    """``speedup`` = the baseline's median time / this row's median time, for the same op, mode,
    shape, dtype and device measured in the same run (empty when the baseline did not run)."""
    baseline_ms = {_problem(r): r["median_ms"] for r in rows if r["backend"] == r["baseline"]}
    for row in rows:
        reference = baseline_ms.get(_problem(row))
        row["speedup"] = reference / row["median_ms"] if reference else ""


def format_table(rows: Sequence[Dict]) -> str:
    """One block per (op, mode, shape, dtype): backend, median [q20, q80] ms, speed-up, peak MiB."""
    lines = []
    header = f"{'backend':<22} {'median ms':>10} {'[q20, q80]':>21} {'speed-up':>9} {'peak MiB':>9}"
    groups: Dict[tuple, List[Dict]] = defaultdict(list)
    for row in rows:
        groups[_problem(row)].append(row)
    for (op, mode, shape, dtype, device), group in groups.items():
        lines.append(f"\n{op} {mode}  shape={shape} dtype={dtype} device={device} ({group[0]['device_name']})")
        lines.append(header)
        for row in group:
            speedup = f"{row['speedup']:.2f}x" if row["speedup"] != "" else "-"
            spread = f"[{row['q20_ms']:.3f}, {row['q80_ms']:.3f}]"
            memory = f"{row['peak_mem_mib']:.1f}" if row["peak_mem_mib"] != "" else "-"
            lines.append(f"{row['backend']:<22} {row['median_ms']:>10.3f} {spread:>21} {speedup:>9} {memory:>9}")
    return "\n".join(lines)


def format_markdown(rows: Sequence[Dict]) -> str:
    """Markdown tables for a README: one per (op, mode), a row per shape and dtype, a column per
    backend; each cell ``median ms (speed-up, peak MiB)``; the device named above each table."""
    tables: Dict[tuple, List[Dict]] = defaultdict(list)
    for row in rows:
        tables[(row["op"], row["mode"])].append(row)
    out = []
    for (op, mode), group in tables.items():
        backends = list(dict.fromkeys(r["backend"] for r in group))
        cells: Dict[tuple, Dict[str, str]] = defaultdict(dict)
        for r in group:
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] != "" else "-"
            memory = f", {r['peak_mem_mib']:.1f} MiB" if r["peak_mem_mib"] != "" else ""
            cells[(r["shape"], r["dtype"])][r["backend"]] = f"{r['median_ms']:.3f} ms ({speedup}{memory})"
        dims = "B x T x K" if op in CRF_OPS else "N x C"
        out.append(f"\n**{op}, {'forward + backward' if mode == 'full' else mode}** on {group[0]['device_name']}, "
                   f"torch {group[0]['torch_version']}: median time (speed-up over {group[0]['baseline']}, "
                   "peak extra memory)\n")
        out.append(f"| {dims} | dtype | " + " | ".join(backends) + " |")
        out.append("|---|---|" + "---|" * len(backends))
        for (shape, dtype), by_backend in cells.items():
            out.append(f"| {shape} | {dtype} | " + " | ".join(by_backend.get(b, "-") for b in backends) + " |")
    return "\n".join(out) + "\n"


def write_csv(rows: Sequence[Dict], path: str) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path: str) -> List[Dict]:
    """Rows of a CSV written by :func:`write_csv`, with the numbers converted back."""
    numeric = {"N", "C", "B", "T", "K", "median_ms", "q20_ms", "q80_ms", "min_ms", "repeats", "warmup",
               "speedup", "peak_mem_mib", "rel_diff_vs_baseline"}
    with open(path, newline="") as src:
        rows = list(csv.DictReader(src))
    return [{k: (float(v) if k in numeric and v != "" else v) for k, v in row.items()} for row in rows]


def write_json(path: str, environment: Dict, config: Dict, skipped: List[Dict], rows: Sequence[Dict]) -> None:
    with open(path, "w") as out:
        json.dump({"environment": environment, "config": config, "skipped": skipped,
                   "results": [{k: row.get(k, "") for k in COLUMNS} for row in rows]}, out, indent=1)


def _most_common(rows: Sequence[Dict], key: str):
    return Counter(row[key] for row in rows).most_common(1)[0][0]


def _plot_lines(ax, rows: Sequence[Dict], x_key: str, title: str) -> None:
    by_backend: Dict[str, List[tuple]] = defaultdict(list)
    for row in rows:
        by_backend[row["backend"]].append((float(row[x_key]), float(row["median_ms"])))
    for backend, points in sorted(by_backend.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel("median time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot(rows: Sequence[Dict], path_prefix: str) -> List[str]:
    """PNG plots from the rows (or from :func:`read_csv`); returns the files written.

    ``<prefix>_cross_entropy.png``: forward+backward time against C, one panel per cross-entropy op,
    at the most frequent N and dtype. ``<prefix>_crf.png``: log-likelihood forward+backward and
    decode time against T (at the smallest K) and against K (at the largest T), at the largest B.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if not rows:
        return written
    device_name = rows[0]["device_name"]
    ce_rows = [r for r in rows if r["op"] in CROSS_ENTROPY_OPS and r["mode"] == "full"]
    if ce_rows:
        n, dtype = _most_common(ce_rows, "N"), _most_common(ce_rows, "dtype")
        ops = [op for op in CROSS_ENTROPY_OPS if any(r["op"] == op for r in ce_rows)]
        fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
        for ax, op in zip(axes[0], ops):
            selected = [r for r in ce_rows if r["op"] == op and r["N"] == n and r["dtype"] == dtype]
            _plot_lines(ax, selected, "C", f"{op} forward+backward, N={int(n)}, {dtype}")
        fig.suptitle(device_name, fontsize=10)
        fig.tight_layout()
        written.append(path_prefix + "_cross_entropy.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    # The CRF plots show what training and inference pay: forward+backward, and decode.
    crf_rows = [r for r in rows if (r["op"], r["mode"]) in (("crf_nll", "full"), ("crf_decode", "forward"))]
    if crf_rows:
        dtype = _most_common(crf_rows, "dtype")
        crf_rows = [r for r in crf_rows if r["dtype"] == dtype]
        b = max(r["B"] for r in crf_rows)
        crf_rows = [r for r in crf_rows if r["B"] == b]
        k_fixed, t_fixed = min(r["K"] for r in crf_rows), max(r["T"] for r in crf_rows)
        ops = [op for op in CRF_OPS if any(r["op"] == op for r in crf_rows)]
        fig, axes = plt.subplots(len(ops), 2, figsize=(10, 4 * len(ops)), squeeze=False)
        for axes_row, op in zip(axes, ops):
            what = "decode" if op == "crf_decode" else "log-likelihood forward+backward"
            _plot_lines(axes_row[0], [r for r in crf_rows if r["op"] == op and r["K"] == k_fixed], "T",
                        f"CRF {what}, B={int(b)}, K={int(k_fixed)}, {dtype}")
            _plot_lines(axes_row[1], [r for r in crf_rows if r["op"] == op and r["T"] == t_fixed], "K",
                        f"CRF {what}, B={int(b)}, T={int(t_fixed)}, {dtype}")
        fig.suptitle(device_name, fontsize=10)
        fig.tight_layout()
        written.append(path_prefix + "_crf.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
