"""Time the reference CRF (``fusedloss.reference.crf``) against pytorch-crf 0.7.2 on the CPU.

Both run in this process on the same inputs, alternating run by run: log-likelihood forward+backward
(reduction sum, gradients of the emissions and the three transition parameters) and decoding to Python lists
(``torchcrf.CRF.decode`` against the reference Viterbi plus one ``tolist()``). Prints the median time of each
and the ratio torchcrf / reference (above 1: the reference is faster). Times are those of this machine's CPU only.

    python benchmarks/bench_reference_crf.py [--threads 2] [--repeats 20] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchcrf

from fusedloss.reference import crf as reference


def median_seconds(baseline, candidate, repeats: int, clock=time.perf_counter):
    """Median time of each function; the runs alternate so that both see the same machine load."""
    baseline(), candidate()  # warm-up
    times = {baseline: [], candidate: []}
    for _ in range(repeats):
        for fn in (baseline, candidate):
            start = clock()
            fn()
            times[fn].append(clock() - start)
    return statistics.median(times[baseline]), statistics.median(times[candidate])


def bench(batch: int, seq_len: int, num_tags: int, repeats: int, clock) -> None:
    torch.manual_seed(0)
    crf = torchcrf.CRF(num_tags, batch_first=True)
    emissions = torch.randn(batch, seq_len, num_tags, requires_grad=True)
    tags = torch.randint(0, num_tags, (batch, seq_len))
    # Ragged batch: lengths from seq_len / 2 to seq_len, the longest first.
    lengths = torch.linspace(seq_len, seq_len // 2, batch).long()
    mask = torch.arange(seq_len)[None] < lengths[:, None]
    params = (crf.transitions, crf.start_transitions, crf.end_transitions)

    def torchcrf_llh():
        crf(emissions, tags, mask, reduction="sum").backward()

    def reference_llh():
        reference.crf_log_likelihood(emissions, tags, mask, *params).sum().backward()

    def torchcrf_decode():
        with torch.no_grad():
            crf.decode(emissions, mask)

    def reference_decode():
        with torch.no_grad():
            path = reference.crf_viterbi(emissions, mask, *params)[0].tolist()
            [row[: int(n)] for row, n in zip(path, lengths.tolist())]

    for name, baseline, ours in (("llh fwd+bwd", torchcrf_llh, reference_llh),
                                 ("decode", torchcrf_decode, reference_decode)):
        t_base, t_ours = median_seconds(baseline, ours, repeats, clock)
        print(f"B={batch} T={seq_len} K={num_tags} {name:12s} torchcrf {t_base * 1e3:8.2f} ms  "
              f"reference {t_ours * 1e3:8.2f} ms  speedup {t_base / t_ours:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time, this process's CPU time (steadier "
                        "when other processes load the machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"median of {args.repeats}")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for num_tags in (9, 37):
        bench(32, 128, num_tags, args.repeats, clock)


if __name__ == "__main__":
    main()
