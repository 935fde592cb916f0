"""CRF benchmark: log-likelihood forward and forward+backward, and Viterbi decode
to lists, of every fusedloss backend against pytorch-crf 0.7.2 (torchcrf.CRF; and torch-struct's
LinearChainCRF for the log-likelihood when it is importable), at B in {8, 32}, T in {128, 512},
K in {9, 37, 73, 133}, float32, full masks, on the current device. Writes
benchmarks/results/crf_<device>.{csv,json} and plots of time against T and K.
Extra arguments go to fusedloss-bench (e.g. --repeats 20, --device cpu).

    python benchmarks/bench_crf.py
"""

import os
import sys

from fusedloss.bench import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = ",".join(f"{b}x{t}x{k}" for b in (8, 32) for t in (128, 512) for k in (9, 37, 73, 133))


if __name__ == "__main__":
    sys.exit(main(["--ops", "crf_nll,crf_decode", "--shapes", SHAPES, "--out", RESULTS, "--name", "crf_{device}",
                   *sys.argv[1:]]))
