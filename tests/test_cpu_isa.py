"""The vector-ISA variants of the CPU kernels against each other on the same inputs.

The extension runs each CPU job in an AVX-512 variant where the CPU has AVX-512 (F, BW, VL, DQ), else in an AVX2 +
FMA variant where it has those, else in the baseline x86-64 variant; ``FUSEDLOSS_CPU_ISA=baseline`` or ``=avx2``
caps it. A subprocess computes every family's values and gradients in a capped variant; this process computes them
in its own. Jobs compiled without contraction (distillation, the one-class softmax) must agree bit for bit; jobs
that fuse multiply-adds (softmax from two classes on, the sigmoid and multi-label losses, the CRF) or that the
AVX-512 variant runs with 16 lanes (softmax: another exp, another order of the sums, tiles of rows up to 512
classes) within a few float32 ulps; Viterbi paths exactly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._backends import require_backend_for_module

require_backend_for_module("cpp")

import fusedloss  # noqa: E402
import fusedloss._C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def compute():
    """Every family's results on fixed inputs, on the cpp backend: {name: tensor}."""
    out = {}
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=3.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    for num_classes in (1, 9, 37, 133, 200, 300, 1024):
        for smoothing in (0.0, 0.1):
            x = leaf(67, num_classes)
            target = torch.randint(0, num_classes, (67,), generator=generator)
            target[5] = -100
            loss = fusedloss.cross_entropy(x, target, label_smoothing=smoothing, reduction="none", backend="cpp")
            loss.backward(torch.rand(67, generator=generator))
            out[f"softmax C={num_classes} eps={smoothing}"] = loss.detach()
            out[f"softmax C={num_classes} eps={smoothing} grad"] = x.grad
        # Class weights and the focal factor (rows of the tiles and of the per-row sweep, in each variant).
        x = leaf(67, num_classes)
        target = torch.randint(0, num_classes, (67,), generator=generator)
        weight = torch.rand(num_classes, generator=generator) + 0.5
        loss = fusedloss.cross_entropy(x, target, weight=weight, focal_gamma=2.0, backend="cpp")
        loss.backward()
        out[f"softmax C={num_classes} weight focal"] = loss.detach()
        out[f"softmax C={num_classes} weight focal grad"] = x.grad
    x, y = leaf(64, 80), (torch.rand(64, 80, generator=generator) < 0.2).float()
    pos_weight = torch.rand(80, generator=generator) + 0.5
    for name, fn in (
        ("bce", lambda: fusedloss.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight, backend="cpp")),
        ("sigmoid focal", lambda: fusedloss.sigmoid_focal_loss(x, y, reduction="sum", backend="cpp")),
        ("zlpr", lambda: fusedloss.multilabel_categorical_crossentropy(x, y, backend="cpp")),
        ("bi-tempered", lambda: fusedloss.bi_tempered_logistic_loss(x, y.argmax(1), t1=0.8, t2=1.2, backend="cpp")),
    ):
        x.grad = None
        loss = fn()
        loss.backward()
        out[name] = loss.detach()
        out[name + " grad"] = x.grad.clone()
    student, teacher = leaf(32, 500), torch.randn(32, 500, generator=generator)
    loss = fusedloss.distillation_loss(student, teacher, beta=0.5, backend="cpp")
    loss.backward()
    out["distillation"], out["distillation grad"] = loss.detach(), student.grad
    emissions = leaf(6, 40, 9, scale=2.0)
    transitions = torch.randn(9, 9, generator=generator)
    start, end = torch.randn(9, generator=generator), torch.randn(9, generator=generator)
    tags = torch.randint(0, 9, (6, 40), generator=generator)
    mask = torch.arange(40)[None] < torch.tensor([40, 33, 20, 7, 1, 40])[:, None]
    allowed = torch.nn.functional.one_hot(tags, 9).bool() | (torch.rand(6, 40, 1, generator=generator) < 0.3)
    for name, tag_argument in (("crf", tags), ("crf partial", allowed)):
        emissions.grad = None
        llh = fusedloss.crf_log_likelihood(emissions, tag_argument, transitions, start, end, mask, "none",
                                           backend="cpp")
        llh.sum().backward()
        out[name], out[name + " grad"] = llh.detach(), emissions.grad.clone()
    with torch.no_grad():
        out["viterbi paths"], out["viterbi scores"] = fusedloss.crf_viterbi(emissions, transitions, start, end,
                                                                            mask, backend="cpp")
        out["5-best paths"], out["5-best scores"] = fusedloss.crf_viterbi(emissions, transitions, start, end, mask,
                                                                          k=5, backend="cpp")
        # Viterbi at every tag count the AVX-512 variant runs in one vector (up to 16) and past it: random scores,
        # integer ones (exact ties everywhere), emissions of 1000, forbidden transitions, float16 emissions, and
        # sequences with a NaN or -inf emission (the vector run hands those to the scalar one).
        lengths = torch.tensor([23, 17, 1, 23, 9])
        mask = torch.arange(23)[None] < lengths[:, None]
        for k in (1, 2, 3, 4, 5, 8, 9, 15, 16, 17):
            for kind in ("random", "ties", "1000", "forbidden", "float16", "nan"):
                emissions = torch.randn(5, 23, k, generator=generator)
                transitions = torch.randn(k, k, generator=generator)
                start, end = torch.randn(k, generator=generator), torch.randn(k, generator=generator)
                if kind == "ties":
                    emissions, transitions = emissions.round(), transitions.round()
                    start, end = start.round(), end.round()
                elif kind == "1000":
                    emissions = emissions * 1000
                elif kind == "forbidden":
                    transitions[torch.rand(k, k, generator=generator) < 0.4] = -10000.0
                elif kind == "float16":
                    emissions = emissions.half()
                elif kind == "nan":
                    emissions[1, 3, 0], emissions[3, 5, k - 1] = float("nan"), float("-inf")
                paths, scores = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, backend="cpp")
                out[f"viterbi K={k} {kind} paths"], out[f"viterbi K={k} {kind} scores"] = paths, scores
                # One sequence and two (the AVX-512 variant's run of up to 16 tags in one vector, one or two
                # sequences side by side; its steps read 16 emissions at once except near a sequence's end).
                for part, rows in (("one", slice(3, 4)), ("pair", slice(0, 2))):
                    paths, scores = fusedloss.crf_viterbi(emissions[rows], transitions, start, end, mask[rows],
                                                          backend="cpp")
                    out[f"viterbi K={k} {kind} {part} paths"], out[f"viterbi K={k} {kind} {part} scores"] = (
                        paths, scores)
        # Batches (the AVX-512 and AVX2 variants decode 16 or 8 sequences at a time, one per lane), ragged, with
        # -inf transitions and emissions, and a NaN in one sequence.
        lengths = torch.randint(1, 20, (37,), generator=generator)
        mask = torch.arange(19)[None] < lengths[:, None]
        for k in (2, 9, 17, 40):
            for kind in ("random", "ties", "-inf", "nan"):
                emissions = torch.randn(37, 19, k, generator=generator)
                transitions = torch.randn(k, k, generator=generator)
                start, end = torch.randn(k, generator=generator), torch.randn(k, generator=generator)
                if kind == "ties":
                    emissions, transitions = emissions.round(), transitions.round()
                elif kind == "-inf":
                    transitions[torch.rand(k, k, generator=generator) < 0.4] = float("-inf")
                    emissions[torch.rand(37, 19, k, generator=generator) < 0.2] = float("-inf")
                elif kind == "nan":
                    emissions[4, 0, 0], emissions[20, 1, k - 1] = float("nan"), float("inf")
                paths, scores = fusedloss.crf_viterbi(emissions, transitions, start, end, mask, backend="cpp")
                out[f"viterbi K={k} batch {kind} paths"], out[f"viterbi K={k} batch {kind} scores"] = paths, scores
    return out


