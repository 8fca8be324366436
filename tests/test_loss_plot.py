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


def test_the_validation_loss_is_drawn_at_the_steps_it_was_measured():
    measured = rows([0.3, 0.25, 0.28, 0.2])
    measured[1]["val_loss"], measured[3]["val_loss"] = "0.1", "0.12"
    lines = {line.get_label(): line for line in loss_figure(measured).axes[0].get_lines()}
    assert list(lines["validation loss (held out)"].get_xdata()) == [2, 4]
    assert list(lines["validation loss (held out)"].get_ydata()) == [0.1, 0.12]
    plain = loss_figure(rows([0.3])).axes[0].get_lines()
    assert "validation loss (held out)" not in {line.get_label() for line in plain}
