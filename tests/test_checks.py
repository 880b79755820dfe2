"""checks.py on its own: each check names the argument and what it expected, and raises before any
launch (the ops' tests show the same errors through the public ops)."""

import pytest
import torch

from fractal_kernels.checks import (
    are_counters, check_bn_input, check_bn_options, check_bn_tensor_lists, check_bn_tensors, check_mask, check_rows,
    check_tensor_list, has_no_data,
)
from fractal_kernels.testing import fake_mode

NAMES = ("weights", "biases", "running_means", "running_vars")


def test_tensor_lists():
    x = torch.randn(4, 3)
    assert check_tensor_list("inputs", (x, x)) == [x, x]
    with pytest.raises(TypeError, match="inputs must be a list or tuple of tensors, got Tensor"):
        check_tensor_list("inputs", x)
    with pytest.raises(ValueError, match="inputs must hold at least one tensor"):
        check_tensor_list("inputs", [])
    with pytest.raises(TypeError, match=r"inputs\[0\] must have a floating dtype"):
        check_tensor_list("inputs", [x.long()])
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape \(2, 3\), expected \(4, 3\) like inputs\[0\]"):
        check_tensor_list("inputs", [x, x[:2]])
    assert len(check_tensor_list("inputs", [x, x[:2]], same_batch=False)) == 2
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape \(2, 4\), expected \[B_1, 3\]"):
        check_tensor_list("inputs", [x, torch.randn(2, 4)], same_batch=False)
    with pytest.raises(TypeError, match=r"inputs\[1\] has dtype torch.float64"):
        check_tensor_list("inputs", [x, x.double()])


def test_masks():
    check_mask(None, 2, 4, torch.device("cpu"))
    check_mask(torch.ones(2, 4, dtype=torch.bool), 2, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"mask must have shape \[num_inputs, batch\] = \[2, 4\], got \[4, 2\]"):
        check_mask(torch.ones(4, 2, dtype=torch.bool), 2, 4, torch.device("cpu"))
    with pytest.raises(TypeError, match="mask must be bool or a 0/1 floating tensor, got torch.int64"):
        check_mask(torch.ones(2, 4, dtype=torch.long), 2, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        check_mask(torch.full((2, 4), 0.5), 2, 4, torch.device("cpu"))
    with fake_mode():  # no values to read: only the metadata is checked
        fake = torch.full((2, 4), 0.5)
        assert has_no_data(fake)
        check_mask(fake, 2, 4, torch.device("cpu"))


def test_gather_tables():
    inputs = [torch.randn(3, 2), torch.randn(1, 2)]
    check_rows(torch.tensor([[0, 1, 2], [-1, 0, -1]]), inputs, None)
    with pytest.raises(TypeError, match="rows must be an int32 or int64 tensor, got torch.float32"):
        check_rows(torch.zeros(2, 3), inputs, None)
    with pytest.raises(ValueError, match=r"rows must have shape \[num_inputs, batch\] = \[2, B\]"):
        check_rows(torch.zeros(3, 3, dtype=torch.long), inputs, None)
    with pytest.raises(ValueError, match=r"rows\[i, b\] must be -1 or a row of inputs\[i\]"):
        check_rows(torch.tensor([[0, 1, 3], [-1, 0, -1]]), inputs, None)
    with pytest.raises(ValueError, match="at most once"):
        check_rows(torch.tensor([[0, 0, 2], [-1, 0, -1]]), inputs, None)
    check_rows(torch.tensor([[0, 0, 2], [-1, 0, -1]]), inputs, False)  # not validated when not asked


def test_batch_norm_arguments():
    x = torch.randn(4, 3, 2, 2)
    c = torch.ones(3)
    check_bn_tensors(x, True, NAMES, c, c, None, None, index=1)
    with pytest.raises(ValueError, match="must have 2 to 5 dimensions"):
        check_bn_input("x", torch.randn(4), True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        check_bn_input("x", torch.randn(1, 3), True)
    with pytest.raises(ValueError, match=r"running_means\[1\] and running_vars\[1\] must both be tensors or both"):
        check_bn_tensors(x, True, NAMES, c, c, c, None, index=1)
    with pytest.raises(ValueError, match=r"running_means\[0\] and running_vars\[0\] are needed when training=False"):
        check_bn_tensors(x, False, NAMES, c, c, None, None, index=0)
    with pytest.raises(TypeError, match="must share one dtype"):
        check_bn_tensors(x.half(), True, NAMES, c.half(), c, None, None)
    with pytest.raises(TypeError, match="momentum must be a float, got str"):
        check_bn_options(True, "0.1", 1e-5)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        check_bn_options(True, 0.1, 0.0)


def test_batch_norm_argument_lists():
    """The lists' one-pass check accepts what check_bn_tensors accepts for each input, and names
    the first wrong entry as check_bn_tensors does."""
    x = torch.randn(4, 3, 2, 2)
    c = torch.ones(3)
    check_bn_tensor_lists(x, True, NAMES, [c, None], [c, None], [None, c], [None, c])
    check_bn_tensor_lists(x.half(), False, NAMES, [c.half()], [c.half()], [c.half()], [c.half()])
    with pytest.raises(ValueError, match=r"running_means\[1\] and running_vars\[1\] must both be tensors or both"):
        check_bn_tensor_lists(x, True, NAMES, [c, c], [c, c], [c, c], [c, None])
    with pytest.raises(ValueError, match=r"running_means\[1\] and running_vars\[1\] are needed when training=False"):
        check_bn_tensor_lists(x, False, NAMES, [c, c], [c, c], [c, None], [c, None])
    with pytest.raises(ValueError, match=r"biases\[1\] must have shape \[3\]"):
        check_bn_tensor_lists(x, True, NAMES, [c, c], [c, torch.ones(2)], [None, None], [None, None])
    with pytest.raises(TypeError, match=r"weights\[0\] must be a tensor or None, got list"):
        check_bn_tensor_lists(x, True, NAMES, [[1.0] * 3], [c], [None], [None])
    with pytest.raises(TypeError, match="must share one dtype"):
        check_bn_tensor_lists(x.half(), True, NAMES, [c.half(), c], [c.half(), c.half()], [None, None], [None, None])


def test_counters_and_seeds():
    device = torch.device("cpu")
    counter = torch.zeros((), dtype=torch.int64)
    assert are_counters([counter, None], 1, device) and are_counters([torch.zeros(2, dtype=torch.int64)], 2, device)
    assert not are_counters([counter.int()], 1, device)
    assert not are_counters([torch.zeros(2, dtype=torch.int64)], 1, device)
    assert not are_counters([torch.zeros(1, dtype=torch.int64, device="meta")], 1, device)
    assert not are_counters([0], 1, device)
