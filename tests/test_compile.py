"""torch.compile(fullgraph=True, backend="inductor") through the fused ops of the cpp and Triton backends.

Small models (a linear layer, then a loss) call the public functions; compiled with ``fullgraph=True`` (any graph
break is an error) by Inductor, which generates and builds C++ for the code around the ops on CPU tensors, they must
give eager's loss and gradients. The fused ops are opaque custom ops to the compiler: their fake kernels give the
output shapes, their registered autograd the backward. The Triton kernels run under TRITON_INTERPRET=1
(tests/conftest.py) inside their custom ops. A few small cases only: every compile runs gcc.
"""

import pytest
import torch

import fusedloss
from _backends import requires_backend

BACKENDS = [pytest.param("cpp", marks=requires_backend("cpp")),
            pytest.param("triton", marks=requires_backend("triton"))]

NUM_TAGS = 5


class _Model(torch.nn.Module):
    """features (B, T, H) -> tanh -> linear -> scores (B, T, NUM_TAGS) -> the loss named by ``loss`` (for
    ``linear_cross_entropy`` the linear layer and the loss are one fused op)."""

    def __init__(self, hidden: int, backend: str, loss: str, **loss_options):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Linear(hidden, NUM_TAGS)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(NUM_TAGS, hidden, generator=generator))
            self.proj.bias.copy_(torch.randn(NUM_TAGS, generator=generator))
        self.crf = fusedloss.CRF(NUM_TAGS, batch_first=True, backend=backend) if loss == "crf" else None
        self.backend, self.loss, self.loss_options = backend, loss, loss_options

    def forward(self, features, target, mask):
        hidden = torch.tanh(features)
        if self.loss == "linear_cross_entropy":  # the head inside the fused op
            return fusedloss.linear_cross_entropy(hidden, self.proj.weight, target, linear_bias=self.proj.bias,
                                                  backend=self.backend, **self.loss_options)
        scores = self.proj(hidden)
        if self.loss == "cross_entropy":
            return fusedloss.cross_entropy(scores, target, backend=self.backend, **self.loss_options)
        if self.loss == "crf":
            return -self.crf(scores, target.clamp(min=0), mask, reduction="token_mean")
        multi_hot = torch.nn.functional.one_hot(target.clamp(min=0), NUM_TAGS).float()
        return fusedloss.sigmoid_focal_loss(scores, multi_hot, backend=self.backend, **self.loss_options)


def _loss_and_grads(model, features, target, mask):
    model.zero_grad()
    features = features.detach().clone().requires_grad_()
    loss = model(features, target, mask)
    loss.sum().backward() if loss.dim() else loss.backward()
    grads = [features.grad] + [p.grad.clone() for p in model.parameters()]
    return [loss.detach()] + grads


CASES = {
    # inplace_backward falls back to the functional op under torch.compile (softmax_loss's docstring).
    "cross_entropy": ("cross_entropy", {"reduction": "none", "label_smoothing": 0.1, "focal_gamma": 2.0,
                                        "z_loss": 1e-3, "softcap": 5.0, "inplace_backward": True}),
    "cross_entropy_mean": ("cross_entropy", {"weight": torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25])}),
    "crf": ("crf", {}),
    "sigmoid_focal": ("sigmoid_focal", {"alpha": 0.25, "gamma": 2.0, "reduction": "mean"}),
    "linear_cross_entropy": ("linear_cross_entropy", {"label_smoothing": 0.1, "chunk_size": 4}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_matches_eager(backend, case):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 8, generator=generator)
    target = torch.randint(0, NUM_TAGS, (2, 3), generator=generator)
    target[1, 2] = -100
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, options = CASES[case]
    model = _Model(8, backend, loss, **options)

    eager = _loss_and_grads(model, features, target, mask)
    compiled = _loss_and_grads(torch.compile(model, fullgraph=True, backend="inductor"), features, target, mask)
    names = ["loss", "features gradient"] + [f"{name} gradient" for name, _ in model.named_parameters()]
    for name, e, c in zip(names, eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
