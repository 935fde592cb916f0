"""Fused linear + cross entropy: time and peak memory against eager and the peers, at the large-vocabulary shapes.

For each shape N x H x V (float32 by default), forward+backward of a head ``loss(hidden (N, H), weight (V, H),
target (N,))`` is timed for: eager ``F.cross_entropy(F.linear(x, w), y)`` (the baseline), torch's chunked
``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``, Cut Cross-Entropy (its torch.compile
implementation on the CPU) and Liger's fused linear cross entropy (CUDA only) when importable, and
``fusedloss.linear_cross_entropy`` with its default chunk size and a sweep of chunk sizes, plain and with label
smoothing 0.1, focal γ = 2 and z-loss 1e-4. Calls are interleaved (every candidate once per round), medians over
the rounds; the peak extra memory of one call comes from ``fusedloss.bench.harness.peak_memory`` (the CPU
allocator's trace under torch.profiler; max_memory_allocated on CUDA). Prints and writes a Markdown table.

    python benchmarks/bench_linear_cross_entropy.py [--shapes 2048x512x32000,4096x1024x128256] [--repeats 3]
        [--chunks 64,128,256] [--no-options] [--threads 2] [--out benchmarks/results/linear_cross_entropy_cpu.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench.harness import device_name, peak_memory, synchronize
from fusedloss.linear import default_chunk_size


def _peers(device: torch.device) -> Dict[str, Callable]:
    peers = {"eager": lambda x, w, y: F.cross_entropy(F.linear(x, w), y)}
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        peers["torch chunked"] = lambda x, w, y: F.linear_cross_entropy(x, w, y, options=options)
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        from cut_cross_entropy import linear_cross_entropy as cce

        impl = "cce" if device.type == "cuda" else "torch_compile"
        peers["Cut Cross-Entropy"] = lambda x, w, y: cce(x, w, y, impl=impl)
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        peers["Liger FLCE"] = lambda x, w, y: liger(w, x, y)
    return peers


def _ours(chunk_size, **options) -> Callable:
    return lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y, chunk_size=chunk_size, **options)


def run_shape(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, chunks: List[int],
              repeats: int, with_options: bool = True) -> List[Dict]:
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)
    default = default_chunk_size(n, h, v, device.type)
    candidates = dict(_peers(device))
    candidates[f"fusedloss (chunk {default}, default)"] = _ours(None)
    for chunk in chunks:
        if chunk != default:
            candidates[f"fusedloss (chunk {chunk})"] = _ours(chunk)
    if with_options:
        candidates[f"fusedloss + label smoothing 0.1 (chunk {default})"] = _ours(None, label_smoothing=0.1)
        candidates[f"fusedloss + focal γ=2 (chunk {default})"] = _ours(None, focal_gamma=2.0)
        candidates[f"fusedloss + z-loss 1e-4 (chunk {default})"] = _ours(None, z_loss=1e-4)

    def step(fn):
        def call():
            x.grad = None
            w.grad = None
            fn(x, w, y).backward()
            synchronize(device)
        return call

    calls = {name: step(fn) for name, fn in candidates.items()}
    for call in calls.values():  # warm-up (and torch.compile's compilation)
        call()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)

    def reset():
        x.grad = None
        w.grad = None

    rows = []
    eager_ms = statistics.median(times["eager"])
    eager_mib = None
    for name, call in calls.items():
        mib = peak_memory(call, reset, device)
        if name == "eager":
            eager_mib = mib
        median = statistics.median(times[name])
        rows.append({"shape": f"{n}x{h}x{v}", "what": name, "ms": median, "speedup": eager_ms / median,
                     "mib": mib})
    for row in rows:
        row["mem_ratio"] = row["mib"] / eager_mib if eager_mib else float("nan")
    return rows


def markdown(rows: List[Dict], header: str) -> str:
    lines = [header, "", "| N x H x V | what | fwd+bwd ms | speed-up vs eager | peak extra MiB | memory vs eager |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['what']} | {r['ms']:.0f} | {r['speedup']:.2f}x | {r['mib']:.1f} | "
                     f"{r['mem_ratio']:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048x512x32000,4096x1024x128256")
    parser.add_argument("--chunks", default="64,128,256,512", help="chunk sizes to sweep besides the default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-options", action="store_true", help="time plain cross entropy only")
    parser.add_argument("--out", default=None, help="write the Markdown table here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    rows = []
    for shape in args.shapes.split(","):
        n, h, v = (int(d) for d in shape.lower().split("x"))
        rows += run_shape(n, h, v, dtype, device, chunks, args.repeats, not args.no_options)
    header = (f"Device: {device_name(device)}, torch {torch.__version__}, {args.dtype}, "
              f"{torch.get_num_threads()} threads; medians of {args.repeats} interleaved forward+backward calls; "
              f"peak extra memory of one call (fusedloss.bench.harness.peak_memory).")
    text = markdown(rows, header)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
