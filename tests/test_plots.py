"""fractalnet.plots: what every figure shares so that a reader can trust it."""

import pytest

from fractalnet.plots import error_axis, legend_beside, plain_ticks, pyplot, run_subtitle, save

pytestmark = pytest.mark.either_session

pytest.importorskip("matplotlib")


def tick_texts(fig, axis):
    fig.canvas.draw()
    return [label.get_text() for label in axis.get_ticklabels() if label.get_text()]


def test_log_axes_show_plain_numbers():
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([3, 6, 40], [1, 2, 3])
    ax.set_xscale("log")
    plain_ticks(ax, "x")
    texts = tick_texts(fig, ax.xaxis)
    plt.close(fig)
    assert texts and all("^" not in t and "$" not in t and "times" not in t for t in texts), texts
    assert "10" in texts and "5" in texts


def test_error_axes_start_at_zero_and_say_what_one_image_is():
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [98.3, 99.2])  # matplotlib alone would zoom to 98.3-99.2
    ax.set_ylabel("test error (%)")
    error_axis(ax, 360)
    assert ax.get_ylim()[0] == 0
    assert ax.get_ylabel() == "test error (%)\none test image = 0.28%"
    error_axis(ax, 180, "validation")
    assert ax.get_ylabel().endswith("one validation image = 0.56%")
    plt.close(fig)


def test_the_legend_stands_beside_the_axes_and_the_subtitle_under_them(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="a line")
    legend_beside(ax)
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 > axes.x1  # no point of the axes under it
    subtitle = run_subtitle("digits", 30, [0, 1], "CPU (x86_64)", 360)
    assert subtitle == "digits (360 test images), 30 epochs, mean ± sd of seeds 0, 1, CPU (x86_64)"
    save(fig, tmp_path / "figure.png", subtitle)
    assert subtitle in [text.get_text() for text in fig.texts]
    assert (tmp_path / "figure.png").stat().st_size > 1000
