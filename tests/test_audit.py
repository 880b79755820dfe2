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
#: Kernels that stream activations (the per-channel combine kernel touches only statistics).
STREAMING_KERNELS = {
    "masked_join_fwd_kernel",
    "masked_join_bwd_kernel",
    "bn_stats_kernel",
    "bn_apply_kernel",
    "bn_backward_reduce_kernel",
    "bn_backward_dx_kernel",
}


@pytest.fixture(scope="module")
def audit_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fractal_kernels.audit", "--json", str(path)],
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_aligned_streaming_kernels_use_128_bit_accesses(audit_rows, dtype):
    rows = [
        r for r in audit_rows
        if r["kernel"] in STREAMING_KERNELS and r["label"].startswith(dtype + " ") and "3x7x5x9" not in r["label"]
    ]
    assert {r["kernel"] for r in rows} == STREAMING_KERNELS
    for row in rows:
        assert 128 in row["load_widths"] and 128 in row["store_widths"], row
