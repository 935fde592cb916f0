"""CRF for partial annotation: the partial-label log-likelihood, log Z and k-best Viterbi against the plain CRF
ops of the same backend and against pytorch-crf.

At B x T x K (default 32 x 128 x 9, float32; sequence lengths drawn from [T/2, T], so masks are ragged), per
fusedloss backend:

- forward+backward of ``crf_log_likelihood`` with int64 tags (plain) and with bool allowed sets (partial: 30 %
  of the positions unlabeled, the others one tag), and of ``crf_log_partition``; pytorch-crf's log-likelihood
  forward+backward for scale. Goal: partial within 2.5x plain.
- ``crf_viterbi`` with k = 1 and k = 5 (tensors out), pytorch-crf's ``decode`` (lists out, its only form).
  Goal: 5-best within 6x 1-best.

Calls are interleaved (every candidate once per round), medians over the rounds. Prints a Markdown table and
writes it, with CSV and JSON, into benchmarks/results/crf_partial_<device>.*.

    python benchmarks/bench_crf_partial.py [--shapes 32x128x9,32x128x37] [--repeats 20] [--threads 2]
        [--backends reference,cpp] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Callable, Dict, List

import torch

import fusedloss
from fusedloss.bench.harness import (
    device_name,
    device_slug,
    interleaved_medians,
    synchronize,
    write_results,
)

COLUMNS = ["shape", "what", "backend", "median_ms", "vs_baseline", "baseline", "vs_pytorch_crf"]
UNLABELED = 0.3


def problem(batch: int, seq_len: int, num_tags: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    emissions = torch.randn(batch, seq_len, num_tags, generator=generator)
    tags = torch.randint(0, num_tags, (batch, seq_len), generator=generator)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    mask = torch.arange(seq_len)[None] < lengths[:, None]
    unlabeled = torch.rand(batch, seq_len, generator=generator) < UNLABELED
    allowed = torch.nn.functional.one_hot(tags, num_tags).bool() | unlabeled.unsqueeze(2)
    return [x.to(device) for x in (emissions, tags, mask, allowed)]


def bench_shape(batch: int, seq_len: int, num_tags: int, backends: List[str], repeats: int,
                device: torch.device) -> List[Dict]:
    import torchcrf

    emissions, tags, mask, allowed = problem(batch, seq_len, num_tags, device)
    theirs = torchcrf.CRF(num_tags, batch_first=True).to(device)
    leaf = emissions.clone().requires_grad_()

    def step(fn: Callable[[], torch.Tensor], module: torch.nn.Module) -> Callable[[], None]:
        def call():
            leaf.grad = None
            module.zero_grad(set_to_none=True)
            fn().backward()
            synchronize(device)
        return call

    def quiet(fn):
        def call():
            with warnings.catch_warnings():  # pytorch-crf hands uint8 masks to torch.where, which warns
                warnings.simplefilter("ignore", UserWarning)
                return fn()
        return call

    training = {("pytorch-crf", "log-likelihood"): step(quiet(lambda: -theirs(leaf, tags, mask)), theirs)}
    decoding = {("pytorch-crf", "decode"): quiet(lambda: theirs.decode(emissions, mask))}
    for backend in backends:
        ours = fusedloss.CRF(num_tags, batch_first=True, backend=backend).to(device)
        ours.load_state_dict(theirs.state_dict())
        training[(backend, "log-likelihood")] = step(lambda o=ours: -o(leaf, tags, mask), ours)
        training[(backend, "partial log-likelihood")] = step(lambda o=ours: -o(leaf, allowed, mask), ours)
        training[(backend, "log partition")] = step(lambda o=ours: o.log_partition(leaf, mask).sum(), ours)
        for k in (1, 5):
            decoding[(backend, f"viterbi k={k}")] = lambda o=ours, k=k: o.viterbi(emissions, mask, k=k)

    rows = []
    shape = f"{batch}x{seq_len}x{num_tags}"
    for calls, reference_name in ((training, "log-likelihood"), (decoding, "viterbi k=1")):
        medians = interleaved_medians(dict(zip(map(str, calls), calls.values())), repeats, device)
        medians = {key: medians[str(key)] for key in calls}
        pytorch_crf = medians[next(key for key in calls if key[0] == "pytorch-crf")]
        for (backend, what), ms in medians.items():
            baseline = medians.get((backend, reference_name))
            rows.append({"shape": shape, "what": what, "backend": backend, "median_ms": ms,
                         "vs_baseline": ms / baseline if baseline else float("nan"),
                         "baseline": reference_name if baseline else "",
                         "vs_pytorch_crf": pytorch_crf / ms})
    return rows


def markdown(rows: List[Dict], header: str) -> str:
    lines = [header, "",
             "| B x T x K | what | backend | ms | time vs the same backend's | speed-up vs pytorch-crf |",
             "|---|---|---|---:|---|---:|"]
    for r in rows:
        relative = f"{r['vs_baseline']:.2f}x {r['baseline']}" if r["baseline"] else "-"
        lines.append(f"| {r['shape']} | {r['what']} | {r['backend']} | {r['median_ms']:.3f} | {relative} | "
                     f"{r['vs_pytorch_crf']:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x128x9,32x128x37", help="comma-separated B x T x K")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=None,
                        help="comma-separated fusedloss backends (default: reference and auto's pick)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.backends is None:
        usable = [name for name, reason in fusedloss.available_backends().items() if reason is None]
        fused = "cpp" if device.type == "cpu" else "triton"
        args.backends = ",".join(["reference"] + ([fused] if fused in usable else []))
    backends = [b for b in args.backends.split(",") if b]
    rows: List[Dict] = []
    for shape in args.shapes.split(","):
        batch, seq_len, num_tags = (int(d) for d in shape.lower().split("x"))
        rows += bench_shape(batch, seq_len, num_tags, backends, args.repeats, device)
    header = (f"Device: {device_name(device)}, torch {torch.__version__}, float32, {torch.get_num_threads()} "
              f"threads; medians of {args.repeats} interleaved calls; lengths drawn from [T/2, T]; partial labels "
              f"with {UNLABELED:.0%} of the positions unlabeled. Training rows are forward+backward, decoding rows "
              "forward only.")
    text = markdown(rows, header)
    print(text)
    stem = os.path.join(args.out_dir, f"crf_partial_{device_slug(device)}")
    write_results(stem, text, rows, COLUMNS, device, vars(args))
    print(f"wrote {stem}.md, .csv, .json")


if __name__ == "__main__":
    main()
