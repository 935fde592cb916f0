"""summary.md of a gpu-check run (scripts/gpu_check.sh): phases, tests, one table per family and backend, benchmark
figures and the GPU goals.

The family table has one row per (family, backend, benchmark case): the fused backend's forward+backward median
time (decode: forward) from the benchmark CSVs, its speed-up over the case's baseline, the achieved bandwidth and its
fraction of a device copy where the kernel is bandwidth-bound (cross entropy: the bench's byte count; the sigmoid
losses: one read of input and target and one write of the gradient, a lower bound; the CRF and the linear head are
latency- and compute-bound: no figure), and the worst max error against float64 over every check
tests/test_gpu.py made for that family and backend (test_gpu_errors.jsonl: the check with the largest error relative
to its allowed error, and how many checks exceeded it). Families without a benchmark (the vocabulary-parallel
losses, the torch.compile models) have the error columns only; a family the tests never reached has no error.

Usage: python scripts/gpu_check_summary.py OUT_FOLDER > OUT_FOLDER/summary.md
"""

import glob
import json
import math
import os
import sys
import xml.etree.ElementTree as ElementTree

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from fusedloss.bench.report import read_csv  # noqa: E402

# The goals (bf16 cross entropy forward+backward; CRF float32) and the figures they are checked against.
CE_GOAL_SHAPE = "8192x128256"
CE_GOALS = (("speed-up over eager", "eager", 3.0), ("speed-up over Liger-Kernel", "liger-kernel", 1.2))
CE_BANDWIDTH_GOAL = 0.8
CRF_GOALS = (("crf_nll", "full", 30.0), ("crf_decode", "forward", 50.0))
CRF_GOAL_SHAPES = ("32x128x9", "32x128x73", "32x512x9", "32x512x73")


def _rows(out, stem):
    rows = []
    for path in sorted(glob.glob(os.path.join(out, f"{stem}_*.csv"))):
        run = os.path.basename(path).rsplit("_", 1)[0]  # the file's stem without the device part
        rows.extend(dict(row, run=run) for row in read_csv(path))
    return rows


def _verdict(value, goal):
    if value is None:
        return "not measured"
    return f"{value:.2f} ({'met' if value >= goal else 'NOT met'}, goal {goal:g})"


def _tests(out):
    lines = []
    for report, phase in (("test_gpu.xml", "test"), ("test_gpu_compile.xml", "test_compile")):
        path = os.path.join(out, report)
        if not os.path.exists(path):
            lines.append(f"- {phase}: no test report (the phase did not run or did not finish)")
            continue
        root = ElementTree.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        lines.append(f"- {phase}: {counts['tests']} tests: {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped, time {float(suite.get('time', 0)):.0f} s")
        for case in suite.iter("testcase"):
            for kind in ("failure", "error"):
                item = case.find(kind)
                if item is not None:
                    message = (item.get("message") or "").splitlines()[0][:300] if item.get("message") else ""
                    lines.append(f"  - {kind.upper()} {case.get('name')}: {message}")
    return lines


# ---------------------------------------------------------------------------------------------- the family table

# Families in the order of the table: (name in the error records, the benchmark CSV stem, the cases of its rows:
# (op, mode, shape) with None for any).
FAMILIES = (
    ("softmax losses", "cross_entropy", (("cross_entropy", "full", None),)),
    ("linear head", "linear_cross_entropy", (("linear_cross_entropy", "full", None),)),
    ("CRF", "crf", (("crf_nll", "full", "32x512x73"), ("crf_nll", "full", "32x128x9"),
                    ("crf_decode", "forward", "32x512x73"), ("crf_decode", "forward", "32x128x9"))),
    ("sigmoid and multi-label", "sigmoid", ((None, "full", None),)),
    ("vocab-parallel (world of 1)", None, ()),
)
FUSED_BACKENDS = ("triton", "cuda")


def _errors(out):
    """{(family, backend): [records]} from test_gpu_errors.jsonl."""
    by_key = {}
    path = os.path.join(out, "test_gpu_errors.jsonl")
    if not os.path.exists(path):
        return by_key
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a timeout
                continue
            by_key.setdefault((record["family"], record["backend"]), []).append(record)
    return by_key


