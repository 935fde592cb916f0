"""fusedloss-bench: a tiny run writes a well-formed CSV, JSON and PNGs; the timing, quantile,
peak-memory and speed-up helpers give hand-computed answers."""

import csv
import importlib.metadata
import json
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fusedloss
from _backends import expect_backend
from fusedloss.bench import cases, cli, harness, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OPS = ("cross_entropy", "focal", "crf_nll", "crf_decode")
CE_SHAPES, CRF_SHAPES = ("16x7", "40x7"), ("2x5x3", "2x9x3")


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["--ops", ",".join(OPS), "--shapes", ",".join(CE_SHAPES + CRF_SHAPES), "--repeats", "3",
                   "--warmup", "1", "--threads", "1", "--device", "cpu", "--out", str(out), "--name", "tiny_{device}",
                   "--no-progress"])
    assert rc == 0
    return out


def _rows(out):
    (path,) = out.glob("tiny_cpu-*.csv")
    with open(path, newline="") as src:
        reader = csv.DictReader(src)
        return reader.fieldnames, list(reader)


def test_csv_has_the_columns_and_one_row_per_op_mode_backend_shape(bench_out):
    columns, rows = _rows(bench_out)
    assert tuple(columns) == report.COLUMNS
    keys = [(r["op"], r["mode"], r["backend"], r["shape"]) for r in rows]
    assert len(keys) == len(set(keys))
    expected = set()
    for op in OPS:
        modes = ("forward",) if op == "crf_decode" else ("forward", "full")
        baseline = "eager" if op in ("cross_entropy", "focal") else "pytorch-crf"
        for shape in (CE_SHAPES if op in ("cross_entropy", "focal") else CRF_SHAPES):
            expected |= {(op, mode, backend, shape) for mode in modes for backend in (baseline, "fusedloss-reference")}
    assert expected <= set(keys)
    # The Triton interpreter (TRITON_INTERPRET=1 in the tests) is never benchmarked on CPU tensors.
    assert not any(r["backend"] == "fusedloss-triton" for r in rows)


def test_csv_values(bench_out):
    _, rows = _rows(bench_out)
    for r in rows:
        q20, median, q80, fastest = (float(r[k]) for k in ("q20_ms", "median_ms", "q80_ms", "min_ms"))
        assert 0 < fastest <= q20 <= median <= q80
        assert float(r["peak_mem_mib"]) >= 0
        assert r["device"] == "cpu" and r["device_name"] and r["dtype"] == "float32"
        assert r["torch_version"] == torch.__version__ and r["repeats"] == "3"
        dims = ("N", "C") if r["op"] in ("cross_entropy", "focal") else ("B", "T", "K")
        assert "x".join(r[d] for d in dims) == r["shape"]
        if r["backend"] == r["baseline"]:
            assert float(r["speedup"]) == 1.0
        else:
            assert float(r["speedup"]) == pytest.approx(
                next(float(b["median_ms"]) for b in rows if b["backend"] == r["baseline"]
                     and (b["op"], b["mode"], b["shape"]) == (r["op"], r["mode"], r["shape"])) / median, rel=1e-4)
        # Every backend computed the baseline's value from the same inputs (decode: the same paths).
        limit = 0.0 if r["op"] == "crf_decode" else 1e-5
        assert float(r["rel_diff_vs_baseline"]) <= limit, r


def test_bandwidth_columns(bench_out):
    """Cross-entropy rows carry the bytes a fused call must move (float32 logits read, and for forward + backward
    the gradient written, plus int64 targets), the GB/s they imply at the median time, and one copy bandwidth per
    problem measured in the same run; CRF rows leave them empty."""
    _, rows = _rows(bench_out)
    copy_by_shape = {}
    for r in rows:
        if r["op"] not in ("cross_entropy", "focal"):
            assert r["bytes"] == r["gbps"] == r["copy_gbps"] == r["bw_fraction"] == "", r
            continue
        n, c = int(r["N"]), int(r["C"])
        # two reads and one write of the float32 logits; one read for the Triton forward (it saves row statistics)
        reads_and_writes = 1 if (r["mode"], r["backend"]) == ("forward", "fusedloss-triton") else 3
        assert int(r["bytes"]) == reads_and_writes * 4 * n * c + 8 * n
        assert float(r["gbps"]) == pytest.approx(int(r["bytes"]) / (float(r["median_ms"]) * 1e6), rel=1e-4)
        assert float(r["copy_gbps"]) > 0
        assert float(r["bw_fraction"]) == pytest.approx(float(r["gbps"]) / float(r["copy_gbps"]), rel=1e-4)
        assert copy_by_shape.setdefault(r["shape"], r["copy_gbps"]) == r["copy_gbps"]  # one copy per problem
    assert len(copy_by_shape) == len(CE_SHAPES)


