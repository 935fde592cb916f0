"""Vocabulary-parallel cross entropy against gathering the logits: time and per-rank peak memory.

Spawns ``--world`` processes on this machine (gloo, CPU tensors, one thread per rank); each holds an equal
``(N, V / world)`` slice of float32 logits (generated per rank, never whole) and int64 targets shared by all.
Per vocabulary size, each rank times forward+backward of

- ``vocab_parallel_cross_entropy(shard, target)`` (statistics all-reduced, gradient of the shard);
- all-gather of the logits (``dist.all_gather`` + ``torch.cat``), then ``fusedloss.cross_entropy`` on the
  gathered ``(N, V)`` logits and the shard's slice of its gradient;
- the same with ``torch.nn.functional.cross_entropy``;

and, with ``--hidden H``, the linear form ``vocab_parallel_linear_cross_entropy(input, W_shard, target)``
against all-gather of the head's rows + ``fusedloss.linear_cross_entropy`` on the full head.

Time: median over ``--repeats`` runs (after one warm-up) of the slowest rank's forward+backward (the ranks
start each run together after a barrier). Memory, in a second spawn of the ranks: the peak resident set size
of the rank's process during one forward+backward (VmHWM in /proc/self/status, reset through
/proc/self/clear_refs before the run) minus the resident size before it, the largest over ranks: what the call
adds to the inputs that already exist, the returned gradient included. In that spawn only, glibc's malloc is
told to serve every allocation above 128 KiB from fresh mmaps (MALLOC_MMAP_THRESHOLD_) so that freed memory
goes back to the system and a later run cannot hide its peak in memory an earlier one left behind (it makes
every allocation fault its pages in, which is why the times come from a spawn without it).

    python benchmarks/bench_distributed.py                      # N=4096, V=32000 and 128256, world 2
    python benchmarks/bench_distributed.py --hidden 256 --vocab 32000 --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_bytes(step) -> int:
    """Peak resident bytes that one call of ``step`` adds to the process (see the module docstring)."""
    result = None
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets VmHWM to the current resident size
    result = step()
    peak = _rss_kib("VmHWM")
    del result
    return (peak - before) * 1024


def _methods(rank, world, rows, vocab, hidden):
    """name -> a function running one forward+backward on this rank and returning the shard's gradient."""
    import fusedloss
    from fusedloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    shard_size = vocab // world
    target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0))
    shard = torch.randn(rows, shard_size, generator=torch.Generator().manual_seed(1 + rank))
    offset = rank * shard_size

    def vocab_parallel():
        logits = shard.detach().requires_grad_()
        vocab_parallel_cross_entropy(logits, target).backward()
        return logits.grad

    def gathered(loss_fn):
        def step():
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard)
            logits = torch.cat(parts, dim=-1).requires_grad_()
            del parts
            loss_fn(logits, target).backward()
            return logits.grad[:, offset:offset + shard_size].clone()

        return step

    methods = {
        "vocab_parallel_cross_entropy": vocab_parallel,
        "all-gather + fusedloss.cross_entropy": gathered(fusedloss.cross_entropy),
        "all-gather + F.cross_entropy": gathered(F.cross_entropy),
    }
    if hidden:
        hidden_states = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(7)) / hidden**0.5
        head_shard = torch.randn(shard_size, hidden, generator=torch.Generator().manual_seed(8 + rank))

        def linear_parallel():
            x, head = hidden_states.detach().requires_grad_(), head_shard.detach().requires_grad_()
            vocab_parallel_linear_cross_entropy(x, head, target).backward()
            return head.grad

        def linear_gathered():
            parts = [torch.empty_like(head_shard) for _ in range(world)]
            dist.all_gather(parts, head_shard)
            head = torch.cat(parts).requires_grad_()
            del parts
            x = hidden_states.detach().requires_grad_()
            fusedloss.linear_cross_entropy(x, head, target).backward()
            return head.grad[offset:offset + shard_size].clone()

        methods[f"vocab_parallel_linear_cross_entropy (H={hidden})"] = linear_parallel
        methods[f"all-gather head + fusedloss.linear_cross_entropy (H={hidden})"] = linear_gathered
    return methods


def _worker(rank, world, store, args, phase, queue):
    """``phase`` "time": median of the slowest rank's time; "memory": the largest rank's peak (one run)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows_out = []
    for vocab in args.vocab:
        for name, step in _methods(rank, world, args.rows, vocab, args.hidden).items():
            measures = []
            for repeat in range(args.repeats + 1 if phase == "time" else 2):
                dist.barrier()
                if phase == "memory":
                    measure = _peak_bytes(step)  # the first run (first-call imports, buffers) is dropped
                else:
                    start = time.perf_counter()
                    step()
                    measure = time.perf_counter() - start
                measure = torch.tensor([measure], dtype=torch.float64)
                dist.all_reduce(measure, op=dist.ReduceOp.MAX)  # the slowest rank, the largest peak
                if repeat:  # the first run warms up
                    measures.append(float(measure))
            rows_out.append((vocab, name, statistics.median(measures)))
    if rank == 0:
        queue.put(rows_out)
    dist.barrier()
    dist.destroy_process_group()


def _markdown(rows, args, load) -> str:
    lines = [
        f"# Vocabulary-parallel cross entropy, {args.world} ranks on one CPU",
        "",
        f"Device: {_cpu_name()} ({os.cpu_count()} cores), gloo, {args.world} processes of 1 thread, "
        f"torch {torch.__version__}, float32, N = {args.rows} rows, equal shards of V / {args.world} classes. "
        f"Median of {args.repeats} runs of the slowest rank's forward+backward; peak memory: the largest over "
        "ranks of the resident-set peak during one forward+backward above the resident size before it "
        "(inputs excluded, returned gradient included). A shared, noisy machine: take ratios, not absolutes.",
        "",
        f"Load average of the machine (1 min) when the run started and ended: {load[0]:.1f}, {load[1]:.1f} "
        "(other jobs shared the 2 cores).",
        "",
        "`python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| V | method | time fwd+bwd (ms) | time vs all-gather + F.cross_entropy | peak memory per rank (MiB) |",
        "|---:|---|---:|---:|---:|",
    ]
    for vocab in args.vocab:
        group = [row for row in rows if row[0] == vocab]
        baseline = next(row[2] for row in group if row[1] == "all-gather + F.cross_entropy")
        for _, name, median, peak in group:
            ratio = f"{median / baseline:.2f}x" if "linear" not in name else "-"
            lines.append(f"| {vocab} | {name} | {median * 1e3:.0f} | {ratio} | {peak / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=lambda text: [int(v) for v in text.split(",")], default=[32000, 128256])
    parser.add_argument("--hidden", type=int, default=0, help="also time the linear form with this H (0: off)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(RESULTS, "distributed_cpu-AMD-EPYC.md"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    measured = {}
    for phase in ("time", "memory"):
        if phase == "memory":  # inherited by the ranks of this spawn only (it slows every allocation down)
            os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        with tempfile.TemporaryDirectory() as directory:
            mp.spawn(_worker, args=(args.world, os.path.join(directory, "store"), args, phase, queue),
                     nprocs=args.world)
        measured[phase] = queue.get()
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    rows = [(vocab, name, median, peak)
            for (vocab, name, median), (_, _, peak) in zip(measured["time"], measured["memory"], strict=True)]
    text = _markdown(rows, args, (load_before, os.getloadavg()[0]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        file.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
