"""Sigmoid and multi-label loss benchmark: forward and forward+backward time and peak extra memory of every
fusedloss backend against torch's own function (BCE with logits, multilabel soft margin) and the loss written in
eager PyTorch (the published formula or the authors' code), float32, on the current device, at N=4096 rows:

- BCE with logits + pos_weight and sigmoid focal loss at C=80 and C=1000;
- multilabel soft margin and ZLPR at C=1000 and C=10000;
- bi-tempered logistic loss (t1, t2) = (0.8, 1.2) and (0.5, 4.0), 5 normalization steps, at C=1000;
- GHM-C with 10 and 30 bins at C=80.

Writes benchmarks/results/sigmoid_<group>_<device>.{csv,json,md} for the four groups. Extra arguments go to
fusedloss-bench (e.g. --repeats 20, --threads 2).

    python benchmarks/bench_sigmoid.py --threads 2
"""

import os
import sys

from fusedloss.bench import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GROUPS = (
    ("elementwise", "bce_pos_weight,sigmoid_focal", "4096x80,4096x1000"),
    ("multilabel", "multilabel_soft_margin,zlpr", "4096x1000,4096x10000"),
    ("bi_tempered", "bi_tempered_0.8_1.2,bi_tempered_0.5_4.0", "4096x1000"),
    ("ghmc", "ghmc_10,ghmc_30", "4096x80"),
)


if __name__ == "__main__":
    for group, ops, shapes in GROUPS:
        main(["--ops", ops, "--shapes", shapes, "--out", RESULTS, "--name", f"sigmoid_{group}_{{device}}",
              *sys.argv[1:]])