def test_bandwidth_arithmetic():
    # two reads of the logits and one write of the gradient, in both modes (the gradient is computed in forward)
    assert cases.cross_entropy_bytes("full", (1000, 500), torch.bfloat16) == 3 * 2 * 1000 * 500 + 8 * 1000
    assert cases.cross_entropy_bytes("forward", (1000, 500), torch.float32) == 3 * 4 * 1000 * 500 + 8 * 1000
    # the Triton forward saves row statistics instead of writing the gradient: one read
    triton = "fusedloss-triton"
    assert cases.cross_entropy_bytes("forward", (1000, 500), torch.float32, triton) == 4 * 1000 * 500 + 8000
    assert cases.cross_entropy_bytes("full", (1000, 500), torch.float32, triton) == 3 * 4 * 1000 * 500 + 8000
    row = report.bandwidth(3_000_000, 2.0, 3.0)  # 3 MB in 2 ms = 1.5 GB/s, half of a 3 GB/s copy
    assert row == {"bytes": 3_000_000, "gbps": pytest.approx(1.5), "copy_gbps": 3.0, "bw_fraction": pytest.approx(0.5)}


def test_png_plots(bench_out):
    import matplotlib.image

    for suffix in ("cross_entropy", "crf"):
        (path,) = bench_out.glob(f"tiny_cpu-*_{suffix}.png")
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.01  # not a blank canvas


def test_json_records_the_environment(bench_out):
    (path,) = bench_out.glob("tiny_cpu-*.json")
    data = json.loads(path.read_text())
    assert data["environment"]["torch_version"] == torch.__version__
    assert data["environment"]["device"] == "cpu"
    assert "profiler" in data["config"]["memory_method"]
    assert set(data["config"]["backends"]) == {"reference", "triton", "cpp", "cuda"}
    assert len(data["results"]) == len(_rows(bench_out)[1])
    # Only a backend that cannot serve a case is skipped (BackendUnavailable, or CaseUnavailable for a peer);
    # any other error fails the run (test_a_backend_that_raises_fails_the_run).
    for item in data["skipped"]:
        assert item["reason"].startswith(("BackendUnavailable", "CaseUnavailable")), item


def test_markdown_tables(bench_out):
    (path,) = bench_out.glob("tiny_cpu-*.md")
    text = path.read_text()
    assert "**cross_entropy, forward + backward** on" in text and "**crf_decode, forward** on" in text
    assert "| 40x7 | float32 | " in text and "| B x T x K | dtype | pytorch-crf | fusedloss-reference" in text


def test_read_csv_round_trip(bench_out):
    (path,) = bench_out.glob("tiny_cpu-*.csv")
    rows = report.read_csv(str(path))
    assert len(rows) == len(_rows(bench_out)[1])
    assert all(isinstance(r["median_ms"], float) and isinstance(r["speedup"], float) for r in rows)


def test_torch_struct_peer_matches_pytorch_crf(tmp_path):
    pytest.importorskip("torch_struct")
    cli.main(["--ops", "crf_nll", "--shapes", "3x9x5", "--repeats", "1", "--warmup", "0", "--threads", "1",
              "--out", str(tmp_path), "--no-progress", "--no-memory"])
    rows = report.read_csv(str(tmp_path / "bench.csv"))
    struct_rows = [r for r in rows if r["backend"] == "torch-struct"]
    assert len(struct_rows) == 2 and all(r["rel_diff_vs_baseline"] < 1e-5 for r in struct_rows)


