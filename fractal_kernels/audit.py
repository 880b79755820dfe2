"""Compile audit: builds every kernel configuration the package launches for sm_80 and sm_90, no GPU needed.

    python -m fractal_kernels.audit [--arch 80 90] [--quick]

The op launchers run on small CPU tensors with launches recorded instead of run; each recorded
launch is specialised exactly as Triton's JIT would specialise it on a GPU (16-byte-aligned
pointers and integers divisible by 16 are marked, values of 1 folded), compiled to PTX and cubin,
and passed through the ptxas that ships with Triton for registers and spills. The PTX gives the
widths of global loads and stores. One row per configuration; the exit status is non-zero on a
compile failure or any spill.

The Triton interpreter makes kernels uncompilable, so TRITON_INTERPRET must be unset here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import launch as common

@dataclasses.dataclass
class AuditRow:
    kernel: str
    label: str
    arch: int
    registers: int
    spill_bytes: int
    load_widths: list[int]
    store_widths: list[int]
    error: str = ""

    def format(self) -> str:
        if self.error:
            return f"{self.kernel:<28} {self.label:<52} sm_{self.arch}  COMPILE FAILED: {self.error}"
        loads = ",".join(map(str, self.load_widths)) or "-"
        stores = ",".join(map(str, self.store_widths)) or "-"
        return (
            f"{self.kernel:<28} {self.label:<52} sm_{self.arch}  {self.registers:>4}  {self.spill_bytes:>6}  "
            f"{loads:<14} {stores}"
        )


HEADER = f"{'kernel':<28} {'configuration':<52} arch    regs  spills  ld bits        st bits"

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


def ptxas_usage(ptx: str, ptxas: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) of the one kernel in ``ptx``, from ``ptxas -v``."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    result = subprocess.run(
        [ptxas, f"-arch={arch}", "-v", "-", "-o", "/dev/null"], input=ptx, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr))
    return registers, spills


def _specialise(kernel, backend, args, kwargs):
    """What the JIT would compile for ``kernel[grid](*args, **kwargs)``: (signature, constexprs, attrs, options)."""
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _config_label(label: str, record: common.LaunchRecord) -> str:
    flags = ",".join(
        f"{k}={int(v) if isinstance(v, bool) else v}"
        for k, v in record.kwargs.items()
        if k not in ("num_warps", "num_stages", "maxnreg") and not k.startswith("BLOCK")
    )
    return f"{label} {flags}".strip()


def collect(quick: bool) -> list[tuple[str, common.LaunchRecord]]:
    """Runs every registered case with launches recorded; one (label, record) per distinct launch."""
    from . import batchnorm, join  # noqa: F401  (registers their cases)

    distinct: dict[tuple, tuple[str, common.LaunchRecord]] = {}
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for cases in common.AUDIT_CASES:
        for label, thunk in cases(quick):
            with common.record_launches() as records:
                thunk()
            for record in records:
                signature, constexprs, attrs, _ = _specialise(record.kernel, backend, record.args, record.kwargs)
                key = (
                    record.kernel.fn.__name__,
                    tuple(signature.items()),
                    tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
                    tuple(sorted((str(k), str(v)) for k, v in attrs.items())),
                    record.kwargs.get("num_warps"),
                )
                distinct.setdefault(key, (_config_label(label, record), record))
    return list(distinct.values())


def compile_row(label: str, record: common.LaunchRecord, arch: int) -> AuditRow:
    """Compiles one recorded launch for one arch and measures it."""
    target = GPUTarget("cuda", arch, 32)
    name = record.kernel.fn.__name__
    try:
        signature, constexprs, attrs, options = _specialise(record.kernel, make_backend(target), record.args, record.kwargs)
        compiled = triton.compile(
            ASTSource(record.kernel, signature, constexprs, attrs), target=target, options=options.__dict__
        )
        ptx = compiled.asm["ptx"]
        registers, spills = ptxas_usage(ptx, triton.knobs.nvidia.ptxas.path)
        return AuditRow(name, label, arch, registers, spills, *access_widths(ptx))
    except Exception as error:  # reported in the table and in the exit status
        return AuditRow(name, label, arch, 0, 0, [], [], error=str(error).strip().splitlines()[-1][:200])


_JOBS: list[tuple[str, common.LaunchRecord, int]] = []


def _compile_job(index: int) -> AuditRow:
    return compile_row(*_JOBS[index])


def audit(archs: list[int], quick: bool = False, only: str = "", jobs: int = 1, out=sys.stdout) -> list[AuditRow]:
    """Compiles every distinct launch for every arch in ``jobs`` processes; prints and returns one
    row per (launch, arch). ``only`` keeps the launches whose kernel name or label contains it."""
    _JOBS[:] = [
        (label, record, arch)
        for label, record in collect(quick)
        if only in f"{record.kernel.fn.__name__} {label}"
        for arch in archs
    ]
    print(HEADER, file=out, flush=True)
    rows = []
    # Forked workers inherit the recorded launches; rows come back in order.
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for row in pool.map(_compile_job, range(len(_JOBS))):
            rows.append(row)
            print(row.format(), file=out, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--quick", action="store_true", help="fp32 and bf16 only")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--only", default="", metavar="TEXT", help="only launches whose kernel or label contains TEXT")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    if common.INTERPRETING:
        print("the audit compiles kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = audit(args.arch, args.quick, args.only, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(row) for row in rows], f, indent=1)
    failed = [r for r in rows if r.error]
    spilled = [r for r in rows if r.spill_bytes]
    print(
        f"\n{len(rows)} compiled configurations, {len(failed)} failed, {len(spilled)} with spills "
        f"({time.perf_counter() - start:.0f} s; triton {triton.__version__}, torch {torch.__version__})"
    )
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
