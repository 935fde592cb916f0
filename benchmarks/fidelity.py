"""Numerical fidelity of every fusedloss backend at large logits and emissions.

Each fused backend runs in float32 and is compared with a float64 evaluation of the reference backend; beside
it stands the error of the float32 reference itself (PyTorch's own float32 computation of the same loss). The
rule the tests apply (tests/test_fidelity.py and docs/fidelity.md; flash-attention's test rule): a backend's error
is at most twice the float32 reference's error plus a floor of 1e-6.

Error of an output against its float64 value: ``max |out - ref64| / max |ref64|`` over the whole tensor
(NaN or Inf where the float64 value is finite counts as an infinite error).

Softmax losses: ``input (N, C) = scale * randn``, half of the targets the row's argmax (an overconfident model
that is mostly right: p_y close to 1, where ``1 - p_y`` and ``log p_y`` lose precision first), the others
uniform; value = the per-row losses (``reduction="none"``), gradient = d(Σ_n g_n l_n)/d input for a random
positive ``g``. CRF: ``emissions (B, T, K) = scale * randn``, ragged masks, transitions ~ N(0, 1), random gold
tags; value = the per-sequence log-likelihood (its error relative to the best path's score: see ``crf_errors``),
gradient = of emissions and the three transition tensors (the largest of the four errors), marginals, Viterbi
score.

    python benchmarks/fidelity.py                  # full table, every usable backend of the device
    python benchmarks/fidelity.py --markdown --seeds 2 --scales 1,100,1e4   # the table of docs/fidelity.md

On CPU tensors the Triton kernels run under ``TRITON_INTERPRET=1`` (numerically what a GPU runs, except that
the interpreter's exp/log are numpy's where a GPU uses its own approximations: on a GPU, run it there).
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by fusedloss, lazily)

import fusedloss  # noqa: E402
from fusedloss.bench.harness import device_name  # noqa: E402

FLOOR = 1e-6  # relative error every backend may have whatever the float32 reference's luck
# Gradients (and CRF marginals) are of the size of weight × grad_output ~ 1 unless every row is saturated; the
# float64 oracle is itself only exact to ~1e-16 of that (it rounds p_y = 1 - 4e-17 to 1), so their errors are
# measured against at least this scale.
GRADIENT_MIN_SCALE = 1e-9
RULE_FACTOR = 2.0

# name -> keyword options of fusedloss.cross_entropy (``soft`` selects probability targets; ``focal_loss``
# options are spelled as cross_entropy's: weight = alpha per class, divisor by count does not change errors).
SOFTMAX_LOSSES: Dict[str, Dict] = {
    "cross_entropy": {},
    "class weights": {"weight": True},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "focal γ=2": {"focal_gamma": 2.0},
    "focal γ=0.5 + smoothing 0.1": {"focal_gamma": 0.5, "label_smoothing": 0.1},
    "z-loss 1e-4": {"z_loss": 1e-4},
    "softcap 30": {"softcap": 30.0},
    "soft targets": {"soft": True},
    "soft targets + focal γ=2 + softcap 30": {"soft": True, "focal_gamma": 2.0, "softcap": 30.0},
}
SOFTMAX_SCALES = (1.0, 100.0, 1e3, 1e4)
SOFTMAX_SHAPES = ((257, 9), (257, 133), (16, 1500))
CRF_SCALES = (1.0, 100.0, 1e3)
CRF_SHAPES = ((6, 12, 5), (4, 7, 73))  # (B, T, K)
CRF_OUTPUTS = ("log-likelihood", "gradient", "marginals", "viterbi score")


def within_rule(error: float, reference_error: float) -> bool:
    """The acceptance rule: at most twice the float32 reference's error, plus the floor."""
    return error <= RULE_FACTOR * reference_error + FLOOR


