"""Owns training checkpoints: what goes in one, writing it atomically, keeping the last K, and resuming exactly.

A checkpoint is a folder `OUTPUT/checkpoints/step-000250/` holding
    lora_weights.safetensors     every trainable tensor, fp32, by parameter name (what training continues from)
    <name>-step000250.safetensors  the shareable adapter at that step (kohya or diffusers layout, with metadata)
    training_state.pt            step, optimizer, LR scheduler, grad scaler, data-sampler position, the run's config,
                                 the images trained on (folder/name and sha256 of each file)
    rng-rank<R>.pt               python / numpy / torch (+CUDA) RNG states and the noise generator, per process
It is written into `checkpoints/.tmp-step-000250/` and renamed into place once complete, so a crash leaves either
the whole checkpoint or none; `latest` only ever sees complete ones. Everything is stored as tensors and plain
Python values and read back with torch's weights_only loader (a checkpoint cannot run code).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from stylelora.config import DIM_FROM_WEIGHTS_KEYS, ConfigError, TrainConfig, config_to_dict
from stylelora.lora.io import write_safetensors_atomic

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "lora_weights.safetensors"
STATE_FILE = "training_state.pt"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
# Settings that may differ between a run and its resume without breaking exactness of what was trained so far.
# The learning rates, gradient clipping and precision are among them: changing them is how a diverged run continues
# from its last good checkpoint (as kohya's --resume allows); the loop applies new rates
# (optim.load_with_new_learning_rates).
RESUME_MAY_CHANGE = {
    "train": {"steps", "epochs", "resume", "save_every", "keep_checkpoints", "sample_every", "samples", "sample_prompts",
              "save_every_n_epochs", "sample_every_n_epochs",
              "sample_seed", "sample_steps", "sample_guidance", "output", "overwrite", "format", "precision",
              "save_precision", "validate_every", "validate_every_n_epochs", "max_validation_steps", "sample_at_first",
              "author", "tags", "license", "description"},
    "data": {"cache", "cache_dir"},
    # The warmup is past by the first checkpoint of any usual run; unset, it follows the steps (config.warmup_steps).
    "optim": {"unet_lr", "text_encoder_lr", "text_encoder_2_lr", "max_grad_norm", "warmup_steps"},
    # The file a run started from (--network-weights) sets only the first step's weights, which a checkpoint replaces.
    "network": {"weights"},
}
# The data folders are compared as the folders they name, not as typed: `data`, `./data/` and /abs/data are one.
# A folder that moved (another disk, another machine, another working directory) resumes when it holds the very
# images the checkpoint's run trained on, by name and content (image_changes): kohya's --resume does not look at
# --train_data_dir at all and its users copy datasets between machines, so refusing a moved folder would be a
# surprise; a folder that moved *and* changed is refused, as pointing at another dataset by mistake would be.
DATA_FOLDERS = ("dir", "reg_dir")
NAMES_SHOWN = 3  # image names shown per kind of change


class ResumeError(ValueError):
    """A checkpoint cannot be found or does not fit this run; the message says what to do."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder `step-NNNNNN` was saved at."""
    return int(CHECKPOINT_NAME.match(path.name).group(1))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders of a run, oldest first (temp folders of interrupted writes are ignored)."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(spec: str, run_dir: Path) -> Path:
    """The checkpoint folder `--resume` names: "latest" (newest complete one of this run) or a path."""
    if spec == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            raise ResumeError(_no_checkpoint_message(run_dir))
        return found[-1]
    path = Path(spec)
    if not path.exists():
        raise ResumeError(f"--resume {spec}: no such folder. Pass a run's checkpoint folder "
                          f"(OUTPUT/{CHECKPOINTS_DIR}/step-NNNNNN), its run folder or 'latest' (with --output).")
    if (path / STATE_FILE).is_file():
        return path
    latest = complete_checkpoints(path)  # a run folder was given: take its newest checkpoint
    if latest:
        return latest[-1]
    raise ResumeError(f"--resume {spec}: not a checkpoint folder (no {STATE_FILE} in it) nor a run folder with "
                      f"checkpoints. Pass OUTPUT/{CHECKPOINTS_DIR}/step-NNNNNN or 'latest'.")


def _no_checkpoint_message(run_dir: Path) -> str:
    """Why `--resume latest` finds nothing in `run_dir`, and what to do. A run with --save-every 0 has an adapter but
    no checkpoint; "check --output" would send its user looking for a folder they already gave."""
    found = f"--resume latest: no complete checkpoint in {run_dir / CHECKPOINTS_DIR}."
    if not any(run_dir.glob("*.safetensors")):
        return f"{found} Check --output (it must be the interrupted run's folder), or drop --resume to start a new run."
    return (f"{found} The run in {run_dir} finished without one: checkpoints are saved every --save-every steps, at "
            "the last step and when a run is stopped with Ctrl-C, and it ran with --save-every 0. Start it again with "
            "--overwrite and a --save-every above 0, so that --resume latest can continue it later.")


# ----------------------------------------------------------------------------- save


