"""A training run started from the app: `stylelora train` in a child process, followed through its run folder.

The settings become a TrainConfig through stylelora.config (validated here, so a bad value is refused at once with
the config's own message), saved as TOML in the run's own folder (OUTPUT/app-settings.toml, never in the dataset)
and handed to `python -m stylelora.train.command train DATA --config`: the exact CLI path, in its own process, so a
run neither blocks nor slows the app's generation lock, cannot take the app down, checkpoints as a CLI run does,
and can be stopped with Ctrl-C semantics (SIGINT: the step in progress ends and is saved as a checkpoint, logs
flushed) and resumed from it (`--resume latest`). Progress and loss are read from the run's metrics.csv (stylelora.train.logs), the
newest sample grid from its samples/ folder, and the log is the trainer's own lines (its progress bars left out).
"""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stylelora.app.errors import AppError, plain_name
from stylelora.train.command import INTERRUPTED

SETTINGS_FILE = "app-settings.toml"  # in the run folder: what the app started, so Resume can continue it
LOG_FILE = "app-train.log"  # the trainer's output, kept beside its metrics
LOG_LINES_KEPT = 200
OTHER_BARS = re.compile(r"\d+%\|")  # tqdm bars (training and model loading): the metrics file says the same

@dataclass(frozen=True)
class TrainSettings:
    """What the Train tab sends: the data folder, the adapter name and base, and the options it shows.

    `options` maps config fields ("train.steps", "network.rank", ...: the ones stylelora.config gives a widget) to
    the values entered; a value left empty (None or "") means the option's own default, as an absent CLI flag does.
    """

    data_dir: str
    name: str
    base: str = "toy"
    overwrite: bool = False
    options: dict = field(default_factory=dict)
    start_from: str = ""  # an adapter of the adapters folder to continue (--network-weights); "" for a new LoRA
    more_options: str = ""  # any other `stylelora train` flags, as typed on the command line

    def overrides(self, adapters_dir: Path, data: Path, start: Path | None = None) -> dict:
        """Config overrides as `stylelora train` flags give them; the run folder is adapters_dir/NAME; `start`:
        the file `start_from` names (AppService resolves it inside the adapters folder)."""
        name = plain_name(self.name, "Adapter name")
        overrides = {key: value for key, value in self.options.items() if value is not None and value != ""}
        overrides.update(self.more_overrides())
        if overrides.get("network.train_text_encoder") is False:
            overrides.pop("optim.text_encoder_lr", None)  # the box may still hold a value; the config would refuse it
        overrides.update({"data.dir": str(Path(data).absolute()), "train.base": self.base, "train.output_name": name,
                          "train.output": str(adapters_dir / name), "train.overwrite": bool(self.overwrite)})
        if start is not None:  # the adapter's own rank, alpha and layers: the tab's Rank box does not apply
            overrides.update({"network.weights": str(start), "network.dim_from_weights": True})
        return overrides


    def more_overrides(self) -> dict:
        """The overrides `more_options` gives, read by `stylelora train`'s own parser; a flag for something the tab
        sets itself (a box of its own, the data folder, the name) is refused, naming the box, as the box would
        otherwise win without a word."""
        from stylelora.config import OPTIONS_BY_NAME as specs
        from stylelora.train.command import flag_overrides

        try:
            overrides, not_options = flag_overrides(self.more_options)
        except ValueError as error:
            raise AppError(f"More options: {error}") from None
        if not_options:
            raise AppError(f"More options: {', '.join(not_options)} belongs to the command line, not to a run's "
                           "settings; type training flags here (`stylelora train --help` and docs/training.md list "
                           "them).")
        boxes = {**TAB_SETS, **{key: f"its box {spec.option.widget.label.split(' (')[0]!r}"
                                for key, spec in specs.items() if spec.option.widget is not None}}
        taken = [f"{specs[key].flag} ({boxes[key]})" for key in overrides if key in boxes]
        if taken:
            raise AppError(f"More options: the tab has its own control for {'; '.join(taken)}: use that instead.")
        return overrides


# What the Train tab sets itself, besides the option boxes: More options may not (TrainSettings.more_overrides).
TAB_SETS = {"data.dir": "the Training data folder box", "train.base": "the Base model box",
            "train.output_name": "the Adapter name box",
            "train.output": "the Adapter name box: runs are saved in the adapters folder as NAME/",
            "train.overwrite": "the overwrite box", "network.weights": "Start from an adapter",
            "network.dim_from_weights": "Start from an adapter",
            "train.resume": "the Resume button, which continues the run named in the Adapter name box"}


