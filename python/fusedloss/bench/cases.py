"""What is benchmarked: the ops, their inputs, and one callable per (op, backend).

A :class:`Workload` holds the inputs of one (op, shape, dtype, device) bound to one backend:
``forward()`` returns the loss (or the decoded tag lists), ``full()`` runs forward and backward,
``reset()`` drops the gradients of the previous call. The fusedloss backends are named
``fusedloss-<backend>``; the peers ``eager``, ``torch.compile``, ``liger-kernel``, ``pytorch-crf``
and ``torch-struct``. The first backend of every op is its baseline.
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
ALL_OPS = CROSS_ENTROPY_OPS + CRF_OPS
LABEL_SMOOTHING = 0.1
FOCAL_GAMMA = 2.0
BASELINE = {op: "eager" for op in CROSS_ENTROPY_OPS}
BASELINE.update({op: "pytorch-crf" for op in CRF_OPS})


@dataclass
class Workload:
    forward: Callable[[], object]
    full: Optional[Callable[[], object]]
    reset: Callable[[], None]

    def modes(self) -> Dict[str, Callable[[], object]]:
        return {"forward": self.forward, **({"full": self.full} if self.full is not None else {})}


def shape_dims(op: str, shape: Tuple[int, ...]) -> Dict[str, int]:
    """``{"N": .., "C": ..}`` for the cross-entropy ops, ``{"B": .., "T": .., "K": ..}`` for the CRF."""
    names = ("N", "C") if op in CROSS_ENTROPY_OPS else ("B", "T", "K")
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
    if op in CROSS_ENTROPY_OPS:
        n, c = shape
        return torch.randn(n, c, device=device, dtype=dtype), torch.randint(0, c, (n,), device=device)
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
    (fusedloss.CRF loads torchcrf.CRF's state_dict, SPEC 5)."""
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
        raise ValueError("the torch-struct adapter needs T >= 2 (it folds step 0 into the first edge)")
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
    if op in CROSS_ENTROPY_OPS:
        peers = ["eager"]
        if compile_eager:
            peers.append("torch.compile")
        if device.type == "cuda" and op != "focal" and importlib.util.find_spec("liger_kernel") is not None:
            peers.append("liger-kernel")
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


def cross_entropy_bytes(mode: str, shape: Tuple[int, ...], dtype: torch.dtype) -> int:
    """The bytes a cross-entropy call must move at least: the logits read once and the int64 targets, and for
    forward + backward the gradient written once (a fused kernel's traffic; unfused code moves more)."""
    n, c = shape
    logits = n * c * torch.empty((), dtype=dtype).element_size()
    return (2 * logits if mode == "full" else logits) + 8 * n


def difference(op: str, value, baseline_value) -> float:
    """How far a backend's forward result is from the baseline's: relative difference of the loss,
    or for decode the fraction of sequences whose best path differs."""
    if op == "crf_decode":
        return sum(a != b for a, b in zip(value, baseline_value)) / max(len(baseline_value), 1)
    value, baseline_value = float(value.detach()), float(baseline_value.detach())
    return abs(value - baseline_value) / max(abs(baseline_value), 1e-30)
