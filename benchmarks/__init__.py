"""Kernel and model benchmarks of fractal-kernels: ``python -m benchmarks`` (see __main__.py)."""
