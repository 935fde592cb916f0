"""Outputs of a benchmark run: speed-up ratios, the printed table, CSV, JSON and PNG plots."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from typing import Dict, List, Sequence

from fusedloss.bench.cases import CRF_OPS, CROSS_ENTROPY_OPS, LINEAR_OPS

COLUMNS = (
    "op", "mode", "backend", "shape", "N", "C", "H", "V", "B", "T", "K", "dtype", "device", "device_name",
    "median_ms", "q20_ms", "q80_ms", "min_ms", "repeats", "warmup", "baseline", "speedup",
    "peak_mem_mib", "rel_diff_vs_baseline", "bytes", "gbps", "copy_gbps", "bw_fraction", "torch_version",
    "triton_version", "fusedloss_version",
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


def bandwidth(nbytes: int, median_ms: float, copy_gbps: float) -> Dict:
    """The bandwidth columns of a cross-entropy row: ``bytes`` it must move (cases.cross_entropy_bytes),
    achieved ``gbps`` = bytes / median time, the ``copy_gbps`` of a copy of the logits' bytes measured in the same
    run, and ``bw_fraction`` = gbps / copy_gbps (the distance to what the memory system sustains)."""
    gbps = nbytes / (median_ms * 1e6)
    return {"bytes": nbytes, "gbps": gbps, "copy_gbps": copy_gbps, "bw_fraction": gbps / copy_gbps}


def _bandwidth_cell(row: Dict) -> str:
    if row.get("gbps", "") == "":
        return "-"
    return f"{row['gbps']:.1f} ({100 * row['bw_fraction']:.0f}%)"


def format_table(rows: Sequence[Dict]) -> str:
    """One block per (op, mode, shape, dtype): backend, median [q20, q80] ms, speed-up, peak MiB, and for cross
    entropy the achieved GB/s with its fraction of the copy bandwidth measured in the same run."""
    lines = []
    header = (f"{'backend':<22} {'median ms':>10} {'[q20, q80]':>21} {'speed-up':>9} {'peak MiB':>9} "
              f"{'GB/s (% copy)':>15}")
    groups: Dict[tuple, List[Dict]] = defaultdict(list)
    for row in rows:
        groups[_problem(row)].append(row)
    for (op, mode, shape, dtype, device), group in groups.items():
        copy = f", copy {group[0]['copy_gbps']:.1f} GB/s" if group[0].get("copy_gbps", "") != "" else ""
        lines.append(f"\n{op} {mode}  shape={shape} dtype={dtype} device={device} ({group[0]['device_name']}{copy})")
        lines.append(header)
        for row in group:
            speedup = f"{row['speedup']:.2f}x" if row["speedup"] != "" else "-"
            spread = f"[{row['q20_ms']:.3f}, {row['q80_ms']:.3f}]"
            memory = f"{row['peak_mem_mib']:.1f}" if row["peak_mem_mib"] != "" else "-"
            lines.append(f"{row['backend']:<22} {row['median_ms']:>10.3f} {spread:>21} {speedup:>9} {memory:>9} "
                         f"{_bandwidth_cell(row):>15}")
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
            bandwidth = (f", {r['gbps']:.1f} GB/s = {100 * r['bw_fraction']:.0f}% of copy"
                         if r.get("gbps", "") != "" else "")
            cells[(r["shape"], r["dtype"])][r["backend"]] = f"{r['median_ms']:.3f} ms ({speedup}{memory}{bandwidth})"
        dims = "B x T x K" if op in CRF_OPS else "N x H x V" if op in LINEAR_OPS else "N x C"
        bandwidth = (", achieved bandwidth (% of a copy of the same bytes in the same run)"
                     if op in CROSS_ENTROPY_OPS and group[0].get("gbps", "") != "" else "")
        out.append(f"\n**{op}, {'forward + backward' if mode == 'full' else mode}** on {group[0]['device_name']}, "
                   f"torch {group[0]['torch_version']}: median time (speed-up over {group[0]['baseline']}, "
                   f"peak extra memory{bandwidth})\n")
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
    numeric = {"N", "C", "H", "V", "B", "T", "K", "median_ms", "q20_ms", "q80_ms", "min_ms", "repeats", "warmup",
               "speedup", "peak_mem_mib", "rel_diff_vs_baseline", "bytes", "gbps", "copy_gbps", "bw_fraction"}
    with open(path, newline="") as src:
        rows = list(csv.DictReader(src))
    return [{k: (float(v) if k in numeric and v != "" else v) for k, v in row.items()} for row in rows]


def write_json(path: str, environment: Dict, config: Dict, skipped: List[Dict], rows: Sequence[Dict]) -> None:
    with open(path, "w") as out:
        json.dump({"environment": environment, "config": config, "skipped": skipped,
                   "results": [{k: row.get(k, "") for k in COLUMNS} for row in rows]}, out, indent=1)


def _most_common(rows: Sequence[Dict], key: str):
    return Counter(row[key] for row in rows).most_common(1)[0][0]


def _most_varied(rows: Sequence[Dict], key: str, along: str):
    """The value of ``key`` measured at the most distinct values of ``along`` (ties: the smallest)."""
    seen: Dict[float, set] = defaultdict(set)
    for row in rows:
        seen[row[key]].add(row[along])
    return min(seen, key=lambda value: (-len(seen[value]), value))


def _plot_lines(ax, rows: Sequence[Dict], x_key: str, title: str, series_key: str = "") -> None:
    """One line per backend (and per value of ``series_key``, when given) of median time against ``x_key``."""
    by_series: Dict[str, List[tuple]] = defaultdict(list)
    for row in rows:
        label = row["backend"] + (f", {series_key}={int(row[series_key])}" if series_key else "")
        by_series[label].append((float(row[x_key]), float(row["median_ms"])))
    for label, points in sorted(by_series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
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
    one line per backend and N, at the most frequent dtype. ``<prefix>_crf.png``: log-likelihood
    forward+backward and decode time against T (at the K measured at the most T) and against K (at the
    T measured with the most K), at the largest B: every panel of a grid with two sizes along its axis
    shows a curve.
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
        dtype = _most_common(ce_rows, "dtype")
        ops = [op for op in CROSS_ENTROPY_OPS if any(r["op"] == op for r in ce_rows)]
        fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
        for ax, op in zip(axes[0], ops):
            selected = [r for r in ce_rows if r["op"] == op and r["dtype"] == dtype]
            _plot_lines(ax, selected, "C", f"{op} forward+backward, {dtype}", series_key="N")
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
        k_fixed = _most_varied(crf_rows, "K", "T")
        t_fixed = _most_varied(crf_rows, "T", "K")
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
