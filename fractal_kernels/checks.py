"""Argument checks of the public ops: a ValueError or TypeError naming the argument and what was
expected, raised before any launch."""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch


#: Storage dtypes the kernels accept (fp64 is for gradcheck; it accumulates in fp64).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)


def has_no_data(t: torch.Tensor) -> bool:
    """Whether t has shapes but no values to read: a meta or fake tensor."""
    return t.is_meta or torch._subclasses.fake_tensor.is_fake(t)


def check_tensor_list(name: str, tensors, *, same_batch: bool = True) -> list[torch.Tensor]:
    """Checks that ``tensors`` is a list/tuple of one or more tensors of one shape (but for the
    batch size when not ``same_batch``), dtype and device."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor, got none")
    first = tensors[0]
    check_float_tensor(name, first, index=0)
    shape, dtype, device = first.shape, first.dtype, first.device
    for i, t in enumerate(tensors[1:], 1):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if (t.shape != shape) if same_batch else (t.dim() != first.dim() or t.shape[1:] != shape[1:]):
            like = str(tuple(shape)) if same_batch else f"[B_{i}, {', '.join(map(str, shape[1:]))}]"
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {like} like {name}[0]")
        if t.dtype != dtype:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}, expected {dtype} like {name}[0]")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}, expected {device} like {name}[0]")
    return list(tensors)


def check_float_tensor(name: str, t, index: Optional[int] = None) -> None:
    """Checks that ``t`` is a tensor of a storage dtype the kernels take; ``index``: its entry in
    the list ``name`` (the message is built only to raise: this runs for every op)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_label(name, index)} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPE_SET:
        raise TypeError(f"{_label(name, index)} must have a floating dtype in {FLOAT_DTYPES}, got {t.dtype}")


def check_mask(mask: Optional[torch.Tensor], num_inputs: int, batch: int, device: torch.device) -> None:
    """Checks a drop-path mask: None, or a [num_inputs, batch] bool or 0/1 float tensor on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
    is_bool = mask.dtype is torch.bool
    if not is_bool and not mask.dtype.is_floating_point:
        raise TypeError(f"mask must be bool or a 0/1 floating tensor, got {mask.dtype}")
    if tuple(mask.shape) != (num_inputs, batch):
        raise ValueError(f"mask must have shape [num_inputs, batch] = {[num_inputs, batch]}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, expected {device} like the inputs")
    # A float mask's values: where they can be read (a GPU mask costs one synchronisation: the
    # model's masks are bool, which need no check); not while torch traces or on fake tensors.
    if not is_bool and mask.numel() and not torch.compiler.is_compiling() and not has_no_data(mask):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (a drop-path mask keeps or drops an input, it does not "
                             "weight it); pass a bool mask")


def check_rows(rows, inputs: Sequence[torch.Tensor], validate: Optional[bool]) -> None:
    """Checks a gather table: integer [k, B] on the inputs' device; with ``validate`` also its
    values: rows[i, b] in [-1, B_i), and no row of an input named twice (two samples stored to
    one row would race). ``validate=None`` validates where that reads nothing back from a device
    (CPU tensors with values); on a GPU it costs a synchronisation, so it is done only when asked."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be a tensor, got {type(rows).__name__}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rows must be an int32 or int64 tensor, got {rows.dtype}")
    if rows.dim() != 2 or rows.shape[0] != len(inputs):
        raise ValueError(f"rows must have shape [num_inputs, batch] = [{len(inputs)}, B], got {list(rows.shape)}")
    if rows.device != inputs[0].device:
        raise ValueError(f"rows is on {rows.device}, expected {inputs[0].device} like the inputs")
    if torch.compiler.is_compiling() or rows.numel() == 0:
        return
    if validate is None:  # fake and meta tensors have no values to read
        validate = rows.device.type == "cpu" and not has_no_data(rows)
    if not validate:
        return
    sizes = torch.tensor([x.shape[0] for x in inputs], device=rows.device)[:, None]
    if bool(((rows < -1) | (rows >= sizes)).any()):
        raise ValueError("rows[i, b] must be -1 or a row of inputs[i] (0 <= row < inputs[i].shape[0])")
    ordered = rows.sort(dim=1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError("rows must name each row of an input at most once (rows[i] has a repeated row)")


def _label(name: str, index: Optional[int]) -> str:
    """An argument's name in a message: ``name``, or entry ``index`` of the list ``name``."""
    return name if index is None else f"{name}[{index}]"


#: The dtypes a per-channel parameter or statistic may have, by the input's dtype: torch's
#: batch_norm rule (the input's own, or fp32 for a half-precision input).
PARAM_DTYPES = {
    torch.float32: frozenset({torch.float32}),
    torch.float64: frozenset({torch.float64}),
    torch.float16: frozenset({torch.float16, torch.float32}),
    torch.bfloat16: frozenset({torch.bfloat16, torch.float32}),
}


def check_channel_param(name: str, t: Optional[torch.Tensor], channels: int, device: torch.device,
                        dtypes: frozenset, index: Optional[int] = None) -> None:
    """Checks an optional per-channel parameter or statistic: 1-D of ``channels`` values on
    ``device``, of one of ``dtypes`` (PARAM_DTYPES of the input's); ``index``: its entry in the
    list ``name`` (the message is built only to raise)."""
    if _are_channel_params((t,), (channels,), device, dtypes):
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_label(name, index)} must be a tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_label(name, index)} must be a floating tensor, got {t.dtype}")
    if t.dtype not in dtypes:
        expected = " or ".join(sorted(str(d) for d in dtypes))
        raise TypeError(f"{_label(name, index)} has dtype {t.dtype}, expected {expected} for an input of that "
                        "dtype (as torch's batch_norm)")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{_label(name, index)} must have shape [{channels}] (one value per channel), "
                         f"got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{_label(name, index)} is on {t.device}, expected {device} like the input")


