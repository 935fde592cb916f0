"""Triton kernels of fusedloss, one module per op family (installed as fusedloss.triton_kernels).

Importing this package does not import triton; the family modules do, and the dispatcher imports
them only when the triton backend is asked for.
"""
