"""Token-classification shapes and per-call cost: fusedloss (auto backend) against eager PyTorch.

Times, in the same run and interleaved call by call (so that drifts of a shared machine hit both sides
alike), forward+backward of cross_entropy (plain, label smoothing 0.1, focal γ=2) against
F.cross_entropy and the eager focal formula at N=4096 rows of C = 9, 17, 37, 64, 133, 1024, 32000 classes; the
forward alone under torch.no_grad; the fixed cost of a call at N=1 and N=64 rows of 9 tags; the floor of a fused
forward+backward beside it (at 17 to 133 classes an autograd node that only copies the logits into a gradient:
torch's cost of a call and the memory's, no arithmetic; at C >= 1024 the machine's, one copy of the logits and
one row sum); and the CRF (log-likelihood forward+backward, decode) against pytorch-crf at B=1 T=32 K=9 and
B=32 T=128 K=9. --sweep instead times
cross_entropy at every C from 2 to 64 and at sizes up to 1024 (where a cliff between two paths would show).
Prints a Markdown table of medians and speed-ups (eager time / fusedloss time; above 1 is faster).

    python benchmarks/bench_token_classification.py [--repeats 30] [--threads 2] [--quick] [--sweep] [--out FILE]
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench.harness import device_name, interleaved_medians

FOCAL_GAMMA = 2.0


def eager_focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (-(1 - log_p.exp()) ** FOCAL_GAMMA * log_p).mean()


def interleaved_ms(calls: Dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> Dict[str, float]:
    """Median milliseconds per call of each entry, the entries timed in turn within every repeat (short calls in
    bursts: fusedloss.bench.harness.interleaved_medians)."""
    return interleaved_medians(calls, repeats, torch.device("cpu"), warmup)


def _fwd_bwd(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    # The step frees its own gradient (as zero_grad() would) inside its own timing: cleared at the start of the
    # next step instead, the free of the other side's gradient (and its temporaries' pages) would land in this
    # side's time.
    def step() -> None:
        loss_fn(logits, target).backward()
        logits.grad = None

    return step


def _fwd_no_grad(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            loss_fn(logits, target)

    return step


def softmax_rows(shapes: List[Tuple[int, int]], repeats: int) -> List[Tuple[str, str, float, float]]:
    variants = {
        "cross_entropy": (F.cross_entropy, fusedloss.cross_entropy),
        "label smoothing 0.1": (
            lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1),
            lambda x, y: fusedloss.cross_entropy(x, y, label_smoothing=0.1),
        ),
        "focal γ=2": (eager_focal, lambda x, y: fusedloss.focal_loss(x, y, gamma=FOCAL_GAMMA)),
    }
    rows = []
    for n, c in shapes:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(n, c, generator=gen).requires_grad_()
        target = torch.randint(0, c, (n,), generator=gen)
        reps = repeats if n * c <= 4096 * 1024 else max(5, repeats // 3)
        for variant, (eager, fused) in variants.items():
            if n < 4096 and variant != "cross_entropy":
                continue
            ms = interleaved_ms({"eager": _fwd_bwd(eager, logits, target), "fused": _fwd_bwd(fused, logits, target)},
                                reps)
            rows.append((f"{variant}, fwd+bwd", f"N={n} C={c}", ms["eager"], ms["fused"]))
        if n == 4096:
            ms = interleaved_ms({"eager": _fwd_no_grad(F.cross_entropy, logits, target),
                                 "fused": _fwd_no_grad(fusedloss.cross_entropy, logits, target)}, reps)
            rows.append(("cross_entropy, forward under no_grad", f"N={n} C={c}", ms["eager"], ms["fused"]))
        if n == 4096 and 9 < c < 1024:
            rows += node_floor_rows(logits, target, reps)
        if n == 4096 and c >= 1024:
            rows += memory_rows(logits, target, reps)
    return rows


def memory_rows(logits: torch.Tensor, target: torch.Tensor, repeats: int) -> List[Tuple[str, str, float, float]]:
    """The machine's own floor for a large vocabulary, in the same run: the fused forward+backward against one
    copy of the logits into a preallocated tensor (it reads the logits and writes the gradient, the least a
    forward+backward can move), the fused no_grad forward against ``logits.sum(-1)`` (one read). The "speed-up"
    column is floor time / fused time: 1 would be the floor itself, 0.4 is 2.5x it."""
    n, c = logits.shape
    buffer = torch.empty_like(logits)
    detached = logits.detach()

    def copy() -> None:
        buffer.copy_(detached)

    def row_sums() -> None:
        detached.sum(-1)

    ms = interleaved_ms({"floor": copy, "fused": _fwd_bwd(fusedloss.cross_entropy, logits, target)}, repeats)
    rows = [("preallocated copy of the logits vs fused fwd+bwd", f"N={n} C={c}", ms["floor"], ms["fused"])]
    ms = interleaved_ms({"floor": row_sums, "fused": _fwd_no_grad(fusedloss.cross_entropy, logits, target)},
                        repeats)
    rows.append(("logits.sum(-1) vs fused forward under no_grad", f"N={n} C={c}", ms["floor"], ms["fused"]))
    return rows


class _CopyNode(torch.autograd.Function):
    """The least work any fused forward+backward does: one autograd node whose forward reads the logits and writes
    them into a new gradient-sized buffer (a copy), and whose backward returns that buffer."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        grad = torch.empty_like(logits)
        grad.copy_(logits)
        ctx.save_for_backward(grad)
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return ctx.saved_tensors[0], None