def _are_channel_params(tensors: tuple, shape: tuple, device: torch.device, dtypes: frozenset) -> bool:
    """Whether each of ``tensors`` is None or a valid per-channel tensor: the valid case in one
    call (this runs for every unit of every step; a tensor's attribute costs a few hundred
    instructions, an isinstance as much again, so a non-tensor is told by its AttributeError)."""
    try:
        for t in tensors:
            if t is not None and not (t.dtype in dtypes and t.shape == shape and t.device == device):
                return False
    except AttributeError:
        return False
    return True


def check_bn_input(name: str, x: torch.Tensor, training: bool) -> None:
    """Checks a BatchNorm input: [N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W]."""
    shape = x.shape  # read once: each read builds a torch.Size
    if not 2 <= len(shape) <= 5:
        raise ValueError(f"{name} must have 2 to 5 dimensions [N, C, ...], got shape {list(shape)}")
    # N * HW == 1, read from numel where C > 0 (one call instead of the sizes' product).
    if training and x.numel() == shape[1] and (shape[1] or shape[0] * math.prod(shape[2:]) == 1):
        # F.batch_norm's rule and message (an empty batch is allowed: it normalises nothing).
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _check_number(name: str, value) -> None:
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def check_bn_params(x, training, momentum, eps, names, weight, bias, running_mean, running_var) -> None:
    """Checks one input's BatchNorm parameters and options; ``names`` are the parameters' in the
    caller's signature."""
    check_bn_tensors(x, training, names, weight, bias, running_mean, running_var)
    check_bn_options(training, momentum, eps)


def check_bn_tensors(x: torch.Tensor, training, names, weight, bias, running_mean, running_var,
                     index: Optional[int] = None) -> None:
    """Checks one input's BatchNorm parameters and running statistics against input ``x`` (its
    channels, device and dtype); ``names`` are theirs in the caller's signature (with ``index``:
    the lists' names, of which these are entry ``index``)."""
    device, dtypes = x.device, PARAM_DTYPES[x.dtype]
    shape = (x.shape[1],)
    tensors = (weight, bias, running_mean, running_var)
    if not _are_channel_params(tensors, shape, device, dtypes):
        for name, t in zip(names, tensors):  # the first wrong one raises, named
            check_channel_param(name, t, shape[0], device, dtypes, index)
    if len(dtypes) > 1 and len({t.dtype for t in tensors if t is not None}) > 1:
        # A half-precision input's parameters and statistics are all its dtype or all fp32 (torch's rule).
        given = ", ".join(f"{_label(n, index)} {t.dtype}" for n, t in zip(names, tensors) if t is not None)
        raise TypeError(f"the parameters and running statistics of a {x.dtype} input must share one dtype, got {given}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{_label(names[2], index)} and {_label(names[3], index)} must both be tensors or both be "
                         "None")
    if not training and running_mean is None:
        raise ValueError(f"{_label(names[2], index)} and {_label(names[3], index)} are needed when training=False")


def check_bn_tensor_lists(x: torch.Tensor, training, names, weights, biases, running_means, running_vars) -> None:
    """check_bn_tensors for each input's entries of the per-input lists (``names`` theirs). The
    usual case (single-dtype parameters, running statistics both present or both absent, and
    present in eval) takes one pass over all of them."""
    dtypes = PARAM_DTYPES[x.dtype]
    usual = len(dtypes) == 1 and _are_channel_params((*weights, *biases, *running_means, *running_vars),
                                                     (x.shape[1],), x.device, dtypes)
    for mean, var in zip(running_means, running_vars):
        usual = usual and (mean is None) == (var is None) and (training or mean is not None)
    if not usual:
        for i, params in enumerate(zip(weights, biases, running_means, running_vars)):
            check_bn_tensors(x, training, names, *params, index=i)


_INT64 = torch.int64


def are_counters(tensors: Sequence, numel: int, device: torch.device) -> bool:
    """Whether each of ``tensors`` is None or an int64 tensor of ``numel`` elements on
    ``device`` (batch counters, dropout seeds): the valid case in one call, a non-tensor told by
    its AttributeError (see _are_channel_params)."""
    try:
        for t in tensors:
            if t is not None and not (t.dtype is _INT64 and t.numel() == numel and t.device == device):
                return False
    except AttributeError:
        return False
    return True


def check_bn_options(training, momentum, eps) -> None:
    """Checks the BatchNorm options, momentum and eps, as torch does."""
    if type(eps) is float and eps > 0 and (momentum is None or type(momentum) is float):
        return  # the usual case, in one test (this runs for every unit of every step)
    if momentum is not None:  # None: the cumulative average (with num_batches_tracked)
        _check_number("momentum", momentum)
    _check_number("eps", eps)
    # The installed torch's rules: sqrt(var + eps) of a batch variance needs eps > 0; torch 2.13
    # takes eps = 0 in eval (the running variance), 2.11 does not.
    if eps > 0:
        return
    if training:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0 or not eval_takes_zero_eps():
        raise ValueError(f"batch_norm eps must be {'non-negative' if eval_takes_zero_eps() else 'positive'}, "
                         f"but got {eps}")


@functools.cache
def eval_takes_zero_eps() -> bool:
    """Whether the installed torch's batch_norm takes eps = 0 in eval (2.13 does, 2.11 does not)."""
    try:
        torch.nn.functional.batch_norm(torch.ones(2, 1), torch.zeros(1), torch.ones(1), training=False, eps=0.0)
    except ValueError:
        return False
    return True
