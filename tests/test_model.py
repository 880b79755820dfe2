"""The FractalNet model: structure, fused vs eager equivalence, drop-path, anytime prediction,
extraction, layouts, autocast, activation memory."""

import copy

import pytest
import torch
from helpers import DEVICE, freeze_batchnorm, train_step
from torch import nn

import fractal_kernels as fk
from fractal_kernels.testing import saved_bytes
from fractalnet import FractalNet, create_model, list_models
from fractalnet.drop_path import DropPath

# On the GPU's launch path (a GPU, or the fake GPU, whose launches the interpreter runs): the
# launches a GPU makes. The interpreter's own launch path runs each op's tests (test_ops and the
# op files); the model adds no launch of its own.
pytestmark = pytest.mark.fake_gpu

# Drop-path per sample: every column runs in every training step, whatever the draw.
SMALL = dict(widths=(8, 16, 16), columns=3, dropout=(0.0, 0.1, 0.2), drop_path_per="sample")


def small_pair(seed=0, **overrides):
    """A fused model and an eager (fused=False) model with the same weights."""
    torch.manual_seed(seed)
    fused = FractalNet(10, **{**SMALL, **overrides}, fused=True).to(DEVICE)
    eager = FractalNet(10, **{**SMALL, **overrides}, fused=False).to(DEVICE)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def batch(n=8, size=16, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_configurations():
    assert list_models() == ["fractalnet20_cifar", "fractalnet34_imagenet", "fractalnet40_cifar"]
    counts = {}
    for name in list_models():
        model = create_model(name, 10 if "cifar" in name else 1000)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        counts[name] = (sum(p.numel() for p in model.parameters()), len(convs))
    assert counts["fractalnet20_cifar"] == (33_724_618, 5 * 7)
    assert counts["fractalnet40_cifar"][1] == 5 * 15
    assert counts["fractalnet34_imagenet"][1] == 1 + 4 * 15
    imagenet = create_model("fractalnet34_imagenet", 1000)
    deepest = sum(len(block.columns[-1]) for block in imagenet.blocks)
    assert deepest + 2 == 34  # stem conv + deepest column + linear head
    assert create_model("fractalnet20_cifar", 100, columns=2).num_columns == 2
    with pytest.raises(ValueError, match="unknown model 'resnet'.*fractalnet20_cifar"):
        create_model("resnet", 10)


def assert_same_step(fused, eager, out_f, grads_f, out_e, grads_e):
    torch.testing.assert_close(out_f, out_e, atol=1e-4, rtol=1e-4)
    assert grads_f.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(fused.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("per", ["sample", "batch"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_and_eager_models_agree_in_training(backend, per):
    """Without dropout the two draw the same drop-path and compute the same step (dropout draws
    its masks differently: see the next test)."""
    fused, eager = small_pair(dropout=(0.0, 0.0, 0.0), drop_path_per=per)
    x = batch()
    for seed in range(3):  # per batch: global and local batches
        with fk.use_backend(backend):
            out_f, grads_f = train_step(fused, x, seed=seed)
        out_e, grads_e = train_step(eager, x, seed=seed)
        assert_same_step(fused, eager, out_f, grads_f, out_e, grads_e)


class KernelMaskDropout(nn.Module):
    """nn.Dropout that applies the masks the fused kernels drew, from their seeds, in order."""

    def __init__(self, p, seeds):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        return x * fk.dropout_mask(x, self.seeds.pop(0), self.p) / (1 - self.p)


def test_fused_dropout_is_the_eager_dropout_with_the_kernels_masks(monkeypatch):
    """The fused model's dropout (drawn inside the BatchNorm kernels) is nn.Dropout with the
    masks its seeds produce: with those masks, the eager model computes the same step."""
    from fractalnet import model as model_module

    fused, eager = small_pair()
    taken = []
    take = model_module.DropoutSeeds.take
    monkeypatch.setattr(model_module.DropoutSeeds, "take", lambda self, n: taken.append(take(self, n)) or taken[-1])
    x = batch()
    with fk.use_backend("triton"):
        out_f, grads_f = train_step(fused, x)
    seeds = [seed for seeds in taken for seed in seeds.unbind(0)]
    assert len(seeds) == sum(1 for unit in eager.units() if isinstance(unit.dropout, nn.Dropout))
    for unit in eager.units():
        if isinstance(unit.dropout, nn.Dropout):
            unit.dropout = KernelMaskDropout(unit.dropout.p, seeds)
    with fk.use_backend("triton"):
        out_e, grads_e = train_step(eager, x)
    assert not seeds
    assert_same_step(fused, eager, out_f, grads_f, out_e, grads_e)


def test_global_drop_path_with_frozen_bn_runs_one_column_per_sample():
    model, _ = small_pair(dropout=(0.0, 0.0, 0.0), global_ratio=1.0)
    freeze_batchnorm(model)
    x = batch()
    with fk.use_backend("triton"):
        out = model(x)
        columns = model.last_drop_path.global_column
        assert set(columns.tolist()) == {1, 2, 3}
        for b in range(x.shape[0]):
            alone = model(x[b:b + 1], column=int(columns[b]))
            torch.testing.assert_close(out[b], alone[0], atol=1e-5, rtol=1e-5)


#: Training modes of a model whose BatchNorms are frozen: (model options, drop-path seeds).
FROZEN_MODES = {
    "dense": (dict(local_drop=0.0, global_ratio=0.0), (0,)),
    "per sample": (dict(drop_path_per="sample"), (0, 1)),
    "per batch": (dict(drop_path_per="batch"), (0, 1, 2)),
    "per batch, global": (dict(drop_path_per="batch", global_ratio=1.0), (0, 1)),
    "skip_dropped": (dict(drop_path_per="sample", skip_dropped=True), (0, 1)),
    "recompute": (dict(drop_path_per="batch", recompute=True), (0, 1, 2)),
}


@pytest.mark.parametrize("mode", FROZEN_MODES)
def test_frozen_batchnorm_stays_frozen_in_a_training_model(mode):
    """Fine-tuning keeps the model in train() with its BatchNorms in eval(): they normalise by
    their running statistics and leave them (and their counters) as they were, in every mode,
    fused as eager."""
    options, seeds = FROZEN_MODES[mode]
    fused, eager = small_pair(**{**options, "dropout": (0.0,) * 3})
    if options.get("skip_dropped"):
        eager.skip_dropped = False  # the eager model runs dense: the frozen statistics make no difference
    for model in (fused, eager):
        freeze_batchnorm(model)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.num_batches_tracked.fill_(3)
    eager.load_state_dict(fused.state_dict())
    buffers = {k: v.clone() for k, v in fused.state_dict().items()}
    x = batch()
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        with fk.use_backend("triton"):
            out_f, grads_f = train_step(fused, x, generator=generator)
        out_e, grads_e = train_step(eager, x, generator=torch.Generator().manual_seed(seed))
        assert_same_step(fused, eager, out_f, grads_f, out_e, grads_e)
        assert all(torch.equal(v, buffers[k]) for k, v in fused.state_dict().items()), mode


@pytest.mark.parametrize("fused", [True, False])
def test_per_batch_global_batch_is_its_column_alone_and_keeps_running_stats(fused):
    """Drawn per batch, a global batch is the network restricted to its column, step for step,
    and leaves every running statistic as it was; a local batch updates them."""
    model = FractalNet(10, **{**SMALL, "dropout": (0.0,) * 3, "drop_path_per": "batch"}, fused=fused).to(DEVICE)
    x = batch()
    generators = [torch.Generator().manual_seed(seed) for seed in range(40)]
    draws = [(g.get_state(), DropPath(8, (1, 2, 3), 3, 3, 0.15, 0.5, DEVICE, g, per_batch=True)) for g in generators]
    global_state, global_draw = next((s, d) for s, d in draws if d.is_global[0])
    local_state, _ = next((s, d) for s, d in draws if not d.is_global[0])
    column = int(global_draw.global_column[0])
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    alone = copy.deepcopy(model)
    with fk.use_backend("triton"):
        out, grads = train_step(model, x, generator=torch.Generator().set_state(global_state))
        for bn in (m for m in alone.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.track_running_stats = False
        out_alone, grads_alone = train_step(alone, x, column=column)
    torch.testing.assert_close(out, out_alone)
    assert grads.keys() == grads_alone.keys() and all(torch.equal(grads[k], grads_alone[k]) for k in grads)
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    with fk.use_backend("triton"):
        train_step(model, x, generator=torch.Generator().set_state(local_state))
    changed = [k for k, v in model.state_dict().items() if k.endswith("running_mean") and not torch.equal(v,
                                                                                                          buffers[k])]
    assert changed


def standard_loop(model, call, pass_structure: bool, steps: int = 6) -> list:
    """``steps`` per-batch drop-path steps of a user's loop (``zero_grad()`` to None, SGD with
    momentum 0.9) through ``call``; every step's draws seeded by its number. Returns the
    optimizer and the global columns drawn (None for a local batch; unknown while traced)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    structures, data = torch.Generator().manual_seed(12), torch.Generator().manual_seed(1)
    drawn = []
    for step in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=data).to(DEVICE)
        y = torch.randint(0, 10, (8,), generator=data).to(DEVICE)
        kwargs = {"structure": model.draw_structure(structures)} if pass_structure else {}
        optimizer.zero_grad()
        torch.manual_seed(20 + step)
        nn.functional.cross_entropy(call(x, **kwargs), y).backward()
        assert all(p.grad is not None for p in model.parameters()), step
        optimizer.step()
        structure = kwargs.get("structure", model.last_drop_path and model.last_drop_path.batch_column)
        drawn.append(None if structure == "local" else structure)
    return optimizer, drawn


#: The Triton backend where torch.compile traces the triton_ops a GPU runs (the interpreter's
#: opaque custom ops compile in test_ops.test_compile_fullgraph_forward_and_backward), and with
#: the model drawing its structure: a structure passed in is the training loop's way
#: (test_compile.test_compiled_training_loop_trains_what_eager_trains).
STANDARD_LOOP_CASES = [
    pytest.param("reference", False, id="drawn-by-the-model-reference"),
    pytest.param("reference", True, id="structure-passed-reference"),
    pytest.param("triton", False, id="drawn-by-the-model-triton"),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend,pass_structure", STANDARD_LOOP_CASES)
def test_eager_and_compiled_steps_agree_under_the_standard_loop(backend, pass_structure):
    """One semantics, whatever the loop and the compiler: every parameter gets a gradient every
    step (zeros where a global batch does not reach it, so momentum moves it) and a global batch
    updates no running statistic. Six steps of local and global batches (every structure) eager and under
    torch.compile(fullgraph=True), the model drawing its own structure (the compiled graph then
    runs every column and masks) or taking one: the same parameters, gradients, momentum buffers
    and running statistics."""
    torch._dynamo.reset()  # a graph per structure: the recompile limit counts every test's
    torch.manual_seed(0)
    model = FractalNet(10, widths=(4, 8), columns=3, dropout=(0.0, 0.0)).to(DEVICE)
    twin = copy.deepcopy(model)
    with fk.use_backend(backend):
        optimizer, drawn = standard_loop(model, model, pass_structure)
        twin_optimizer, _ = standard_loop(twin, torch.compile(twin, fullgraph=True, backend="aot_eager"),
                                          pass_structure)
    assert set(drawn) == {None, 1, 2, 3}, drawn
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], twin_optimizer.state[q]["momentum_buffer"],
                                   rtol=1e-4, atol=1e-5)


def test_execution_refuses_what_cannot_work_where_it_is_set():
    """Compact column segments, and the unfused model's nn.BatchNorm2d, have no synchronised
    statistics: setting a process group on such a model raises at once, instead of training
    with per-rank statistics without a word; the model's mode is its blocks' mode."""
    model = FractalNet(10, **{**SMALL, "skip_dropped": True}).to(DEVICE)
    with pytest.raises(ValueError, match="skip_dropped and process_group do not combine"):
        model.process_group = "a process group"
    assert model.process_group is None and model(batch()).shape == (8, 10)
    model.skip_dropped = False
    model.process_group = "a process group"
    with pytest.raises(ValueError, match="skip_dropped and process_group do not combine"):
        model.skip_dropped = True
    with pytest.raises(ValueError, match="nn.SyncBatchNorm"):
        model.fused = False
    assert model.fused and not model.skip_dropped
    assert all(block.execution is model.execution for block in model.blocks)
    model.process_group = None
    model.fused = False
    assert all(not block.execution.fused for block in model.blocks)


def test_anytime_truncation_and_single_columns():
    model, eager = small_pair()
    model.eval(), eager.eval()
    x = batch(4)
    with fk.use_backend("triton"):
        full = model(x)
        torch.testing.assert_close(model(x, columns=3), full)
        for k in (1, 2):
            torch.testing.assert_close(model(x, columns=k), eager(x, columns=k), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x, column=k), eager(x, column=k), atol=1e-5, rtol=1e-5)
        # f_1 is the shallowest column alone.
        torch.testing.assert_close(model(x, columns=1), model(x, column=1))


@pytest.mark.parametrize("fused", [True, False])
def test_extracted_column_matches_column_mode(fused):
    model, eager = small_pair()
    net = model if fused else eager
    net.eval()
    x = batch(4)
    for k in (1, 2, 3):
        plain = net.extract_column(k).eval()
        assert isinstance(plain, nn.Sequential)
        assert not any(isinstance(m, FractalNet) for m in plain.modules())
        with fk.use_backend("triton"):
            torch.testing.assert_close(plain(x), net(x, column=k), atol=1e-5, rtol=1e-5)
    first = next(m for m in net.extract_column(1).modules() if isinstance(m, nn.Conv2d))
    assert first.weight is not net.blocks[0].columns[0][0].conv.weight, "the extraction holds copies"


def test_eval_is_deterministic():
    model, _ = small_pair()
    model.eval()
    x = batch(4)
    with fk.use_backend("triton"):
        assert torch.equal(model(x), model(x))


def test_channels_last_end_to_end():
    # No dropout: its random mask follows the memory layout, so it would differ between layouts.
    model, eager = small_pair(dropout=(0.0, 0.0, 0.0))
    model = model.to(memory_format=torch.channels_last)
    x = batch().to(memory_format=torch.channels_last)
    with fk.use_backend("triton"):
        out, grads = train_step(model, x)
    out_e, grads_e = train_step(eager, batch())
    torch.testing.assert_close(out, out_e, atol=1e-4, rtol=1e-4)
    for name in grads_e:
        torch.testing.assert_close(grads[name], grads_e[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_bf16(backend):
    model, _ = small_pair()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16), fk.use_backend(backend):
        out = model(batch())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_recompute_gives_the_same_gradients_and_saves_memory():
    plain, _ = small_pair()
    recomputing, _ = small_pair(recompute=True)
    x = batch()
    with fk.use_backend("triton"):
        out_p, grads_p = train_step(plain, x)
        out_r, grads_r = train_step(recomputing, x)
        torch.manual_seed(5)
        saved_plain = saved_bytes(lambda: plain(x))
        torch.manual_seed(5)
        saved_recompute = saved_bytes(lambda: recomputing(x))
    assert torch.equal(out_p, out_r)
    for name in grads_p:
        torch.testing.assert_close(grads_r[name], grads_p[name], atol=0, rtol=0, msg=name)
    assert saved_recompute < 0.8 * saved_plain


def test_state_dicts_are_interchangeable():
    """A trained fused model's state loads into the eager one value for value (running statistics
    and counters included), and both then compute the same eval output."""
    fused, eager = small_pair(seed=3)
    with fk.use_backend("triton"):
        train_step(fused, batch())
    state = fused.state_dict()
    assert state.keys() == eager.state_dict().keys()
    eager.load_state_dict(state)
    for key, value in eager.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert any(k.endswith("num_batches_tracked") and v.item() == 1 for k, v in state.items())
    fused.eval(), eager.eval()
    x = batch(seed=4)
    with fk.use_backend("triton"):
        torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


BAD = [
    (dict(widths=(8, 16), dropout=(0.0,)), "one entry per block"),
    (dict(columns=0), "columns must be a positive integer"),
    (dict(local_drop=1.5), "local_drop must be a probability"),
    (dict(dropout=(0.0, -0.1, 0.2)), r"dropout\[1\] must be a probability"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_configuration(overrides, message):
    with pytest.raises(ValueError, match=message):
        FractalNet(10, **{**SMALL, **overrides})


@pytest.mark.parametrize("kwargs,message", [
    (dict(columns=4), "columns must be an integer from 1 to 3"),
    (dict(column=0), "column must be an integer from 1 to 3"),
    (dict(columns=2, column=1), "not both"),
])
def test_bad_column_arguments(kwargs, message):
    model, _ = small_pair()
    with pytest.raises(ValueError, match=message):
        model(batch(2), **kwargs)
    with pytest.raises(ValueError, match="column must be an integer"):
        model.extract_column(5)


@pytest.mark.parametrize("variant", ["eager", "fused", "recompute", "skip_dropped", "per_batch"])
def test_training_step_reads_nothing_back_from_the_device(variant):
    """No synchronisation inside a training step, so that it can be captured in a CUDA graph: on
    meta tensors (no data, so any read of one fails) under no_host_reads, forward, backward and
    the optimizer step run through; skip_dropped and per-batch drop-path read only their masks,
    which they draw on the host."""
    from fractal_kernels.testing import no_host_reads

    torch.manual_seed(0)
    per = "batch" if variant == "per_batch" else "sample"
    model = FractalNet(10, **{**SMALL, "drop_path_per": per}, fused=variant != "eager",
                       recompute=variant == "recompute", skip_dropped=variant == "skip_dropped").to("meta")
    x = torch.empty(8, 3, 16, 16, device="meta")
    labels = torch.empty(8, dtype=torch.int64, device="meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with fk.use_backend("triton"), no_host_reads() as reads:
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()
    assert reads.reads == []


# ----------------------------------------------------------------------------------------------
# The skip_dropped model
# ----------------------------------------------------------------------------------------------

# Drawn per sample, segments carry different subsets of the batch (the case skip_dropped is for).
SKIPPING = dict(widths=(8, 16, 16), columns=3, dropout=(0.0, 0.0, 0.0), drop_path_per="sample")


def skipping_pair(fused=True, **overrides):
    torch.manual_seed(0)
    dense = FractalNet(10, **{**SKIPPING, **overrides}, fused=fused).to(DEVICE)
    skipping = FractalNet(10, **{**SKIPPING, **overrides}, fused=fused, skip_dropped=True).to(DEVICE)
    skipping.load_state_dict(dense.state_dict())
    return dense, skipping


def test_skipping_with_frozen_bn_equals_the_dense_model():
    dense, skipping = skipping_pair()
    freeze_batchnorm(dense), freeze_batchnorm(skipping)
    x = batch(12)
    with fk.use_backend("triton"):
        out_d, grads_d = train_step(dense, x)
        out_s, grads_s = train_step(skipping, x)
    torch.testing.assert_close(out_s, out_d, atol=1e-5, rtol=1e-5)
    for name, g in grads_d.items():
        torch.testing.assert_close(grads_s.get(name, torch.zeros_like(g)), g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_skipping_with_one_segment_left_at_a_join_spreads_it_over_the_batch():
    """With two samples, a join often has one segment left: its output is still one row a
    sample (zeros where nothing survived), as the dense model's. Many seeds, frozen BatchNorm."""
    dense, skipping = skipping_pair(dropout=(0.0, 0.0, 0.0))
    freeze_batchnorm(dense), freeze_batchnorm(skipping)
    x = batch(2)
    with fk.use_backend("triton"), torch.no_grad():
        for seed in range(12):
            torch.manual_seed(seed)
            expected = dense(x)
            torch.manual_seed(seed)
            torch.testing.assert_close(skipping(x), expected, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


def test_skipping_with_training_bn_matches_the_plain_pytorch_reference():
    _, fused = skipping_pair(fused=True)
    _, plain = skipping_pair(fused=False)  # reference ops: each segment on its surviving subset
    x = batch(12)
    with fk.use_backend("triton"):
        out_f, grads_f = train_step(fused, x)
    out_p, grads_p = train_step(plain, x)
    torch.testing.assert_close(out_f, out_p, atol=1e-4, rtol=1e-4)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_f[name], g, atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_convolution_work_skipped_matches_the_drop_path_probabilities():
    """Samples each conv processes, over many steps, against the expected survival of the
    segment it belongs to: global samples keep one column of C, local ones keep each of a
    k-input join's inputs with probability (1 - p) + p^k / k."""
    model = FractalNet(10, widths=(4, 4), columns=3, dropout=(0.0, 0.0), skip_dropped=True, fused=False,
                       drop_path_per="sample")
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, inputs, out, name=name: counts.__setitem__(
                name, counts.get(name, 0) + inputs[0].shape[0]))
    batch_size, steps, p, g, C = 64, 40, 0.15, 0.5, 3
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch_size, 3, 8, 8))
    block = model.blocks[0]
    join_size = {row: len(ending) for row, ending in block.endings([1, 2, 3]) if len(ending) > 1}
    for column in (1, 2, 3):
        for u in range(len(block.columns[column - 1])):
            end_row = next(r for r in sorted(join_size) if r >= (u + 1) * block.span(column))
            k = join_size[end_row]
            expected = g / C + (1 - g) * ((1 - p) + p**k / k)
            for b in range(2):
                seen = counts[f"blocks.{b}.columns.{column - 1}.{u}.conv"] / (steps * batch_size)
                assert abs(seen - expected) < 0.06, (b, column, u, seen, expected)


@pytest.mark.parametrize("seed", [1, 2, 3])  # local with one input dropped, global, local with several
def test_drawn_per_batch_skipping_is_the_dense_computation(seed):
    """Drawn per batch, every segment carries the whole batch or nothing, so the BatchNorm
    statistics of the dense model already leave out the samples a segment does not carry:
    training BatchNorm, the same outputs, gradients and running statistics of every unit that
    ran (a unit skipping leaves out keeps its own). Drawn per sample, the two differ by design."""
    dense, skipping = skipping_pair(drop_path_per="batch")
    x = batch(12)
    with fk.use_backend("triton"):
        out_d, grads_d = train_step(dense, x, generator=torch.Generator().manual_seed(seed))
        out_s, grads_s = train_step(skipping, x, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out_s, out_d, atol=1e-5, rtol=1e-5)
    for name, g in grads_s.items():
        torch.testing.assert_close(g, grads_d[name], atol=1e-5, rtol=1e-4, msg=name)
    ran = {name.rsplit(".", 2)[0] for name, g in grads_s.items() if g.any()}  # units that saw samples
    for name, value in skipping.state_dict().items():
        if name.rsplit(".", 2)[0] in ran and "running" in name:
            torch.testing.assert_close(value, dense.state_dict()[name], atol=1e-6, rtol=1e-5, msg=name)


def test_eval_is_dense_and_unchanged():
    dense, skipping = skipping_pair()
    dense.eval(), skipping.eval()
    x = batch(4)
    with fk.use_backend("triton"):
        torch.testing.assert_close(skipping(x), dense(x))