def test_peak_memory_cpu_counts_what_is_held_at_once():
    mib = 1 << 18  # float32 elements in one MiB

    def two_at_once():
        a = torch.ones(4 * mib)
        b = torch.ones(2 * mib)
        del a
        c = torch.ones(3 * mib)
        return b, c

    cpu = torch.device("cpu")
    assert harness.peak_memory(two_at_once, lambda: None, cpu) == pytest.approx(6.0, abs=0.01)
    assert harness.peak_memory(lambda: torch.ones(mib) + 1, lambda: None, cpu) == pytest.approx(2.0, abs=0.01)


def test_time_call_and_quantiles():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert harness.quantile(values, q) == pytest.approx(np.quantile(values, q))
    calls = []
    timing = harness.time_call(lambda: calls.append("fn"), lambda: calls.append("reset"), torch.device("cpu"), 2, 5)
    assert calls == ["reset", "fn"] * 7
    assert 0 < timing["min_ms"] <= timing["q20_ms"] <= timing["median_ms"] <= timing["q80_ms"]


def test_speedups_against_the_baseline_of_the_same_problem():
    def row(backend, shape, ms):
        return {"op": "crf_nll", "mode": "full", "shape": shape, "dtype": "float32", "device": "cpu",
                "backend": backend, "baseline": "pytorch-crf", "median_ms": ms}

    rows = [row("pytorch-crf", "8x128x9", 30.0), row("fusedloss-cpp", "8x128x9", 1.5),
            row("fusedloss-cpp", "8x512x9", 6.0)]
    report.add_speedups(rows)
    assert [r["speedup"] for r in rows] == [1.0, 20.0, ""]


def test_bad_shapes_are_rejected():
    for bad in ("4096", "0x5", "1x2x3x4"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["--shapes", bad])
    assert cli.parse_shapes("4096x32000, 8x128x9") == [(4096, 32000), (8, 128, 9)]


# ----------------------------------------------------------------------------------------------
# What a backend that raises does to the run
# ----------------------------------------------------------------------------------------------

_TINY_RUN = ["--ops", "cross_entropy", "--shapes", "8x5", "--repeats", "1", "--warmup", "0", "--threads", "1",
             "--device", "cpu", "--no-progress", "--no-memory"]


def _break(monkeypatch, backend, exception, mode="forward"):
    """``backend``'s workloads raise ``exception`` from ``mode`` (forward, or full: forward + backward)."""
    make_workload = cases.make_workload

    def broken(op, name, *args):
        workload = make_workload(op, name, *args)
        if name == backend:
            def fail():
                raise exception
            setattr(workload, mode, fail)
        return workload

    monkeypatch.setattr(cases, "make_workload", broken)


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("error", [RuntimeError, ValueError, TypeError, NotImplementedError, ImportError])
def test_a_backend_that_raises_fails_the_run(tmp_path, monkeypatch, error, mode):
    """A kernel's exception is a bug: the run stops with it (not a "skipped" line), naming the case."""
    injected = error("injected kernel failure")
    _break(monkeypatch, "fusedloss-reference", injected, mode)
    with pytest.raises(cli.BenchmarkFailed, match="cross_entropy on fusedloss-reference.*8x5.*float32") as failed:
        cli.main(_TINY_RUN + ["--out", str(tmp_path)])
    assert failed.value.__cause__ is injected
    assert not (tmp_path / "bench.json").exists()  # no report that looks like a complete run


