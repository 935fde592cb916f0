"""Python side of the ``fusedloss._C`` extension: autograd and fake (meta) registrations of its
ops, one module per op family. The same module serves the ``cpp`` backend (CPU kernels) and the
``cuda`` backend (CUDA kernels): the torch dispatcher picks the kernel by the tensors' device.
"""