def trainable_tensors(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """{"unet.<param name>": param, "text_encoder.<...>": ...} for every parameter that trains."""
    return {f"{prefix}.{name}": param for prefix, model in models.items() if model is not None
            for name, param in model.named_parameters() if param.requires_grad}


def save_checkpoint(run_dir: Path, step: int, *, accelerator, trainable: dict[str, torch.nn.Parameter],
                    training_state: dict[str, Any], rng_state: dict[str, Any],
                    write_adapter: Callable[[Path], Path], keep: int) -> Path:
    """Write checkpoint `step` atomically on the main process (every process adds its own RNG state)."""
    final, temp = checkpoint_dir(run_dir, step), run_dir / CHECKPOINTS_DIR / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)  # left over from a crash mid-write
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_torch(rng_state, temp / f"rng-rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        weights = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in trainable.items()}
        write_safetensors_atomic(temp / WEIGHTS_FILE, weights, {})
        _save_torch(training_state, temp / STATE_FILE)
        write_adapter(temp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # a resumed run re-reaching a step it had saved before
        os.replace(temp, final)
        prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_temp_checkpoints(run_dir: Path) -> None:
    """Temp folders of checkpoints a killed process never finished: never valid, safe to delete."""
    folder = run_dir / CHECKPOINTS_DIR
    for temp in folder.glob(".tmp-step-*") if folder.is_dir() else []:
        shutil.rmtree(temp, ignore_errors=True)


def _save_torch(value: Any, path: Path) -> None:
    torch.save(value, path)
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- RNG


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state this process's training draws from, in weights_only-loadable form."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- load


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's training state (step, optimizer, scheduler, sampler, config), touching no model."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def restore_weights_and_rng(path: Path, *, process_index: int, trainable: dict[str, torch.nn.Parameter],
                            generator: torch.Generator) -> None:
    """Copy the saved LoRA weights into `trainable` and restore this process's random states."""
    rng_file = path / f"rng-rank{process_index}.pt"
    if not rng_file.is_file():
        raise ResumeError(f"{path} has no random state for process {process_index}: it was saved by a run with fewer "
                          "processes. Resume with the same number of processes (world size) as the original run.")
    _load_weights(path / WEIGHTS_FILE, trainable)
    restore_rng(torch.load(rng_file, map_location="cpu", weights_only=True), generator)


def _load_weights(file: Path, trainable: dict[str, torch.nn.Parameter]) -> None:
    saved = load_file(str(file))
    missing, unexpected = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
    if missing or unexpected:
        raise ResumeError(f"{file.parent} holds a different LoRA ({len(missing)} tensors missing, e.g. {missing[:2]}; "
                          f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}): it was made with other network "
                          "settings or another base model. Resume with the original settings.")
    with torch.no_grad():
        for name, param in trainable.items():
            if saved[name].shape != param.shape:
                raise ResumeError(f"{file.parent}: {name} has shape {tuple(saved[name].shape)} but this run's is "
                                  f"{tuple(param.shape)}; resume with the original --rank / network settings.")
            param.copy_(saved[name])


def check_resumable(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]], path: Path, *,
                    image_changes: str | None = None) -> None:
    """Refuse a resume whose settings differ from the checkpoint's in ways that would change the result. A setting
    the checkpoint does not name (saved before that option existed) counts as that option's default.

    image_changes (see image_changes()): "" when the images are the checkpoint's, so its data folders may have
    moved; how they differ otherwise; None when the checkpoint does not record them (only the same folders)."""
    defaults = config_to_dict(TrainConfig())
    changed, moved = [], False
    for section in sorted(set(saved) | set(current)):
        allowed = RESUME_MAY_CHANGE.get(section, set())
        before, now = {**defaults.get(section, {}), **saved.get(section, {})}, current.get(section, {})
        if section == "network" and before.get("dim_from_weights") and now.get("dim_from_weights"):
            allowed = allowed | set(DIM_FROM_WEIGHTS_KEYS)  # the file's, which the resume takes from the checkpoint
        for key in sorted(set(before) | set(now)):
            if key in allowed or before.get(key) == now.get(key):
                continue
            if section == "data" and key in DATA_FOLDERS:
                if image_changes == "" or _same_folder(before.get(key), now.get(key)):
                    continue
                moved = True
            changed.append(f"{section}.{key}: {before.get(key)!r} → {now.get(key)!r}")
    if changed:
        raise ConfigError(f"cannot resume from {path}: these settings differ from the checkpoint's run: "
                          f"{'; '.join(changed)}. Use the original values (its settings are in "
                          f"{path.parent.parent / 'config.toml'}), or start a new run without --resume."
                          + (_moved_note(image_changes) if moved else ""))


def _same_folder(before: Any, now: Any) -> bool:
    if not before or not now:
        return not before and not now
    return Path(before).expanduser().resolve() == Path(now).expanduser().resolve()


def _moved_note(image_changes: str | None) -> str:
    if image_changes is None:
        return (" A data folder that moved resumes when it holds the same images, but this checkpoint was saved "
                "before checkpoints recorded their images: give the original folder.")
    return f" A data folder that moved resumes when it holds the same images; these differ: {image_changes}."


def image_changes(saved: dict[str, dict[str, str]] | None, current: dict[str, dict[str, str]]) -> str | None:
    """How the images differ from the ones a checkpoint's run trained on (loop.data_identity: {"train"/"reg":
    {folder/name: sha256}}): "" when they are the same, None when the checkpoint does not record them."""
    if saved is None:
        return None
    parts = []
    for role, label in (("train", "training"), ("reg", "regularization")):
        before, now = saved.get(role, {}), current.get(role, {})
        for verb, keys in (("added", now.keys() - before.keys()), ("removed", before.keys() - now.keys()),
                           ("changed", {key for key in now.keys() & before.keys() if now[key] != before[key]})):
            if keys:
                names = sorted(keys)
                shown = ", ".join(names[:NAMES_SHOWN]) + (f", +{len(names) - NAMES_SHOWN} more"
                                                          if len(names) > NAMES_SHOWN else "")
                parts.append(f"{len(names)} {label} image{'s' if len(names) > 1 else ''} {verb} ({shown})")
    return "; ".join(parts)
