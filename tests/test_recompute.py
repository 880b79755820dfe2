"""recompute.py on its own: within recompute_activations a consumer of a registered output saves
its recipe, which the backward runs, in the place of the output; other tensors keep the hooks
that were active around the block."""

import torch

from fractal_kernels import recompute


def test_a_registered_output_is_recomputed_in_the_backward_not_saved():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    calls = []

    def recipe():
        calls.append(torch.is_grad_enabled())
        return x.detach() * 2

    assert not recompute.recording()
    with recompute.recompute_activations():
        assert recompute.recording()
        y = x * 2  # stands for a fused op's output
        recompute.register(y, recipe)
        z = y.sin()  # saves y: the recipe in its place
    assert not calls
    z.sum().backward()
    assert calls == [False]  # run once, without grad
    torch.testing.assert_close(x.grad, 2 * torch.cos(2 * x.detach()))


def test_nothing_is_recorded_without_grad_and_outer_hooks_still_pack_the_rest():
    with torch.no_grad(), recompute.recompute_activations():
        assert not recompute.recording()
    packed = []
    x = torch.randn(3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with recompute.recompute_activations():
            z = (x * 3).sin()
    z.sum().backward()
    assert len(packed) == 1  # sin's input, not registered: through the outer hooks
    torch.testing.assert_close(x.grad, 3 * torch.cos(3 * x.detach()))
