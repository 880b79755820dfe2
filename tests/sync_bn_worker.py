"""One rank of the two-process synchronised-BatchNorm test (test_batchnorm.py).

Rank r normalises its half of a shared batch with bn_relu(process_group=WORLD) on the Triton
backend (interpreted on CPU) and saves its output, gradients and running statistics.
"""

import os
import sys

if __name__ == "__main__":
    # gloo on CPU tensors: the Triton kernels run in the interpreter, GPU or not.
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    import fractal_kernels as fk

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    data = {
        "x0": torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1,
        "x1": torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64) - 1,  # uneven shards
        "g0": torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64),
        "g1": torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64),
        "weight": torch.rand(4, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(4, generator=gen, dtype=torch.float64),
    }
    x = data[f"x{rank}"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_()
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    out = fk.bn_relu(x, w, b, rm, rv, True, 0.1, 1e-5, process_group=dist.group.WORLD)
    dx, dw, db = torch.autograd.grad(out, [x, w, b], data[f"g{rank}"])
    torch.save(
        {"data": data, "out": out.detach(), "dx": dx, "dw": dw, "db": db, "running_mean": rm, "running_var": rv},
        os.path.join(sys.argv[1], f"rank{rank}.pt"),
    )
    dist.destroy_process_group()
