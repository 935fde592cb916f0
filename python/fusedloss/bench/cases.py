"""What is benchmarked: the ops, their inputs, and one callable per (op, backend).

A :class:`Workload` holds the inputs of one (op, shape, dtype, device) bound to one backend:
``forward()`` returns the loss (or the decoded tag lists), ``full()`` runs forward and backward,
``reset()`` drops the gradients of the previous call. The fusedloss backends are named
``fusedloss-<backend>``; the peers ``eager``, ``torch.compile``, ``liger-kernel``, ``pytorch-crf``
and ``torch-struct``. The first backend of every op is its baseline.

A backend that cannot serve a case says so with an exception the run skips: a fusedloss backend with
:class:`fusedloss.BackendUnavailable` (its reasons), a peer with :class:`CaseUnavailable`. Any other exception is a
bug, and fails the run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import fusedloss

CROSS_ENTROPY_OPS = ("cross_entropy", "cross_entropy_smooth", "focal")
CRF_OPS = ("crf_nll", "crf_decode")
# Sigmoid and multi-label losses: see the block "Sigmoid and multi-label losses" below.
SIGMOID_OPS = ("bce_pos_weight", "sigmoid_focal", "multilabel_soft_margin", "zlpr", "bi_tempered_0.8_1.2",
               "bi_tempered_0.5_4.0", "ghmc_10", "ghmc_30")
# The fused linear + cross entropy head (fusedloss.linear_cross_entropy): shapes are (N, H, V).
LINEAR_OPS = ("linear_cross_entropy",)
ALL_OPS = CROSS_ENTROPY_OPS + CRF_OPS + SIGMOID_OPS + LINEAR_OPS
LABEL_SMOOTHING = 0.1
FOCAL_GAMMA = 2.0
BASELINE = {op: "eager" for op in CROSS_ENTROPY_OPS}
BASELINE.update({op: "pytorch-crf" for op in CRF_OPS})
BASELINE["linear_cross_entropy"] = "eager"
# torch's own function where it has one, else the loss written in eager PyTorch ops.
BASELINE.update({op: "torch" if op in ("bce_pos_weight", "multilabel_soft_margin") else "eager"
                 for op in SIGMOID_OPS})


class CaseUnavailable(Exception):
    """A peer cannot run this case (a shape or dtype it does not take): the run records it as skipped."""


@dataclass
class Workload:
    forward: Callable[[], object]
    full: Optional[Callable[[], object]]
    reset: Callable[[], None]

    def modes(self) -> Dict[str, Callable[[], object]]:
        return {"forward": self.forward, **({"full": self.full} if self.full is not None else {})}


def shape_dims(op: str, shape: Tuple[int, ...]) -> Dict[str, int]:
    """``{"B": .., "T": .., "K": ..}`` for the CRF, ``{"N": .., "H": .., "V": ..}`` for the linear head,
    ``{"N": .., "C": ..}`` for the other ops."""
    names = ("B", "T", "K") if op in CRF_OPS else ("N", "H", "V") if op in LINEAR_OPS else ("N", "C")
    return dict(zip(names, shape))


def eager_focal_loss(input: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """The focal loss as users write it in eager PyTorch: ``mean_n -(1 - p_y)^γ log p_y``."""
    log_p_target = F.log_softmax(input, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (-(1 - log_p_target.exp()).pow(gamma) * log_p_target).mean()


_EAGER_LOSS = {
    "cross_entropy": F.cross_entropy,
    "cross_entropy_smooth": lambda x, y: F.cross_entropy(x, y, label_smoothing=LABEL_SMOOTHING),
    "focal": eager_focal_loss,
}


def _fused_loss(op: str, backend: str) -> Callable:
    if op == "cross_entropy":
        return lambda x, y: fusedloss.cross_entropy(x, y, backend=backend)
    if op == "cross_entropy_smooth":
        return lambda x, y: fusedloss.cross_entropy(x, y, label_smoothing=LABEL_SMOOTHING, backend=backend)
    return lambda x, y: fusedloss.focal_loss(x, y, gamma=FOCAL_GAMMA, backend=backend)


def _liger_loss(op: str) -> Callable:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    smoothing = LABEL_SMOOTHING if op == "cross_entropy_smooth" else 0.0
    return LigerCrossEntropyLoss(label_smoothing=smoothing)


def _compiled_loss(op: str) -> Callable:
    # A fresh Dynamo cache per workload: every shape of the grid compiles once, and the per-function
    # recompile limit never silently sends a later shape back to eager.
    torch._dynamo.reset()
    return torch.compile(_EAGER_LOSS[op], dynamic=False)


def make_inputs(op: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random inputs, the same for every backend of one (op, shape, dtype): logits ~ N(0, 1) and
    uniform targets; for the CRF, emissions ~ N(0, 1), uniform gold tags and a full mask."""
    torch.manual_seed(seed)
    if op in SIGMOID_OPS:
        return sigmoid_inputs(shape, dtype, device)
    if op in CROSS_ENTROPY_OPS:
        n, c = shape
        return torch.randn(n, c, device=device, dtype=dtype), torch.randint(0, c, (n,), device=device)
    if op in LINEAR_OPS:
        n, h, v = shape
        hidden = torch.randn(n, h, device=device, dtype=dtype)
        head = (torch.randn(v, h, device=device) / h**0.5).to(dtype)
        return hidden, head, torch.randint(0, v, (n,), device=device)
    b, t, k = shape
    emissions = torch.randn(b, t, k, device=device, dtype=dtype)
    tags = torch.randint(0, k, (b, t), device=device)
    return emissions, tags, torch.ones(b, t, dtype=torch.bool, device=device)


