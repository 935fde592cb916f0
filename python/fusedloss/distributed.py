"""Vocabulary-parallel softmax losses over ``torch.distributed`` (docs/distributed.rst).

When the class dimension (the vocabulary of a language model head) is split across the ranks of a process
group, each rank holds a contiguous slice of it, in rank order; slices may differ in size. These functions
give every rank the loss of the *gathered* logits, exactly as :func:`fusedloss.cross_entropy` (resp.
``linear_cross_entropy``) would compute it on one device, and the gradient of the rank's own shard, while
only per-row statistics cross the network, never logits.

Per row, with ``s`` the (soft-capped) logits, ``m`` the global row max, ``lse`` the global log-sum-exp,
``C`` the global class count, ``w`` the class weights (ones when None) and ``h_c`` the derivative of
``(1 - p_c)^γ log p_c`` with respect to ``log p_c`` (1 when γ = 0)::

    l   = (1 - ε) w_y f_y (lse - s_y) + (ε / C) Σ_c w_c f_c (lse - s_c) + z_loss · lse²,   f_c = (1 - p_c)^γ
    A   = (1 - ε) w_y h_y + (ε / C) Σ_c w_c h_c
    ∂l/∂s_j = p_j (A + 2 z_loss · lse) − (1 − ε) w_y h_y [j = y] − (ε / C) w_j h_j

so a rank writes the gradient of its shard from ``lse`` and ``A`` alone.

Communication of one call (all ``all_reduce`` on ``group``; counted by the tests):

- forward: one ``MAX`` all-reduce of the row maxima (it also carries every rank's shard size, so no
  separate exchange of the layout is needed), then one ``SUM`` all-reduce of the packed per-row sums
  (sum of exps, the target logit from the rank that holds it, the smoothing sum). The one exception:
  focal loss (γ > 0) *with* label smoothing needs ``Σ_c w_c (1 − p_c)^γ log p_c`` over every class, which
  needs ``lse`` first: a third all-reduce (``SUM``). Focal loss without smoothing needs only ``p_y``.
- backward: none for ``vocab_parallel_cross_entropy`` (each rank computes its shard's gradient from the
  saved statistics); one ``SUM`` all-reduce of ``grad_input`` for ``vocab_parallel_linear_cross_entropy``
  (skipped on every rank when ``input`` does not require grad).

Reading the shard sizes costs one host synchronization per call (the reduced sizes are read to slice
``weight`` and to place targets). The collectives sit inside a ``torch.autograd.Function`` whose backward
computes the local gradient: a plain ``all_reduce`` inside autograd would give wrong gradients.

Passes over the local logits: the first (before any communication) takes each row's local max ``m_r`` and
``Σ_j exp(s_j − m_r)``, rescaled by ``exp(m_r − m)`` once the global max is known (as online softmax does), so
forward reads the shard once; twice with class weights and label smoothing (``Σ_j w_j (m − s_j)`` needs this
shard's slice of ``weight``, known only after the first all-reduce) and with focal loss and label smoothing
(the focal sums need ``lse``). Backward reads it once more (the linear form recomputes each chunk's logits there).

Every rank of the group must make the same call (same rows, targets, options; only the shards differ): the
collectives pair up across ranks. The first all-reduce carries checksums of every rank's targets and options,
so targets or options that differ between ranks raise the same ``ValueError`` on every rank (rather than
silently different losses), as do the checks that need the global C (weight shape, target range). Different
row counts cannot be caught that way: the all-reduce itself fails in the backend (gloo aborts the process).

Local work. On CPU tensors with the extension built (``backend="auto"`` or ``"cpp"``) the cpp kernels of
``csrc/kernels/vocab_parallel.h`` do it: one pass over each chunk of rows for the statistics (per row the local
max and the sum of exps relative to it, and ``Σ_j (m_r − s_j)`` for smoothing, with softcap applied), and one pass
in backward that writes the shard's gradient ``p_j (A + 2 z lse) − (ε / C) w_j − [j = y] (1 − ε) w_y h_y`` (times
the softcap derivative and the row's scale) from the global ``lse`` and ``A``. The sums that focal loss with
label smoothing needs per class (``Σ_j w_j f_j (lse − s_j)`` and ``Σ_j w_j h_j`` given ``lse``, and the matching
gradient), CUDA tensors (no Triton kernel for this yet) and ``backend="reference"`` run the PyTorch ops below
(:func:`_local_row_stats`, :func:`_local_class_sums`, :func:`_local_grad`), in float32 for
float16/bfloat16/float32 inputs (float64 for float64), over chunks of rows so that temporaries stay
``O(chunk · C_shard)``. Targets are class indices; soft targets (class probabilities) are not supported here.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fusedloss._dispatch import BACKEND_NAMES, BackendUnavailable, _backend_reason
from fusedloss._validation import (
    check_bool,
    check_class_input,
    check_floating_tensor,
    check_int,
    check_same_device,
    check_softmax_options,
    values_checkable,
)
from fusedloss.linear import default_chunk_size
from fusedloss.reference.softmax import focal_power
from fusedloss.softmax import check_token_weight

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

# Shard sizes travel in the float row-max all-reduce; float32 holds integers exactly below 2^24.
_MAX_SHARD_SIZE = 2**24
# Checksums of targets and options travel in the row-max all-reduce as floats: below 2^23, exact in float32.
_CHECKSUM_MODULUS = 2**23
# Temporaries of the plain form's local passes are kept near this many elements (chunks of rows).
_CHUNK_ELEMENTS = 2**22


# ----------------------------------------------------------------------------------------------
# Arguments: group, DTensor, options
# ----------------------------------------------------------------------------------------------


def _resolve_group(shard, group, name: str, class_dim: int):
    """The local shard and the process group. A DTensor sharded on its class dimension (``class_dim``: -1 for
    logits, 0 for the rows of a head) gives its local shard and its mesh's group along that mesh dimension."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "fusedloss.distributed needs an initialized process group: call torch.distributed.init_process_group "
            "first (e.g. under torchrun)"
        )
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on ranks outside the new group
        raise ValueError(f"group does not contain this process (global rank {dist.get_rank()})")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(shard, DTensor):
        class_dim = class_dim % shard.dim()
        placements = shard.placements
        sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim % shard.dim() == class_dim]
        replicated = all(isinstance(p, Replicate) for i, p in enumerate(placements) if i not in sharded)
        if len(sharded) != 1 or not replicated:
            raise ValueError(
                f"{name} as a DTensor must be sharded on its class dimension ({class_dim}) along exactly one mesh "
                f"dimension and replicated along any others, got placements {tuple(placements)}"
            )
        mesh_group = shard.device_mesh.get_group(sharded[0])
        if group is not None and group != mesh_group:
            raise ValueError(
                f"group must be None or the group of {name}'s device mesh along its sharded dimension, "
                "got a different group"
            )
        group = mesh_group
        shard = shard.to_local()
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(f"group does not contain this process (global rank {dist.get_rank()})")
    return shard, group


