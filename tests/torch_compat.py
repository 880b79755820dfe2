"""The torch internals the tests reach, in one place that knows every supported torch (2.11 to
2.13). An internal missing from the installed torch skips the test that needs it, with the reason:
the package's own behaviour never depends on these."""

import inspect

import pytest
import torch


def written_arguments(kernel, kwargs: dict) -> set:
    """The names of the tensor arguments torch's kernel-mutation analysis reports ``kernel``
    writes when launched with ``kwargs`` (2.13: identify_accessed_tensors; 2.11:
    identify_mutated_tensors)."""
    from torch._higher_order_ops import triton_kernel_wrap

    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, dict(kwargs), {})
        return {dep.name for dep in accesses.read_writes.writes}
    if hasattr(triton_kernel_wrap, "identify_mutated_tensors"):
        return set(triton_kernel_wrap.identify_mutated_tensors(kernel, dict(kwargs), {}))
    pytest.skip(f"torch {torch.__version__} has no kernel-mutation analysis this test knows")


def fake_tensor_updater(gm: torch.fx.GraphModule):
    """Inductor's FakeTensorUpdater of ``gm``: 2.13 takes the GraphModule, 2.11 its graph."""
    from torch._inductor.fx_utils import FakeTensorUpdater

    parameter = list(inspect.signature(FakeTensorUpdater.__init__).parameters)[1]
    return FakeTensorUpdater(gm.graph if parameter == "graph" else gm)
