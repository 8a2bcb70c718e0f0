"""Fused ops, each with its PyTorch reference beside it (installed as ``spo_fast.kernels``)."""