def _use_cpp_kernels(backend, device: torch.device) -> bool:
    """The ``backend`` argument (as in every public function). Returns whether the cpp kernels do the local work:
    ``"auto"`` takes them for CPU tensors when the extension is built, ``"cpp"`` requires them, ``"reference"`` runs
    the PyTorch ops; the Triton and CUDA backends have no kernel for these losses (BackendUnavailable)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    cpp_reason = _backend_reason("cpp")
    if cpp_reason is None and device.type != "cpu":
        cpp_reason = f"runs on CPU tensors, got a {device.type} tensor"
    if backend == "auto":
        return cpp_reason is None
    if backend == "reference":
        return False
    if backend == "cpp" and cpp_reason is None:
        return True
    reason = cpp_reason if backend == "cpp" else "has no kernel for the vocabulary-parallel losses"
    raise BackendUnavailable(f"no backend can run the vocabulary-parallel losses for this call:\n  {backend}: {reason}")


def _check_options(weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap):
    ignore_index, label_smoothing, focal_gamma, z_loss, softcap = check_softmax_options(
        ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, "auto"
    )
    if weight is not None:
        check_floating_tensor("weight", weight)
        if weight.dim() != 1:
            raise ValueError(f"weight must be the full (C,) tensor of class weights, got shape {tuple(weight.shape)}")
    return ignore_index, label_smoothing, focal_gamma, z_loss, softcap


def _check_target(target, row_shape: tuple, input: torch.Tensor, input_name: str) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        raise TypeError(
            "target must be int64 global class indices; class-probability (soft) targets are not supported by "
            f"the vocabulary-parallel losses, got {target.dtype}"
        )
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 global class indices, got {target.dtype} (convert with target.long())")
    if tuple(target.shape) != row_shape:
        raise ValueError(
            f"target must have shape {row_shape} ({input_name}.shape[:-1], the same on every rank), "
            f"got {tuple(target.shape)}"
        )
    check_same_device("target", target, input)


# ----------------------------------------------------------------------------------------------
# The plan of one call: layout, targets and options, shared by forward and backward
# ----------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    group: dist.ProcessGroup
    device: torch.device
    compute_dtype: torch.dtype
    num_rows: int
    shard_size: int
    chunk_rows: int
    ignore_index: int
    label_smoothing: float
    focal_gamma: float
    z_loss: float
    softcap: float | None
    options_checksum: int
    # filled in once the shard sizes are known (after the row-max all-reduce)
    num_classes: int = 0
    offset: int = 0
    weight_shard: torch.Tensor | None = None  # (C_shard,) compute dtype
    kept: torch.Tensor | None = None  # (N,) bool: target != ignore_index
    local_target: torch.Tensor | None = None  # (N,) target - offset, clamped into the shard
    target_is_local: torch.Tensor | None = None  # (N,) bool: kept and the target class lies in this shard
    cpp_kernels: bool = False  # the local work runs in the cpp kernels (set by the public functions)

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits in the compute dtype, soft-capped: ``s = softcap · tanh(x / softcap)``."""
        logits = logits.to(self.compute_dtype)
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def chunks(self):
        for start in range(0, self.num_rows, self.chunk_rows):
            yield start, min(start + self.chunk_rows, self.num_rows)


