"""Test set-up: the mode the kernels run in, chosen before triton is imported.

  * with a CUDA GPU: compiled kernels on it;
  * FRACTAL_KERNELS_FAKE_GPU=1 (the second half of `make test`): the fake GPU of
    fractal_kernels.testing, i.e. the GPU's registration and compile path with every launch run
    by the interpreter;
  * otherwise: the Triton interpreter on CPU tensors (TRITON_INTERPRET=1; importing torch does not
    import triton).
"""

import os

import torch

if os.environ.get("FRACTAL_KERNELS_FAKE_GPU") == "1":
    from fractal_kernels.testing import fake_gpu

    fake_gpu.install()
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