def rel_error(out: torch.Tensor, ref: torch.Tensor, scale: Optional[float] = None, min_scale: float = 0.0) -> float:
    """``max |out - ref| / max(scale, min_scale)`` with ``scale = max |ref|`` unless given (absolute when both are
    0); inf for a non-finite ``out`` where ``ref`` is finite."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out - ref).abs()
    diff = torch.where(torch.isfinite(ref) & ~torch.isfinite(out), float("inf"), diff)
    diff = torch.where(torch.isnan(ref) & torch.isnan(out), 0.0, diff)
    worst = float(diff.max()) if diff.numel() else 0.0
    if scale is None:
        scale = float(ref.abs().max()) if ref.numel() else 0.0
    scale = max(scale, min_scale)
    return worst / scale if scale > 0 else worst


def fused_backends(device: torch.device) -> List[str]:
    """The usable fused backends for tensors on ``device`` (Triton on CPU only through the interpreter)."""
    names = []
    for name, reason in fusedloss.available_backends().items():
        if reason is not None or name == "reference":
            continue
        if name == "cpp" and device.type != "cpu" or name == "cuda" and device.type != "cuda":
            continue
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Softmax losses
# ---------------------------------------------------------------------------------------------


def softmax_inputs(n: int, c: int, scale: float, options: Dict, generator: torch.Generator,
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, Dict, torch.Tensor]:
    """``(input, target, cross_entropy kwargs, grad_output for reduction="none")`` in float64."""
    x = torch.randn(n, c, generator=generator, dtype=torch.float64) * scale
    kwargs = {k: v for k, v in options.items() if k not in ("soft", "weight")}
    if options.get("soft"):
        target = torch.softmax(3 * torch.randn(n, c, generator=generator, dtype=torch.float64), -1)
    else:
        target = torch.randint(0, c, (n,), generator=generator)
        confident = torch.rand(n, generator=generator) < 0.5
        target = torch.where(confident, x.argmax(-1), target)
    if options.get("weight"):
        kwargs["weight"] = torch.rand(c, generator=generator, dtype=torch.float64) + 0.5
    grad_output = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5
    return x.to(device), target.to(device), {k: _to(v, device) for k, v in kwargs.items()}, grad_output.to(device)


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _cast(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def softmax_outputs(backend: str, x: torch.Tensor, target: torch.Tensor, kwargs: Dict, reduction: str,
                    grad_output: Optional[torch.Tensor], dtype: torch.dtype,
                    loss_fn: Callable = fusedloss.cross_entropy,
                    view: Callable = _identity) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d(loss · grad_output)/d input)`` of one backend with every floating input cast to ``dtype``.
    The input is ``view(x)`` (e.g. a strided slice of a larger ``x``: non-contiguous layouts)."""
    leaf = x.detach().to(dtype).requires_grad_()
    loss = loss_fn(view(leaf), _cast(target, dtype), reduction=reduction, backend=backend,
                   **{k: _cast(v, dtype) for k, v in kwargs.items()})
    loss.backward(_cast(grad_output, dtype) if reduction == "none" else None)
    return loss.detach(), view(leaf.grad)


def softmax_errors(backends: Sequence[str], x, target, kwargs, reduction="none", grad_output=None,
                   loss_fn: Callable = fusedloss.cross_entropy,
                   view: Callable = _identity) -> Dict[str, Tuple[float, float]]:
    """``{name: (value error, gradient error)}`` against the float64 reference, for the float32 reference
    (``"torch fp32"``) and each fused backend in float32."""
    exact = softmax_outputs("reference", x, target, kwargs, reduction, grad_output, torch.float64, loss_fn, view)
    errors = {}
    for name, backend in [("torch fp32", "reference")] + [(b, b) for b in backends]:
        out = softmax_outputs(backend, x, target, kwargs, reduction, grad_output, torch.float32, loss_fn, view)
        errors[name] = (rel_error(out[0], exact[0]), rel_error(out[1], exact[1], min_scale=GRADIENT_MIN_SCALE))
    return errors


# ---------------------------------------------------------------------------------------------
# CRF
# ---------------------------------------------------------------------------------------------


def crf_inputs(b: int, t: int, k: int, scale: float, generator: torch.Generator, device: torch.device):
    """``(emissions, tags, mask, transitions, start, end, grad_output)`` in float64, ragged left-aligned masks."""
    emissions = torch.randn(b, t, k, generator=generator, dtype=torch.float64) * scale
    tags = torch.randint(0, k, (b, t), generator=generator)
    lengths = torch.randint(1, t + 1, (b,), generator=generator)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    transitions = torch.randn(k, k, generator=generator, dtype=torch.float64)
    start, end = (torch.randn(k, generator=generator, dtype=torch.float64) for _ in range(2))
    grad_output = torch.rand(b, generator=generator, dtype=torch.float64) + 0.5
    return tuple(v.to(device) for v in (emissions, tags, mask, transitions, start, end, grad_output))


def crf_outputs(backend: str, emissions, tags, mask, transitions, start, end, grad_output,
                dtype: torch.dtype, view: Callable = _identity) -> Dict[str, Sequence[torch.Tensor]]:
    """The four CRF outputs of one backend with every floating input cast to ``dtype``; the emissions passed are
    ``view(emissions)`` (non-contiguous layouts)."""
    params = [v.detach().to(dtype).requires_grad_() for v in (emissions, transitions, start, end)]
    llh = fusedloss.crf_log_likelihood(view(params[0]), tags, params[1], params[2], params[3], mask,
                                       reduction="none", backend=backend)
    llh.backward(grad_output.to(dtype))
    plain = [view(params[0].detach())] + [p.detach() for p in params[1:]]
    marginals = fusedloss.crf_marginals(*plain, mask, backend=backend)
    _, score = fusedloss.crf_viterbi(*plain, mask, backend=backend)
    return {"log-likelihood": [llh.detach()], "gradient": [view(params[0].grad)] + [p.grad for p in params[1:]],
            "marginals": [marginals], "viterbi score": [score]}


