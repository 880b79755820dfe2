"""torch's kernel-mutation analysis of every launch the package makes, the kernels torch.library
finds for each op, and Inductor's reinplacing around them."""

import re

import pytest
import torch
from helpers import DEVICE
from torch_compat import fake_tensor_updater, written_arguments

import fractal_kernels as fk
from fractalnet import FractalNet

from gpu_path import LAUNCHES, configuration

pytestmark = [pytest.mark.fake_gpu, pytest.mark.usefixtures("fresh_dynamo")]


# ----------------------------------------------------------------------------------------------
# torch's kernel-mutation analysis on every launch the package makes
# ----------------------------------------------------------------------------------------------

#: The parameters each kernel writes (a name, or a slot prefix followed by the slot's digit).
WRITTEN = {
    "join_forward_kernel": ("out_ptr",),
    "join_backward_kernel": ("dx",),
    "bn_stats_kernel": ("partials_ptr",),
    "bn_combine_kernel": ("stats_ptr", "running_mean", "running_var", "num_batches_tracked"),
    "bn_apply_kernel": ("out_ptr",),
    "bn_backward_sums_kernel": ("sums_ptr",),
    "bn_backward_dx_kernel": ("dx", "param_grads_ptr"),
    "bn_forward_kernel": ("out_ptr", "running_mean", "running_var", "num_batches_tracked", "stats_ptr"),
    "bn_backward_kernel": ("dx", "param_grads_ptr"),
}


def written_by_contract(kernel: str, kwargs: dict) -> set:
    return {
        name for name, value in kwargs.items()
        if isinstance(value, torch.Tensor) and any(re.fullmatch(re.escape(p) + r"\d?", name) for p in WRITTEN[kernel])
    }


#: One launch of each configuration up to its tile sizes, which change no pointer a kernel writes.
ANALYSED = list({configuration(record, kwargs, tiles=False): (label, record, kwargs)
                 for label, record, kwargs in LAUNCHES}.values())


def test_every_kernel_is_analysed():
    assert {record.kernel.fn.__name__ for _, record, _ in ANALYSED} == set(WRITTEN)


@pytest.mark.parametrize("label,record,kwargs", ANALYSED,
                         ids=[f"{r.kernel.fn.__name__}-{i}" for i, (_, r, _) in enumerate(ANALYSED)])
def test_mutation_analysis_of_each_launch(label, record, kwargs):
    name = record.kernel.fn.__name__
    written = written_arguments(record.kernel, kwargs)
    # Exactly what the kernel writes: a read-only argument reported as written would be cloned
    # and copied back around every launch under torch.compile.
    assert written == written_by_contract(name, kwargs), label
    tensors = {n: v for n, v in kwargs.items() if isinstance(v, torch.Tensor)}
    for arg in written:
        t = tensors[arg]
        # Whole tensors: functionalization clones a written argument, so a written view would
        # lose whatever the kernel writes beyond it.
        assert t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes(), (label, arg)
        others = [n for n, v in tensors.items()
                  if n != arg and v.numel() and v.untyped_storage()._cdata == t.untyped_storage()._cdata]
        assert not others, f"{label}: {arg} shares its memory with {others}"


# ----------------------------------------------------------------------------------------------
# The kernels torch.library finds for each op, and eager launches
# ----------------------------------------------------------------------------------------------

OP_KERNELS = {
    "fractal_kernels::join_forward": {"join_forward_kernel"},
    "fractal_kernels::join_backward": {"join_backward_kernel"},
    "fractal_kernels::bn_stats": {"bn_stats_kernel", "bn_combine_kernel"},
    "fractal_kernels::bn_apply": {"bn_apply_kernel"},
    "fractal_kernels::bn_backward_sums": {"bn_backward_sums_kernel"},
    "fractal_kernels::bn_backward_dx": {"bn_backward_dx_kernel"},
    "fractal_kernels::bn_forward": {"bn_forward_kernel"},
    "fractal_kernels::bn_backward": {"bn_backward_kernel"},
}


@pytest.mark.parametrize("op", OP_KERNELS)
def test_torch_library_finds_the_kernels_of_each_op(op):
    """AOT autograd's compile cache keys on the source of these kernels: an op whose kernels are
    not found could be served stale code from the cache after a kernel is edited."""
    from torch._library.triton import get_triton_kernels_for_op

    found = {kernel.fn.__name__ for kernel in get_triton_kernels_for_op(op)}
    assert found == OP_KERNELS[op]


@pytest.mark.slow
def test_inductor_reinplacing_leaves_no_copy_around_kernels():
    """Inductor's reinplace pass, run on the AOT graphs of a training step, removes every clone
    that functionalization put around the kernels: no kernel argument is cloned, and no clone or
    copy consumes or feeds a kernel node."""
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._higher_order_ops.triton_kernel_wrap import (
        triton_kernel_wrapper_functional,
        triton_kernel_wrapper_mutation,
    )
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._guards import detect_fake_mode
    from torch._inductor.virtualized import V

    graphs = []

    def reinplaced(gm, example_inputs):
        with V.set_fake_mode(detect_fake_mode(example_inputs)):
            reinplace_inplaceable_ops(fake_tensor_updater(gm), gm.graph)
        gm.recompile()
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=reinplaced, bw_compiler=reinplaced,
                                     keep_inference_input_mutations=True)

    torch.manual_seed(0)
    model = FractalNet(10, widths=(4, 8), columns=3, dropout=(0.0, 0.0)).to(DEVICE)
    with fk.use_backend("triton"):
        torch.compile(model, fullgraph=True, backend=backend)(torch.randn(6, 3, 8, 8, device=DEVICE)).sum().backward()
    assert len(graphs) == 2  # forward and backward
    kernel_ops = (triton_kernel_wrapper_functional, triton_kernel_wrapper_mutation)
    copy_ops = {"aten.clone.default", "aten.copy_.default", "aten.copy.default"}
    for gm in graphs:
        kernels = {n for n in gm.graph.nodes if n.target in kernel_ops}
        assert kernels
        cloned = [n.name for n in kernels
                  if n.target is triton_kernel_wrapper_functional and n.kwargs["tensors_to_clone"]]
        assert not cloned
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target) in copy_ops:
                assert not (set(node.all_input_nodes) | set(node.users)) & kernels, node.format_node()
