"""fractalnet.graphs: the graphed training step. On a CPU the capture is replaced by a plain
call (the fake GPU cannot replay a graph): the tests check what the graphs rest on, that the
steps are the structure-forced eager steps, the state after warm-up and capture, and the
combinations refused; on a GPU, K replayed steps against K eager ones."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, requires_gpu

import fractal_kernels as fk
from fractalnet import DropPath, FractalNet
from fractalnet.graphs import GraphedTrainingStep

CONFIG = dict(widths=(4, 8), columns=3, dropout=(0.0, 0.1))


def eager_capture(step):
    """A capture that records nothing: its replay runs the step."""
    return step


def setup(per="batch", seed=0, **options):
    torch.manual_seed(seed)
    model = FractalNet(10, **CONFIG, drop_path_per=per, **options).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 8, 8, generator=gen).to(DEVICE) for _ in range(8)]
    labels = [torch.randint(10, (4,), generator=gen).to(DEVICE) for _ in range(8)]
    return model, optimizer, images, labels


def test_structures():
    assert FractalNet(10, **CONFIG, drop_path_per="batch").structures() == ["local", 1, 2, 3]
    assert FractalNet(10, **CONFIG, drop_path_per="batch").structures(columns=2) == ["local", 1, 2]
    assert FractalNet(10, **CONFIG, drop_path_per="sample").structures() == [None]


def test_a_forced_global_structure_is_the_drawn_global_batch():
    """model(x, structure=c) is the step a per-batch draw of a global batch of column c takes."""
    model, _, images, _ = setup()
    twin = copy.deepcopy(model)
    seed = next(s for s in range(100) if DropPath(4, [1, 2, 3], 3, 2, 0.15, 0.5, DEVICE,
                                                   torch.Generator().manual_seed(s), per_batch=True).batch_column)
    with fk.use_backend("triton"):
        torch.manual_seed(5)
        drawn = model(images[0], generator=torch.Generator().manual_seed(seed))
        column = model.last_drop_path.batch_column
        torch.manual_seed(5)
        forced = twin(images[0], structure=column)
    torch.testing.assert_close(drawn, forced, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))


def test_a_forced_local_structure_draws_its_masks_from_the_device_generator():
    model, _, images, _ = setup()
    with fk.use_backend("triton"):
        torch.manual_seed(3)
        first = model(images[0], structure="local")
        assert not model.last_drop_path.is_global.any()
        torch.manual_seed(3)
        again = model(images[0], structure="local")
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    masks = [model.last_drop_path.mask(b, row) for b in range(2) for row in model.last_drop_path.rows]
    assert all(m.any(0).all() for m in masks)  # every sample keeps an input at every join


@pytest.mark.parametrize("structure, message", [(0, "one of the active columns"), (True, "one of the active"),
                                                ("global", "one of the active")])
def test_bad_structures(structure, message):
    model, _, images, _ = setup()
    with pytest.raises(ValueError, match=message):
        model(images[0], structure=structure)
    with pytest.raises(ValueError, match="per batch"):
        setup("sample")[0](images[0], structure="local")


def graphed_against_eager(per: str, capture, tolerance: float, warmup: int = 3, steps: int = 8):
    """``steps`` graphed steps (up to eight; per batch, the first five draw every structure) and
    as many structure-forced eager steps of a twin in a user's loop (``zero_grad()`` to None),
    from the same torch seed: parameters, running statistics and momentum buffers agree.
    Returns the step and structures."""
    model, optimizer, images, labels = setup(per)
    images, labels = images[:steps], labels[:steps]
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    with fk.use_backend("triton"):
        step = GraphedTrainingStep(model, optimizer, images[0], labels[0], generator=torch.Generator().manual_seed(18),
                                   capture=capture, warmup=warmup)
        # The warm-up and capture leave no trace.
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
        torch.manual_seed(11)
        structures = [step(x, y) for x, y in zip(images, labels)]
        torch.manual_seed(11)
        for x, y, structure in zip(images, labels, structures):
            twin_optimizer.zero_grad()  # a user's loop: the model gives unreached parameters zeros
            out = twin(x) if structure is None else twin(x, structure=structure)
            F.cross_entropy(out, y).backward()
            twin_optimizer.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance / 10, msg=name)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], twin_optimizer.state[q]["momentum_buffer"],
                                   rtol=tolerance, atol=tolerance / 10)
    return step, structures


@pytest.mark.slow
@pytest.mark.parametrize("per", ["batch", "sample"])
def test_graphed_steps_are_the_structure_forced_eager_steps(per):
    """Each replay runs the step of its structure on the copied batch, and the warm-up and capture
    leave no trace (the capture here a plain call; one warm-up step a structure, which the state
    must come back from as from three)."""
    step, structures = graphed_against_eager(per, eager_capture, 1e-6, warmup=1, steps=5)
    if per == "batch":  # the draws of these five steps replay every structure
        assert set(structures) == {"local", 1, 2, 3}
    loss, accuracy = step.epoch_totals()
    assert loss > 0 and 0 <= accuracy <= 1 and step.seen == 0


def test_a_new_learning_rate_is_captured_before_the_next_step():
    """The graphs hold the learning rate they were captured with: a step after the optimizer's
    rate changed (the schedule sets it each epoch) captures every structure again first, and
    only then."""
    model, optimizer, images, labels = setup()
    captured = []

    def counting_capture(step):
        captured.append(step)
        return step

    step = GraphedTrainingStep(model, optimizer, images[0], labels[0], capture=counting_capture, warmup=1)
    structures = len(model.structures())
    assert len(captured) == structures
    step(images[1], labels[1])
    for group in optimizer.param_groups:
        group["lr"] = 0.005
    assert len(captured) == structures
    step(images[2], labels[2])
    step(images[3], labels[3])
    assert len(captured) == 2 * structures


def test_structure_draw_follows_the_per_batch_recipe():
    model, _, _, _ = setup()
    generator = torch.Generator().manual_seed(0)
    draws = [model.draw_structure(generator) for _ in range(3000)]
    share_global = 1 - draws.count("local") / len(draws)
    assert abs(share_global - model.global_ratio) < 0.03
    for column in (1, 2, 3):
        assert abs(draws.count(column) / len(draws) - model.global_ratio / 3) < 0.03
    assert {model.draw_structure(generator, columns=2) for _ in range(200)} == {"local", 1, 2}
    # Seeded alike, alike (every rank draws the same structures).
    again = torch.Generator().manual_seed(0)
    assert [model.draw_structure(again) for _ in range(3000)] == draws
    assert setup("sample")[0].draw_structure(generator) is None
    with pytest.raises(ValueError, match="CPU generator"):  # a device generator, as far as it tells
        model.draw_structure(types.SimpleNamespace(device=torch.device("cuda")))


def test_structure_draw_is_real_under_fake_tensors():
    """Memory estimators and FLOP counters trace a training step on fake tensors: the host's draw
    stays a real one there, and gives what it gives outside."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, _, _, _ = setup()
    generator = torch.Generator().manual_seed(3)
    expected = [model.draw_structure(generator) for _ in range(20)]
    generator.manual_seed(3)
    with FakeTensorMode():
        drawn = [model.draw_structure(generator) for _ in range(20)]
    assert drawn == expected