def _loss_workload(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> Workload:
    leaf = logits.detach().requires_grad_()

    def reset():
        leaf.grad = None

    return Workload(forward=lambda: loss_fn(leaf, target), full=lambda: loss_fn(leaf, target).backward(), reset=reset)


def _crf_module(backend: str, num_tags: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A CRF whose parameters are pytorch-crf's initialization from a fixed seed, for every backend
    (fusedloss.CRF has torchcrf.CRF's parameter names and shapes, so it loads torchcrf.CRF's state_dict)."""
    import torchcrf

    torch.manual_seed(1)
    module = torchcrf.CRF(num_tags, batch_first=True)
    if backend != "pytorch-crf":
        fused = fusedloss.CRF(num_tags, batch_first=True, backend=backend.removeprefix("fusedloss-"))
        fused.load_state_dict(module.state_dict())
        module = fused
    return module.to(device=device, dtype=dtype)


def _crf_workload(op: str, module: torch.nn.Module, emissions, tags, mask) -> Workload:
    if op == "crf_decode":
        def decode():
            with torch.no_grad():
                return module.decode(emissions, mask)

        return Workload(forward=decode, full=None, reset=lambda: None)
    leaf = emissions.detach().requires_grad_()

    def reset():
        leaf.grad = None
        module.zero_grad(set_to_none=True)

    def nll():
        return -module(leaf, tags, mask, reduction="sum")

    return Workload(forward=nll, full=lambda: nll().backward(), reset=reset)


def _torch_struct_nll(emissions, tags, mask, transitions, start, end) -> torch.Tensor:
    """Summed negative log-likelihood with torch-struct's LinearChainCRF for full masks and T >= 2
    (edge potentials ``(B, T-1, K, K)``, entry ``[b, t, j, i]`` scoring tag i at t → tag j at t+1;
    start and emission of step 0 folded into the first edge, the end score into the last)."""
    import torch_struct

    if emissions.shape[1] < 2:
        raise CaseUnavailable("the torch-struct adapter needs T >= 2 (it folds step 0 into the first edge)")
    edges = (emissions[:, 1:, :, None] + transitions.t()[None, None]).clone()
    edges[:, 0] += (start + emissions[:, 0])[:, None, :]
    edges[:, -1] += end[:, None]
    lengths = mask.sum(-1)
    log_z = torch_struct.LinearChainCRF(edges, lengths=lengths).partition
    gold = (start[tags[:, 0]] + emissions.gather(-1, tags.unsqueeze(-1)).squeeze(-1).sum(-1)
            + transitions[tags[:, :-1], tags[:, 1:]].sum(-1) + end[tags[:, -1]])
    return (log_z - gold).sum()


def peer_backends(op: str, device: torch.device, compile_eager: bool) -> List[str]:
    """The non-fusedloss backends of ``op`` on ``device``, baseline first."""
    if op in SIGMOID_OPS:
        return ["torch", "eager"] if BASELINE[op] == "torch" else ["eager"]
    if op in CROSS_ENTROPY_OPS:
        peers = ["eager"]
        if compile_eager:
            peers.append("torch.compile")
        if device.type == "cuda" and op != "focal" and importlib.util.find_spec("liger_kernel") is not None:
            peers.append("liger-kernel")
        return peers
    if op in LINEAR_OPS:
        peers = ["eager"]
        if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13
            peers.append("torch-chunked")
        if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
            peers.append("liger-kernel")
        if importlib.util.find_spec("cut_cross_entropy") is not None:
            peers.append("cut-cross-entropy")
        return peers
    peers = ["pytorch-crf"]
    if op == "crf_nll" and importlib.util.find_spec("torch_struct") is not None:
        peers.append("torch-struct")
    return peers


def fusedloss_backends(device: torch.device) -> List[str]:
    """The fusedloss backends usable on ``device``: never the Triton interpreter on CPU tensors
    (it exists for tests; it is orders of magnitude slower than any kernel)."""
    names = []
    for name, reason in fusedloss.available_backends().items():
        if reason is not None:
            continue
        if name == "triton" and device.type != "cuda":
            continue
        if name in ("cuda", "cpp") and name != ("cuda" if device.type == "cuda" else "cpp"):
            continue
        names.append("fusedloss-" + name)
    return names


def make_workload(op: str, backend: str, inputs: tuple, dtype: torch.dtype, device: torch.device) -> Workload:
    """Bind ``inputs`` (from :func:`make_inputs`) to one backend of ``op``."""
    if op in SIGMOID_OPS:
        return _loss_workload(sigmoid_loss_fn(op, backend, inputs), inputs[0], inputs)
    if op in LINEAR_OPS:
        return _linear_workload(backend, *inputs)
    if op in CROSS_ENTROPY_OPS:
        logits, target = inputs
        if backend == "eager":
            loss_fn = _EAGER_LOSS[op]
        elif backend == "torch.compile":
            loss_fn = _compiled_loss(op)
        elif backend == "liger-kernel":
            loss_fn = _liger_loss(op)
        else:
            loss_fn = _fused_loss(op, backend.removeprefix("fusedloss-"))
        return _loss_workload(loss_fn, logits, target)
    emissions, tags, mask = inputs
    num_tags = emissions.shape[-1]
    if backend == "torch-struct":
        module = _crf_module("pytorch-crf", num_tags, dtype, device)
        leaf = emissions.detach().requires_grad_()

        def nll():
            return _torch_struct_nll(leaf, tags, mask, module.transitions, module.start_transitions,
                                     module.end_transitions)

        def reset():
            leaf.grad = None
            module.zero_grad(set_to_none=True)

        return Workload(forward=nll, full=lambda: nll().backward(), reset=reset)
    return _crf_workload(op, _crf_module(backend, num_tags, dtype, device), emissions, tags, mask)


def _linear_loss(backend: str, device: torch.device) -> Callable:
    """``loss(hidden (N, H), head_weight (V, H), target (N,))`` of one backend of the linear head."""
    if backend == "eager":
        return lambda x, w, y: F.cross_entropy(F.linear(x, w), y)
    if backend == "torch-chunked":
        # torch's own chunked head; LinearCrossEntropyOptions() opts into its chunked path with automatic choices
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, y: F.linear_cross_entropy(x, w, y, options=options)
    if backend == "liger-kernel":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, y: loss(w, x, y)
    if backend == "cut-cross-entropy":
        from cut_cross_entropy import linear_cross_entropy as cce

        # The Triton kernels need a GPU; its torch.compile implementation runs anywhere.
        impl = "cce" if device.type == "cuda" else "torch_compile"
        return lambda x, w, y: cce(x, w, y, impl=impl)
    fused = backend.removeprefix("fusedloss-")
    return lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y, backend=fused)


def _linear_workload(backend: str, hidden: torch.Tensor, head: torch.Tensor, target: torch.Tensor) -> Workload:
    loss_fn = _linear_loss(backend, hidden.device)
    x = hidden.detach().requires_grad_()
    w = head.detach().requires_grad_()

    def reset():
        x.grad = None
        w.grad = None

    return Workload(forward=lambda: loss_fn(x, w, target), full=lambda: loss_fn(x, w, target).backward(),
                    reset=reset)


def cross_entropy_bytes(mode: str, shape: Tuple[int, ...], dtype: torch.dtype, backend: str = "") -> int:
    """The bytes the fused cross-entropy kernels move for one call of the bench, and the int64 targets: the logits
    read twice and the gradient written once for forward + backward. The forward alone (the bench's logits
    require grad) moves the same with the cpp and cuda kernels, which write the gradient in the forward pass, and
    one read with the Triton kernels, which save per-row statistics and leave the gradient to the backward. Rows
    that fit in a cache may be read once from memory; the count is the design's traffic, not a minimum (one
    read and one write), so the fraction of a copy is not flattered. Other backends are counted like cpp."""
    n, c = shape
    logits = n * c * torch.empty((), dtype=dtype).element_size()
    if mode == "forward" and backend == "fusedloss-triton":
        return logits + 8 * n
    return 3 * logits + 8 * n


def difference(op: str, value, baseline_value) -> float:
    """How far a backend's forward result is from the baseline's: relative difference of the loss,
    or for decode the fraction of sequences whose best path differs."""
    if op == "crf_decode":
        return sum(a != b for a, b in zip(value, baseline_value)) / max(len(baseline_value), 1)
    value, baseline_value = float(value.detach()), float(baseline_value.detach())
    return abs(value - baseline_value) / max(abs(baseline_value), 1e-30)


# ----------------------------------------------------------------------------------------------
# Sigmoid and multi-label losses
# ----------------------------------------------------------------------------------------------
# Inputs: logits ~ N(0, 2²) of (N, C), a multi-hot target (10 % positives), pos_weight (C,) and class
# indices (N,) for the bi-tempered loss. Peers: "torch" (torch's own function, where it has one) and
# "eager" (the loss as users write it in eager PyTorch: the published formula or the authors' code).


def sigmoid_inputs(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device):
    n, c = shape
    logits = 2 * torch.randn(n, c, device=device, dtype=dtype)
    target = (torch.rand(n, c, device=device) < 0.1).to(dtype)
    pos_weight = torch.linspace(0.5, 2.0, c, device=device, dtype=dtype)
    labels = torch.randint(0, c, (n,), device=device)
    return logits, target, pos_weight, labels


def eager_bce_with_logits(x, y, pos_weight):
    """``-(P y log σ(x) + (1 - y) log σ(-x))``, mean over elements."""
    return -(pos_weight * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()


def eager_sigmoid_focal(x, y, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss's code, mean reduction."""
    p = torch.sigmoid(x)
    ce_loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce_loss * ((1 - p_t) ** gamma)
    return ((alpha * y + (1 - alpha) * (1 - y)) * loss).mean()


def eager_multilabel_soft_margin(x, y):
    return -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean(-1).mean()


def eager_zlpr(x, y):
    """bert4keras's multilabel_categorical_crossentropy as commonly ported to PyTorch (mean over rows)."""
    x = (1 - 2 * y) * x
    x_neg = x - y * 1e12
    x_pos = x - (1 - y) * 1e12
    zeros = torch.zeros_like(x[..., :1])
    x_neg = torch.cat([x_neg, zeros], dim=-1)
    x_pos = torch.cat([x_pos, zeros], dim=-1)
    return (torch.logsumexp(x_neg, dim=-1) + torch.logsumexp(x_pos, dim=-1)).mean()


def eager_ghmc(x, y, bins):
    """mmdetection's GHMC.forward (the authors' code, a Python loop over bins), momentum 0, every entry valid."""
    edges = torch.arange(bins + 1, dtype=torch.float32, device=x.device) / bins
    edges[-1] += 1e-6
    weights = torch.zeros_like(x)
    g = torch.abs(x.sigmoid().detach() - y)
    tot = max(float(x.numel()), 1.0)
    n = 0
    for i in range(bins):
        inds = (g >= edges[i]) & (g < edges[i + 1])
        num_in_bin = inds.sum().item()
        if num_in_bin > 0:
            weights[inds] = tot / num_in_bin
            n += 1
    if n > 0:
        weights = weights / n
    return F.binary_cross_entropy_with_logits(x, y, weights, reduction="sum") / tot


def _bi_tempered_temperatures(op: str) -> Tuple[float, float]:
    t1, t2 = op.removeprefix("bi_tempered_").split("_")
    return float(t1), float(t2)


def sigmoid_loss_fn(op: str, backend: str, inputs) -> Callable:
    """``loss(logits_leaf, inputs) -> scalar`` of one sigmoid-family op on one backend."""
    fused = backend.removeprefix("fusedloss-")
    if op == "bce_pos_weight":
        if backend == "torch":
            return lambda x, i: F.binary_cross_entropy_with_logits(x, i[1], pos_weight=i[2])
        if backend == "eager":
            return lambda x, i: eager_bce_with_logits(x, i[1], i[2])
        return lambda x, i: fusedloss.binary_cross_entropy_with_logits(x, i[1], pos_weight=i[2], backend=fused)
    if op == "sigmoid_focal":
        if backend == "eager":
            return lambda x, i: eager_sigmoid_focal(x, i[1])
        return lambda x, i: fusedloss.sigmoid_focal_loss(x, i[1], reduction="mean", backend=fused)
    if op == "multilabel_soft_margin":
        if backend == "torch":
            return lambda x, i: F.multilabel_soft_margin_loss(x, i[1])
        if backend == "eager":
            return lambda x, i: eager_multilabel_soft_margin(x, i[1])
        return lambda x, i: fusedloss.multilabel_soft_margin_loss(x, i[1], backend=fused)
    if op == "zlpr":
        if backend == "eager":
            return lambda x, i: eager_zlpr(x, i[1])
        return lambda x, i: fusedloss.multilabel_categorical_crossentropy(x, i[1], backend=fused)
    if op.startswith("bi_tempered"):
        t1, t2 = _bi_tempered_temperatures(op)
        if backend == "eager":
            from fusedloss.reference import sigmoid as reference

            return lambda x, i: reference.bi_tempered_logistic_loss(x, i[3], t1, t2, 0.0, 5, "mean")
        return lambda x, i: fusedloss.bi_tempered_logistic_loss(x, i[3], t1, t2, num_iters=5, backend=fused)
    bins = int(op.removeprefix("ghmc_"))
    if backend == "eager":
        return lambda x, i: eager_ghmc(x, i[1], bins)
    return lambda x, i: fusedloss.ghmc_loss(x, i[1], bins=bins, backend=fused)