def _ratio(record):
    error, allowed = record["error"], record["allowed"]
    if error is None or (isinstance(error, float) and math.isnan(error)):
        return math.inf
    return error / allowed if allowed > 0 else (0.0 if error == 0 else math.inf)


def _error_cells(records):
    if not records:
        return "not tested", "-"
    worst = max(records, key=_ratio)
    over = sum(1 for r in records if not r["ok"])
    return (f"{worst['error']:.2g} (allowed {worst['allowed']:.2g}; {worst['dtype']} {worst['quantity']}, "
            f"{worst['test']})", f"{over} / {len(records)}")


def _sigmoid_bytes(row):
    """One read of the input and the target and one write of the gradient (bi-tempered: int64 labels)."""
    n, c = int(row["N"]), int(row["C"])
    size = {"bfloat16": 2, "float16": 2, "float32": 4}.get(row["dtype"], 4)
    target = 8 * n if str(row["op"]).startswith("bi_tempered") else size * n * c
    return 2 * size * n * c + target


def _bench_cells(family, row, copy_gbps):
    speedup = f"{row['speedup']:.2f}x vs {row['baseline']}" if row.get("speedup") not in ("", None) else "-"
    gbps, fraction = "-", "-"
    if family == "softmax losses" and row.get("gbps") not in ("", None):
        gbps, fraction = f"{row['gbps']:.4g}", f"{100 * row['bw_fraction']:.0f}%"
    elif family == "sigmoid and multi-label" and row.get("median_ms"):
        achieved = _sigmoid_bytes(row) / (row["median_ms"] * 1e6)
        gbps = f"{achieved:.4g}"
        fraction = f"{100 * achieved / copy_gbps:.0f}%" if copy_gbps else "-"
    return f"{row['median_ms']:.3f}", speedup, gbps, fraction


def _family_table(out):
    errors = _errors(out)
    copies = [r["copy_gbps"] for r in _rows(out, "cross_entropy") if r.get("copy_gbps") not in ("", None)]
    copy_gbps = max(copies) if copies else None
    lines = ["| family | backend | benchmark case | ms | speed-up | GB/s | % of copy "
             "| max error vs float64 (worst check) | checks over tolerance |", "|---|---|---|---|---|---|---|---|---|"]
    listed = set()
    for family, stem, selections in FAMILIES:
        rows = _rows(out, stem) if stem else []
        backends = [b for b in FUSED_BACKENDS if (family, b) in errors or
                    any(r["backend"] == f"fusedloss-{b}" for r in rows)]
        backends += sorted(b for f, b in errors if f == family and b not in backends)
        if not backends:
            lines.append(f"| {family} | - | - | - | - | - | - | not tested | - |")
        for backend in backends:
            listed.add((family, backend))
            error, over = _error_cells(errors.get((family, backend), []))
            selected = [r for r in rows if r["backend"] == f"fusedloss-{backend}"
                        and any((op is None or r["op"] == op) and r["mode"] == mode and (shape is None or
                                r["shape"] == shape) for op, mode, shape in selections)]
            if not selected:
                case = "not measured" if stem else "(no benchmark)"
                lines.append(f"| {family} | {backend} | {case} | - | - | - | - | {error} | {over} |")
            for r in selected:
                ms, speedup, gbps, fraction = _bench_cells(family, r, copy_gbps)
                case = f"{r['op']} {r['mode']} {r['shape']} {r['dtype']}"
                lines.append(f"| {family} | {backend} | {case} | {ms} | {speedup} | {gbps} | {fraction} | {error} | "
                             f"{over} |")
    for family, backend in sorted(k for k in errors if k not in listed):  # torch.compile models and the rest
        error, over = _error_cells(errors[(family, backend)])
        lines.append(f"| {family} | {backend} | (no benchmark) | - | - | - | - | {error} | {over} |")
    lines.append("")
    lines.append(f"- % of copy: against the copy bandwidth measured in the cross-entropy runs "
                 f"({copy_gbps:.4g} GB/s)" if copy_gbps else "- % of copy: no copy bandwidth was measured")
    return lines