def test_refused_combinations():
    model, optimizer, images, labels = setup()
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        if DEVICE == "cpu":
            GraphedTrainingStep(model, optimizer, images[0], labels[0])
        else:
            raise ValueError("CUDA graphs need CUDA tensors")  # (on a GPU the tensors are CUDA ones)
    for options, error, message in ((dict(skip_dropped=True), ValueError, "skip_dropped"),):
        m, o, x, y = setup(**options)
        with pytest.raises(error, match=message):
            GraphedTrainingStep(m, o, x[0], y[0], capture=eager_capture)
    model.process_group = "a group"
    with pytest.raises(ValueError, match="process_group"):
        GraphedTrainingStep(model, optimizer, images[0], labels[0], capture=eager_capture)
    model.process_group = None
    with pytest.raises(TypeError, match="torch.optim.SGD"):
        GraphedTrainingStep(model, torch.optim.Adam(model.parameters()), images[0], labels[0], capture=eager_capture)
    model.eval()
    with pytest.raises(ValueError, match="training mode"):
        GraphedTrainingStep(model, optimizer, images[0], labels[0], capture=eager_capture)
    model.train()
    step = GraphedTrainingStep(model, optimizer, images[0], labels[0], capture=eager_capture, warmup=1)
    with pytest.raises(ValueError, match="example's shapes"):
        step(images[0][:2], labels[0][:2])


@requires_gpu
@pytest.mark.parametrize("per", ["batch", "sample"])
def test_cuda_graph_replays_equal_eager_steps(per):
    """On a GPU: the CUDA graphs themselves, against the structure-forced eager steps from the
    same torch seed (graph-safe RNG draws what eager draws)."""
    graphed_against_eager(per, None, 1e-4)
