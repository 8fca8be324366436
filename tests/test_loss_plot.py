"""The loss plot written into every run folder (stylelora.train.logs): what its axes show."""
from __future__ import annotations

from stylelora.train.logs import LOSS_PLOT_FILE, loss_figure, plot_loss


def rows(losses: list[float]) -> list[dict]:
    return [{"step": str(step), "loss": str(loss), "loss_smoothed": str(loss)} for step, loss in
            enumerate(losses, start=1)]


def test_a_short_run_gets_whole_step_numbers_on_the_x_axis(tmp_path):
    figure = loss_figure(rows([0.3, 0.25, 0.28]))
    figure.canvas.draw()  # the tick labels are written when the figure is drawn (as savefig draws it)
    labels = [label.get_text() for label in figure.axes[0].get_xticklabels() if label.get_text()]
    assert labels and all(label.isdigit() for label in labels), labels
    assert plot_loss(rows([0.3, 0.25, 0.28]), tmp_path / LOSS_PLOT_FILE).read_bytes().startswith(b"\x89PNG")
