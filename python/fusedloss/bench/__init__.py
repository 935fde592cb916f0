"""``fusedloss-bench``: time every fusedloss backend against the libraries it replaces.

Ops (``--ops``):

=====================  ===============================================  ===========================
op                     what is timed                                    baseline
=====================  ===============================================  ===========================
cross_entropy          ``fusedloss.cross_entropy(x, y)``, x ``(N, C)``  ``F.cross_entropy``
cross_entropy_smooth   the same with ``label_smoothing=0.1``            the same in ``F``
focal                  ``fusedloss.focal_loss(x, y, gamma=2)``          eager ``-(1-p_y)^2 log p_y``
crf_nll                ``-fusedloss.CRF(K)(emissions, tags, mask)``,    ``torchcrf.CRF`` (pytorch-crf)
                       emissions ``(B, T, K)``
crf_decode             ``CRF.decode(emissions, mask)`` (to lists)       ``torchcrf.CRF.decode``
=====================  ===============================================  ===========================

Each op runs in mode ``forward`` and (except decode) ``full`` = forward + backward, on every
fusedloss backend that can serve it on the device, on the baseline, and on the optional peers
(Liger-Kernel on CUDA, ``torch.compile`` of the eager code with ``--compile``, torch-struct when
importable). Timing: warmup calls, then ``--repeats`` timed calls; median, 20% and 80% quantiles
(CUDA events on the GPU). Peak extra memory: see :func:`fusedloss.bench.harness.peak_memory`.
Bandwidth (cross-entropy rows): the bytes the fused kernels move (forward + backward: the logits read twice
and the gradient written once; the forward alone: the same for cpp and cuda, which compute the gradient in the
forward pass, one read for Triton; the targets), the GB/s that makes at the median time, and its fraction
of the GB/s of a plain copy of the logits' bytes timed in the same run: the distance to what the memory
system sustains, on any device.
Outputs in ``--out``: ``<name>.csv`` (one row per op, mode, backend, shape, dtype, device),
``<name>.json`` (environment and skipped cases), ``<name>.md`` (the tables in Markdown),
``<name>_cross_entropy.png`` and ``<name>_crf.png``.
Skipped: only a backend that cannot serve a case (a fusedloss backend raising
:class:`fusedloss.BackendUnavailable`, with its reasons; a peer raising
:class:`fusedloss.bench.cases.CaseUnavailable`). Any other exception a backend raises stops the run
with a non-zero exit status and its traceback (:class:`fusedloss.bench.cli.BenchmarkFailed`).
"""

from fusedloss.bench.cli import main

__all__ = ["main"]
