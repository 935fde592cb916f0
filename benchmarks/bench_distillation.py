"""Distillation losses: time and peak memory against the eager formula.

- ``distillation_loss`` forward+backward on logits ``(N, V)`` (default N = 4096, V = 32000, float32, β = 0 and
  0.5) against the eager formula (TRL's ``generalized_jsd_loss``: ``log_softmax`` of both, the mixture through
  ``logsumexp``, ``F.kl_div``, the mean over rows). Goal: at least 2x eager.
- ``linear_distillation_loss`` forward+backward on hidden states ``(N, H)`` with two heads ``(V, H)`` (default
  N = 2048, H = 512, V = 32000) against eager (both heads' ``F.linear`` + the formula; the teacher's head without
  autograd). Goal: at least 1.2x eager at no more than 0.1x its peak memory.

Calls are interleaved (every candidate once per round), medians over the rounds; the peak extra memory of one call
comes from ``fusedloss.bench.harness.peak_memory`` (the CPU allocator's trace under torch.profiler;
max_memory_allocated on CUDA). Prints a Markdown table and writes CSV, JSON and Markdown into benchmarks/results/.

    python benchmarks/bench_distillation.py [--rows 4096] [--vocab 32000] [--linear 2048x512x32000]
        [--repeats 5] [--threads 2] [--backends auto] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench.harness import (
    device_name,
    device_slug,
    interleaved_medians,
    peak_memory,
    synchronize,
    write_results,
)

COLUMNS = ["case", "shape", "beta", "what", "median_ms", "speedup", "peak_mem_mib", "mem_ratio"]


def eager_formula(student_logits, teacher_logits, beta: float, temperature: float = 1.0) -> torch.Tensor:
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(log_ps, log_pt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(log_pt, log_ps, reduction="none", log_target=True)
    else:
        mixture = torch.logsumexp(torch.stack([log_ps + math.log(1 - beta), log_pt + math.log(beta)]), dim=0)
        jsd = (beta * F.kl_div(mixture, log_pt, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(mixture, log_ps, reduction="none", log_target=True))
    return jsd.sum() / student_logits.shape[0]


def _measure(calls: Dict[str, Callable[[], None]], reset: Callable[[], None], repeats: int,
             device: torch.device) -> Dict[str, Dict]:
    medians = interleaved_medians(calls, repeats, device)
    return {name: {"median_ms": medians[name], "peak_mem_mib": peak_memory(call, reset, device)}
            for name, call in calls.items()}


def _rows(case: str, shape: str, beta: float, measured: Dict[str, Dict]) -> List[Dict]:
    eager = measured["eager"]
    return [{"case": case, "shape": shape, "beta": beta, "what": name, "median_ms": m["median_ms"],
             "speedup": eager["median_ms"] / m["median_ms"], "peak_mem_mib": m["peak_mem_mib"],
             "mem_ratio": m["peak_mem_mib"] / eager["peak_mem_mib"] if eager["peak_mem_mib"] else float("nan")}
            for name, m in measured.items()]


def bench_logits(n: int, v: int, beta: float, backends: List[str], repeats: int, device: torch.device,
                 dtype: torch.dtype) -> List[Dict]:
    torch.manual_seed(0)
    s = (2 * torch.randn(n, v, device=device)).to(dtype).requires_grad_()
    t = (2 * torch.randn(n, v, device=device)).to(dtype)

    def step(fn):
        def call():
            s.grad = None
            fn().backward()
            synchronize(device)
        return call

    calls = {"eager": step(lambda: eager_formula(s, t, beta))}
    for backend in backends:
        calls[f"fusedloss ({backend})"] = step(
            lambda backend=backend: fusedloss.distillation_loss(s, t, beta=beta, backend=backend))

    def reset():
        s.grad = None

    return _rows("distillation_loss", f"{n}x{v}", beta, _measure(calls, reset, repeats, device))


def bench_linear(n: int, h: int, v: int, beta: float, backends: List[str], repeats: int, device: torch.device,
                 dtype: torch.dtype) -> List[Dict]:
    torch.manual_seed(0)
    xs = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    ws = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    xt = torch.randn(n, h, device=device).to(dtype)
    wt = (torch.randn(v, h, device=device) / h**0.5).to(dtype)

    def eager():
        with torch.no_grad():
            teacher_logits = F.linear(xt, wt)
        return eager_formula(F.linear(xs, ws), teacher_logits, beta)

    def step(fn):
        def call():
            xs.grad = None
            ws.grad = None
            fn().backward()
            synchronize(device)
        return call

    calls = {"eager": step(eager)}
    for backend in backends:
        calls[f"fusedloss ({backend})"] = step(
            lambda backend=backend: fusedloss.linear_distillation_loss(xs, ws, xt, wt, beta=beta, backend=backend))

    def reset():
        xs.grad = None
        ws.grad = None

    return _rows("linear_distillation_loss", f"{n}x{h}x{v}", beta, _measure(calls, reset, repeats, device))


def markdown(rows: List[Dict], header: str) -> str:
    lines = [header, "",
             "| loss | shape | β | what | fwd+bwd ms | speed-up vs eager | peak extra MiB | memory vs eager |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['shape']} | {r['beta']:g} | {r['what']} | {r['median_ms']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['peak_mem_mib']:.1f} | {r['mem_ratio']:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--betas", default="0,0.5")
    parser.add_argument("--linear", default="2048x512x32000", help="N x H x V of the linear form ('' to skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="auto", help="comma-separated fusedloss backends to time")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = [b for b in args.backends.split(",") if b]
    betas = [float(b) for b in args.betas.split(",") if b]
    rows: List[Dict] = []
    for beta in betas:
        rows += bench_logits(args.rows, args.vocab, beta, backends, args.repeats, device, dtype)
    if args.linear:
        n, h, v = (int(d) for d in args.linear.lower().split("x"))
        for beta in betas:
            rows += bench_linear(n, h, v, beta, backends, args.repeats, device, dtype)
    header = (f"Device: {device_name(device)}, torch {torch.__version__}, {args.dtype}, "
              f"{torch.get_num_threads()} threads; medians of {args.repeats} interleaved forward+backward calls; "
              f"peak extra memory of one call (fusedloss.bench.harness.peak_memory).")
    text = markdown(rows, header)
    print(text)
    stem = os.path.join(args.out_dir, f"distillation_{device_slug(device)}")
    write_results(stem, text, rows, COLUMNS, device, vars(args))
    print(f"wrote {stem}.md, .csv, .json")


if __name__ == "__main__":
    main()
