"""The compile audit: every kernel compiles for sm_80 and sm_90 with the tiling a real GPU gets,
with and without its register limit, with no spills, the occupancy goals met, NaN-propagating
ReLU, and global accesses as wide as the layout allows."""

import json
import subprocess
import sys

import pytest
import torch

from fractal_kernels import batchnorm_kernels, join
from fractal_kernels.audit import (
    ODD_SHAPE, QUICK_UNLIMITED_ARCHS, SM_COUNT, STREAMING_KERNELS, AuditRow, occupancy_goal,
)
from fractal_kernels.launch import Kernel
from helpers import gpu_path_env

KERNEL_MODULES = [join, batchnorm_kernels]
#: Kernels that read activations (the combine kernel touches only statistics), and of those the
#: ones that also write activations (the others write per-channel partials).
READING_KERNELS = {
    "join_forward_kernel",
    "join_backward_kernel",
    "bn_stats_kernel",
    "bn_apply_kernel",
    "bn_backward_sums_kernel",
    "bn_backward_dx_kernel",
}
WRITING_KERNELS = READING_KERNELS - {"bn_stats_kernel", "bn_backward_sums_kernel"}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}


def run_audit(path, *options: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    """``python -m fractal_kernels.audit --quick *options``: its rows and its process."""
    result = subprocess.run(
        [sys.executable, "-m", "fractal_kernels.audit", "--quick", *options, "--json", str(path)],
        capture_output=True, text=True, env=gpu_path_env(), timeout=1800,
    )
    assert result.stdout.startswith("kernel"), result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(path.read_text()), result


@pytest.fixture(scope="module")
def audit_rows(tmp_path_factory):
    """The quick audit (fp32, bf16 channels-last, four shapes; `make audit` does every dtype, layout and
    shape), sm_80 with the register limit, sm_90 with and without it: 573 rows (382 compiles, 191
    of them from the other arch's TTIR, and 191 ptxas runs), about 75 s on two cores with a cold
    Triton cache, so its tests are slow (make check compiles each kernel once:
    test_every_kernel_compiles_at_the_odd_shape)."""
    return run_audit(tmp_path_factory.mktemp("audit") / "audit.json")


def package_kernels():
    return {
        name
        for module in KERNEL_MODULES
        for name, obj in vars(module).items()
        if name.endswith("_kernel") and isinstance(obj, Kernel)
    }


@pytest.mark.slow
def test_nothing_flagged(audit_rows):
    rows, result = audit_rows
    flagged = [(r["kernel"], r["label"], r["arch"], r["register_limit"], r["problems"]) for r in rows if r["problems"]]
    assert not flagged
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.slow
def test_every_kernel_compiles_for_both_architectures_with_and_without_the_limit(audit_rows):
    rows, _ = audit_rows
    compiled = {(row["kernel"], row["arch"], bool(row["register_limit"])) for row in rows if not row["error"]}
    expected = {(arch, limit) for arch in SM_COUNT for limit in (True, False) if limit or arch in QUICK_UNLIMITED_ARCHS}
    assert {(arch, limit) for _, arch, limit in compiled} == expected
    for name in package_kernels():
        assert {(name, arch, limit) for arch, limit in expected} <= compiled, name


@pytest.mark.slow
def test_spills_and_occupancy_either_way(audit_rows):
    rows, _ = audit_rows
    for row in rows:
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, row
        if ODD_SHAPE not in row["label"] and " K=8" not in row["label"] and ",K=8" not in row["label"]:
            assert row["resident_warps"] >= occupancy_goal(row["kernel"]), row
    streaming = [r for r in rows if r["kernel"] in STREAMING_KERNELS and r["register_limit"]]
    assert streaming and all(r["resident_warps"] >= 16 for r in streaming)


@pytest.mark.slow
def test_relu_propagates_nan(audit_rows):
    rows, _ = audit_rows
    relu = [r for r in rows if r["kernel"] == "bn_apply_kernel" and "RELU=1" in r["label"]]
    assert relu and all(r["nan_max"] for r in relu)


def test_resident_warps_arithmetic():
    # 128 registers, 8 warps: 32 KB a block of the 64 KB register file -> two blocks.
    assert AuditRow("k", "", 90, 128, 8, registers=128).resident_warps == 16
    assert AuditRow("k", "", 90, 255, 8, registers=166).resident_warps == 8
    assert AuditRow("k", "", 90, 0, 4, registers=32).resident_warps == 64  # thread limit
    assert AuditRow("k", "", 80, 0, 8, registers=32, shared_bytes=80 * 1024).resident_warps == 16


def contiguous_run_bytes(label: str, kernel: str) -> int:
    """Bytes of the longest run the kernel can read as one aligned vector: a sample for the
    joins, a plane (NCHW) or a pixel's channels (NHWC) for the BatchNorm kernels."""
    dtype, shape, layout = label.split()[:3]
    n, c, h, w = map(int, shape.split("x"))
    if kernel.startswith("masked_join"):
        elements = c * h * w
    else:
        elements = h * w if layout == "nchw" else c
    return elements * ELEMENT_BYTES[dtype]


def expected_width(label: str, kernel: str) -> int:
    """The widest access the alignment allows, up to 128 bits."""
    run = contiguous_run_bytes(label, kernel)
    return 8 * min(16, run & -run)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streaming_kernels_use_the_widest_aligned_accesses(audit_rows, dtype):
    rows, _ = audit_rows
    rows = [r for r in rows if r["kernel"] in READING_KERNELS and r["label"].startswith(dtype + " ")
            and ODD_SHAPE not in r["label"]]
    assert {r["kernel"] for r in rows} == READING_KERNELS
    for row in rows:
        width = expected_width(row["label"], row["kernel"])
        assert width in row["load_widths"], row
        if row["kernel"] in WRITING_KERNELS:
            assert width in row["store_widths"], row


VARIANTS_OVER_STEPS = """
import torch, torch.nn.functional as F
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
import fractal_kernels as fk
from fractal_kernels.audit import SM_COUNT, variant_key
from fractal_kernels.channel_tiling import tile_for_gpu
from fractal_kernels.launch import record_launches
from fractalnet import FractalNet

torch.manual_seed(0)
model = FractalNet(10, widths=(16, 32), columns=3, dropout=(0.0, 0.1), skip_dropped=True,
                   drop_path_per="sample").to("meta")
x, labels = torch.empty(64, 3, 8, 8, device="meta"), torch.empty(64, dtype=torch.int64, device="meta")
backend = make_backend(GPUTarget("cuda", 90, 32))
with fk.use_backend("triton"), tile_for_gpu(SM_COUNT[90]):
    for step in range(12):
        with record_launches() as records:
            F.cross_entropy(model(x), labels).backward()
        # Tile sizes (constexprs BLOCK_*, and num_warps) follow small row counts by powers of two.
        keys = set()
        for record in records:
            name, signature, constexprs, attrs = variant_key(record, backend)[:4]
            tiles = {str((i,)) for i, arg in enumerate(record.kernel.arg_names) if arg.startswith("BLOCK")}
            keys.add((name, signature, tuple(c for c in constexprs if c[0] not in tiles), attrs))
        if step == 0:
            first = keys
        print("new", len(keys - first), flush=True)
"""


@pytest.mark.slow
def test_skip_dropped_steps_compile_no_new_kernel_variants():
    """Under skip_dropped every step's segments hold other row counts; the kernels do not
    specialise on them, so the steps after the first launch only variants it compiled, but for
    tile sizes (the JIT's own specialisation, as on an sm_90 GPU, on meta tensors)."""
    env = gpu_path_env()
    result = subprocess.run([sys.executable, "-c", VARIANTS_OVER_STEPS], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    new = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("new")]
    assert len(new) == 12 and sum(new) == 0, result.stdout


def test_every_kernel_compiles_at_the_odd_shape(tmp_path):
    """make check's compile check: every kernel as the odd shape launches it (each of them, fp32),
    compiled for sm_90 with and without its register limit, without spills (after the quick
    audit, in make test, these compiles are in Triton's cache)."""
    rows, result = run_audit(tmp_path / "audit.json", "--arch", "90", "--only", f"float32 {ODD_SHAPE} nchw")
    assert result.returncode == 0, result.stdout[-2000:]
    compiled = {(row["kernel"], bool(row["register_limit"])) for row in rows if not row["error"]}
    assert compiled == {(name, limit) for name in package_kernels() for limit in (True, False)}
    assert all(row["spill_bytes"] == 0 for row in rows)


def odd_shape_records() -> list:
    """One recorded launch of each kernel at the odd shape (fp32, NCHW), tiled for an H100."""
    from fractal_kernels.audit_cases import AUDIT_CASES
    from fractal_kernels.channel_tiling import tile_for_gpu
    from fractal_kernels.launch import record_launches

    with tile_for_gpu(SM_COUNT[90]), record_launches() as records:
        for cases in AUDIT_CASES:
            for _, thunk in cases((3, 7, 5, 9), torch.float32, False, True):
                thunk()
    return list({record.kernel.fn.__name__: record for record in records}.values())


#: Kernels of each kind: a streaming join, the single-pass BatchNorm (statistics, apply, ReLU),
#: a backward with its per-channel sums.
SHARED_WORK_KERNELS = {"join_forward_kernel", "bn_forward_kernel", "bn_backward_dx_kernel"}


@pytest.mark.fake_gpu
def test_rows_from_shared_work_are_full_compiles():
    """The audit assembles each launch's no-limit row from its limited compile's PTX less the
    .maxnreg line, and compiles a launch for sm_90 from its sm_80 TTIR (make audit compiles sm_80
    first): for a launch of each kind of kernel, that PTX is the full no-limit compile's, the
    TTIR is the same for both archs, and the rows agree with compiles from source."""
    from fractal_kernels.audit import MAXNREG_DIRECTIVE, compile_launch, compile_rows, measure_row

    records = [record for record in odd_shape_records() if record.kernel.fn.__name__ in SHARED_WORK_KERNELS]
    assert len(records) == len(SHARED_WORK_KERNELS)
    for record in records:
        name = record.kernel.fn.__name__
        (limited_row, unlimited_row), ttir = compile_rows("odd", record, 90, without_limit=True)
        limited, _, _ = compile_launch(record, 90, record.kwargs)
        without = {key: value for key, value in record.kwargs.items() if key != "maxnreg"}
        full, _, _ = compile_launch(record, 90, without)
        assert ".maxnreg" in limited.asm["ptx"], name
        assert MAXNREG_DIRECTIVE.sub("", limited.asm["ptx"]) == full.asm["ptx"], name
        expected = AuditRow(name, "odd", 90, 0, limited_row.num_warps, relu=limited_row.relu,
                            occupancy_goal_applies=limited_row.occupancy_goal_applies)
        measure_row(expected, full.asm["ptx"], full.asm["cubin"], full.metadata.shared)
        assert unlimited_row == expected and not expected.error, name
        assert limited_row.register_limit == record.kwargs["maxnreg"] and not limited_row.error, name
        _, sm80_ttir = compile_rows("odd", record, 80, without_limit=False)
        assert sm80_ttir == ttir, name
        assert compile_rows("odd", record, 90, without_limit=True, ttir=sm80_ttir)[0] == [limited_row, unlimited_row]


@pytest.mark.fake_gpu
def test_a_gather_backward_compiles_one_variant_for_all_its_inputs():
    """A gather backward writes one compact input a launch; the input's index (first_input) is
    not specialised, so the launches of all three share one compiled variant (as on an sm_90 GPU)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from fractal_kernels.audit import variant_key
    from fractal_kernels.audit_cases import batch_norm_cases, join_cases
    from fractal_kernels.channel_tiling import tile_for_gpu
    from fractal_kernels.launch import record_launches

    backend = make_backend(GPUTarget("cuda", 90, 32))
    thunks = [thunk for cases in (batch_norm_cases, join_cases)
              for label, thunk in cases((100, 64, 32, 32), torch.float32, False, True) if "gather" in label]
    keys: dict[str, list] = {}
    with tile_for_gpu(SM_COUNT[90]), record_launches() as records:
        for thunk in thunks:
            thunk()
    for record in records:
        keys.setdefault(record.kernel.fn.__name__, []).append(variant_key(record, backend))
    for name in ("bn_backward_dx_kernel", "join_backward_kernel"):
        assert len(keys[name]) == 3 and len(set(keys[name])) == 1, name
