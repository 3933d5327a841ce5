"""Benchmarks: `flashllm bench kernels` (kernels.py) times the sparse products against cuBLAS,
cuSPARSE and torch's 2:4 path on real layer shapes, next to the byte-count ideal."""
