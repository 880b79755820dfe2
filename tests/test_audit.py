"""The compile audit: every kernel compiles for sm_80 and sm_90 with no spills, and the streaming
kernels use 128-bit global loads and stores on aligned fp32/bf16 inputs."""

import json
import os
import subprocess
import sys

import pytest
import triton

from fractal_kernels import batchnorm, join

KERNEL_MODULES = [join, batchnorm]
#: Kernels that read activations (the combine kernel touches only statistics), and of those the
#: ones that also write activations (the others write per-channel partials).
READING_KERNELS = {
    "masked_join_fwd_kernel",
    "masked_join_bwd_kernel",
    "bn_stats_kernel",
    "bn_apply_kernel",
    "bn_backward_reduce_kernel",
    "bn_backward_dx_kernel",
}
WRITING_KERNELS = READING_KERNELS - {"bn_stats_kernel", "bn_backward_reduce_kernel"}


@pytest.fixture(scope="module")
def audit_rows(tmp_path_factory):
    """The quick audit (fp32 and bf16; `make audit` adds fp16 and fp64), sm_80 and sm_90."""
    path = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fractal_kernels.audit", "--quick", "--json", str(path)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.startswith("kernel")
    return json.loads(path.read_text())


def package_kernels():
    return {
        name
        for module in KERNEL_MODULES
        for name, obj in vars(module).items()
        if name.endswith("_kernel") and isinstance(obj, triton.runtime.KernelInterface)
    }


def test_every_kernel_compiles_for_both_architectures(audit_rows):
    compiled = {(row["kernel"], row["arch"]) for row in audit_rows if not row["error"]}
    for name in package_kernels():
        assert {(name, 80), (name, 90)} <= compiled, name


def test_no_spills_and_sane_register_counts(audit_rows):
    for row in audit_rows:
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, row


def expected_width(dtype, label):
    """128-bit accesses, except bf16 NCHW 2x2 planes: a plane is 8 bytes and vectors stay within one."""
    return 64 if dtype == "bfloat16" and "x2x2 nchw" in label else 128


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_aligned_streaming_kernels_use_wide_accesses(audit_rows, dtype):
    rows = [
        r for r in audit_rows
        if r["kernel"] in READING_KERNELS and r["label"].startswith(dtype + " ") and "3x7x5x9" not in r["label"]
    ]
    assert {r["kernel"] for r in rows} == READING_KERNELS
    for row in rows:
        width = expected_width(dtype, row["label"])
        assert width in row["load_widths"], row
        if row["kernel"] in WRITING_KERNELS:
            assert width in row["store_widths"], row
