"""The phases of the GPU check (benchmarks.gpu_check), each run in a process of its own by the
driver there: environment, ops, model, compile, graphs, sanitizer and benchmarks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent




def environment(dry_run: bool, out: Path) -> dict:
    import platform

    import torch
    import triton

    details = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                   python=platform.python_version())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        details.update(device=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                       memory_gib=round(props.total_memory / 2**30, 1))
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=10)
            details["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else None
    else:
        details["device"] = f"CPU ({platform.machine()}), no GPU"
    details["compute_sanitizer"] = _sanitizer()
    return dict(status="passed", summary=f"{details['device']}; torch {details['torch']}, triton {details['triton']}",
                details=details)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _poison_free_memory(device) -> None:
    """Fills memory the caching allocator will hand out next with 0xFF bytes (NaN in every float
    dtype), small and large blocks, so that an output element a kernel forgets to write reads NaN
    instead of a lucky value."""
    import torch

    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    blocks = [torch.full((n,), -1, dtype=torch.int32, device=device) for n in [2**17] * 64 + [2**25] * 4]
    del blocks


def op_cases(small: bool = False) -> list[dict]:
    """The ops phase's cases: (op, dtype, layout, join kind, training), the training dtypes first
    (``small``: fp32 NCHW only, for the sanitizer)."""
    import torch

    from fractal_kernels.testing.ops import OPS

    dtypes = [torch.float32] if small else [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    joins = {"none": ("none",), "mask": ("none", "bool", "float"), "rows": ("rows",)}
    return [dict(op=spec.name, dtype=dtype, channels_last=channels_last, join=join, training=training)
            for dtype in dtypes for channels_last in ((False,) if small else (False, True))
            for training in (True, False) for spec in OPS.values() if training or spec.batch_norm
            for join in joins[spec.join]]


def check_op(case: dict, shape: tuple, device, seed: int) -> dict:
    """One op case, fused against the fp64 reference: forward, backward, running statistics."""
    import torch

    import fractal_kernels as fk
    from fractal_kernels import reference
    from fractal_kernels.testing import TOLERANCES
    from fractal_kernels.testing.ops import OPS, OpInputs

    dtype, op = case["dtype"], case["op"]
    k = 1 if OPS[op].single_input else 3
    gen = torch.Generator().manual_seed(seed)
    N, C = shape[0], shape[1]
    layout = torch.channels_last if case["channels_last"] else torch.contiguous_format
    rows = None
    sizes = [N] * k
    if case["join"] == "rows":
        held = torch.rand(k, N, generator=gen) < torch.tensor([[1.0], [0.5], [0.25]])
        held[:, 0] = True  # every input holds a sample: its statistics are defined
        rows = torch.full((k, N), -1, dtype=torch.int64)
        for i in range(k):
            samples = held[i].nonzero().squeeze(1)
            rows[i, samples] = torch.randperm(len(samples), generator=gen)
        sizes = held.sum(1).tolist()
    masters = [torch.randn((n,) + tuple(shape[1:]), generator=gen, dtype=torch.float64) * 2 + 0.5 for n in sizes]
    xs = [m.to(dtype).to(device).contiguous(memory_format=layout).requires_grad_() for m in masters]
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    mask = None
    if case["join"] in ("bool", "float"):
        mask = torch.rand(k, N, generator=gen) < 0.6
        mask[:, 0] = False  # a sample no input keeps
        mask = (mask if case["join"] == "bool" else mask.float()).to(device)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    state = dict(weights=[torch.rand(C, generator=gen, dtype=torch.float64).add(0.5) for _ in range(k)],
                 biases=[torch.randn(C, generator=gen, dtype=torch.float64) for _ in range(k)],
                 running_means=[torch.randn(C, generator=gen, dtype=torch.float64) for _ in range(k)],
                 running_vars=[torch.rand(C, generator=gen, dtype=torch.float64).add(0.5) for _ in range(k)])
    mine = {key: [t.to(device, param).requires_grad_(key in ("weights", "biases")) for t in ts]
            for key, ts in state.items()}
    theirs = {key: [t.detach().to(device).double().requires_grad_(key in ("weights", "biases")) for t in ts]
              for key, ts in mine.items()}
    training = case["training"]
    spec = OPS[op]

    def call(ns, inputs, bn):
        return spec.call(getattr(ns, op), OpInputs(inputs, mask, None if rows is None else rows.to(device), **bn),
                         training)

    bn = spec.batch_norm
    _poison_free_memory(device)
    with fk.use_backend("triton"):
        out = call(fk, xs, mine)
        leaves = xs + (mine["weights"] + mine["biases"] if bn else [])
        cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
        grads = torch.autograd.grad(out, leaves, cotangent.to(out.dtype), allow_unused=True)
    expected = call(reference, xs64, theirs)
    expected_grads = torch.autograd.grad(expected, xs64 + (theirs["weights"] + theirs["biases"] if bn else []),
                                         cotangent, allow_unused=True)
    atol, rtol = TOLERANCES[dtype]
    errors = {}
    pairs = [("forward", out, expected)] + [(f"grad {i}", g, e) for i, (g, e) in enumerate(zip(grads, expected_grads))]
    if bn and training:
        pairs += [(f"{key} {i}", t, e) for key in ("running_means", "running_vars")
                  for i, (t, e) in enumerate(zip(mine[key], theirs[key]))]
    worst, failures = 0.0, []
    for name, actual, want in pairs:
        if actual is None or want is None:
            continue
        scale = max(1.0, want.detach().abs().max().item()) if want.numel() else 1.0
        if name.startswith("grad"):
            scale *= 4
        error = (actual.detach().double() - want.detach()).abs()
        worst = max(worst, (error.max().item() if error.numel() else 0.0) / scale)
        try:
            torch.testing.assert_close(actual.detach().double(), want.detach(), atol=atol * scale, rtol=rtol * scale)
        except AssertionError as failure:
            failures.append(f"{name}: {str(failure).splitlines()[0]}")
    errors = dict(ok=not failures, max_scaled_error=worst)
    if failures:
        errors["failure"] = "; ".join(failures)[:300]
    return errors


def ops(dry_run: bool, out: Path, checkpoint: Callable[[dict], None], small: bool = False) -> dict:
    """Every case against the reference; the failures are the rows. Checkpointed case by case: a
    phase stopped at its limit (the first call compiles every variant) keeps what it checked."""
    device = _device()
    shape = (6, 5, 3, 4) if dry_run or small else (128, 128, 32, 32)
    cases = op_cases(small)
    rows = []

    def result(status: str) -> dict:
        bad = [r for r in rows if not r["ok"]]
        summary = f"{len(rows) - len(bad)}/{len(rows)} of {len(cases)} cases within tolerance on {list(shape)}"
        return dict(status=status if not bad else "failed", summary=summary, rows=bad, cases=len(rows),
                    worst=max([r.get("max_scaled_error", 0.0) for r in rows] or [0.0]))

    for seed, case in enumerate(cases):
        label = dict(op=case["op"], dtype=str(case["dtype"])[6:], layout="nhwc" if case["channels_last"] else "nchw",
                     join=case["join"], mode="train" if case["training"] else "eval")
        try:
            rows.append(dict(label, **check_op(case, shape, device, seed)))
        except Exception as error:
            rows.append(dict(label, ok=False, failure=f"{type(error).__name__}: {error}"[:300]))
        checkpoint(result("running"))
    return result("passed")


def _relative(a, b) -> float:
    import torch

    a, b = a.detach().double(), b.detach().double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-30)).item()


def _model_pair(dry_run: bool, per: str, device):
    import torch

    from fractalnet import create_model

    torch.manual_seed(0)
    widths = (2, 3, 4, 4, 4) if dry_run else (64, 128, 256, 512, 512)
    options = dict(widths=widths, dropout=(0.0,) * 5, drop_path_per=per)
    fused = create_model("fractalnet20_cifar", 10, **options).to(device)
    eager = create_model("fractalnet20_cifar", 10, **options, fused=False).to(device)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2 if dry_run else 32, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    return fused, eager, x


def model(dry_run: bool, out: Path) -> dict:
    import torch

    import fractal_kernels as fk

    device = _device()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for per in ("sample", "batch"):
        fused, eager, x = _model_pair(dry_run, per, device)
        for seed in range(3):
            results = []
            for model, backend in ((fused, "triton"), (eager, "reference")):
                model.zero_grad(set_to_none=True)
                with fk.use_backend(backend):
                    out = model(x, generator=torch.Generator().manual_seed(seed))
                    out.square().mean().backward()
                grads = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                                   for p in model.parameters()])
                buffers = torch.cat([b.double().flatten() for b in model.buffers()])
                results.append((out, grads, buffers))
            (out_f, grads_f, buffers_f), (out_e, grads_e, buffers_e) = results
            rows.append(dict(drop_path_per=per, seed=seed, output=_relative(out_f, out_e),
                             gradients=_relative(grads_f, grads_e), buffers=_relative(buffers_f, buffers_e)))
    worst = max(max(r["output"], r["gradients"], r["buffers"]) for r in rows)
    ok = worst < 1e-3
    summary = f"largest relative difference fused vs eager {worst:.1e} (output, gradients, buffers; limit 1e-3)"
    return dict(status="passed" if ok else "failed", summary=summary, rows=rows)


def compile_phase(dry_run: bool, out: Path, checkpoint: Callable[[dict], None]) -> dict:
    """The training step first (the longest compile, the most telling), then the ops; checkpointed."""
    import torch

    device = _device()
    backend = "aot_eager" if dry_run else "inductor"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    shape = (6, 5, 3, 4) if dry_run else (64, 128, 32, 32)
    checks = [("FractalNet-20 training step", lambda: _compiled_step(dry_run, device, backend))]
    for op, join in (("masked_join", "bool"), ("bn_relu", "none"), ("join_bn_relu", "bool")):
        for dtype in (torch.float32, torch.bfloat16):
            case = dict(op=op, join=join, dtype=dtype, channels_last=False, training=True)
            checks.append((f"{op} {str(dtype)[6:]}", lambda case=case: _compiled_op(case, shape, device, backend)))
    # Last, since they compile a graph per structure (on a small two-block network: Inductor's
    # time goes by the graph's size): a phase that runs out of time loses only them.
    checks.append(("per-batch steps, each structure", lambda: _compiled_structures(dry_run, device, backend)))
    if not dry_run:
        checks.append(("the same, mode reduce-overhead",
                       lambda: _compiled_structures(dry_run, device, backend, "reduce-overhead")))
    rows = []

    def result(status: str) -> dict:
        bad = [r for r in rows if not r["ok"]]
        return dict(status=status if not bad else "failed", rows=rows,
                    summary=f"{len(rows) - len(bad)}/{len(rows)} of {len(checks)} compiled ({backend}, fullgraph) "
                            "match eager")

    for what, check in checks:
        torch._dynamo.reset()
        try:
            rows.append(dict(what=what, **check()))
        except Exception as error:
            rows.append(dict(what=what, ok=False, failure=f"{type(error).__name__}: {error}"[:300]))
        checkpoint(result("running"))
    return result("passed")


def _compiled_step(dry_run: bool, device, backend: str) -> dict:
    import torch

    import fractal_kernels as fk

    fused, eager, x = _model_pair(dry_run, "sample", device)
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    with fk.use_backend("triton"):
        torch.manual_seed(3)
        out = compiled(x)
        out.square().mean().backward()
    torch.manual_seed(3)
    expected = eager(x)
    expected.square().mean().backward()
    grads = [_relative(p.grad, q.grad) for p, q in zip(fused.parameters(), eager.parameters())]
    difference = max(_relative(out, expected), *grads)
    return dict(ok=difference < 1e-3, max_scaled_error=difference)


def _compiled_structures(dry_run: bool, device, backend: str, mode=None) -> dict:
    """Drawn per batch, the compiled step of each structure of a two-block FractalNet (C = 3), as
    the training loop compiles it
    (``model(x, structure=s)``: one graph each; with ``mode`` reduce-overhead, CUDA graphs of
    them, run three times as replays would be) against the eager model forced to that structure:
    outputs and gradients (None, as zeros, where a column is not reached)."""
    import torch

    import fractal_kernels as fk

    from fractalnet import FractalNet

    torch.manual_seed(0)
    options = dict(widths=(2, 3) if dry_run else (32, 64), columns=3, dropout=(0.0, 0.0), drop_path_per="batch")
    fused = FractalNet(10, **options).to(device)
    eager = FractalNet(10, **options, fused=False).to(device)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2 if dry_run else 32, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    compiled = torch.compile(fused, fullgraph=True, backend=backend, **({"mode": mode} if mode else {}))
    differences = {}
    for structure in fused.structures():
        results = []
        for model, runs in ((compiled, 3 if mode else 1), (eager, 1)):
            for _ in range(runs):
                if mode:
                    torch.compiler.cudagraph_mark_step_begin()
                fused.zero_grad(set_to_none=True), eager.zero_grad(set_to_none=True)
                torch.manual_seed(3)
                with fk.use_backend("triton"):
                    out = model(x, structure=structure)
                    out.square().mean().backward()
            parameters = fused.parameters() if model is compiled else eager.parameters()
            grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
            results.append((out.detach().clone(), grads))
        (out_c, grads_c), (out_e, grads_e) = results
        differences[str(structure)] = max(_relative(out_c, out_e), _relative(grads_c, grads_e))
    worst = max(differences.values())
    return dict(ok=worst < 1e-3, max_scaled_error=worst, by_structure=differences)


def _compiled_op(case: dict, shape, device, backend: str) -> dict:
    """check_op with the op compiled (the fused op traced, against the reference run eagerly)."""
    import torch

    import fractal_kernels as fk

    op = case["op"]
    original = getattr(fk, op)
    compiled = torch.compile(original, fullgraph=True, backend=backend, dynamic=False)
    setattr(fk, op, compiled)
    try:
        return check_op(case, shape, device, seed=0)
    finally:
        setattr(fk, op, original)


def graphs(dry_run: bool, out: Path) -> dict:
    """fractalnet.graphs on the paper's recipe (FractalNet-20, drop-path per batch, fp32), batch
    100 and 32: three replays against three structure-forced eager steps from the same seed, then
    step time and host time per step (thread CPU time, no synchronisation inside), eager fused
    step against graphed."""
    import copy

    import torch
    import torch.nn.functional as F

    from fractalnet import create_model
    from fractalnet.graphs import GraphedTrainingStep

    cuda = torch.cuda.is_available()
    if not cuda and not dry_run:
        return dict(status="skipped", summary="needs a CUDA GPU")
    # A dry run goes through the same steps on the CPU, tiny, the capture a plain call.
    device = torch.device("cuda" if cuda else "cpu")
    capture = None if cuda else (lambda step: step)
    widths = (64, 128, 256, 512, 512) if cuda else (2, 3, 4, 4, 4)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for batch in (32, 100) if cuda else (2,):
        torch.manual_seed(0)
        model = create_model("fractalnet20_cifar", 10, widths=widths).to(device)
        twin = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.02, momentum=0.9)
        images = torch.randn(batch, 3, 32, 32, device=device)
        labels = torch.randint(10, (batch,), device=device)
        step = GraphedTrainingStep(model, optimizer, images, labels, generator=torch.Generator().manual_seed(0),
                                   capture=capture, warmup=3 if cuda else 1)
        for p in twin.parameters():
            p.grad = torch.zeros_like(p)

        def eager_step(structure=None):
            twin_optimizer.zero_grad(set_to_none=False)
            drawn = dict(generator=structure_generator) if structure is None else dict(structure=structure)
            out = twin(images, **drawn)
            F.cross_entropy(out, labels).backward()
            twin_optimizer.step()

        structure_generator = torch.Generator().manual_seed(1)
        torch.manual_seed(5)
        structures = [step(images, labels) for _ in range(3)]
        torch.manual_seed(5)
        for structure in structures:
            eager_step(structure)
        difference = max(_relative(p, q) for p, q in zip(model.parameters(), twin.parameters()))
        graphed_ms, eager_ms = _device_ms(lambda: step(images, labels)), _device_ms(eager_step)
        repeats = 20 if cuda else 2
        graphed_host, eager_host = _host_us(lambda: step(images, labels), repeats), _host_us(eager_step, repeats)
        rows.append(dict(batch=batch, structures=" ".join(map(str, structures)), max_relative_difference=difference,
                         eager_step_ms=eager_ms, graphed_step_ms=graphed_ms, eager_host_us=eager_host,
                         graphed_host_us=graphed_host, host_ratio=graphed_host / eager_host))
    ok = all(r["max_relative_difference"] < 1e-3 for r in rows)
    last = rows[-1]
    summary = (f"replays match eager steps ({max(r['max_relative_difference'] for r in rows):.1e}); "
               f"batch {last['batch']}: "
               f"{last['graphed_step_ms']:.2f} ms graphed vs {last['eager_step_ms']:.2f} ms eager a step, host "
               f"{last['host_ratio']:.3f}x eager's")
    return dict(status="passed" if ok else "failed", summary=summary, rows=rows)


def _host_us(fn: Callable[[], object], repeats: int = 20) -> float:
    """Host (thread CPU) microseconds per call of ``fn``, the device left to catch up afterwards."""
    fn()
    _synchronize()
    start = time.thread_time()
    for _ in range(repeats):
        fn()
    host = time.thread_time() - start
    _synchronize()
    return host / repeats * 1e6


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_ms(fn: Callable[[], object]) -> float:
    """Milliseconds per call: CUDA events on a GPU, the wall clock on a CPU (a dry run)."""
    import torch

    if torch.cuda.is_available():
        return _cuda_ms(fn)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def _cuda_ms(fn: Callable[[], object], repeats: int = 10) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for candidate in ("/usr/local/cuda/bin/compute-sanitizer",):
        if found is None and Path(candidate).exists():
            found = candidate
    return found


def sanitize(dry_run: bool, out: Path, limit: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return dict(status="skipped", summary="needs a CUDA GPU")
    tool = _sanitizer()
    if tool is None:
        return dict(status="skipped", summary="compute-sanitizer not found (PATH, /usr/local/cuda/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "ops.json"
        command = [tool, "--tool", "memcheck", "--error-exitcode", "7", "--print-limit", "20", sys.executable, "-m",
                   "benchmarks.gpu_check", "--phase", "ops", "--small", "--out", str(out), "--result", str(result_path)]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=max(limit - 5, 5), cwd=ROOT)
        except subprocess.TimeoutExpired:
            return dict(status="timeout", summary=f"memcheck of the small ops run did not end within {limit - 5} s")
        print(run.stdout[-4000:], run.stderr[-4000:])
        inner = json.loads(result_path.read_text()) if result_path.exists() else {}
    errors = run.returncode == 7
    ok = run.returncode == 0 and inner.get("status") == "passed"
    summary = ("memcheck found errors (see the log)" if errors else
               f"memcheck clean over {inner.get('cases', '?')} small op cases" if ok else
               f"memcheck run exited {run.returncode}: {inner.get('summary', 'no result')}")
    return dict(status="passed" if ok else "failed", summary=summary)


def benchmarks(dry_run: bool, out: Path, limit: int) -> dict:
    """python -m benchmarks --quick --gpu-only, stopped short of the phase's limit if need be: its
    report is written row by row, and a stopped run's markdown is made here from what it has."""
    from benchmarks import report as benchmark_report

    command = [sys.executable, "-m", "benchmarks", "--quick", "--gpu-only", "--out", str(out),
               *(["--cpu"] if dry_run else [])]
    started = time.time()
    try:
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(limit - 10, 5))
        print(run.stdout[-6000:], run.stderr[-6000:])
        returncode = run.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    reports = [p for p in sorted(out.glob("*-quick.json")) if p.stat().st_mtime >= started]
    if not reports:
        return dict(status="failed", summary=f"python -m benchmarks exited {returncode} and wrote no report")
    data = json.loads(reports[-1].read_text())
    if returncode is None:
        reports[-1].with_suffix(".md").write_text(benchmark_report.markdown(data))
    models = data.get("models_gpu", [])
    steps = {(r["implementation"], r["layout"]): r.get("step_ms") for r in models}
    fused, eager = steps.get(("fused", "nhwc")), steps.get(("eager", "nhwc"))
    headline = f"; FractalNet-20 bf16 nhwc step: fused {eager / fused:.2f}x eager's speed" if fused and eager else ""
    summary = (f"{len(models)} training-step rows, {len(data.get('kernels_gpu', []))} kernel rows in "
               f"{reports[-1].name}{headline}")
    if returncode is None:
        return dict(status="timeout", summary=f"stopped {limit - 10} s in, with {summary}")
    return dict(status="passed" if returncode == 0 else "failed", summary=summary)