@dataclass(frozen=True)
class TrainingStatus:
    """One look at a run: state ("running", "done", "failed", "stopped"), progress, loss, log, adapter, sample."""

    name: str
    state: str
    step: int
    total: int
    losses: tuple[tuple[int, float], ...]
    log: str
    adapter: Path | None
    message: str
    sample: Path | None = None
    checkpoint: int | None = None  # the step of the newest complete checkpoint
    validation: tuple[tuple[int, float], ...] = ()  # (step, loss) of the held-out images (--validation-split)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


class TrainingJob:
    """One `stylelora train` child process, its run folder, and what it printed so far."""

    def __init__(self, name: str, config, process: subprocess.Popen, *, resumed: bool = False) -> None:
        self.name, self.config, self.process, self.resumed = name, config, process, resumed
        self.total = config.train.steps  # until the trainer writes the run's own (--epochs sets them only then)
        self.started, self.total_known = time.time(), False
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self.stopped = False
        self._lock = threading.Lock()
        self._metrics: tuple = (None, (), ())  # (file signature, smoothed losses, validation losses)
        self._log = (config.output_dir / LOG_FILE).open("a" if resumed else "w", encoding="utf-8")
        self._readers = [threading.Thread(target=self._read, args=(process.stderr, self._on_stderr), daemon=True),
                         threading.Thread(target=self._read, args=(process.stdout, self.stdout.append), daemon=True)]
        for reader in self._readers:
            reader.start()

    @classmethod
    def start(cls, settings: TrainSettings, adapters_dir: Path, data: Path, start: Path | None = None) -> TrainingJob:
        from stylelora.config import load_config, save_config

        config = load_config(None, settings.overrides(Path(adapters_dir), data, start))
        if config.adapter_path.exists() and not config.train.overwrite:
            raise AppError(f"{config.output_dir.name}/{config.adapter_path.name} exists already: choose another "
                           "name or tick 'overwrite'.")
        from stylelora.train.checkpoint import complete_checkpoints

        if complete_checkpoints(config.output_dir) and not config.train.overwrite:
            raise AppError(f"{config.output_dir.name} holds a stopped run with checkpoints: press Resume to continue "
                           "it, tick 'overwrite' to start it over, or choose another name.")
        from stylelora.train.logs import METRICS_FILE

        (config.output_dir / METRICS_FILE).unlink(missing_ok=True)  # an earlier run's curve is not this one's
        return cls._launch(config, save_config(config, config.output_dir / SETTINGS_FILE), resume=False)

    @classmethod
    def resume(cls, run_dir: Path, datasets_dir: Path) -> TrainingJob:
        """Continue the app run in `run_dir` from its newest checkpoint, with the settings it was started with."""
        from stylelora.config import load_config
        from stylelora.train.checkpoint import checkpoint_step, complete_checkpoints

        if not run_dir.is_dir():
            raise AppError(f"There is no run named {run_dir.name}: Resume continues the run named in the Adapter "
                           "name box, so type the name of a stopped run there.")
        settings = run_dir / SETTINGS_FILE
        if not settings.is_file():
            raise AppError(f"{run_dir.name} is not a run started from this app (no {SETTINGS_FILE} in it); continue "
                           f"it with `stylelora train DATA --output {run_dir.name} --resume latest`.")
        config = load_config(settings, {"train.resume": "latest", "train.overwrite": False})
        if not Path(config.data.dir).resolve().is_relative_to(Path(datasets_dir).resolve()):
            raise AppError(f"{run_dir.name} trains on a folder outside {Path(datasets_dir).name}/; continue it from "
                           "the command line.")
        checkpoints = complete_checkpoints(run_dir)
        if not checkpoints:
            raise AppError(f"{run_dir.name} has no checkpoint to resume from (one is written every "
                           f"{config.train.save_every} steps); start it again instead.")
        steps = run_steps(config) or config.train.steps
        if checkpoint_step(checkpoints[-1]) >= steps and config.adapter_path.is_file():
            raise AppError(f"{run_dir.name} has finished its {steps} steps: its adapter is "
                           f"{run_dir.name}/{config.adapter_path.name}. To train more, start a run with more steps.")
        return cls._launch(config, settings, resume=True)

    @classmethod
    def _launch(cls, config, settings: Path, *, resume: bool) -> TrainingJob:
        command = [sys.executable, "-m", "stylelora.train.command", "train", config.data.dir, "--config", str(settings)]
        if resume:
            command += ["--resume", "latest"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   encoding="utf-8", errors="replace", env=_child_env())
        return cls(config.train.output_name, config, process, resumed=resume)

    # -- reading the child's output

    @staticmethod
    def _read(stream, handle) -> None:
        # Text mode turns tqdm's carriage returns into line ends, so each bar refresh arrives as one line.
        for line in stream:
            handle(line.rstrip("\n"))
        stream.close()

    def _on_stderr(self, line: str) -> None:
        if not line.strip() or OTHER_BARS.search(line) or line.startswith(INTERRUPTED):
            return  # bars: the metrics say the same; the CLI's resume advice: the app's Stop message says it
        with self._lock:
            self.lines = (self.lines + [line])[-LOG_LINES_KEPT:]
            if not self._log.closed:
                self._log.write(line + "\n")
                self._log.flush()

    # -- the run folder

    def metrics(self) -> tuple[tuple[int, float], ...]:
        """(step, smoothed loss) of every step the run's metrics.csv holds (re-read only when it changed)."""
        return self._read_metrics()[1]

    def validation_metrics(self) -> tuple[tuple[int, float], ...]:
        """(step, validation loss) of the steps where metrics.csv has one (--validation-split)."""
        return self._read_metrics()[2]

    def _read_metrics(self) -> tuple:
        from stylelora.train.logs import METRICS_FILE

        path = self.config.output_dir / METRICS_FILE
        try:
            stat = path.stat()
        except OSError:
            return self._metrics
        signature = (stat.st_mtime_ns, stat.st_size)
        if signature != self._metrics[0]:
            try:
                with path.open(newline="", encoding="utf-8") as handle:
                    rows = list(csv.DictReader(handle))
                losses = tuple((int(row["step"]), float(row["loss_smoothed"])) for row in rows)
                validation = tuple((int(row["step"]), float(row["val_loss"])) for row in rows if row.get("val_loss"))
            except (OSError, ValueError, KeyError):
                return self._metrics  # written atomically, so this is rare: keep the last good read
            self._metrics = (signature, losses, validation)
        return self._metrics

    def latest_sample(self) -> Path | None:
        from stylelora.train.samples import SAMPLES_DIR

        grids = sorted((self.config.output_dir / SAMPLES_DIR).glob("step-*.png"))
        return grids[-1] if grids else None

    def latest_checkpoint(self) -> int | None:
        from stylelora.train.checkpoint import complete_checkpoints

        found = complete_checkpoints(self.config.output_dir)
        return int(found[-1].name.split("-")[-1]) if found else None

    # -- state

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def adapter(self) -> Path | None:
        if self.process.poll() != 0:
            return None
        lines = [line for line in self.stdout if line.strip()]
        return Path(lines[-1].strip()) if lines else self.config.adapter_path

    def wait(self, timeout: float | None = None) -> TrainingStatus:
        self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        return self.status()

    def stop(self) -> None:
        """Interrupt the run as Ctrl-C would: it ends after the step in progress, saved (Resume continues from it)."""
        if self.running:
            self.stopped = True
            self.process.send_signal(signal.SIGINT)

    def status(self) -> TrainingStatus:
        code = self.process.poll()
        if code is not None:
            for reader in self._readers:
                reader.join(timeout=5)
            with self._lock:
                self._log.close()
        with self._lock:
            log = "\n".join(self.lines)
        losses = self.metrics()
        step = losses[-1][0] if losses else 0
        if not self.total_known:  # read once, when the trainer has written the run's config.toml
            steps = run_steps(self.config, newer_than=self.started)
            self.total, self.total_known = steps or self.total, steps is not None
        checkpoint = self.latest_checkpoint()
        every = self.config.train.save_every
        kept = (f"the last checkpoint (step {checkpoint}) is kept: Resume continues from it" if checkpoint else
                "no checkpoint was written yet (" + (f"one every {every} steps" if every else "checkpoints are off") +
                ", and a stop saves one only once a step has ended), so Resume has nothing to continue")
        if code is None:
            state, message = "running", f"step {step}/{self.total}"
        elif code == 0:
            state, message = "done", f"adapter written: {self.config.output_dir.name}/{self.config.adapter_path.name}"
        elif self.stopped:
            state, message = "stopped", f"stopped at step {step}; {kept}"
        else:
            state, message = "failed", f"{_last_error(log) or f'the trainer exited with code {code}'} ({kept})"
        return TrainingStatus(self.name, state, step, self.total, losses, log, self.adapter, message,
                              self.latest_sample(), checkpoint, self.validation_metrics())

    def follow(self, interval: float = 0.5):
        """TrainingStatus every `interval` seconds while the run lasts, then the final one."""
        while self.running:
            yield self.status()
            time.sleep(interval)
        yield self.wait()


def run_steps(config, newer_than: float = 0.0) -> int | None:
    """The steps the run in config's folder trains, from the config.toml the trainer writes there (written after
    newer_than), or None before it has: --epochs turns into steps only once the trainer has bucketed the images."""
    import tomllib

    from stylelora.train.loop import CONFIG_FILE

    path = config.output_dir / CONFIG_FILE
    try:
        if path.stat().st_mtime < newer_than:
            return None
        return int(tomllib.loads(path.read_text(encoding="utf-8"))["train"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or being replaced
        return None


def _last_error(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1].strip()


def _child_env() -> dict:
    """The app's environment, with this checkout importable (also when it is not pip-installed)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env
