"""Command line of ``fusedloss-bench`` (see the package docstring for what it measures)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import fusedloss
from fusedloss.bench import cases, harness, report

# Shape grids. Cross entropy and the sigmoid losses: (N, C); CRF: (B, T, K).
_SIGMOID_GRIDS = {
    ("cpu", True): [(512, 80), (512, 1000)],
    ("cuda", True): [(4096, 80), (4096, 1000)],
    ("cpu", False): [(4096, 80), (4096, 1000)],
    ("cuda", False): [(4096, c) for c in (80, 1000, 10000)],
}
_GRIDS = {
    # Quick: a vocabulary curve at N=512, the token-classification shapes (4096 rows of 9 and 133 tags) and the
    # fixed cost of a call (one row of 9 tags).
    ("cpu", True): {"ce": [(512, c) for c in (512, 4096, 32000)] + [(4096, 9), (4096, 133), (1, 9)],
                    "crf": [(8, 64, 9), (8, 256, 9), (8, 64, 37), (8, 64, 73)],
                    "lce": [(512, 256, 32000)]},
    ("cuda", True): {"ce": [(4096, c) for c in (4096, 32000, 128256)],
                     "crf": [(32, t, k) for t in (128, 512) for k in (9, 73)],
                     "lce": [(8192, 4096, 128256)]},
    # Token classification (C = 9..133 tags) and vocabularies up to N=4096, C=32000.
    ("cpu", False): {"ce": [(4096, c) for c in (9, 37, 133, 1024, 8192, 32000)],
                     "crf": [(b, t, k) for b in (8, 32) for t in (128, 512) for k in (9, 37, 73, 133)],
                     "lce": [(2048, 512, 32000), (4096, 1024, 128256)]},
    ("cuda", False): {"ce": [(8192, c) for c in (4096, 32000, 128256, 262144)],
                      "crf": [(b, t, k) for b in (8, 32) for t in (128, 512) for k in (9, 37, 73, 133)],
                      "lce": [(8192, 4096, 128256), (8192, 2048, 32000)]},
}


def parse_shapes(text: str) -> List[Tuple[int, ...]]:
    """``"4096x32000,8x128x9"`` -> ``[(4096, 32000), (8, 128, 9)]``."""
    shapes = []
    for item in text.split(","):
        dims = tuple(int(d) for d in item.strip().lower().split("x"))
        if len(dims) not in (2, 3) or min(dims) < 1:
            raise argparse.ArgumentTypeError(
                f"a shape is NxC (cross entropy), BxTxK (CRF) or NxHxV (linear_cross_entropy), got {item!r}")
        shapes.append(dims)
    return shapes


def _csv_list(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return items

    return parse


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedloss-bench",
        description="Benchmark every available fusedloss backend against eager PyTorch, pytorch-crf, "
                    "and Liger-Kernel / torch.compile / torch-struct when available.")
    parser.add_argument("--quick", action="store_true", help="small grid and few repeats (< 2 min on a 2-core CPU)")
    parser.add_argument("--ops", type=_csv_list(cases.ALL_OPS), default=list(cases.ALL_OPS),
                        help=f"comma-separated subset of {','.join(cases.ALL_OPS)} (default: all)")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated NxC (cross-entropy ops), BxTxK (CRF ops) and NxHxV "
                             "(linear_cross_entropy) shapes; "
                             "default: a grid per device")
    parser.add_argument("--dtype", type=_csv_list(tuple(_DTYPES)), default=["float32"],
                        help="comma-separated dtypes (default float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    parser.add_argument("--name", default="bench",
                        help="stem of the output files; {device} is replaced by the device name (default bench)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's choice, all cores)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the eager cross-entropy code (compiles once per shape)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _problems(args, device: torch.device) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    grid = _GRIDS[(device.type, bool(args.quick))]
    problems = []
    for op in args.ops:
        wanted_dims = 3 if op in cases.CRF_OPS or op in cases.LINEAR_OPS else 2
        if args.shapes is not None:
            shapes = args.shapes
        elif op in cases.SIGMOID_OPS:
            shapes = _SIGMOID_GRIDS[(device.type, bool(args.quick))]
        else:
            shapes = grid["ce" if wanted_dims == 2 else "lce" if op in cases.LINEAR_OPS else "crf"]
        for shape in shapes:
            if len(shape) == wanted_dims:
                problems.extend((op, shape, _DTYPES[d]) for d in args.dtype)
    return problems


class BenchmarkFailed(RuntimeError):
    """A backend raised something other than "cannot serve this case" (the exception it raised is the cause)."""


# The only exceptions that skip a (case, backend): the backend cannot serve the case, and says why.
_UNAVAILABLE = (fusedloss.BackendUnavailable, cases.CaseUnavailable)


@contextlib.contextmanager
def _failing_loudly(op: str, backend: str, shape_text: str, dtype_name: str) -> Iterator[None]:
    """Re-raise any exception (but the skips) as :class:`BenchmarkFailed` naming the case, with the original as
    its cause: the run stops with a non-zero exit and both tracebacks."""
    try:
        yield
    except _UNAVAILABLE:
        raise
    except Exception as exc:
        raise BenchmarkFailed(f"{op} on {backend}, shape {shape_text}, {dtype_name}: "
                              f"{type(exc).__name__}: {exc}") from exc


def run(args, device: torch.device, environment: Dict) -> Tuple[List[Dict], List[Dict]]:
    """Measure every (op, shape, dtype) x backend x mode; returns (rows, skipped)."""
    from tqdm import tqdm

    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    fused = cases.fusedloss_backends(device)
    plan = [(op, shape, dtype, cases.peer_backends(op, device, args.compile) + fused)
            for op, shape, dtype in _problems(args, device)]
    total = sum(len(backends) * (1 if op == "crf_decode" else 2) for op, _, _, backends in plan)
    rows, skipped = [], []
    copy_gbps: Dict[tuple, float] = {}  # per (shape, dtype): the device's copy bandwidth over the logits' bytes
    with tqdm(total=total, disable=args.no_progress, file=sys.stderr, unit="run") as progress:
        for op, shape, dtype, backends in plan:
            inputs = cases.make_inputs(op, shape, dtype, device)
            shape_text = "x".join(map(str, shape))
            dtype_name = str(dtype).replace("torch.", "")
            baseline_value = None
            if op in cases.CROSS_ENTROPY_OPS and (shape, dtype) not in copy_gbps:
                copy_gbps[(shape, dtype)] = harness.copy_bandwidth(shape[0] * shape[1], dtype, device, warmup, repeats)
            for backend in backends:
                n_modes = 1 if op == "crf_decode" else 2
                progress.set_description(f"{op} {shape_text} {backend}")
                try:
                    with _failing_loudly(op, backend, shape_text, dtype_name):
                        workload = cases.make_workload(op, backend, inputs, dtype, device)
                        workload.reset()
                        value = workload.forward()
                except _UNAVAILABLE as exc:
                    # The backend cannot serve this dtype or shape: recorded with its reasons, not fatal. Anything
                    # else a kernel raises is a bug and stops the run (_failing_loudly).
                    skipped.append({"op": op, "backend": backend, "shape": shape_text, "dtype": dtype_name,
                                    "reason": f"{type(exc).__name__}: {exc}"})
                    progress.update(n_modes)
                    continue
                if backend == cases.BASELINE[op]:
                    baseline_value = value
                diff = cases.difference(op, value, baseline_value) if baseline_value is not None else ""
                for mode, fn in workload.modes().items():
                    with _failing_loudly(op, f"{backend} ({mode})", shape_text, dtype_name):
                        timing = harness.time_call(fn, workload.reset, device, warmup, repeats)
                        memory = "" if args.no_memory else harness.peak_memory(fn, workload.reset, device)
                    row = {"op": op, "mode": mode, "backend": backend, "shape": shape_text,
                           **cases.shape_dims(op, shape), "dtype": dtype_name, "repeats": repeats,
                           "warmup": warmup, "baseline": cases.BASELINE[op], "peak_mem_mib": memory,
                           "rel_diff_vs_baseline": diff, **timing, **environment}
                    if op in cases.CROSS_ENTROPY_OPS:
                        row.update(report.bandwidth(cases.cross_entropy_bytes(mode, shape, dtype, backend),
                                                    timing["median_ms"], copy_gbps[(shape, dtype)]))
                    rows.append(row)
                    progress.update(1)
    report.add_speedups(rows)
    return rows, skipped


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedloss-bench: --device cuda, but torch sees no CUDA device")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        _run_and_report(args, device, list(sys.argv[1:] if argv is None else argv))
    finally:  # main() may run inside a longer process (the tests): leave its thread count as it was
        torch.set_num_threads(threads)
    return 0


def _run_and_report(args, device: torch.device, argv: List[str]) -> None:
    environment = harness.environment(device)
    name = args.name.replace("{device}", harness.device_slug(device))
    os.makedirs(args.out, exist_ok=True)
    rows, skipped = run(args, device, environment)
    print(report.format_table(rows))
    for item in skipped:
        print(f"skipped {item['op']} {item['backend']} {item['shape']} {item['dtype']}: {item['reason']}")
    prefix = os.path.join(args.out, name)
    report.write_csv(rows, prefix + ".csv")
    config = {"argv": argv, "memory_method": harness.MEMORY_METHOD[device.type],
              "backends": fusedloss.available_backends()}
    report.write_json(prefix + ".json", environment, config, skipped, rows)
    with open(prefix + ".md", "w") as markdown:
        markdown.write(report.format_markdown(rows))
    written = report.plot(rows, prefix)
    print(f"\nwrote {prefix}.csv, {prefix}.json, {prefix}.md" + "".join(f", {p}" for p in written))
    print(f"device: {environment['device_name']}; torch {environment['torch_version']}, "
          f"triton {environment['triton_version'] or '-'}; peak memory: {harness.MEMORY_METHOD[device.type]}")
