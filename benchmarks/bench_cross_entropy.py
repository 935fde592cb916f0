"""Cross-entropy benchmark: forward and forward+backward time and peak memory
of every fusedloss backend against eager PyTorch (and torch.compile with --compile, Liger-Kernel on
CUDA when installed), for plain cross entropy, label smoothing and focal loss.

Grids: on CUDA, N=8192 rows and vocabularies C up to 262144 in bfloat16 (the goal shape is
C=128256); on the CPU, N=4096, C=32000 float32 plus the NER tag-set sizes C=9, 37, 133 at
the same N (B=32 sentences of T=128 tokens). Writes
benchmarks/results/cross_entropy_<device>.{csv,json} and a plot of time against C.
Extra arguments go to fusedloss-bench (e.g. --repeats 20, --compile, --device cpu).

    python benchmarks/bench_cross_entropy.py
"""

import argparse
import os
import sys

import torch

from fusedloss.bench import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GRIDS = {
    "cuda": ("8192x4096,8192x32000,8192x128256,8192x262144", "bfloat16"),
    "cpu": ("4096x9,4096x37,4096x133,4096x1024,4096x8192,4096x32000", "float32"),
}


if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    known, extra = pre.parse_known_args()
    shapes, dtype = GRIDS[torch.device(known.device).type]
    sys.exit(main(["--ops", "cross_entropy,cross_entropy_smooth,focal", "--shapes", shapes, "--dtype", dtype,
                   "--device", known.device, "--out", RESULTS, "--name", "cross_entropy_{device}", *extra]))