def _cross_entropy(rows):
    lines = ["| run | shape | mode | backend | median ms | speed-up vs eager | GB/s | % of copy |",
             "|---|---|---|---|---|---|---|---|"]
    copies = {}
    for r in rows:
        copies[r["run"]] = r["copy_gbps"]
        lines.append(f"| {r['run']} | {r['shape']} {r['dtype']} | {r['mode']} | {r['backend']} | "
                     f"{r['median_ms']:.3f} | {r['speedup']:.2f}x | {r['gbps']:.4g} | {100 * r['bw_fraction']:.0f}% |")
    lines.append("")
    lines.extend(f"- copy bandwidth measured in {run}: {gbps:.4g} GB/s" for run, gbps in copies.items())
    return lines


def _goals(ce_rows, crf_rows):
    lines = []
    full = [r for r in ce_rows if r["shape"] == CE_GOAL_SHAPE and r["mode"] == "full" and r["dtype"] == "bfloat16"]
    by_backend = {r["backend"]: r for r in full}
    if not any(b.startswith("fusedloss-") for b in by_backend):
        lines.append(f"- cross entropy {CE_GOAL_SHAPE} bf16 fwd+bwd: not measured")
    for backend in sorted(b for b in by_backend if b.startswith("fusedloss-") and b != "fusedloss-reference"):
        row = by_backend[backend]
        for what, peer, goal in CE_GOALS:
            ratio = by_backend[peer]["median_ms"] / row["median_ms"] if peer in by_backend else None
            lines.append(f"- cross entropy {CE_GOAL_SHAPE} bf16 fwd+bwd, {backend}, {what}: {_verdict(ratio, goal)}")
        lines.append(f"- cross entropy {CE_GOAL_SHAPE} bf16 fwd+bwd, {backend}, fraction of copy bandwidth: "
                     f"{_verdict(row['bw_fraction'], CE_BANDWIDTH_GOAL)}")
    for op, mode, goal in CRF_GOALS:
        for shape in CRF_GOAL_SHAPES:
            selected = [r for r in crf_rows if (r["op"], r["mode"], r["shape"]) == (op, mode, shape)]
            for r in selected:
                if r["backend"].startswith("fusedloss-") and r["backend"] != "fusedloss-reference":
                    lines.append(f"- {op} {mode} {shape}, {r['backend']}, speed-up over pytorch-crf: "
                                 f"{_verdict(r['speedup'] or None, goal)} ({r['median_ms']:.3f} ms)")
            if not selected:
                lines.append(f"- {op} {mode} {shape}: not measured")
    return lines


def main(out):
    sections = ["# gpu-check", ""]
    env_path = os.path.join(out, "environment.txt")
    if os.path.exists(env_path):
        with open(env_path) as f:
            sections += ["```", *f.read().splitlines()[:4], "```", ""]
    phases_path = os.path.join(out, "phases.txt")
    if os.path.exists(phases_path):
        with open(phases_path) as f:
            sections += ["## Phases (exit status)", "", *(f"- {line.strip()}" for line in f if line.strip()), ""]
    sections += ["## Tests (tests/test_gpu.py)", "", *_tests(out), ""]
    sections += ["## Families: time, bandwidth and max error against float64, per backend", "", *_family_table(out),
                 ""]
    ce_rows, crf_rows = _rows(out, "cross_entropy"), _rows(out, "crf")
    if ce_rows:
        sections += ["## Cross entropy (achieved bandwidth: the bytes the fused kernels move, two reads of the logits "
                     "and one write of the gradient, over the median time)", "",
                     *_cross_entropy(ce_rows), ""]
    sections += ["## Goals", "", *_goals(ce_rows, crf_rows), ""]
    sections += ["Full tables: the *.md, *.csv and *.json files of this folder.", ""]
    print("\n".join(sections))


if __name__ == "__main__":
    main(sys.argv[1])
