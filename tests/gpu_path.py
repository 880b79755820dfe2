"""Inputs and recorded launches of the GPU-path tests (test_compile, test_launch,
test_mutation_analysis): small shapes, and one launch of every configuration the package makes."""

import itertools

import torch
from helpers import DEVICE, GPU_PATH

import helpers
from fractal_kernels import launch
from fractal_kernels.audit import QUICK_SHAPES, SM_COUNT
from fractal_kernels.channel_tiling import tile_for_gpu

BATCH, CHANNELS = 5, 3


def small_inputs(k, dtype, channels_last, sizes=None, seed=0):
    return helpers.make_inputs(sizes or [BATCH] * k, (CHANNELS, 3, 4), dtype, channels_last, seed)


def make_params(k, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    param = torch.float64 if dtype == torch.float64 else torch.float32

    def vector(offset, spread, grad=False):
        t = torch.rand(CHANNELS, generator=gen, dtype=torch.float64) * spread + offset
        return t.to(DEVICE, param).requires_grad_(grad)

    return dict(
        weights=[vector(0.5, 1, True) for _ in range(k)], biases=[vector(-0.5, 1, True) for _ in range(k)],
        running_means=[vector(-1, 2) for _ in range(k)], running_vars=[vector(0.5, 1) for _ in range(k)],
    )


def make_mask(k, seed=2):
    mask = torch.rand(k, BATCH, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, 0] = False  # a sample without a survivor
    mask[:, 1] = True
    return mask.to(DEVICE)


def make_rows(sizes, seed=3):
    return helpers.make_rows(sizes, BATCH, seed)


def recorded_launches():
    """One launch of every distinct configuration (kernel, constexprs, absent slots) the
    compile audit's cases make."""
    from fractal_kernels.audit_cases import AUDIT_CASES

    distinct = {}
    kinds = [(shape, dtype, channels_last) for shape in QUICK_SHAPES for dtype in (torch.float32, torch.bfloat16)
             for channels_last in (False, True)]
    for cases, (shape, dtype, channels_last) in itertools.product(AUDIT_CASES, kinds):
        for label, thunk in cases(shape, dtype, channels_last, False):
            # Tiled as the audit tiles them: the large shapes take the split kernels.
            with tile_for_gpu(SM_COUNT[90]), launch.record_launches() as records:
                thunk()
            for record in records:
                kwargs = launch_kwargs(record)
                distinct.setdefault(configuration(record, kwargs), (label, record, kwargs))
    return list(distinct.values())


def configuration(record, kwargs: dict, tiles: bool = True) -> tuple:
    """A launch's kernel, constexprs (without the tile sizes BLOCK_* unless ``tiles``) and absent slots."""
    constexprs = tuple((n, v) for n, v in kwargs.items() if n.isupper() and (tiles or not n.startswith("BLOCK")))
    absent = tuple(n for n, v in kwargs.items() if v is None)
    return record.kernel.fn.__name__, constexprs, absent


def launch_kwargs(record) -> dict:
    options = {"num_warps", "num_stages", "maxnreg"}
    kwargs = dict(zip(record.kernel.arg_names, record.args))
    kwargs.update((k, v) for k, v in record.kwargs.items() if k not in options)
    return kwargs


LAUNCHES = recorded_launches() if GPU_PATH else []


def materialised(value, misaligned: bool):
    """A tensor of value's shape, strides and dtype with data (fake-GPU memory), 16-byte aligned
    or one element off; other values as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    offset = 1 if misaligned else 0
    size = offset + sum((n - 1) * s for n, s in zip(value.shape, value.stride())) + 1 if value.numel() else offset
    storage = torch.empty(max(size, 1), dtype=value.dtype, device=DEVICE)
    return storage.as_strided(value.shape, value.stride(), offset)