# Results that must be the same bits in every variant: the jobs compiled without contraction, and Viterbi's
# scores (additions and maxima only: the AVX-512 variant's vector run does viterbi's arithmetic lane by lane).
EXACT = ("softmax C=1 ", "distillation", "viterbi K=")


VARIANTS = ("avx512", "avx2", "baseline")  # best first


def test_cpu_isa_is_reported():
    assert fusedloss._C.cpu_isa() in VARIANTS


@pytest.mark.parametrize("capped", ["baseline", "avx2"])
def test_capped_variant_agrees_with_this_process(tmp_path, capped):
    this = fusedloss._C.cpu_isa()
    if VARIANTS.index(this) >= VARIANTS.index(capped):
        pytest.skip(f"this CPU runs {this}: both sides would run the same code")
    path = tmp_path / "capped.pt"
    script = (
        "import sys, torch; sys.path.insert(0, %r); import fusedloss._C; "
        "from tests.test_cpu_isa import compute; "
        "assert fusedloss._C.cpu_isa() == %r, fusedloss._C.cpu_isa(); "
        "torch.save(compute(), %r)" % (str(ROOT), capped, str(path))
    )
    env = dict(os.environ, FUSEDLOSS_CPU_ISA=capped)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT, timeout=300)
    other_results = torch.load(path)
    ours = compute()
    assert set(other_results) == set(ours)
    for name, value in ours.items():
        other = other_results[name]
        if name.startswith(EXACT) or "paths" in name:
            assert torch.equal(value, other) or (value.isnan().any() and torch.equal(value.isnan(), other.isnan())
                                                 and torch.equal(value.nan_to_num(), other.nan_to_num())), name
        else:
            torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-6, msg=name)
