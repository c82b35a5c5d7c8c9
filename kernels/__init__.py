"""Triton N:M sparse matmul kernels (installed as ``spa_compiler.kernels``)."""