def node_floor_rows(logits: torch.Tensor, target: torch.Tensor, repeats: int) -> List[Tuple[str, str, float, float]]:
    """At tag-set sizes, where a call is tens of microseconds: the fused forward+backward against _CopyNode, an
    autograd node that reads the logits and writes a gradient and computes nothing, in the same run. What the
    fused call costs above it is the kernel's arithmetic; what the floor costs is torch's (the Python call, the
    autograd graph and engine, the allocation) and the memory's. The floor is a Python autograd.Function, whose
    call costs a few microseconds more than fusedloss's C++ one: it errs on the high side."""
    n, c = logits.shape
    ms = interleaved_ms({"floor": _fwd_bwd(_CopyNode.apply, logits, target),
                         "fused": _fwd_bwd(fusedloss.cross_entropy, logits, target)}, repeats)
    return [("autograd node that copies the logits vs fused fwd+bwd", f"N={n} C={c}", ms["floor"], ms["fused"])]


# Tag-set sizes of the sweep: every C from 2 to 64 (where a cliff between two vector paths would show), then
# the sizes around the paths' limits up to a small vocabulary.
SWEEP_CLASSES = list(range(2, 65)) + [65, 80, 96, 100, 127, 128, 133, 160, 200, 255, 256, 257, 300, 400, 512, 1024]


def sweep_rows(repeats: int) -> List[Tuple[str, str, float, float]]:
    """cross_entropy forward+backward and forward under no_grad at N=4096 rows for every C of SWEEP_CLASSES."""
    rows = []
    for c in SWEEP_CLASSES:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(4096, c, generator=gen).requires_grad_()
        target = torch.randint(0, c, (4096,), generator=gen)
        ms = interleaved_ms({"eager": _fwd_bwd(F.cross_entropy, logits, target),
                             "fused": _fwd_bwd(fusedloss.cross_entropy, logits, target)}, repeats)
        rows.append(("cross_entropy, fwd+bwd", f"N=4096 C={c}", ms["eager"], ms["fused"]))
        ms = interleaved_ms({"eager": _fwd_no_grad(F.cross_entropy, logits, target),
                             "fused": _fwd_no_grad(fusedloss.cross_entropy, logits, target)}, repeats)
        rows.append(("cross_entropy, forward under no_grad", f"N=4096 C={c}", ms["eager"], ms["fused"]))
    return rows


def _crf_nll(crf, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        emissions.grad = None
        crf.zero_grad(set_to_none=True)
        (-crf(emissions, tags, mask)).backward()

    return step


def _crf_decode(crf, emissions: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            crf.decode(emissions, mask)

    return step


def crf_rows(shapes: List[Tuple[int, int, int]], repeats: int) -> List[Tuple[str, str, float, float]]:
    try:
        import torchcrf
    except ImportError:
        print("pytorch-crf is not installed: CRF rows skipped")
        return []
    rows = []
    for b, t, k in shapes:
        gen = torch.Generator().manual_seed(0)
        emissions = torch.randn(b, t, k, generator=gen).requires_grad_()
        tags = torch.randint(0, k, (b, t), generator=gen)
        mask = torch.ones(b, t, dtype=torch.bool)
        ours = fusedloss.CRF(k, batch_first=True)
        theirs = torchcrf.CRF(k, batch_first=True)
        theirs.load_state_dict(ours.state_dict())

        reps = repeats if b * t <= 1024 else max(5, repeats // 3)
        shape = f"B={b} T={t} K={k}"
        ms = interleaved_ms({"eager": _crf_nll(theirs, emissions, tags, mask),
                             "fused": _crf_nll(ours, emissions, tags, mask)}, reps)
        rows.append(("CRF log-likelihood, fwd+bwd (vs pytorch-crf)", shape, ms["eager"], ms["fused"]))
        ms = interleaved_ms({"eager": _crf_decode(theirs, emissions, mask),
                             "fused": _crf_decode(ours, emissions, mask)}, reps)
        rows.append(("CRF decode (vs pytorch-crf)", shape, ms["eager"], ms["fused"]))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    parser.add_argument("--sweep", action="store_true",
                        help="instead: cross_entropy at N=4096 for every C from 2 to 64 and sizes up to 1024")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        softmax_shapes = [(1, 9), (64, 9), (4096, 9), (4096, 133)]
        crf_shapes = [(1, 32, 9)]
        args.repeats = min(args.repeats, 10)
    else:
        softmax_shapes = [(1, 9), (64, 9), (4096, 9), (4096, 17), (4096, 37), (4096, 64), (4096, 133),
                          (4096, 1024), (4096, 32000)]
        crf_shapes = [(1, 32, 9), (32, 128, 9)]
    if args.sweep:
        rows = sweep_rows(args.repeats)
    else:
        rows = softmax_rows(softmax_shapes, args.repeats) + crf_rows(crf_shapes, args.repeats)
    lines = [
        f"device: {device_name(torch.device('cpu'))}, torch {torch.__version__}, float32, "
        f"median of {args.repeats} interleaved calls (fewer for the largest shapes)",
        "",
        "| what | shape | eager ms | fusedloss ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for what, shape, eager_ms, fused_ms in rows:
        lines.append(f"| {what} | {shape} | {eager_ms:.4g} | {fused_ms:.4g} | {eager_ms / fused_ms:.2f}x |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
