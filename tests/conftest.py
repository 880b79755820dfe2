"""Test set-up: the mode the kernels run in, chosen before triton is imported.

  * with a CUDA GPU: compiled kernels on it;
  * FRACTAL_KERNELS_FAKE_GPU=1 (the second half of `make test`): the fake GPU of
    fractal_kernels.testing, i.e. the GPU's registration and compile path with every launch run
    by the interpreter;
  * otherwise: the Triton interpreter on CPU tensors (TRITON_INTERPRET=1; importing torch does not
    import triton).
"""

import atexit
import os
import shutil
import tempfile

import torch

# A fresh Inductor cache for each session: torch.compile's FX graph cache keys on the kernels'
# source but not on the ops' fake functions, so one left by an older checkout replays outputs of
# stale shapes.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fractal-kernels-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

if os.environ.get("FRACTAL_KERNELS_FAKE_GPU") == "1":
    from fractal_kernels.testing import fake_gpu

    fake_gpu.install()
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
