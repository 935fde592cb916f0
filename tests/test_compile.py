"""torch.compile(fullgraph=True) through the Triton softmax loss (custom ops ``fusedloss::triton_softmax_loss``).

A small token classifier calls the public ``fusedloss.cross_entropy(..., backend="triton")``; compiled with
``fullgraph=True`` (any graph break is an error) it must give eager's loss and gradients. On CPU tensors the
kernels run under TRITON_INTERPRET=1 (tests/conftest.py), inside the custom op that Dynamo treats as opaque.
"""

import pytest
import torch

import fusedloss


class _Tagger(torch.nn.Module):
    def __init__(self, hidden: int, num_classes: int, **loss_options):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(num_classes, hidden, generator=generator))
            self.proj.bias.copy_(torch.randn(num_classes, generator=generator))
        self.loss_options = loss_options

    def forward(self, features, target):
        logits = self.proj(torch.tanh(features))
        return fusedloss.cross_entropy(logits, target, backend="triton", **self.loss_options)


def _loss_and_grads(model, features, target):
    model.zero_grad()
    features = features.detach().clone().requires_grad_()
    loss = model(features, target)
    loss.sum().backward() if loss.dim() else loss.backward()
    return loss.detach(), features.grad, model.proj.weight.grad.clone()


@pytest.mark.parametrize(
    "loss_options",
    [
        {},
        # inplace_backward falls back to the functional op under torch.compile (softmax_loss's docstring).
        {"reduction": "none", "label_smoothing": 0.1, "focal_gamma": 2.0, "z_loss": 1e-3, "softcap": 5.0,
         "inplace_backward": True},
    ],
    ids=["plain", "every-option"],
)
def test_compiled_model_matches_eager(loss_options):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 8, generator=generator)
    target = torch.randint(0, 5, (2, 3), generator=generator)
    target[0, 1] = -100
    model = _Tagger(8, 5, **loss_options)

    eager = _loss_and_grads(model, features, target)
    compiled = _loss_and_grads(torch.compile(model, fullgraph=True), features, target)
    for name, e, c in zip(("loss", "input gradient", "weight gradient"), eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