def test_a_backend_that_cannot_serve_the_case_is_skipped(tmp_path, monkeypatch):
    _break(monkeypatch, "fusedloss-reference", fusedloss.BackendUnavailable("reference: pretends not to take this"))
    assert cli.main(_TINY_RUN + ["--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [(s["backend"], s["reason"]) for s in data["skipped"]] == [
        ("fusedloss-reference", "BackendUnavailable: reference: pretends not to take this")]
    assert {r["backend"] for r in data["results"]} >= {"eager"}
    assert not any(r["backend"] == "fusedloss-reference" for r in data["results"])


def test_the_command_exits_nonzero_with_the_traceback(tmp_path):
    """``python -m fusedloss.bench`` as a user runs it, with one backend broken: exit status 1 and the kernel's own
    traceback on stderr."""
    code = textwrap.dedent(f"""
        import runpy, sys
        from fusedloss.bench import cases
        make_workload = cases.make_workload

        def broken(op, name, *args):
            workload = make_workload(op, name, *args)
            if name == "fusedloss-reference":
                def fail():
                    raise RuntimeError("injected kernel failure")
                workload.forward = fail
            return workload

        cases.make_workload = broken
        sys.argv = ["fusedloss-bench"] + {_TINY_RUN + ["--out", str(tmp_path)]!r}
        runpy.run_module("fusedloss.bench", run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" in done.stderr and "RuntimeError: injected kernel failure" in done.stderr, done.stderr
    assert "BenchmarkFailed: cross_entropy on fusedloss-reference" in done.stderr, done.stderr
    assert "skipped" not in done.stdout


def test_module_and_console_entry_points(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fusedloss-bench", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("fusedloss.bench", run_name="__main__")
    assert done.value.code == 0 and "--quick" in capsys.readouterr().out
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "fusedloss-bench"]
    assert script.load() is cli.main


def test_sigmoid_ops_run_on_every_backend_and_agree(tmp_path):
    cli.main(["--ops", ",".join(cases.SIGMOID_OPS), "--shapes", "16x7", "--repeats", "1", "--warmup", "0",
              "--threads", "1", "--out", str(tmp_path), "--no-progress", "--no-memory"])
    rows = report.read_csv(str(tmp_path / "bench.csv"))
    expected = {"eager", "fusedloss-reference"} | ({"fusedloss-cpp"} if expect_backend("cpp") else set())
    for op in cases.SIGMOID_OPS:
        backends = {r["backend"] for r in rows if r["op"] == op and r["mode"] == "full"}
        assert expected | {cases.BASELINE[op]} <= backends, op
    assert all(r["rel_diff_vs_baseline"] <= 1e-5 for r in rows)
    assert "| N x C | dtype | torch | eager |" in (tmp_path / "bench.md").read_text()


def test_linear_cross_entropy_op_runs_against_its_peers(tmp_path):
    cli.main(["--ops", "linear_cross_entropy", "--shapes", "24x8x300", "--repeats", "1", "--warmup", "0",
              "--threads", "1", "--out", str(tmp_path), "--no-progress"])
    rows = report.read_csv(str(tmp_path / "bench.csv"))
    backends = {r["backend"] for r in rows if r["mode"] == "full"}
    expected = {"eager", "fusedloss-reference"}
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch's own chunked head, torch >= 2.13
        expected.add("torch-chunked")
    if expect_backend("cpp"):
        expected.add("fusedloss-cpp")
    assert expected <= backends
    assert all(r["rel_diff_vs_baseline"] <= 1e-5 for r in rows)
    assert all((r["N"], r["H"], r["V"]) == (24, 8, 300) for r in rows)
    assert all(r["peak_mem_mib"] > 0 for r in rows if r["backend"] != "cut-cross-entropy")
    assert "| N x H x V | dtype |" in (tmp_path / "bench.md").read_text()
    assert cases.BASELINE["linear_cross_entropy"] == "eager"


def test_partial_crf_bench_writes_every_row(tmp_path, monkeypatch):
    """benchmarks/bench_crf_partial.py at a tiny shape: every (what, backend) row, the ratios against the same
    backend's plain op, and the three result files."""
    script = str(Path(__file__).resolve().parent.parent / "benchmarks" / "bench_crf_partial.py")
    monkeypatch.setattr(sys, "argv", [script, "--shapes", "3x6x4", "--repeats", "1", "--backends", "reference",
                                      "--out-dir", str(tmp_path)])
    runpy.run_path(script, run_name="__main__")
    (stem,) = {p.stem for p in tmp_path.iterdir()}
    assert {p.suffix for p in tmp_path.iterdir()} == {".md", ".csv", ".json"}
    rows = json.loads((tmp_path / f"{stem}.json").read_text())["results"]
    assert {(r["what"], r["backend"]) for r in rows} == {
        ("log-likelihood", "pytorch-crf"), ("decode", "pytorch-crf"), ("log-likelihood", "reference"),
        ("partial log-likelihood", "reference"), ("log partition", "reference"), ("viterbi k=1", "reference"),
        ("viterbi k=5", "reference")}
    for r in rows:
        assert r["median_ms"] > 0
        if r["backend"] == "reference":
            assert r["baseline"] in ("log-likelihood", "viterbi k=1") and r["vs_baseline"] > 0