def crf_errors(backends: Sequence[str], *inputs, view: Callable = _identity) -> Dict[str, Dict[str, float]]:
    """``{name: {output: error}}`` against the float64 reference (a list output: the largest error of its parts).

    The log-likelihood ``score(y) - log Z`` is a difference of two sums of emissions: its error is taken relative
    to the larger of its own size and the best path's score (about ``log Z``), the size of what is rounded. (With
    K = 1 it is exactly 0 in exact arithmetic, whatever the emissions.)"""
    exact = crf_outputs("reference", *inputs, torch.float64, view)
    scales = {key: [None] * len(exact[key]) for key in CRF_OUTPUTS}
    min_scales = {key: GRADIENT_MIN_SCALE if key in ("gradient", "marginals") else 0.0 for key in CRF_OUTPUTS}
    scales["log-likelihood"] = [max(float(exact[key][0].abs().max()) for key in ("log-likelihood", "viterbi score"))]
    errors = {}
    for name, backend in [("torch fp32", "reference")] + [(b, b) for b in backends]:
        out = crf_outputs(backend, *inputs, torch.float32, view)
        errors[name] = {key: max(rel_error(o, e, s, min_scales[key]) for o, e, s in zip(out[key], exact[key],
                                                                                     scales[key]))
                        for key in CRF_OUTPUTS}
    return errors


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _worst(into: Dict, key, values: Sequence[float]) -> None:
    into[key] = [max(a, b) for a, b in zip(into[key], values)] if key in into else list(values)


def measure(device: torch.device, seeds: int, softmax_scales=SOFTMAX_SCALES, crf_scales=CRF_SCALES):
    """Worst errors over shapes and seeds: ``{(family, loss, scale, name): [errors...]}``."""
    backends = fused_backends(device)
    table: Dict = {}
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        for loss, options in SOFTMAX_LOSSES.items():
            for scale in softmax_scales:
                for n, c in SOFTMAX_SHAPES:
                    x, target, kwargs, grad_output = softmax_inputs(n, c, scale, options, generator, device)
                    for name, errs in softmax_errors(backends, x, target, kwargs, "none", grad_output).items():
                        _worst(table, ("softmax", loss, scale, name), errs)
        for scale in crf_scales:
            for b, t, k in CRF_SHAPES:
                inputs = crf_inputs(b, t, k, scale, generator, device)
                for name, errs in crf_errors(backends, *inputs).items():
                    _worst(table, ("crf", "CRF", scale, name), [errs[key] for key in CRF_OUTPUTS])
    return backends, table


def _cell(errors: Sequence[float], reference: Sequence[float], mark: bool) -> str:
    text = " / ".join(f"{e:.1e}" for e in errors)
    if mark and not all(within_rule(e, r) for e, r in zip(errors, reference)):
        text += " **!**"
    return text


def format_table(backends: Sequence[str], table: Dict, markdown: bool) -> str:
    names = ["torch fp32"] + list(backends)
    keys = sorted({k[:3] for k in table}, key=lambda k: (k[0] != "softmax", list(SOFTMAX_LOSSES).index(k[1])
                                                          if k[0] == "softmax" else 0, k[2]))
    header = ["loss", "scale", *(n if n == "torch fp32" else f"{n} fp32" for n in names)]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    else:
        lines.append("  ".join(f"{h:<28}" if i == 0 else f"{h:<26}" for i, h in enumerate(header)))
    for key in keys:
        reference = table[key + ("torch fp32",)]
        cells = [key[1], f"{key[2]:g}"] + [_cell(table[key + (n,)], reference, n != "torch fp32") for n in names]
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append("  ".join(f"{c:<28}" if i == 0 else f"{c:<26}" for i, c in enumerate(cells)))
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    text = f"{device_name(device)}, torch {torch.__version__}"
    return text if device.type == "cuda" else text + ", Triton under TRITON_INTERPRET=1"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=3, help="random inputs per (loss, scale, shape)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in SOFTMAX_SCALES), help="logit scales")
    parser.add_argument("--crf-scales", default=",".join(f"{s:g}" for s in CRF_SCALES), help="emission scales")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends, table = measure(device, args.seeds, [float(s) for s in args.scales.split(",")],
                              [float(s) for s in args.crf_scales.split(",")])
    print(f"# Max relative error against float64 (value / gradient; CRF: log-likelihood / gradient / marginals / "
          f"Viterbi score), worst of {args.seeds} seeds x shapes; '!' marks a backend above "
          f"{RULE_FACTOR:g}x torch fp32 + {FLOOR:g}. Device: {device_description(device)}")
    print(format_table(backends, table, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
