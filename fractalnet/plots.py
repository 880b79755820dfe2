"""What every figure of a run shares, so that a reader can trust it: plain tick labels, a legend
beside the axes (never over a point), the error axis from zero with the size of one test image,
and a subtitle that says what run it shows."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_ticks(ax, axis: str = "y") -> None:
    """Tick labels as plain numbers (6, 10, 20), not powers (6x10^0), on a log axis too."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    if target.get_scale() == "log":
        target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        target.set_minor_formatter(NullFormatter())


def error_axis(ax, images: int | None, split: str = "test") -> None:
    """An error axis from 0, saying how much one of the ``images`` of the ``split`` it counts is."""
    ax.set_ylim(bottom=0)
    if images:
        ax.set_ylabel(f"{ax.get_ylabel()}\none {split} image = {100 / images:.2f}%")


def legend_beside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")


def save(fig, path: Path, subtitle: str) -> None:
    """Saves ``fig`` with ``subtitle`` (the run it shows) under its panels."""
    plt = pyplot()
    fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize="small", color="0.3", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run_subtitle(dataset: str, epochs: int, seeds, device: str, test_images: int | None,
                 statistic: str = "mean ± sd") -> str:
    """One line: the data, the training, the seeds (and the ``statistic`` over them) and the
    hardware of a figure."""
    seeds = list(seeds)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"{statistic} of seeds {', '.join(map(str, seeds))}"
    images = f" ({test_images} test images)" if test_images else ""
    return f"{dataset}{images}, {epochs} epochs, {seed_text}, {device}"


def write_plots(history: list[dict], anytime: list[dict], out: Path, subtitle: str, test_images: int) -> None:
    """curves.png (loss and test error by epoch) and anytime.png (each column alone and each
    truncation: test error by depth and by latency) of a run; ``subtitle`` says which run."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], label="train")
    left.plot(epochs, [h["test_loss"] for h in history], label="test")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    right.plot(epochs, [100 * (1 - h["test_accuracy"]) for h in history])
    right.set(xlabel="epoch", ylabel="test error (%)", title="test error (running BatchNorm statistics)")
    error_axis(right, test_images)
    save(fig, out / "curves.png", subtitle)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, marker in (("column", "o"), ("columns", "s")):
        rows = [r for r in anytime if r["mode"] == mode]
        label = "single column k" if mode == "column" else "truncation columns=k"
        left.plot([r["depth"] for r in rows], [100 * (1 - r["accuracy"]) for r in rows], marker=marker, label=label)
        right.plot([r["ms_per_image"] for r in rows], [100 * (1 - r["accuracy"]) for r in rows], marker=marker,
                   label=label)
    left.set(xlabel="depth of column k (conv layers)", ylabel="test error (%)", title="error by depth")
    right.set(xlabel="latency (ms per image)", ylabel="test error (%)", title="error by latency")
    for ax in (left, right):
        error_axis(ax, test_images)
    legend_beside(right)
    save(fig, out / "anytime.png", subtitle)
