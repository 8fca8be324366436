"""A training run started from the app: `stylelora train` in a child process, followed through its output.

The settings become a TrainConfig through stylelora.config (validated here, so a bad value is refused at once with
the config's own message), saved as TOML and handed to `python -m stylelora.train.command train DATA --config`:
the exact CLI path, in its own process, so a run neither blocks nor slows the app's generation lock, cannot take
the app down, and can be stopped with Ctrl-C semantics (SIGINT: logs flushed, checkpoints whole). Progress and the
(smoothed) loss are read from the trainer's progress bar on stderr; the adapter path is the last stdout line.
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

from stylelora.app.service import AppError, plain_name

REQUEST_FILE = ".app-train.toml"
# tqdm's line: "training:  50%|█████     | 2/4 [00:01<00:01,  1.50step/s, loss=0.1234, lr=1.0e-03]"
BAR_LINE = re.compile(r"^training:.*?(\d+)/(\d+) \[(.*)\]\s*$")
POSTFIX_LOSS = re.compile(r"loss=([-+0-9.eE]+|nan|inf)")
LOG_LINES_KEPT = 200
OTHER_BARS = re.compile(r"\d+%\|")  # loading bars of diffusers/transformers: noise in the log


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

    def overrides(self, adapters_dir: Path) -> dict:
        """Config overrides as `stylelora train` flags give them; the run folder is adapters_dir/NAME."""
        name = plain_name(self.name, "Adapter name")
        data = Path(self.data_dir or "").expanduser()
        if not str(self.data_dir or "").strip() or not data.is_dir():
            raise AppError(f"Training data folder {self.data_dir!r} does not exist on the server; give the folder "
                           "of images (+ .txt captions), e.g. datasets/toy-stripes.")
        overrides = {key: value for key, value in self.options.items() if value is not None and value != ""}
        if overrides.get("network.train_text_encoder") is False:
            overrides.pop("optim.text_encoder_lr", None)  # the box may still hold a value; the config would refuse it
        overrides.update({"data.dir": str(data.absolute()), "train.base": self.base, "train.output_name": name,
                          "train.output": str(adapters_dir / name), "train.overwrite": bool(self.overwrite)})
        return overrides


@dataclass(frozen=True)
class TrainingStatus:
    """One look at a run: state ("running", "done", "failed", "stopped"), progress, loss, log, adapter."""

    name: str
    state: str
    step: int
    total: int
    losses: tuple[tuple[int, float], ...]
    log: str
    adapter: Path | None
    message: str

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


class TrainingJob:
    """One `stylelora train` child process and what its output said so far."""

    def __init__(self, name: str, config, process: subprocess.Popen) -> None:
        self.name, self.config, self.process = name, config, process
        self.total = config.train.steps
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self.stopped = False
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._read, args=(process.stderr, self._on_stderr), daemon=True),
                         threading.Thread(target=self._read, args=(process.stdout, self.stdout.append), daemon=True)]
        for reader in self._readers:
            reader.start()

    @classmethod
    def start(cls, settings: TrainSettings, adapters_dir: Path) -> TrainingJob:
        from stylelora.config import load_config, save_config

        config = load_config(None, settings.overrides(Path(adapters_dir)))
        if config.adapter_path.exists() and not config.train.overwrite:
            raise AppError(f"{config.adapter_path.name} exists already in {config.output_dir}: choose another name "
                           "or tick 'overwrite'.")
        request = save_config(config, config.output_dir / REQUEST_FILE)
        command = [sys.executable, "-m", "stylelora.train.command", "train", config.data.dir, "--config", str(request)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   encoding="utf-8", errors="replace", env=_child_env())
        return cls(config.train.output_name, config, process)

    # -- reading the child's output

    @staticmethod
    def _read(stream, handle) -> None:
        # Text mode turns tqdm's carriage returns into line ends, so each bar refresh arrives as one line.
        for line in stream:
            handle(line.rstrip("\n"))
        stream.close()

    def _on_stderr(self, line: str) -> None:
        bar = BAR_LINE.match(line.strip())
        with self._lock:
            if bar is None:
                if line.strip() and not OTHER_BARS.search(line):
                    self.lines = (self.lines + [line])[-LOG_LINES_KEPT:]
                return
            self.step, self.total = int(bar.group(1)), int(bar.group(2))
            loss = POSTFIX_LOSS.search(bar.group(3))
            if loss and (not self.losses or self.losses[-1][0] != self.step):
                self.losses.append((self.step, float(loss.group(1))))

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
        """Interrupt the run as Ctrl-C would (checkpoints stay whole; `--resume latest` continues it)."""
        if self.running:
            self.stopped = True
            self.process.send_signal(signal.SIGINT)

    def status(self) -> TrainingStatus:
        code = self.process.poll()
        with self._lock:
            log, losses, step = "\n".join(self.lines), tuple(self.losses), self.step
        if code is None:
            state, message = "running", f"step {step}/{self.total}"
        elif code == 0:
            for reader in self._readers:
                reader.join(timeout=5)
            state, message = "done", f"adapter written: {self.adapter}"
            losses = self.final_losses() or losses
            step = self.total
        elif self.stopped:
            state, message = "stopped", f"stopped at step {step}; the run folder is {self.config.output_dir}"
        else:
            state, message = "failed", _last_error(log) or f"the trainer exited with code {code}"
        return TrainingStatus(self.name, state, step, self.total, losses, log, self.adapter, message)

    def final_losses(self) -> tuple[tuple[int, float], ...]:
        """Every step's smoothed loss from the run's metrics.csv (written whole when a run ends)."""
        from stylelora.train.logs import METRICS_FILE

        path = self.config.output_dir / METRICS_FILE
        if not path.is_file():
            return ()
        with path.open(newline="", encoding="utf-8") as handle:
            return tuple((int(row["step"]), float(row["loss_smoothed"])) for row in csv.DictReader(handle))

    def follow(self, interval: float = 0.5):
        """TrainingStatus every `interval` seconds while the run lasts, then the final one."""
        while self.running:
            yield self.status()
            time.sleep(interval)
        yield self.wait()


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
