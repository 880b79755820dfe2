"""Counted memory traffic of each op: the fused kernels' bytes (in the Triton interpreter), the
bytes the design must move, and the eager composition's bytes, with a modelled time.

    TRITON_INTERPRET=1 python -m benchmarks.traffic [--quick] --json PATH

(python -m benchmarks runs it so.) Fused: distinct addresses each launch loads and stores
(fractal_kernels.testing.traffic). Eager: each kernel-launching ATen op of the reference's
forward and backward moves its tensor inputs and outputs once (on fake tensors; cuDNN
BatchNorm reads its input twice, so this under-counts the eager side). Modelled time = bytes /
HBM bandwidth of a named GPU: a model, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from fractal_kernels.testing import fake_mode
from fractal_kernels.testing.traffic import count_traffic, eager_traffic

from .cases import OPS, OpCase

#: The GPU of the modelled times and its peak HBM bandwidth (bytes/s).
MODEL_GPU, MODEL_BANDWIDTH = "H100 SXM (HBM3, 3.35 TB/s)", 3.35e12
#: Shapes counted: FractalNet-20's first block at batch 16 (the interpreter is slow) and its last
#: block at its real batch.
SHAPES = [("fractalnet20_cifar", (16, 64, 32, 32)), ("fractalnet20_cifar", (100, 512, 2, 2))]
QUICK_SHAPES = [("fractalnet20_cifar", (8, 64, 16, 16))]


def cases(quick: bool) -> list[tuple[OpCase, bool]]:
    """(case, masked) pairs: every benchmarked op (OPS; k = 3 where it takes several inputs) x
    dtype x layout, with and without a mask where it takes one; --quick: one dtype, and masked
    only where the op takes a mask."""
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return [
        (OpCase(spec.name, 3 if 3 in spec.ks else spec.ks[0], network, shape, dtype, channels_last), masked)
        for network, shape in (QUICK_SHAPES if quick else SHAPES)
        for spec in OPS.values()
        for dtype in dtypes
        for channels_last in (False, True)
        for masked in ((False, True) if spec.masked else (False,))
        if not quick or masked or not spec.masked
    ]


def row(case: OpCase, masked: bool) -> dict:
    mask = case.drop_path_mask() if masked else None
    inputs = case.make(torch.device("cpu"), mask)
    forward = case.function("fused", inputs)
    with count_traffic() as fused_forward:
        out = forward()
    with count_traffic() as fused_backward:
        torch.autograd.grad(out, inputs.leaves, inputs.grad)
    with fake_mode() as mode:
        fake = case.make(torch.device("cpu"), None if mask is None else mode.from_tensor(mask))
        eager_forward = case.function("eager", fake)
        outputs = []
        eager_bytes = {"forward": eager_traffic(lambda: outputs.append(eager_forward()))}
        eager_bytes["backward"] = eager_traffic(lambda: torch.autograd.grad(outputs[0], fake.leaves, fake.grad))
    result = dict(label=case.label + (" mask" if masked else ""), op=case.op, k=case.k, shape=list(case.shape),
                  dtype=str(case.dtype)[6:], layout="nhwc" if case.channels_last else "nchw", masked=masked)
    for direction, fused in (("forward", fused_forward), ("backward", fused_backward)):
        minimal = case.minimal_bytes(direction, mask)
        result[direction] = dict(fused_bytes=fused.total, minimal_bytes=minimal, eager_bytes=eager_bytes[direction],
                                 counted_over_minimal=fused.total / minimal,
                                 eager_over_fused=eager_bytes[direction] / fused.total,
                                 model_fused_us=fused.total / MODEL_BANDWIDTH * 1e6,
                                 model_eager_us=eager_bytes[direction] / MODEL_BANDWIDTH * 1e6)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("counting traffic runs the kernels in the interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rows = [row(case, masked) for case, masked in tqdm(cases(args.quick), desc="traffic (interpreter)")]
    with open(args.json, "w") as f:
        json.dump(dict(model_gpu=MODEL_GPU, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
