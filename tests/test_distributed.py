"""Vocabulary-parallel losses (fusedloss.distributed) on the CPU over gloo, in 2 and 3 spawned processes.

One spawn per world size runs every case (spawning costs seconds on a small machine); each rank writes, per
case, its error (None when every check passed), its loss values and the collectives it ran in forward and in
backward. Oracles on the gathered logits, computed on every rank from a shared seed: fusedloss.cross_entropy
(reference backend), torch.nn.functional.cross_entropy where the options are torch's, and
fusedloss.linear_cross_entropy for the linear form.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fusedloss
from fusedloss._floor import major_minor
from _backends import require_backend

NUM_CLASSES = 11
LAYOUTS = {2: ([5, 6], [1, 10]), 3: ([3, 4, 4], [4, 1, 6])}  # uneven shards, and a rank with one class
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce", "gather",
               "scatter", "send", "recv", "barrier")


def _options_cases():
    """(name, options) for the plain and linear forms; weights are filled in by the worker."""
    return [
        ("plain", {}),
        ("weight", {"weight": True}),
        ("smoothing", {"label_smoothing": 0.2}),
        ("weight_smoothing", {"weight": True, "label_smoothing": 0.3}),
        ("focal", {"focal_gamma": 2.0}),
        ("focal_half_weight", {"focal_gamma": 0.5, "weight": True}),
        ("focal_smoothing", {"focal_gamma": 2.0, "label_smoothing": 0.1}),
        ("focal_smoothing_weight", {"focal_gamma": 1.5, "label_smoothing": 0.2, "weight": True}),
        ("z_loss", {"z_loss": 0.1}),
        ("softcap", {"softcap": 2.0}),
        ("ignore_index_5", {"ignore_index": 5}),
        ("token_weight", {"token_weight": True}),
        ("token_weight_weight", {"token_weight": True, "weight": True}),
        ("everything", {"weight": True, "label_smoothing": 0.1, "focal_gamma": 1.0, "z_loss": 0.05,
                        "softcap": 3.0, "token_weight": True}),
    ]


REDUCTIONS = ("mean", "sum", "none")
PLAIN_CASES = [f"plain/{name}/{reduction}/layout{layout}"
               for name, _ in _options_cases() for reduction in REDUCTIONS for layout in (0, 1)]
PLAIN_CASES += ["plain/all_ignored/mean/layout0", "plain/all_ignored/sum/layout0", "plain/all_ignored/none/layout0",
                "plain/3d_input/mean/layout0", "plain/float32/mean/layout1", "plain/bfloat16/mean/layout0",
                "plain/smoothing_float32_single_process/mean/layout0", "plain/dtensor/mean/even",
                "plain/noncontiguous/mean/layout1", "plain/nan_row/none/layout0"]
LINEAR_CASES = [f"linear/{name}/{reduction}/layout{layout}"
                for name, _ in _options_cases() for reduction in REDUCTIONS for layout in (0, 1)
                if name in ("plain", "weight_smoothing", "focal_smoothing", "everything", "token_weight", "softcap")
                or reduction == "mean"]
LINEAR_CASES += ["linear/bfloat16/mean/layout0",
                 "linear/no_bias/mean/layout0", "linear/input_no_grad/mean/layout0", "linear/all_ignored/mean/layout1",
                 "linear/float32_auto/mean/layout0", "linear/3d_input/none/layout1", "linear/dtensor/sum/even"]
ERROR_CASES = ["error/group_type", "error/group_not_member", "error/target_shape", "error/target_float",
               "error/target_out_of_range", "error/target_negative", "error/weight_shape", "error/token_weight_shape",
               "error/label_smoothing", "error/linear_weight_shape", "error/linear_bias_shape", "error/chunk_size",
               "error/dtensor_placement", "error/input_int", "error/target_mismatch", "error/options_mismatch",
               "error/backend_name", "error/backend_fused", "error/linear_backend_fused"]
ALL_CASES = PLAIN_CASES + LINEAR_CASES + ERROR_CASES


# ----------------------------------------------------------------------------------------------
# The spawned worker
# ----------------------------------------------------------------------------------------------


class _Counter:
    """Counts the torch.distributed collectives that run, by name."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, original in self.originals.items():
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def _data(seed: int, shape, hidden: int | None, dtype, ignore_some=True):
    generator = torch.Generator().manual_seed(seed)
    rows_shape = tuple(shape)
    if hidden is None:
        full = (torch.randn(*rows_shape, NUM_CLASSES, generator=generator, dtype=torch.float64) * 3).to(dtype)
        head = bias = None
    else:
        full = torch.randn(*rows_shape, hidden, generator=generator, dtype=torch.float64).to(dtype)
        head = torch.randn(NUM_CLASSES, hidden, generator=generator, dtype=torch.float64).to(dtype)
        bias = torch.randn(NUM_CLASSES, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(0, NUM_CLASSES, rows_shape, generator=generator)
    if ignore_some:
        target.view(-1)[1::4] = -100
    weight = (torch.rand(NUM_CLASSES, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    token_weight = (torch.rand(rows_shape, generator=generator, dtype=torch.float64) * 2).to(dtype)
    grad_output = torch.rand(rows_shape, generator=generator, dtype=torch.float64).to(dtype)
    return full, head, bias, target, weight, token_weight, grad_output


def _resolve_options(options, weight, token_weight, target):
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = weight
    if options.pop("token_weight", False):
        options["token_weight"] = token_weight
    if options.get("ignore_index") == 5:
        target = torch.where(target == -100, torch.full_like(target, 5), target)
    return options, target


def _is_torch_case(options) -> bool:
    return not any(key in options for key in ("focal_gamma", "z_loss", "softcap", "token_weight"))


def _tolerance(dtype):
    return {torch.float64: {}, torch.float32: {"rtol": 1e-5, "atol": 1e-6},
            torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}[dtype]


def _backward(loss, grad_output, reduction):
    if reduction == "none":
        loss = (loss * grad_output).sum()
    loss.backward()


def _run_plain(case: str, rank: int, world: int, counter: _Counter) -> dict:
    from fusedloss.distributed import vocab_parallel_cross_entropy

    _, name, reduction, layout = case.split("/")
    options = dict(_options_cases()).get(name, {})
    dtype, shape = torch.float64, (9,)
    if name in ("float32", "smoothing_float32_single_process"):
        dtype = torch.float32
        options = {"label_smoothing": 0.1} if name != "float32" else {"weight": True, "label_smoothing": 0.1}
    if name == "bfloat16":
        dtype, options = torch.bfloat16, {"label_smoothing": 0.1, "focal_gamma": 2.0}
    if name == "3d_input":
        shape, options = (2, 3), {"label_smoothing": 0.1, "weight": True}
    full, _, _, target, weight, token_weight, grad_output = _data(len(case), shape, None, dtype)
    if name == "all_ignored":
        target = torch.full_like(target, -100)
    if name == "nan_row":  # NaN reaches row 0's loss and gradient, and no other row
        clean_full = full.clone()
        full[0, 2] = float("nan")
        options = {"label_smoothing": 0.1, "z_loss": 0.01}
    options, target = _resolve_options(options, weight, token_weight, target)
    options["reduction"] = reduction

    if layout == "even":  # DTensor: torch.chunk's layout of the class dimension
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        shard = distribute_tensor(full.detach(), mesh, [Shard(full.dim() - 1)]).requires_grad_()
        sizes = [chunk.shape[-1] for chunk in torch.chunk(full, world, dim=-1)]
    else:
        sizes = LAYOUTS[world][int(layout[-1])]
    offset = sum(sizes[:rank])
    local = slice(offset, offset + sizes[rank])
    if name == "noncontiguous":  # a column slice of a larger tensor, not a copy
        base = full.clone().requires_grad_()
        shard = base[..., local]
    elif layout != "even":
        shard = full[..., local].clone().requires_grad_()

    counter.take()
    # layout 1 runs the PyTorch-op local work (what CUDA tensors get), the others the cpp kernels
    backend = "reference" if layout == "layout1" else "auto"
    loss = vocab_parallel_cross_entropy(shard, target, backend=backend, **options)
    forward = counter.take()
    _backward(loss, grad_output, reduction)
    backward = counter.take()
    # A DTensor's gradient is compared through its global value: torch 2.5 and 2.6 give the gradient of a sharded
    # leaf a Replicate placement (the full tensor on every rank), later releases keep its Shard placement.
    shard_grad = shard.grad.full_tensor()[..., local] if layout == "even" else base.grad[..., local] \
        if name == "noncontiguous" else shard.grad

    gathered = full.clone().requires_grad_()
    expected = fusedloss.cross_entropy(gathered, target, backend="reference", **options)
    _backward(expected, grad_output, reduction)
    tolerance = _tolerance(dtype)
    torch.testing.assert_close(loss, expected, equal_nan=True, **tolerance)
    expected_grad = gathered.grad[..., local]
    if name == "nan_row":
        assert torch.isnan(loss[0]) and torch.isnan(shard_grad[0]).any()
        # The rows are independent (per-row statistics are all-reduced elementwise): every other row's value and
        # gradient is bit for bit what the same call gives on the logits without the NaN.
        clean_shard = clean_full[..., local].clone().requires_grad_()
        clean_loss = vocab_parallel_cross_entropy(clean_shard, target, backend=backend, **options)
        _backward(clean_loss, grad_output, reduction)
        torch.testing.assert_close(loss[1:], clean_loss[1:], rtol=0, atol=0)
        torch.testing.assert_close(shard_grad[1:], clean_shard.grad[1:], rtol=0, atol=0)
        shard_grad, expected_grad = shard_grad[1:], expected_grad[1:]
    torch.testing.assert_close(shard_grad, expected_grad, **tolerance)
    if name == "noncontiguous":
        outside = torch.ones(NUM_CLASSES, dtype=torch.bool)
        outside[local] = False
        assert torch.all(base.grad[..., outside] == 0)
    if name == "all_ignored":
        assert torch.all(shard_grad == 0), "all-ignored rows must get zero gradients"
        if reduction == "mean":
            assert torch.isnan(loss), "the mean over no rows is NaN, as torch"
    if _is_torch_case(options):
        torch_gathered = full.clone().requires_grad_()
        torch_loss = F.cross_entropy(torch_gathered.movedim(-1, 1), target, **options)
        _backward(torch_loss, grad_output, reduction)
        torch.testing.assert_close(loss, torch_loss.to(loss.dtype), equal_nan=True, **tolerance)
        torch.testing.assert_close(shard_grad, torch_gathered.grad[..., local], **tolerance)
    if name == "smoothing_float32_single_process":  # not per shard (a peer's bug): the single-process value
        single = fusedloss.cross_entropy(full, target, label_smoothing=0.1)
        torch.testing.assert_close(loss, single, rtol=1e-6, atol=1e-6)
    return {"value": loss.detach().double().reshape(-1).tolist(), "forward": forward, "backward": backward,
            "focal_smoothing": "focal_gamma" in options and "label_smoothing" in options, "linear": False,
            "input_grad": True}


def _run_linear(case: str, rank: int, world: int, counter: _Counter) -> dict:
    from fusedloss.distributed import vocab_parallel_linear_cross_entropy

    _, name, reduction, layout = case.split("/")
    options = dict(_options_cases()).get(name, {})
    dtype, shape, hidden = torch.float64, (9,), 4
    if name == "float32_auto":
        dtype, options = torch.float32, {"label_smoothing": 0.1, "z_loss": 0.01}
    if name == "bfloat16":
        dtype, options = torch.bfloat16, {"label_smoothing": 0.1, "weight": True}
    if name == "3d_input":
        shape, options = (3, 3), {"focal_gamma": 2.0, "label_smoothing": 0.1, "weight": True}
    inputs, head, bias, target, weight, token_weight, grad_output = _data(len(case), shape, hidden, dtype)
    if name == "all_ignored":
        target = torch.full_like(target, -100)
    if name == "no_bias":
        bias = None
    options, target = _resolve_options(options, weight, token_weight, target)
    options["reduction"] = reduction
    if layout == "even":  # DTensor head and bias sharded on their rows, torch.chunk's layout
        sizes = [len(chunk) for chunk in torch.chunk(head, world)]
    else:
        sizes = LAYOUTS[world][int(layout[-1])]
    offset = sum(sizes[:rank])
    local = slice(offset, offset + sizes[rank])
    input_grad = name != "input_no_grad"

    x = inputs.clone().requires_grad_(input_grad)
    if layout == "even":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        head_shard = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
        bias_shard = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
    else:
        head_shard = head[local].clone().requires_grad_()
        bias_shard = None if bias is None else bias[local].clone().requires_grad_()
    counter.take()
    backend = "reference" if layout == "layout1" else "auto"  # as in _run_plain
    loss = vocab_parallel_linear_cross_entropy(x, head_shard, target, linear_bias_shard=bias_shard, chunk_size=4,
                                               backend=backend, **options)
    forward = counter.take()
    _backward(loss, grad_output, reduction)
    backward = counter.take()
    # Through the global value, as in _run_plain (a DTensor leaf's gradient placement depends on the torch release).
    head_grad = head_shard.grad.full_tensor()[local] if layout == "even" else head_shard.grad
    bias_grad = None if bias is None else bias_shard.grad.full_tensor()[local] if layout == "even" else bias_shard.grad

    x_full = inputs.clone().requires_grad_(input_grad)
    head_full = head.clone().requires_grad_()
    bias_full = None if bias is None else bias.clone().requires_grad_()
    backend = "auto" if name == "float32_auto" else "reference"
    expected = fusedloss.linear_cross_entropy(x_full, head_full, target, linear_bias=bias_full, backend=backend,
                                              **options)
    _backward(expected, grad_output, reduction)
    tolerance = _tolerance(dtype)
    torch.testing.assert_close(loss, expected, equal_nan=True, **tolerance)
    torch.testing.assert_close(head_grad, head_full.grad[local], **tolerance)
    if bias is not None:
        torch.testing.assert_close(bias_grad, bias_full.grad[local], **tolerance)
    if input_grad:
        torch.testing.assert_close(x.grad, x_full.grad, **tolerance)
    else:
        assert x.grad is None
    if name == "all_ignored":
        assert torch.all(head_grad == 0) and torch.all(x.grad == 0)
    if _is_torch_case(options):  # and torch's own F.linear + F.cross_entropy, values and head gradient
        torch_head = head.clone().requires_grad_()
        torch_logits = F.linear(inputs, torch_head, bias)
        torch_loss = F.cross_entropy(torch_logits.reshape(-1, NUM_CLASSES), target.reshape(-1), **options)
        torch_loss = torch_loss.reshape(target.shape) if reduction == "none" else torch_loss
        _backward(torch_loss, grad_output, reduction)
        torch.testing.assert_close(loss, torch_loss, equal_nan=True, **tolerance)
        torch.testing.assert_close(head_grad, torch_head.grad[local], **tolerance)
    return {"value": loss.detach().double().reshape(-1).tolist(), "forward": forward, "backward": backward,
            "focal_smoothing": "focal_gamma" in options and "label_smoothing" in options, "linear": True,
            "input_grad": input_grad, "input_grad_value": None if x.grad is None else x.grad.reshape(-1).tolist()}


def _run_error(case: str, rank: int, world: int, counter: _Counter) -> dict:
    """Runs a bad call; returns the exception's type and message (the test checks them)."""
    from fusedloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    name = case.split("/")[1]
    sizes = LAYOUTS[world][0]
    offset = sum(sizes[:rank])
    full, head, bias, target, weight, token_weight, _ = _data(7, (6,), 3, torch.float32)
    logits = torch.randn(6, NUM_CLASSES)[:, offset:offset + sizes[rank]]
    head_shard = head[offset:offset + sizes[rank]]
    subgroup = dist.new_group([0]) if name == "group_not_member" else None  # every rank must create it
    calls = {
        "group_type": lambda: vocab_parallel_cross_entropy(logits, target, group="world"),
        "group_not_member": lambda: vocab_parallel_cross_entropy(logits, target.clamp(max=sizes[0] - 1),
                                                                 group=subgroup),
        "target_shape": lambda: vocab_parallel_cross_entropy(logits, target[:5]),
        "target_float": lambda: vocab_parallel_cross_entropy(logits, target.float()),
        "target_out_of_range": lambda: vocab_parallel_cross_entropy(logits, target.clamp(min=0) + NUM_CLASSES - 1),
        "target_negative": lambda: vocab_parallel_cross_entropy(logits, torch.full_like(target, -3)),
        "weight_shape": lambda: vocab_parallel_cross_entropy(logits, target, weight=weight[: sizes[rank]]),
        "token_weight_shape": lambda: vocab_parallel_cross_entropy(logits, target, token_weight=token_weight[:3]),
        "label_smoothing": lambda: vocab_parallel_cross_entropy(logits, target, label_smoothing=1.5),
        "linear_weight_shape": lambda: vocab_parallel_linear_cross_entropy(full, head_shard[:, :2], target),
        "linear_bias_shape": lambda: vocab_parallel_linear_cross_entropy(full, head_shard, target,
                                                                         linear_bias_shard=bias),
        "chunk_size": lambda: vocab_parallel_linear_cross_entropy(full, head_shard, target, chunk_size=0),
        "input_int": lambda: vocab_parallel_cross_entropy(logits.long(), target),
        "target_mismatch": lambda: vocab_parallel_cross_entropy(logits, target if rank == 0 else target.flip(0)),
        "options_mismatch": lambda: vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1 * rank),
        "backend_name": lambda: vocab_parallel_cross_entropy(logits, target, backend="fast"),
        "backend_fused": lambda: vocab_parallel_cross_entropy(logits, target, backend="cuda"),
        "linear_backend_fused": lambda: vocab_parallel_linear_cross_entropy(full, head_shard, target, backend="triton"),
    }
    if name == "dtensor_placement":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        rows_sharded = distribute_tensor(torch.randn(6, NUM_CLASSES), mesh, [Shard(0)])
        calls[name] = lambda: vocab_parallel_cross_entropy(rows_sharded, target)
    try:
        result = calls[name]()
    except Exception as error:  # noqa: BLE001  (the test checks type and message)
        return {"error_type": type(error).__name__, "message": str(error)}
    return {"error_type": None, "message": None, "value": result.detach().double().reshape(-1).tolist()}


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    counter = _Counter()
    results = {}
    for case in ALL_CASES:
        kind = case.split("/")[0]
        try:
            run = {"plain": _run_plain, "linear": _run_linear, "error": _run_error}[kind]
            results[case] = {"failure": None} | run(case, rank, world, counter)
        except Exception:  # noqa: BLE001  (reported by the test of this case)
            results[case] = {"failure": traceback.format_exc()}
        counter.take()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    if major_minor(torch.__version__) >= (2, 6):
        dist.destroy_process_group()
    else:
        # The results are on disk. torch 2.5's gloo process group can deadlock in its destructor (the destructor
        # joins a worker thread that waits for the GIL the destructor holds; seen in CI's floor run), so the
        # process ends without tearing the groups down.
        sys.stdout.flush()
        os._exit(0)


def _spawn(world: int, tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, str(directory / "store"), str(directory)), nprocs=world, join=True)
    results = []
    for rank in range(world):
        with open(directory / f"rank{rank}.json") as file:
            results.append(json.load(file))
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ranks(request, tmp_path_factory) -> list[dict]:
    return _spawn(request.param, tmp_path_factory)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PLAIN_CASES + LINEAR_CASES)
