"""Owns what a run reports while it trains: the progress bar, metrics.csv, loss.png and TensorBoard (when installed).

Only the main process writes or prints; the others get a RunLog that does nothing. Files are rewritten whole via
temp + rename, so a reader (or a crash) never sees half a CSV or PNG. On resume the rows after the checkpoint's
step are dropped, so the CSV describes the weights that exist.
"""
from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stylelora.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from stylelora.lora.max_norm import NormReport

METRICS_FILE = "metrics.csv"
LOSS_PLOT_FILE = "loss.png"
# keys_scaled to max_key_norm: what --scale-weight-norms did at the step (empty when it is off), under kohya's names;
# val_loss: the held-out images' loss, at the steps it was measured (--validation-split).
COLUMNS = ("step", "loss", "loss_smoothed", "lr_unet", "lr_text_encoder", "grad_norm", "step_seconds",
           "elapsed_seconds", "keys_scaled", "average_key_norm", "max_key_norm", "val_loss")
SMOOTHING = 0.95  # exponential moving average of the loss for the bar and the plot
CSV_EVERY = 25  # steps between metrics.csv rewrites (cheap: a few KB)
CSV_SECONDS = 2.0  # ... or sooner when steps are slow, so a follower (the app) sees the loss within seconds


class RunLog:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.rows: list[dict] = _read_rows(run_dir / METRICS_FILE, up_to=start_step) if enabled else []
        # Bias-corrected EMA (as in Adam): without the correction the first hundred points hug the first loss.
        self.ema = float(self.rows[-1]["loss_smoothed"]) * (1 - SMOOTHING ** len(self.rows)) if self.rows else 0.0
        self.started = time.perf_counter() - (float(self.rows[-1]["elapsed_seconds"]) if self.rows else 0.0)
        self.bar = _progress_bar(total_steps, start_step) if enabled else None
        self.tensorboard = _tensorboard(run_dir) if enabled else None
        self.csv_written = time.perf_counter()

    def say(self, message: str) -> None:
        """A line for the user, printed above the progress bar (main process only)."""
        if not self.enabled:
            return
        # stderr, like the bar itself: stdout carries only the adapter path, for scripts.
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def record(self, step: int, loss: float, lrs: dict[str, float], grad_norm: float | None, step_seconds: float,
               norms: NormReport | None = None) -> None:
        """One step's row; `lrs`: the optimizer's rates by group name (train.optim.param_groups), of which the log
        keeps the models' own; `norms`: what --scale-weight-norms did at the step (None when the cap is off)."""
        if not self.enabled:
            return
        norm_columns = _norm_columns(norms)
        self.ema = SMOOTHING * self.ema + (1 - SMOOTHING) * loss
        smoothed = self.ema / (1 - SMOOTHING ** (len(self.rows) + 1))
        row = {"step": step, "loss": loss, "loss_smoothed": smoothed, "lr_unet": lrs["unet"],
               "lr_text_encoder": lrs.get("text_encoder", ""), "grad_norm": "" if grad_norm is None else grad_norm,
               "step_seconds": step_seconds, "elapsed_seconds": time.perf_counter() - self.started,
               **norm_columns}
        self.rows.append(row)
        # As kohya's bar shows it: how many modules the cap scaled back at this step, and the largest norm left.
        capped = {} if norms is None else {"scaled": norms.scaled, "max_norm": f"{norms.max_norm:.3g}"}
        self.bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lrs['unet']:.1e}", **capped, refresh=False)
        self.bar.update(1)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", loss, step)
            self.tensorboard.add_scalar("lr/unet", lrs["unet"], step)
            for name, value in norm_columns.items():
                if value != "":
                    self.tensorboard.add_scalar(f"max_norm/{name}", value, step)
        if step % CSV_EVERY == 0 or time.perf_counter() - self.csv_written >= CSV_SECONDS:
            self.write_csv()

    def record_validation(self, step: int, loss: float) -> None:
        """The held-out images' loss at `step` (recorded just before), in its row, the plot and TensorBoard."""
        if not self.enabled:
            return
        self.rows[-1]["val_loss"] = loss
        self.say(f"step {step}: validation loss {loss:.4f}")
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss/validation", loss, step)
        self.write_csv()

    def write_csv(self) -> None:
        if self.enabled:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=COLUMNS)  # a row without val_loss leaves it empty
            writer.writeheader()
            writer.writerows(self.rows)
            write_bytes_atomic(self.run_dir / METRICS_FILE, buffer.getvalue().encode())
            self.csv_written = time.perf_counter()

    def flush(self) -> None:
        """Write metrics.csv and loss.png now (at checkpoints, samples, the end, or when stopping)."""
        if not self.enabled:
            return
        self.write_csv()
        if self.rows:
            plot_loss(self.rows, self.run_dir / LOSS_PLOT_FILE)
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.bar.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def _norm_columns(norms: NormReport | None) -> dict[str, float | int | str]:
    if norms is None:
        return {"keys_scaled": "", "average_key_norm": "", "max_key_norm": ""}
    return {"keys_scaled": norms.scaled, "average_key_norm": norms.mean_norm, "max_key_norm": norms.max_norm}


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    # tqdm computes it/s and the ETA itself; the postfix adds loss and LR.
    return tqdm(total=total, initial=initial, unit="step", desc="training", dynamic_ncols=True, smoothing=0.05)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: `pip install tensorboard` to get it
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _read_rows(path: Path, up_to: int) -> list[dict]:
    if up_to == 0 or not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to]


def plot_loss(rows: list[dict], path: Path) -> Path:
    """Raw loss (faint) and its moving average against the step, as a PNG."""
    buffer = io.BytesIO()
    loss_figure(rows).savefig(buffer, format="png")
    return write_bytes_atomic(path, buffer.getvalue())


def loss_figure(rows: list[dict]):
    """The loss plot's matplotlib Figure: steps on x (whole numbers only: a short run gets no 2.5), loss on y."""
    # matplotlib's Figure API, not pyplot: no global state and no GUI backend, so a Ctrl-C that lands in the
    # middle of the first plot cannot leave a half-imported pyplot behind for the plot written on the way out.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [int(r["step"]) for r in rows]
    figure = Figure(figsize=(7, 4), dpi=100)
    axis = figure.subplots()
    axis.plot(steps, [float(r["loss"]) for r in rows], alpha=0.3, linewidth=0.8, label="loss")
    axis.plot(steps, [float(r["loss_smoothed"]) for r in rows], linewidth=1.6, label="moving average")
    measured = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in (None, "")]
    if measured:
        axis.plot(*zip(*measured), marker="o", markersize=3, linewidth=1.4, label="validation loss (held out)")
    losses = [float(r["loss"]) for r in rows if math.isfinite(float(r["loss"])) and float(r["loss"]) > 0]
    if losses and max(losses) / min(losses) > 20:
        axis.set_yscale("log")  # a few huge early losses would flatten the rest
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure
