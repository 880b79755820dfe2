"""Compile audit: builds every kernel configuration the package launches for sm_80 and sm_90, no GPU needed.

    python -m fractal_kernels.audit [--arch 80 90] [--quick] [--json PATH]

The op launchers run on CPU tensors of the benchmarked networks' shapes, tiled as the GPU of each
architecture would tile them (A100: 108 SMs, H100: 132), with launches recorded instead of run.
Each recorded launch is specialised exactly as Triton's JIT would specialise it on a GPU
(16-byte-aligned pointers and integers divisible by 16 are marked, values of 1 folded) and
compiled to PTX and cubin with the launch's register limit, and assembled again without it
(Inductor launches user kernels without one); a variant compiled for a second arch starts from
the first's TTIR. A row reports
registers, spills, shared memory, resident warps per SM, the widths of global loads and stores,
and whether the PTX has the NaN-propagating max that ReLU needs. The exit status is non-zero on
a compile failure, a spill (with or without the limit), a missed occupancy goal (streaming
kernels two resident 256-thread blocks per SM, reductions one, with or without the limit, at
the benchmarked shapes and up to four inputs a launch) or a ReLU without NaN propagation.
Registers and spills are read from the cubin Triton builds (cuobjdump), shared memory from its
metadata.

It uses Triton internals (the JIT's specialisation, create_function_from_signature, the NVIDIA
backend's make_cubin); a Triton without them fails at import. TRITON_INTERPRET must be unset (the
interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import create_function_from_signature

from .channel_tiling import tile_for_gpu
from .audit_cases import AUDIT_CASES
from .launch import INTERPRETING, LaunchRecord, record_launches

#: SMs of the GPU each architecture's tiling is for.
SM_COUNT = {80: 108, 90: 132}
#: (registers, shared memory bytes, threads) of one SM, and the most blocks it holds.
SM_REGISTERS, SM_THREADS, SM_BLOCKS = 65536, 2048, 32
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}

#: Kernels that stream activations through once: they need two resident 256-thread blocks per
#: SM (16 warps) to hide memory latency; the others reduce, and need one (8 warps).
STREAMING_KERNELS = {"join_forward_kernel", "join_backward_kernel", "bn_apply_kernel", "bn_backward_dx_kernel"}


#: Kernels that apply the ReLU to values (the backward kernels only test its sign).
RELU_KERNELS = {"bn_apply_kernel", "bn_forward_kernel"}


def occupancy_goal(kernel: str) -> int:
    """Resident warps per SM a kernel must reach."""
    return 16 if kernel in STREAMING_KERNELS else 8


#: Benchmarked unit shapes: FractalNet-20 on CIFAR (batch 100), FractalNet-34 on ImageNet (batch
#: 32), and an odd shape that no vector width divides.
SHAPES = [(100, 64, 32, 32), (100, 128, 16, 16), (100, 256, 8, 8), (100, 512, 4, 4), (100, 512, 2, 2),
          (32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7), (3, 7, 5, 9)]
QUICK_SHAPES = [(100, 64, 32, 32), (100, 512, 2, 2), (32, 256, 14, 14), (3, 7, 5, 9)]
#: Storage dtypes, and the (dtype, channels-last) kinds of the quick audit: fp32 in both layouts,
#: bf16 in the one mixed-precision training uses (channels-last, for the tensor cores).
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
QUICK_KINDS = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)]
#: The quick audit compiles without the register limit (torch.compile's launches: Inductor
#: passes none) for these archs only; eager launches, with it, for every arch.
QUICK_UNLIMITED_ARCHS = (90,)
#: The odd shape's label: outside the occupancy goals, which are for the benchmarked shapes.
ODD_SHAPE = "3x7x5x9"


@dataclasses.dataclass
class AuditRow:
    kernel: str
    label: str
    arch: int
    register_limit: int  # 0: none
    num_warps: int
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    load_widths: list[int] = dataclasses.field(default_factory=list)
    store_widths: list[int] = dataclasses.field(default_factory=list)
    nan_max: bool = False
    relu: bool = False
    #: Whether the occupancy goal applies: the benchmarked shapes, at most four inputs a launch.
    occupancy_goal_applies: bool = True
    error: str = ""

    @property
    def resident_warps(self) -> int:
        """Warps of this kernel resident on one SM: registers are allocated per warp in units of
        256, shared memory per block with 1 KB reserved."""
        if self.error:
            return 0
        per_warp = -(-self.registers * 32 // 256) * 256
        blocks = min(SM_REGISTERS // per_warp // self.num_warps, SM_THREADS // (32 * self.num_warps), SM_BLOCKS)
        if self.shared_bytes:
            blocks = min(blocks, SM_SHARED[self.arch] // (self.shared_bytes + 1024))
        return blocks * self.num_warps

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [f"compile failed: {self.error}"]
        found = []
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} bytes spilled")
        if self.occupancy_goal_applies and self.resident_warps < occupancy_goal(self.kernel):
            found.append(f"{self.resident_warps} resident warps < {occupancy_goal(self.kernel)}")
        if self.relu and not self.nan_max:
            found.append("ReLU without a NaN-propagating max")
        return found

    def format(self) -> str:
        limit = str(self.register_limit or "-")
        if self.error:
            return f"{self.kernel:<26} {self.label:<58} sm_{self.arch} {limit:>4}  COMPILE FAILED: {self.error}"
        loads = ",".join(map(str, self.load_widths)) or "-"
        stores = ",".join(map(str, self.store_widths)) or "-"
        flag = "  <- " + "; ".join(self.problems) if self.problems else ""
        return (f"{self.kernel:<26} {self.label:<58} sm_{self.arch} {limit:>4} {self.registers:>4} "
                f"{self.spill_bytes:>6} {self.shared_bytes:>6} {self.resident_warps:>3} {loads:<10} {stores:<6}{flag}")


HEADER = (f"{'kernel':<26} {'configuration':<58} arch  lim regs spills  smem  wps ld bits    st bits\n"
          "(lim: register limit, - for none; wps: resident warps per SM)")

_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)")


def access_widths(ptx: str) -> tuple[list[int], list[int]]:
    """Distinct widths in bits of the global loads and stores in ``ptx``."""
    widths: dict[str, set[int]] = {"ld": set(), "st": set()}
    for op, suffix in _ACCESS.findall(ptx):
        parts = suffix.strip(".").split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 0)
        widths[op].add(vector * bits)
    return sorted(widths["ld"]), sorted(widths["st"])


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes per thread) of the one kernel in ``cubin``, the binary
    Triton would load, from the cuobjdump that ships with Triton. The kernels keep no local
    arrays, so local memory is spilled registers."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        result = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    usage = re.search(r"REG:(\d+).*LOCAL:(\d+)", result.stdout)
    return int(usage.group(1)), int(usage.group(2))


def _specialise(kernel, backend, args, kwargs):
    """What the JIT would compile for ``kernel[grid](*args, **kwargs)``: (signature, constexprs, attrs, options)."""
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def variant_key(record: LaunchRecord, backend) -> tuple:
    """The compiled variant the JIT would launch for ``record`` on ``backend``: launches with
    equal keys share one compiled kernel, and a new key is a new compilation."""
    signature, constexprs, attrs, _ = _specialise(record.kernel, backend, record.args, record.kwargs)
    return (
        record.kernel.fn.__name__,
        tuple(signature.items()),
        tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
        tuple(sorted((str(k), str(v)) for k, v in attrs.items())),
        record.kwargs.get("num_warps"),
        record.kwargs.get("maxnreg"),
    )


def _config_label(label: str, record: LaunchRecord) -> str:
    flags = ",".join(
        f"{k}={int(v) if isinstance(v, bool) else v}"
        for k, v in record.kwargs.items()
        if k not in ("num_warps", "num_stages", "maxnreg") and not k.startswith("BLOCK")
    )
    return f"{label} {flags}".strip()


def collect(arch: int, quick: bool) -> dict[tuple, tuple[str, LaunchRecord]]:
    """Runs every registered case, tiled for ``arch``'s GPU, with launches recorded; one (label,
    record) per distinct compiled kernel, by its variant_key."""
    kinds = QUICK_KINDS if quick else [(dtype, channels_last) for dtype in DTYPES for channels_last in (False, True)]
    distinct: dict[tuple, tuple[str, LaunchRecord]] = {}
    backend = make_backend(GPUTarget("cuda", arch, 32))
    with tile_for_gpu(SM_COUNT[arch]):
        for shape in QUICK_SHAPES if quick else SHAPES:
            for dtype, channels_last in kinds:
                kind = f"{str(dtype)[6:]} {'x'.join(map(str, shape))} {'nhwc' if channels_last else 'nchw'}"
                for cases in AUDIT_CASES:
                    for label, thunk in cases(shape, dtype, channels_last, quick):
                        label = f"{kind} {label}"
                        with record_launches() as records:
                            thunk()
                        for record in records:
                            distinct.setdefault(variant_key(record, backend),
                                                (_config_label(label, record), record))
    return distinct


def compile_launch(record: LaunchRecord, arch: int, kwargs: dict, ttir: str | None = None):
    """``triton.compile`` of ``record``'s kernel launched with ``kwargs`` on ``arch``, from its
    source or from ``ttir``, the TTIR of the same launch compiled for another arch (Triton's
    front end is the same for every target): (compiled kernel, backend, options)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _specialise(record.kernel, backend, record.args, kwargs)
    if ttir is None:
        source = ASTSource(record.kernel, signature, constexprs, attrs)
        return triton.compile(source, target=target, options=options.__dict__), backend, options
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{record.kernel.fn.__name__}.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        return triton.compile(path, target=target, options=options.__dict__), backend, options


def measure_row(row: AuditRow, ptx: str, cubin: bytes, shared_bytes: int) -> None:
    """Fills in ``row``'s measurements from a compile's PTX, cubin and shared memory."""
    row.registers, row.spill_bytes = resource_usage(cubin)
    row.shared_bytes = shared_bytes
    row.load_widths, row.store_widths = access_widths(ptx)
    # PTX has no max.NaN.f64: in fp64 Triton tests for NaN and selects it.
    row.nan_max = "max.NaN" in ptx or ("max.f64" in ptx and "setp.nan.f64" in ptx)


#: The PTX directive of a launch's register limit, the only line the limit changes in PTX
#: (tests/test_audit.py compares with full compiles without it).
MAXNREG_DIRECTIVE = re.compile(r"^[ \t]*\.maxnreg \d+\n", re.MULTILINE)


def assemble(ptx: str, backend, options, arch: int) -> bytes:
    """The cubin of ``ptx``: ptxas as Triton runs it (the backend's make_cubin), kept in Triton's
    cache under the PTX, ptxas's version and the options, as Triton keeps its compiles: an audit
    run again assembles nothing."""
    key = hashlib.sha256("\n".join([backend.hash(), options.hash(), ptx]).encode()).hexdigest()
    cache = get_cache_manager(key)
    path = cache.get_file("kernel.cubin") or cache.put(backend.make_cubin(ptx, {}, options, arch), "kernel.cubin")
    with open(path, "rb") as f:
        return f.read()


def compile_rows(label: str, record: LaunchRecord, arch: int, without_limit: bool,
                 ttir: str | None = None) -> tuple[list[AuditRow], str | None]:
    """Compiles one recorded launch for one arch with its register limit (from ``ttir`` if
    given, see compile_launch) and measures it; with ``without_limit``, also measures it
    without the limit: ptxas, as Triton runs it, on the same PTX less its ``.maxnreg`` (Triton
    sets the limit on the TTGIR, and the PTX of the stages after it differs by that line only).
    Returns the rows and the launch's TTIR (None if the compile failed)."""
    name = record.kernel.fn.__name__
    kwargs = record.kwargs
    rows = [
        AuditRow(name, label, arch, limit or 0, kwargs.get("num_warps", 4),
                 relu=name in RELU_KERNELS and bool(kwargs.get("RELU", False)),
                 occupancy_goal_applies=kwargs.get("K", 1) <= 4 and ODD_SHAPE not in label)
        for limit in [kwargs.get("maxnreg"), *([None] if without_limit else [])]
    ]
    try:
        compiled, backend, options = compile_launch(record, arch, kwargs, ttir)
        ptx = compiled.asm["ptx"]
        measure_row(rows[0], ptx, compiled.asm["cubin"], compiled.metadata.shared)
    except Exception as error:  # reported in the table and in the exit status
        for row in rows:
            row.error = _error_line(error)
        return rows, None
    if without_limit:
        try:
            unlimited = MAXNREG_DIRECTIVE.sub("", ptx)
            cubin = assemble(unlimited, backend, dataclasses.replace(options, maxnreg=None), arch)
            measure_row(rows[1], unlimited, cubin, compiled.metadata.shared)
        except Exception as error:  # the limited row stands
            rows[1].error = _error_line(error)
    return rows, compiled.asm["ttir"]


def _error_line(error: Exception) -> str:
    return str(error).strip().splitlines()[-1][:200]


#: Per compiled variant, its launch on each arch: (label, record, arch, without_limit).
_JOBS: list[list[tuple[str, LaunchRecord, int, bool]]] = []


def _compile_job(index: int) -> list[AuditRow]:
    """One variant's rows on each arch: the first arch compiled from source, the others from its TTIR."""
    rows, ttir = [], None
    for label, record, arch, without_limit in _JOBS[index]:
        arch_rows, ttir = compile_rows(label, record, arch, without_limit, ttir)
        rows += arch_rows
    return rows


def audit(archs: list[int], quick: bool = False, only: str = "", jobs: int = 1, out=sys.stdout) -> list[AuditRow]:
    """Compiles every distinct launch for every arch, with and without its register limit, in
    ``jobs`` processes; prints and returns one row each, a variant's rows together. ``only``
    keeps the launches whose kernel name or label contains it."""
    variants: dict[tuple, list] = {}
    for arch in archs:
        for key, (label, record) in collect(arch, quick).items():
            if only in f"{record.kernel.fn.__name__} {label}":
                variants.setdefault(key, []).append((label, record, arch, not quick or arch in QUICK_UNLIMITED_ARCHS))
    _JOBS[:] = list(variants.values())
    print(HEADER, file=out, flush=True)
    rows = []
    # Forked workers inherit the recorded launches; rows come back in order.
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for job_rows in pool.map(_compile_job, range(len(_JOBS))):
            for row in job_rows:
                rows.append(row)
                print(row.format(), file=out, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SM_COUNT),
                        help="compute capabilities (default 80 90)")
    parser.add_argument("--quick", action="store_true",
                        help="fp32, bf16 channels-last, four of the shapes, fewer join sizes, sm_80 with the register "
                             "limit only")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--only", default="", metavar="TEXT", help="only launches whose kernel or label contains TEXT")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    if INTERPRETING:
        print("the audit compiles kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = audit(args.arch, args.quick, args.only, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(dataclasses.asdict(row), resident_warps=row.resident_warps, problems=row.problems)
                       for row in rows], f, indent=1)
    flagged = [r for r in rows if r.problems]
    print(
        f"\n{len(rows)} compiled configurations, {len(flagged)} flagged "
        f"({time.perf_counter() - start:.0f} s; triton {triton.__version__}, torch {torch.__version__})"
    )
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
