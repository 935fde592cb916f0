"""summary.md of a gpu-check run (scripts/gpu_check.sh): phases, tests, benchmark figures and the GPU goals.

Usage: python scripts/gpu_check_summary.py OUT_FOLDER > OUT_FOLDER/summary.md
"""

import glob
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
    path = os.path.join(out, "test_gpu.xml")
    if not os.path.exists(path):
        return ["no test report (the test phase did not run or did not finish)"]
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"{counts['tests']} tests: {counts['failures']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped, time {float(suite.get('time', 0)):.0f} s"]
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            item = case.find(kind)
            if item is not None:
                message = (item.get("message") or "").splitlines()[0][:300] if item.get("message") else ""
                lines.append(f"- {kind.upper()} {case.get('name')}: {message}")
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