def test_matches_the_gathered_loss_and_gradient(ranks, case):
    """Values equal the oracles on the gathered logits and are the same on every rank (bit for bit); each
    rank's gradient is its slice of the full one (the linear form: the full input gradient on every rank)."""
    for rank, results in enumerate(ranks):
        assert results[case]["failure"] is None, f"rank {rank}:\n{results[case]['failure']}"
    values = [results[case]["value"] for results in ranks]
    assert all(json.dumps(value) == json.dumps(values[0]) for value in values), values
    if ranks[0][case]["input_grad"] and ranks[0][case]["linear"]:
        grads = [results[case]["input_grad_value"] for results in ranks]
        assert all(grad == grads[0] for grad in grads)


@pytest.mark.parametrize("case", PLAIN_CASES + LINEAR_CASES)
def test_collectives_per_call(ranks, case):
    """Forward: 2 all-reduces (3 with focal loss and smoothing); backward: none for the plain form, one
    all-reduce of grad_input for the linear form; no other collective."""
    for rank, results in enumerate(ranks):
        result = results[case]
        assert result["failure"] is None, f"rank {rank}:\n{result['failure']}"
        forward = 3 if result["focal_smoothing"] else 2
        backward = 1 if result["linear"] and result["input_grad"] else 0
        assert result["forward"] == {"all_reduce": forward}, result["forward"]
        assert result["backward"] == ({"all_reduce": backward} if backward else {}), result["backward"]


