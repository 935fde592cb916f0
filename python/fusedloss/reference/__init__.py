"""Pure-PyTorch definition of every loss: the CPU fallback and the test oracle.

Written to be read: each function is the math of its loss in plain PyTorch ops, with autograd
doing the backward. float64 works everywhere, so ``torch.autograd.gradcheck`` runs on it.
"""
