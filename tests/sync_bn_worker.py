"""One rank of the two-process synchronised-BatchNorm test (test_batchnorm.py).

    python sync_bn_worker.py OUT_DIR {interpreter,fake_gpu,compiled}

Rank r normalises its shard of a shared batch with bn_relu, and of two shared inputs with
join_bn_relu and a drop-path mask, with process_group=WORLD on the Triton backend (on CPU: in
the interpreter, or on the fake GPU, eagerly or compiled with fullgraph), forward and backward
without a device-to-host read, and saves its outputs, gradients and running statistics.
Compiled, it also checks that a second call compiles nothing new, and runs a FractalNet
training step with synchronised BatchNorm under fullgraph.
"""

import contextlib
import os
import sys

if __name__ == "__main__":
    out_dir, mode = sys.argv[1], sys.argv[2]
    if mode == "interpreter":
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    if mode in ("fake_gpu", "compiled"):
        from fractal_kernels.testing import fake_gpu

        fake_gpu.install()
    import fractal_kernels as fk
    from fractal_kernels.testing import no_host_reads

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    sizes = (3, 2)  # uneven shards
    data = {
        "x": [torch.randn(n, 4, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1 - 2 * r for r, n in enumerate(sizes)],
        "y": [torch.randn(n, 4, 5, 5, generator=gen, dtype=torch.float64) for n in sizes],
        "g": [torch.randn(n, 4, 5, 5, generator=gen, dtype=torch.float64) for n in sizes],
        "mask": [torch.rand(2, n, generator=gen) < 0.6 for n in sizes],
        "weight": torch.rand(4, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(4, generator=gen, dtype=torch.float64),
    }
    x, y = (data[name][rank].clone().requires_grad_() for name in ("x", "y"))
    w, b = (data[name].clone().requires_grad_() for name in ("weight", "bias"))
    running = [torch.zeros(4, dtype=torch.float64) if i % 2 == 0 else torch.ones(4,
                                                                                 dtype=torch.float64) for i in range(6)]
    group = dist.group.WORLD

    def normalised(x, y, w, b, running):
        out = fk.bn_relu(x, w, b, running[0], running[1], True, 0.1, 1e-5, process_group=group)
        joined = fk.join_bn_relu([x, y], data["mask"][rank], [w, None], [b, b], [running[2], running[4]],
                                 [running[3], running[5]], True, 0.1, 1e-5, process_group=group)
        return out, joined

    if mode == "compiled":
        from torch._dynamo.testing import CompileCounterWithBackend

        counter = CompileCounterWithBackend("aot_eager")
        normalised = torch.compile(normalised, fullgraph=True, backend=counter)
    # Compiled, fullgraph itself refuses a host read (and Dynamo runs under no dispatch mode).
    with no_host_reads() if mode != "compiled" else contextlib.nullcontext():
        out, joined = normalised(x, y, w, b, running)
        grads = torch.autograd.grad([out, joined], [x, y, w, b], [data["g"][rank], data["g"][rank]])
    if mode == "compiled":
        normalised(x, y, w, b, [t.clone() for t in running])
        assert counter.frame_count == 1, counter.frame_count
        from fractalnet import FractalNet, training

        # Four training steps of the default recipe as the loop runs them with two ranks (the
        # draws of seed 9: a local batch, a global batch of the deeper column, each twice): one
        # graph per structure drawn, no recompilation after (test_compile compiles every
        # structure, in one process).
        torch.manual_seed(0)
        model = FractalNet(10, widths=(4, 8), columns=2, dropout=(0.0, 0.1))
        model.process_group = group
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        training.give_every_parameter_a_gradient(model)
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(model, fullgraph=True, backend=counter)
        arguments = training.drop_path_arguments(model, {"drop_path": torch.Generator().manual_seed(9)})
        structures = []
        for _ in range(4):
            kwargs = arguments()
            structures.append(kwargs["structure"])
            optimizer.zero_grad(set_to_none=False)
            step(torch.randn(3, 3, 8, 8, generator=gen), **kwargs).square().mean().backward()
            optimizer.step()
        assert structures == ["local", 2, "local", 2] and counter.frame_count == 2, (structures, counter.frame_count)
    torch.save({"data": data, "out": out.detach(), "joined": joined.detach(), "grads": grads, "running": running},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