EXPECTED_ERRORS = {
    "group_type": ("TypeError", "group"),
    "target_shape": ("ValueError", "target"),
    "target_float": ("TypeError", "target"),
    "target_out_of_range": ("ValueError", "target"),
    "target_negative": ("ValueError", "target"),
    "weight_shape": ("ValueError", "weight"),
    "token_weight_shape": ("ValueError", "token_weight"),
    "label_smoothing": ("ValueError", "label_smoothing"),
    "linear_weight_shape": ("ValueError", "linear_weight_shard"),
    "linear_bias_shape": ("ValueError", "linear_bias_shard"),
    "chunk_size": ("ValueError", "chunk_size"),
    "dtensor_placement": ("ValueError", "input_shard"),
    "input_int": ("TypeError", "input"),
    "target_mismatch": ("ValueError", "target must hold the same"),  # raised on every rank, not a hang
    "options_mismatch": ("ValueError", "label_smoothing"),
    "backend_name": ("ValueError", "backend"),
    "backend_fused": ("BackendUnavailable", "cuda"),
    "linear_backend_fused": ("BackendUnavailable", "triton"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_arguments(ranks, case):
    name = case.split("/")[1]
    for rank, results in enumerate(ranks):
        result = results[case]
        assert result["failure"] is None, f"rank {rank}:\n{result['failure']}"
        if name == "group_not_member":
            # group [0]: rank 0 computes alone; every other rank is told it is not in the group
            if rank == 0:
                assert result["error_type"] is None, result["message"]
            else:
                assert result["error_type"] == "ValueError" and "group" in result["message"], result
            continue
        error_type, argument = EXPECTED_ERRORS[name]
        assert result["error_type"] == error_type, result
        assert argument in result["message"], result


def test_needs_an_initialized_process_group():
    from fusedloss.distributed import vocab_parallel_cross_entropy

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------
# The cpp kernels of the local work, against the PyTorch ops they replace (one process, no group)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cpp_local_kernels_match_pytorch_ops(dtype, softcap):
    require_backend("cpp")
    g = torch.Generator().manual_seed(3)
    n, c = 9, 37
    x = (4 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype)
    x[2, 5] = float("nan")
    x[4] = float("-inf")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = x.to(acc) if softcap is None else softcap * torch.tanh(x.to(acc) / softcap)
    row_max, sum_exp, gap = torch.ops.fusedloss.vocab_parallel_row_stats(x, softcap)
    want_max = s.amax(-1)
    shift = torch.where(torch.isfinite(want_max), want_max, torch.zeros_like(want_max))
    tol = dict(rtol=1e-12, atol=1e-12) if acc == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(row_max, want_max, equal_nan=True, **tol)
    torch.testing.assert_close(sum_exp, (s - shift[:, None]).exp().sum(-1), equal_nan=True, **tol)
    torch.testing.assert_close(gap, (shift[:, None] - s).sum(-1), equal_nan=True, **tol)

    lse = torch.randn(n, generator=g, dtype=torch.float64).to(acc) + 5
    coefficient = torch.rand(n, generator=g, dtype=torch.float64).to(acc)
    target_coef = torch.rand(n, generator=g, dtype=torch.float64).to(acc)
    local_target = torch.randint(-1, c, (n,), generator=g)
    scale = torch.rand(n, generator=g, dtype=torch.float64).to(acc)
    weight = (0.5 + torch.rand(c, generator=g, dtype=torch.float64)).to(acc)
    for w in (None, weight):
        out = torch.empty(n, c, dtype=acc)
        torch.ops.fusedloss.vocab_parallel_shard_grad(x, lse, coefficient, target_coef, local_target, scale, 0.01, w,
                                                      softcap, out)
        want = (s - lse[:, None]).exp() * coefficient[:, None] - 0.01 * (1.0 if w is None else w)
        onehot = torch.zeros(n, c, dtype=acc)
        rows = local_target >= 0
        onehot[rows, local_target[rows]] = 1.0
        want = (want - onehot * target_coef[:, None]) * scale[:, None]
        if softcap is not None:
            want = want * (1 - torch.tanh(x.to(acc) / softcap).square())
        torch.testing.assert_close(out, want, equal_nan=True, **tol)
        if x.dtype == acc:  # written over the logits themselves, as the linear form does
            in_place = x.clone()
            torch.ops.fusedloss.vocab_parallel_shard_grad(in_place, lse, coefficient, target_coef, local_target, scale,
                                                          0.01, w, softcap, in_place)
            torch.testing.assert_close(in_place, want, equal_nan=True, **tol)
