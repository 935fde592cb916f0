"""Backward more than once through one graph (``retain_graph=True``), held to what torch's own ops do.

torch lets a graph run backward again with ``retain_graph=True``; the gradients accumulate in ``.grad``. The fused
backends compute a loss's gradient in the forward pass, save it, and scale it by ``grad_output`` in backward, in
place where that saves a gradient-sized buffer. Such an op may refuse a second backward (RuntimeError: a saved
tensor was modified by an inplace operation) where it says so, but it may never give another number.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch


def grads_after_backwards(loss_fn: Callable, inputs: Sequence[torch.Tensor], scales: Sequence[float]
                          ) -> Tuple[List[List[torch.Tensor]], Optional[RuntimeError]]:
    """Fresh leaves from ``inputs``, one ``loss = loss_fn(*leaves)``, then ``loss.backward(s · g, retain_graph=True)``
    for each s in ``scales`` (g: 1 for a scalar loss, else fixed random values in [0.5, 1.5)) until one raises.
    Returns the leaves' ``.grad`` (float64 copies) after each backward that ran, and the error or None."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = loss_fn(*leaves)
    g = (0.5 + torch.rand(loss.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
         if loss.dim() else torch.ones((), dtype=torch.float64))
    after = []
    for scale in scales:
        try:
            loss.backward((scale * g).to(loss.dtype), retain_graph=True)
        except RuntimeError as error:
            return after, error
        after.append([leaf.grad.double().clone() for leaf in leaves])
    return after, None


def assert_backwards_match(ours: Callable, oracle: Callable, inputs: Sequence[torch.Tensor], scales: Sequence[float],
                           *, may_raise: bool, names: Optional[Sequence[str]] = None, **tolerance) -> None:
    """After every backward of :func:`grads_after_backwards`, ``ours`` has ``oracle``'s gradients; a backward after
    the first may raise instead, only when ``may_raise`` (and then with the in-place modification error)."""
    got, error = grads_after_backwards(ours, inputs, scales)
    expected, oracle_error = grads_after_backwards(oracle, inputs, scales)
    assert oracle_error is None, oracle_error
    assert got, f"the first backward raised: {error}"
    if error is not None:
        assert may_raise, f"backward {len(got) + 1} raised: {error}"
        assert "modified by an inplace operation" in str(error), error
    names = names or [f"input {i}" for i in range(len(inputs))]
    for k, (ours_after, oracle_after) in enumerate(zip(got, expected)):
        for name, a, b in zip(names, ours_after, oracle_after):
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m, k=k, n=name: f"after backward {k + 1}, "
                                                                                     f"gradient of {n}: {m}")


def assert_cross_entropy_backwards_match(backend: str, scales: Sequence[float]) -> None:
    """:func:`assert_backwards_match` of ``fusedloss.cross_entropy`` on ``backend`` against torch's, on one small
    problem with label smoothing."""
    import torch.nn.functional as F

    import fusedloss

    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3])
    assert_backwards_match(lambda x: fusedloss.cross_entropy(x, target, label_smoothing=0.1, backend=backend),
                           lambda x: F.cross_entropy(x, target, label_smoothing=0.1), (x,), scales, may_raise=True)