def _make_plan(group, input: torch.Tensor, num_rows, shard_size, chunk_rows, options, reduction, weight,
               token_weight) -> _Plan:
    compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // shard_size)
    signature = repr((reduction, *options, weight is None, token_weight is None)).encode()
    return _Plan(group, input.device, compute_dtype, num_rows, shard_size, max(1, min(chunk_rows, max(num_rows, 1))),
                 *options, zlib.crc32(signature) % _CHECKSUM_MODULUS)


def _target_checksum(target: torch.Tensor) -> torch.Tensor:
    """A position-dependent checksum of the int64 targets below 2^23 (exact in float32), computed on their
    device: ranks whose targets differ get different sums (but for rare collisions)."""
    flat = target.reshape(-1)
    positions = torch.arange(flat.numel(), device=flat.device) % 8191 + 1
    return ((flat + 257) % 2**20 * positions).sum() % _CHECKSUM_MODULUS


def _exchange_max_and_layout(plan: _Plan, local_max: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Collective 1 (MAX): the global row max, and per rank (each in its own slot, zeros elsewhere) its shard
    size, a checksum of its targets and one of its options. Every rank then knows the layout, and every rank
    raises the same ``ValueError`` when the targets or options differ between ranks. Returns the row max."""
    world = dist.get_world_size(plan.group)
    rank = dist.get_rank(plan.group)
    rows = plan.num_rows
    buffer = torch.zeros(rows + 3 * world, dtype=plan.compute_dtype, device=plan.device)
    buffer[:rows] = local_max
    buffer[rows + rank] = plan.shard_size
    buffer[rows + world + rank] = _target_checksum(target).to(plan.compute_dtype)
    buffer[rows + 2 * world + rank] = plan.options_checksum
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=plan.group)
    per_rank = [int(value) for value in buffer[rows:].tolist()]
    sizes, target_sums, option_sums = per_rank[:world], per_rank[world : 2 * world], per_rank[2 * world :]
    if len(set(target_sums)) > 1:
        differing = [r for r, value in enumerate(target_sums) if value != target_sums[0]]
        raise ValueError(
            "target must hold the same global class indices on every rank of the group; the targets of rank(s) "
            f"{differing} differ from rank 0's"
        )
    if len(set(option_sums)) > 1:
        differing = [r for r, value in enumerate(option_sums) if value != option_sums[0]]
        raise ValueError(
            "every rank must pass the same options (weight/token_weight given or not, ignore_index, reduction, "
            f"label_smoothing, focal_gamma, z_loss, softcap); rank(s) {differing} differ from rank 0"
        )
    plan.num_classes = sum(sizes)
    plan.offset = sum(sizes[:rank])
    return buffer[:rows]


def _place_targets(plan: _Plan, target: torch.Tensor, weight: torch.Tensor | None, input_name: str) -> None:
    """Checks the global targets and class weights against the global C; finds the targets of this shard."""
    num_classes = plan.num_classes
    if weight is not None:
        if weight.shape[0] != num_classes:
            raise ValueError(
                f"weight must be the full (C,) tensor of class weights, C = {num_classes} summed over the shards "
                f"of {input_name}, got shape {tuple(weight.shape)}"
            )
        check_same_device("weight", weight, target)
        plan.weight_shard = weight.detach()[plan.offset : plan.offset + plan.shard_size].to(plan.compute_dtype)
    kept = target != plan.ignore_index
    if values_checkable(target) and target.numel() > 0:
        outside = kept & ((target < 0) | (target >= num_classes))
        if bool(outside.any()):
            bad = target[outside]
            raise ValueError(
                f"target values must be global class indices in [0, {num_classes}) (C summed over the shards) "
                f"or ignore_index={plan.ignore_index}, got {bad.numel()} value(s) outside every shard, "
                f"e.g. {int(bad[0])}"
            )
    local = target - plan.offset
    plan.kept = kept
    plan.target_is_local = kept & (local >= 0) & (local < plan.shard_size)
    plan.local_target = local.clamp(0, plan.shard_size - 1)


# ----------------------------------------------------------------------------------------------
# Local passes over the shard (torch ops; what a fused row kernel would return)
# ----------------------------------------------------------------------------------------------


def _fused_kernels(plan: _Plan) -> bool:
    """Whether the cpp kernels (csrc/kernels/vocab_parallel.h) do this call's local work (module docstring)."""
    return plan.cpp_kernels


def _local_row_stats(plan: _Plan, logits_of) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass over the local shard, before any communication: per row the local max ``m_r``, the local sum
    of exps relative to it ``Σ_j exp(s_j − m_r)`` and, for unweighted smoothing without focal loss,
    ``Σ_j (m_r − s_j)``.

    ``logits_of(start, stop)`` returns the raw local logits of rows ``[start, stop)``.
    """
    local_max = torch.empty(plan.num_rows, dtype=plan.compute_dtype, device=plan.device)
    sum_exp = torch.empty_like(local_max)
    gap_sum = torch.empty_like(local_max) if plan.label_smoothing > 0 and plan.focal_gamma == 0 else None
    fused = _fused_kernels(plan)
    for start, stop in plan.chunks():
        if fused:  # one pass of the cpp kernel over the chunk
            stats = torch.ops.fusedloss.vocab_parallel_row_stats(logits_of(start, stop), plan.softcap)
            local_max[start:stop], sum_exp[start:stop] = stats[0], stats[1]
            if gap_sum is not None:
                gap_sum[start:stop] = stats[2]
            continue
        logits = plan.capped(logits_of(start, stop))
        row_max = logits.amax(dim=-1)
        shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        local_max[start:stop] = row_max
        sum_exp[start:stop] = (logits - shift.unsqueeze(-1)).exp_().sum(dim=-1)
        if gap_sum is not None:
            gap_sum[start:stop] = (shift.unsqueeze(-1) - logits).sum(dim=-1)
    return local_max, sum_exp, gap_sum


def _local_class_sums(plan: _Plan, logits_of, row_max: torch.Tensor, lse: torch.Tensor | None) -> torch.Tensor:
    """Per-row sums over the local classes that need a global quantity first.

    With ``lse`` None: ``Σ_j w_j (m − s_j)`` for weighted smoothing without focal loss (needs this shard's
    slice of ``weight``, i.e. the layout from the first all-reduce). With ``lse``: the focal smoothing sums
    ``[Σ_j w_j f_j (lse − s_j), Σ_j w_j h_j]``. Returns ``(N,)`` or ``(N, 2)``.
    """
    columns = 1 if lse is None else 2
    sums = torch.empty(plan.num_rows, columns, dtype=plan.compute_dtype, device=plan.device)
    for start, stop in plan.chunks():
        logits = plan.capped(logits_of(start, stop))
        if lse is None:
            sums[start:stop, 0] = ((row_max[start:stop].unsqueeze(-1) - logits) * plan.weight_shard).sum(dim=-1)
            continue
        log_probs = logits - lse[start:stop].unsqueeze(-1)
        focal, dfocal = _focal_terms(log_probs, plan.focal_gamma)
        cost = -log_probs * focal
        if plan.weight_shard is not None:
            cost, dfocal = cost * plan.weight_shard, dfocal * plan.weight_shard
        sums[start:stop, 0] = cost.sum(dim=-1)
        sums[start:stop, 1] = dfocal.sum(dim=-1)
    return sums[:, 0] if lse is None else sums


def _focal_terms(log_probs: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``f = (1 − p)^γ`` and ``h = d[f · log p] / d log p = f · (1 − γ p log p / (1 − p))``, both 0 where
    ``1 − p`` is below the smallest normal number (the reference's rule: the factor is 0 there)."""
    probs = torch.exp(log_probs)
    base = -torch.expm1(log_probs)
    focal = focal_power(base, gamma)
    representable = base > torch.finfo(base.dtype).tiny
    ratio = torch.where(representable, probs * log_probs / torch.where(representable, base, torch.ones_like(base)),
                        torch.zeros_like(base))
    return focal, focal * (1.0 - gamma * ratio)


def _local_grad(plan: _Plan, logits: torch.Tensor, rows: slice, saved: dict,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``∂(Σ_n g_n l_n)/∂x`` for the local logits ``x`` of ``rows``, in the compute dtype, from the saved global
    statistics ``lse``, ``A`` (see the module docstring), ``target_coef = (1 − ε) w_y h_y`` and the per-row
    scale ``g_n`` (grad_output × token weight, 0 at ignored rows).

    Written into ``out`` (compute dtype, ``logits``' shape; it may be ``logits`` itself) or a new tensor, in
    place after the first operation, so that the pass holds one chunk-sized temporary (two with softcap or
    focal smoothing)."""
    eps_per_class = plan.label_smoothing / max(plan.num_classes, 1)
    if _fused_kernels(plan) and not (plan.label_smoothing > 0 and plan.focal_gamma != 0):
        lse = saved["lse"][rows]
        is_local = plan.target_is_local[rows]
        if out is None:
            out = torch.empty(logits.shape, dtype=plan.compute_dtype, device=logits.device)
        torch.ops.fusedloss.vocab_parallel_shard_grad(
            logits, lse, saved["A"][rows] + 2.0 * plan.z_loss * lse,
            torch.where(is_local, saved["target_coef"][rows], torch.zeros_like(lse)),
            torch.where(is_local, plan.local_target[rows], -1), saved["row_scale"][rows], eps_per_class,
            plan.weight_shard if plan.label_smoothing > 0 else None, plan.softcap, out)
        return out
    capped = plan.capped(logits)
    lse = saved["lse"][rows].unsqueeze(-1)
    focal_coef = None
    if plan.label_smoothing > 0 and plan.focal_gamma != 0:
        focal_coef = _focal_terms(capped - lse, plan.focal_gamma)[1]
    grad = torch.sub(capped, lse, out=torch.empty_like(capped) if out is None else out)
    grad.exp_().mul_(saved["A"][rows].unsqueeze(-1) + 2.0 * plan.z_loss * lse)
    if plan.label_smoothing > 0:
        if focal_coef is not None:
            if plan.weight_shard is not None:
                focal_coef.mul_(plan.weight_shard)
            grad.sub_(focal_coef, alpha=eps_per_class)
        elif plan.weight_shard is not None:
            grad.sub_(plan.weight_shard, alpha=eps_per_class)
        else:
            grad.sub_(eps_per_class)
    target_coef = torch.where(plan.target_is_local[rows], saved["target_coef"][rows], torch.zeros_like(lse[:, 0]))
    grad.scatter_add_(-1, plan.local_target[rows].unsqueeze(-1), -target_coef.unsqueeze(-1))
    grad.mul_(saved["row_scale"][rows].unsqueeze(-1))
    if plan.softcap is not None:
        grad.mul_(1.0 - (capped / plan.softcap).square())
    return grad


# ----------------------------------------------------------------------------------------------
# Forward: statistics, collectives, row losses
# ----------------------------------------------------------------------------------------------


def _forward_rows(plan: _Plan, logits_of, target_logit_of, target, weight, input_name: str):
    """Row losses ``t_n · l_n`` (0 at ignored rows) in the compute dtype, and what backward needs.

    ``target_logit_of(local_target)`` returns the raw local logit of each row's (clamped) local target.
    """
    local_max, sum_exp, gap_sum = _local_row_stats(plan, logits_of)
    row_max = _exchange_max_and_layout(plan, local_max, target)  # collective 1 (MAX)
    _place_targets(plan, target, weight, input_name)
    eps, gamma, num_classes = plan.label_smoothing, plan.focal_gamma, plan.num_classes

    local_shift = torch.where(torch.isfinite(local_max), local_max, torch.zeros_like(local_max))
    target_logit = plan.capped(target_logit_of(plan.local_target))
    packed = [sum_exp * torch.exp(local_shift - row_max),
              torch.where(plan.target_is_local, target_logit, torch.zeros_like(target_logit))]
    if eps > 0 and gamma == 0:  # the smoothing sum; with focal loss it comes after lse (collective 3)
        if plan.weight_shard is None:  # Σ_j (m − s_j) = Σ_j (m_r − s_j) + C_r (m − m_r): every term >= 0
            packed.append(gap_sum + plan.shard_size * (row_max - local_shift))
        else:
            packed.append(_local_class_sums(plan, logits_of, row_max, None))
    packed = torch.stack(packed, dim=-1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=plan.group)  # collective 2 (SUM)
    lse = row_max + torch.log(packed[:, 0])
    target_logit = packed[:, 1]

    kept = plan.kept
    if weight is None:
        target_weight = torch.ones_like(lse)
        weight_sum = float(num_classes)
    else:
        weight_full = weight.detach().to(device=lse.device, dtype=plan.compute_dtype)
        target_weight = weight_full[target.clamp(0, num_classes - 1)]
        weight_sum = weight_full.sum()
    log_prob_target = target_logit - lse
    if gamma == 0:
        target_cost = -target_weight * log_prob_target
        target_coef = (1.0 - eps) * target_weight
    else:
        focal, dfocal = _focal_terms(log_prob_target, gamma)
        target_cost = -target_weight * focal * log_prob_target
        target_coef = (1.0 - eps) * target_weight * dfocal
    row_loss = (1.0 - eps) * target_cost
    coef_sum = target_coef
    if eps > 0:
        if gamma == 0:  # Σ_c w_c (lse − s_c) = (lse − m) Σ_c w_c + Σ_c w_c (m − s_c)
            smooth_cost = (lse - row_max) * weight_sum + packed[:, 2]
            smooth_coef = weight_sum
        else:
            focal_sums = _local_class_sums(plan, logits_of, row_max, lse)
            dist.all_reduce(focal_sums, op=dist.ReduceOp.SUM, group=plan.group)  # collective 3 (SUM): focal + ε
            smooth_cost, smooth_coef = focal_sums[:, 0], focal_sums[:, 1]
        row_loss = row_loss + (eps / num_classes) * smooth_cost
        coef_sum = coef_sum + (eps / num_classes) * smooth_coef
    if plan.z_loss > 0:
        row_loss = row_loss + plan.z_loss * lse.square()
    row_loss = torch.where(kept, row_loss, torch.zeros_like(row_loss))
    saved = {"lse": lse, "A": coef_sum, "target_coef": target_coef}
    return row_loss, target_weight, saved


def _row_weights(plan: _Plan, token_weight: torch.Tensor | None, target_weight: torch.Tensor):
    """Per-row token weights (0 at ignored rows) and the ``mean`` divisor Σ_n t_n w_{y_n} over kept rows."""
    kept = plan.kept
    if token_weight is None:
        token = kept.to(plan.compute_dtype)
    else:
        token = torch.where(kept, token_weight.detach().reshape(-1).to(plan.compute_dtype),
                            torch.zeros((), dtype=plan.compute_dtype, device=kept.device))
    divisor = (token * torch.where(kept, target_weight, torch.zeros_like(target_weight))).sum()
    return token, divisor


def _reduce(row_loss: torch.Tensor, divisor: torch.Tensor, reduction: str, row_shape, dtype) -> torch.Tensor:
    if reduction == "none":
        return row_loss.reshape(row_shape).to(dtype)
    if reduction == "sum":
        return row_loss.sum().to(dtype)
    return (row_loss.sum() / divisor).to(dtype)


class _VocabParallelSoftmaxLoss(torch.autograd.Function):
    """Row losses of a vocabulary-sharded logit tensor ``(N, C_shard)``; backward is local (no collective)."""

    @staticmethod
    def forward(ctx, logits, plan, target, weight, token_weight, input_name):
        row_loss, target_weight, saved = _forward_rows(
            plan, lambda start, stop: logits[start:stop], lambda local: logits.gather(-1, local.unsqueeze(-1))[:, 0],
            target, weight, input_name,
        )
        token, divisor = _row_weights(plan, token_weight, target_weight)
        ctx.plan, ctx.saved = plan, saved | {"token": token}
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(divisor)
        return row_loss * token, divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row_loss, _grad_divisor):
        (logits,) = ctx.saved_tensors
        plan, saved = ctx.plan, ctx.saved
        saved = saved | {"row_scale": torch.where(plan.kept, grad_row_loss.to(plan.compute_dtype) * saved["token"],
                                                  torch.zeros_like(saved["token"]))}
        grad = torch.empty_like(logits)
        in_place = logits.dtype == plan.compute_dtype  # write each chunk straight into the gradient
        for start, stop in plan.chunks():
            chunk = _local_grad(plan, logits[start:stop], slice(start, stop), saved,
                                grad[start:stop] if in_place else None)
            if not in_place:
                grad[start:stop] = chunk
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(
    input_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: torch.Tensor | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross entropy of logits whose class dimension is split across the ranks of ``group``.

    Every rank returns the value :func:`fusedloss.cross_entropy` gives on the logits gathered along the
    class dimension (``torch.cat(shards, dim=-1)``), with every option global (smoothing uses the global C,
    focal factors the global ``p``), and backpropagates the gradient of its own shard only, which is the
    slice of the full gradient. Per row (see the module docstring for the communication)::

        l_n = -Σ_c q_c w_c (1 - p_c)^γ log p_c  +  z_loss · logsumexp_c(s_c)²

    Args:
        input_shard: this rank's logits ``(*, C_r)`` (float16/bfloat16/float32/float64; computed in float32,
            float64 for float64), classes ``[offset_r, offset_r + C_r)`` of the global ``C = Σ_r C_r`` in rank
            order; ``C_r >= 1`` and may differ between ranks. A DTensor sharded on its last dimension (along one
            mesh dimension, replicated along any others) is accepted: its local shard is used and ``group``
            defaults to its mesh's group.
        target: int64 global class indices of shape ``input_shard.shape[:-1]``, the same on every rank, in
            ``[0, C)`` or ``ignore_index`` (``ValueError`` otherwise, on CPU tensors).
        group: the process group over which the classes are split (default: the world).
        weight: the full ``(C,)`` class weights (the same on every rank) or None; no gradient flows to it.
        ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap: as in
            :func:`fusedloss.cross_entropy`; ``mean`` divides by Σ_n t_n w_{y_n} over non-ignored rows (NaN when
            every row is ignored, as torch, with zero gradients).
        token_weight: optional float tensor of ``target``'s shape; row n's loss and gradient are multiplied by
            ``t_n``. No gradient flows to it.
        inplace_backward: accepted for the signature of :func:`fusedloss.cross_entropy`; it changes nothing here
            (the shard's gradient is a new tensor).
        backend: ``"auto"`` (the cpp kernels for CPU tensors when the extension is built, else PyTorch ops),
            ``"cpp"`` or ``"reference"`` (PyTorch ops) for the local work (module docstring); ``"triton"`` and
            ``"cuda"`` raise :class:`fusedloss.BackendUnavailable` (no kernel of theirs serves these losses).

    Returns:
        The loss in ``input_shard``'s dtype, the same on every rank: a scalar, or ``target``'s shape for
        ``reduction="none"``. Its backward needs no communication.

    Collectives: 2 all-reduces in forward (3 with focal_gamma > 0 and label_smoothing > 0), 0 in backward.
    """
    check_bool("inplace_backward", inplace_backward)
    input_shard, group = _resolve_group(input_shard, group, "input_shard", -1)
    options = _check_options(weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap)
    input_shard = check_class_input(input_shard)
    row_shape = tuple(input_shard.shape[:-1])
    _check_target(target, row_shape, input_shard, "input_shard")
    if token_weight is not None:
        check_token_weight(token_weight, input_shard, target)
    shard_size = input_shard.shape[-1]
    if shard_size >= _MAX_SHARD_SIZE:
        raise ValueError(f"input_shard may hold at most {_MAX_SHARD_SIZE - 1} classes, got {shard_size}")
    rows = input_shard.reshape(-1, shard_size)
    plan = _make_plan(group, input_shard, rows.shape[0], shard_size, None, options, reduction, weight, token_weight)
    plan.cpp_kernels = _use_cpp_kernels(backend, input_shard.device)
    row_loss, divisor = _VocabParallelSoftmaxLoss.apply(rows, plan, target.reshape(-1), weight, token_weight,
                                                        "input_shard")
    return _reduce(row_loss, divisor, reduction, row_shape, input_shard.dtype)


# ----------------------------------------------------------------------------------------------
# Linear form: logits = input @ linear_weight_shard^T + linear_bias_shard, chunk by chunk
# ----------------------------------------------------------------------------------------------


class _VocabParallelLinearLoss(torch.autograd.Function):
    """Row losses of ``F.linear(input, W_shard, b_shard)`` split over the vocabulary; the logits exist one
    chunk of rows at a time. Backward recomputes each chunk's logits and all-reduces ``grad_input`` once."""

    @staticmethod
    def forward(ctx, input, weight_shard, bias_shard, plan, target, weight, token_weight):
        def logits_of(start, stop):
            return F.linear(input[start:stop], weight_shard, bias_shard)

        def target_logit_of(local):
            # Row n's logit of its (local) target, x_n · W[y_n] + b[y_n], a chunk of rows at a time, rounded to the
            # input dtype as F.linear's output is.
            logit = torch.empty(plan.num_rows, dtype=plan.compute_dtype, device=plan.device)
            for start, stop in plan.chunks():
                head_rows = weight_shard[local[start:stop]].to(plan.compute_dtype)
                logit[start:stop] = (input[start:stop].to(plan.compute_dtype) * head_rows).sum(dim=-1)
            if bias_shard is not None:
                logit += bias_shard[local].to(plan.compute_dtype)
            return logit.to(input.dtype)

        row_loss, target_weight, saved = _forward_rows(plan, logits_of, target_logit_of, target, weight, "input")
        token, divisor = _row_weights(plan, token_weight, target_weight)
        ctx.plan, ctx.saved = plan, saved | {"token": token}
        ctx.save_for_backward(input, weight_shard, bias_shard)
        ctx.mark_non_differentiable(divisor)
        return row_loss * token, divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row_loss, _grad_divisor):
        input, weight_shard, bias_shard = ctx.saved_tensors
        plan, saved = ctx.plan, ctx.saved
        saved = saved | {"row_scale": torch.where(plan.kept, grad_row_loss.to(plan.compute_dtype) * saved["token"],
                                                  torch.zeros_like(saved["token"]))}
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        accumulate = plan.compute_dtype
        grad_input = torch.zeros(input.shape, dtype=accumulate, device=input.device) if need_input else None
        grad_weight = torch.zeros(weight_shard.shape, dtype=accumulate, device=input.device) if need_weight else None
        grad_bias = (torch.zeros(weight_shard.shape[0], dtype=accumulate, device=input.device)
                     if need_bias and bias_shard is not None else None)
        for start, stop in plan.chunks():
            rows = input[start:stop]
            logits = F.linear(rows, weight_shard, bias_shard)
            grad_logits = _local_grad(plan, logits, slice(start, stop), saved,
                                      logits if logits.dtype == accumulate else None)  # over the logits buffer
            if grad_input is not None:  # per chunk in the input dtype, as linear_cross_entropy; summed in float32
                grad_input[start:stop] = grad_logits.to(weight_shard.dtype) @ weight_shard
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), rows.to(accumulate))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        if grad_input is not None:
            dist.all_reduce(grad_input, op=dist.ReduceOp.SUM, group=plan.group)  # the one backward collective
            grad_input = grad_input.to(input.dtype)
        return (grad_input, None if grad_weight is None else grad_weight.to(weight_shard.dtype),
                None if grad_bias is None else grad_bias.to(bias_shard.dtype), None, None, None, None)


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias_shard: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross entropy of ``F.linear(input, W, b)`` with the rows of the head ``W (V, H)`` (and ``b (V,)``) split
    across the ranks of ``group`` (the vocabulary-parallel form of ``linear_cross_entropy``).

    Every rank returns ``cross_entropy(F.linear(input, W, b), target, ...)`` of the full head, the same value
    on every rank; backward gives each rank the gradient of its own ``linear_weight_shard`` (and
    ``linear_bias_shard``) and the FULL gradient of ``input`` (the sum over ranks of each shard's
    ``dlogits @ W_shard``, one all-reduce), the same on every rank.

    Args:
        input: ``(*, H)`` hidden states, the same on every rank (float16/bfloat16/float32/float64).
        linear_weight_shard: this rank's rows ``(V_r, H)`` of the head, rows ``[offset_r, offset_r + V_r)`` of
            ``W`` in rank order; ``V_r >= 1`` and may differ between ranks. A DTensor sharded on dimension 0
            (replicated along any other mesh dimension) is accepted, as is a DTensor ``linear_bias_shard``:
            their local shards are used and ``group`` defaults to the mesh's group.
        target: int64 global class indices of shape ``input.shape[:-1]``, the same on every rank.
        linear_bias_shard: this rank's ``(V_r,)`` slice of the bias, or None.
        group, weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap, token_weight:
            as in :func:`vocab_parallel_cross_entropy`.
        chunk_size: rows whose local logits ``(chunk, V_r)`` are formed at a time; None picks
            ``linear_cross_entropy``'s default for the local head, ``max(H // d, 2^20 // V_r, 16)`` rows (d = 2 on
            the CPU, 8 on CUDA).
        backend: as in :func:`vocab_parallel_cross_entropy`.

    Memory: the logits are never formed for all rows: working memory is a few ``(chunk_size, V_r)`` float32
    tensors, plus ``grad_input (N, H)`` and ``grad_weight (V_r, H)`` accumulated in float32 for
    float16/bfloat16/float32 inputs. The local logits are formed once in forward (twice with label smoothing
    and either class weights or focal loss) and once more in backward.

    Collectives: 2 all-reduces in forward (3 with focal_gamma > 0 and label_smoothing > 0), 1 in backward
    (``grad_input``; none when ``input`` does not require grad).
    """
    linear_weight_shard, group = _resolve_group(linear_weight_shard, group, "linear_weight_shard", 0)
    if linear_bias_shard is not None and hasattr(linear_bias_shard, "to_local"):  # a DTensor beside the head
        linear_bias_shard = linear_bias_shard.to_local()
    options = _check_options(weight, ignore_index, reduction, label_smoothing, focal_gamma, z_loss, softcap)
    input = check_floating_tensor("input", input, min_dim=1)
    check_floating_tensor("linear_weight_shard", linear_weight_shard)
    hidden = input.shape[-1]
    if linear_weight_shard.dim() != 2 or linear_weight_shard.shape[1] != hidden or linear_weight_shard.shape[0] < 1:
        raise ValueError(
            f"linear_weight_shard must have shape (V_r, H) with V_r >= 1 and H = input.shape[-1] = {hidden}, "
            f"got {tuple(linear_weight_shard.shape)}"
        )
    if linear_weight_shard.dtype != input.dtype:
        raise TypeError(f"linear_weight_shard must have input's dtype {input.dtype}, got {linear_weight_shard.dtype}")
    check_same_device("linear_weight_shard", linear_weight_shard, input)
    shard_size = linear_weight_shard.shape[0]
    if linear_bias_shard is not None:
        check_floating_tensor("linear_bias_shard", linear_bias_shard)
        if tuple(linear_bias_shard.shape) != (shard_size,):
            raise ValueError(
                f"linear_bias_shard must have shape (V_r,) = ({shard_size},) like linear_weight_shard's rows, "
                f"got {tuple(linear_bias_shard.shape)}"
            )
        if linear_bias_shard.dtype != input.dtype:
            raise TypeError(f"linear_bias_shard must have input's dtype {input.dtype}, got {linear_bias_shard.dtype}")
        check_same_device("linear_bias_shard", linear_bias_shard, input)
    if shard_size >= _MAX_SHARD_SIZE:
        raise ValueError(f"linear_weight_shard may hold at most {_MAX_SHARD_SIZE - 1} rows, got {shard_size}")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size}")
    row_shape = tuple(input.shape[:-1])
    _check_target(target, row_shape, input, "input")
    if token_weight is not None:
        check_token_weight(token_weight, input, target)
    rows = input.reshape(-1, hidden)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows.shape[0], hidden, shard_size, input.device.type)
    plan = _make_plan(group, input, rows.shape[0], shard_size, chunk_size, options, reduction, weight, token_weight)
    plan.cpp_kernels = _use_cpp_kernels(backend, input.device)
    row_loss, divisor = _VocabParallelLinearLoss.apply(rows, linear_weight_shard, linear_bias_shard, plan,
                                                       target.reshape(-1), weight, token_weight)
    return _reduce(row_loss, divisor, reduction, row_shape, input.dtype)

