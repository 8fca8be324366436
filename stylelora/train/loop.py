"""Owns a training run, from a validated config to the adapter file; `run_training` reads top to bottom.

    0. output      the folder checked before anything is written: a folder, outside the data, no other run in it
    1. data        scan + check every image (fails in seconds, before any model loads); planned from the base's
                   config files: a resume's checkpoint checked, the skip report, images upscaled a lot
    2. models      base model, resolution from it, LoRA on the UNet (+ text encoder)
    3. batches     dataset with the latent cache (and text cache for a frozen TE), one-bucket batch sampler
    4. optimizer   optimizer + LR schedule; accelerate wraps what trains (DDP under `accelerate launch`/`torchrun`)
    5. resume      weights, optimizer, schedule, RNGs and sampler position from a checkpoint
    6. train       loss_step → backward → clip → step, logged; samples and checkpoints every N steps
    7. adapter     OUTPUT/NAME.safetensors with full metadata, OUTPUT/config.toml

Only the main process writes files or prints; every process computes, and all of them stop together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch
from accelerate.utils import set_seed

from stylelora.atomic import file_in_the_way
from stylelora.config import (ConfigError, TrainConfig, config_to_dict, save_config, warmup_steps,
                              with_epoch_steps, with_model_defaults, with_sources, with_values)
from stylelora.data.buckets import BucketBatchSampler, BucketConfig
from stylelora.data.captions import CaptionOptions, caption_forms, caption_variants_note, long_captions_note
from stylelora.data.checks import (CheckedImage, CheckResult, alpha_mask_note, check_items, skip_summary,
                                   upscale_warning, upscaled_images, upscaled_notes, write_skip_report)
from stylelora.data.dataset import DatasetOptions, TrainingDataset, collate_samples
from stylelora.data.errors import DataError
from stylelora.data.latent_cache import LatentCache, TextEmbeddingCache, model_identity
from stylelora.data.scan import ScanReport, TrainItem, scan_folder, trigger_pattern
from stylelora.generate.prompt_reading import skip_last_layers
from stylelora.lora.adapter_file import AdapterFile
from stylelora.lora.components import pipeline_models, text_encoders
from stylelora.lora.inject import adapters_disabled
from stylelora.lora.max_norm import NormReport, cap_module_norms
from stylelora.models.heap import return_freed_memory
from stylelora.train import checkpoint
from stylelora.train.block_settings import block_plan, check_against_base
from stylelora.train.logs import METRICS_FILE, RunLog
from stylelora.train.losses import check_schedule
from stylelora.train.lora_dropout import add_lora_dropout
from stylelora.train.metadata import RunFacts, adapter_metadata
from stylelora.train.models import TrainModels, encode_pixels, text_encode_fn
from stylelora.train.network_weights import copy_start_weights, start_weights
from stylelora.train.noise import zero_terminal_snr
from stylelora.train.optim import (build_lr_scheduler, build_optimizer, load_with_new_learning_rates,
                                   optimizer_arguments, optimizer_class)
from stylelora.train.preservation import company_words, decoy_words, made_up_words, words_of
from stylelora.train.sample_prompts import ignored_options_note
from stylelora.train.samples import fill_trigger, sample_path, save_samples
from stylelora.train.step import loss_step, prediction_type
from stylelora.train.validation import (Validation, build_validation, measure, split_validation, validation_dataset,
                                        validation_note, validation_seed)

CONFIG_FILE = "config.toml"
SKIP_REPORT = "skipped.txt"
REG_SKIP_REPORT = "skipped-reg.txt"
IGNORED_NAMED = 5  # ignored files ScanReport.summary names; the skip report lists them all
# Latents are encoded up front in batches of at most 64 images and 64 x 32 x 32 pixels: the toy base's 32 px images
# go 64 at a time, a 256 px or larger image goes alone, as kohya's --vae_batch_size defaults to 1 (sd-scripts
# train_network.py). Measured on SD 1.5 at 256 px on CPU: 64 images at once made the VAE encoder's activations
# the run's peak memory.
CACHE_ENCODE_BATCH = 64
CACHE_ENCODE_PIXELS = 64 * 32 * 32
COMPANY_WORDS_SHOWN = 12  # company words named in the run's opening lines


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite numbers; the message names the step and what to do."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class DataPlan:
    items: tuple[TrainItem, ...]
    checked: CheckResult
    report: ScanReport
    triggers: tuple[str, ...]  # --trigger and the kohya folders' trigger words, each once
    reg: tuple[CheckedImage, ...] = ()  # regularization images, repeats balanced against the training samples
    reg_checked: CheckResult | None = None  # with --reg-dir: what its checks kept and skipped
    reg_report: ScanReport | None = None  # with --reg-dir: what its scan found and ignored
    validation: tuple[CheckedImage, ...] = ()  # with --validation-split: the held-out images, never trained


@dataclass
class Run:
    """Everything the training steps share (one object instead of a dozen arguments)."""

    config: TrainConfig
    accelerator: object
    run_dir: Path
    pipe: object
    models: TrainModels
    trainable: dict[str, torch.nn.Parameter]
    dataset: TrainingDataset
    sampler: BucketBatchSampler
    loader: torch.utils.data.DataLoader
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    generator: torch.Generator
    facts: RunFacts
    log: RunLog | None = None
    epoch: int = 0
    position: int = 0  # batches of the current epoch consumed (the sampler position saved in checkpoints)
    last_checkpoint: Path | None = None
    trained_modules: list = field(default_factory=list)
    images: dict = field(default_factory=dict)  # data_identity: what a checkpoint records of the images trained
    validation: Validation | None = None  # with --validation-split: the held-out images' loader


def run_training(config: TrainConfig) -> Path:
    """Train a LoRA as `config` says and return the path of the adapter file (the same on every process)."""
    # 1. Data, checked before any model is looked at: a folder with nothing usable fails in seconds.
    process = SimpleNamespace(is_main_process=os.environ.get("RANK", "0") == "0")  # before accelerate starts
    say = _printer(process)
    run_dir = config.output_dir
    resume_from = check_output_dir(config)  # before anything is written there
    data = prepare_data(config, run_dir, process, say)
    base_configs = check_base(config)  # what loading the base would refuse, from its config files alone

    # The base family's preset fills what flags and file left unset (precision, batch, LRs, sample prompts).
    config = with_family_preset(config, base_configs, data)
    config = _with_early_coined_trigger_rules(config, base_configs, data)
    # Planned from the base's config files, before its weights load (minutes on SDXL): a warmup longer than the
    # epochs' steps, a checkpoint made with other settings or other data are refused now; the skip report is
    # written once the resume is known to go ahead (a refused one leaves the run's report as it was).
    from stylelora.train.dry_run import plan_batches
    planned, buckets, _, processes = plan_batches(config, base_configs, data)
    resume_state = check_resume(planned, buckets, processes, data, resume_from)
    config, start = start_weights(config, resume_state, say, base_configs)  # --network-weights, before the base
    say(check_against_base(config, base_configs))  # kohya's block lists, against the UNet's blocks
    say(check_schedule(config, base_configs))
    say(describe_settings(config))
    say(ignored_options_note(config.train.sample_prompts or ()))
    report_data(planned, run_dir, data, process, say)
    accelerator = _accelerator(config)
    _clear_output_dir(config, run_dir, resume_from, accelerator)

    # 2. Base model and LoRA.
    pipe = _load_base(config, accelerator)
    check_family(config, pipe)
    config = with_coined_trigger_rules(run_settings(with_model_defaults(config, **model_geometry(pipe))),
                                       pipe.tokenizer, data.triggers)
    say(long_captions_note(data.items, pipe.tokenizer, config.data.caption_variants, config.data.max_token_length))
    _skip_clip_layers(config, pipe)
    set_seed(config.train.seed)  # identical LoRA initialisation on every process
    lora = _add_lora(config, pipe, start, say)

    # 3. Batches: cached latents (and text embeddings for a frozen text encoder), one bucket per batch.
    dataset, text_cache, validation = build_datasets(config, data, pipe, accelerator)
    sampler = BucketBatchSampler(dataset.buckets, config.train.batch_size, seed=config.train.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    # Its own generator: a loader draws a seed each time it starts an epoch, and drawn from torch's global one it
    # would move the state that LoRA dropout draws from (a resume starts its epoch at another step than the run did).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=0,
                                         generator=torch.Generator().manual_seed(config.train.seed))
    config = with_epoch_steps(config, len(sampler))  # --epochs: the steps they take, known once images are bucketed
    config = with_resumed_warmup(config, resume_state)

    # 4. Optimizer and schedule; accelerate wraps what trains (DDP when launched with several processes).
    run = _assemble(config, accelerator, run_dir, pipe, lora, dataset, text_cache, sampler, loader, data)
    run.validation = validation

    # 5. Resume exactly where a checkpoint left off.
    start_step = restore(run, resume_from, resume_state) if resume_from else 0
    say(resumed_schedule_note(run, resume_state))

    # 6. Train.
    if accelerator.is_main_process:
        save_config(config, run_dir / CONFIG_FILE)  # first, so even a killed run documents itself
    say(describe_run(run, start_step))
    run.log = RunLog(run_dir, total_steps=config.train.steps, start_step=start_step,
                     enabled=accelerator.is_main_process)
    try:
        with stop_after_the_step(enabled=accelerator.num_processes == 1) as stop_requested:
            train(run, start_step, stop_requested)
    except TrainingDiverged as diverged:
        run.log.close()
        raise TrainingDiverged(f"{diverged} {_after_divergence(run, diverged.step)}", diverged.step) from None
    except KeyboardInterrupt:
        run.log.close()  # the metrics so far stay readable; checkpoints are already whole
        raise

    # 7. The adapter people share, and the config that made it.
    adapter = finish(run)
    run.log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return adapter


# ----------------------------------------------------------------------------- 0. settings, process, output folder


def with_family_preset(config: TrainConfig, base_configs: Path, data: DataPlan | None = None) -> TrainConfig:
    """The config with the base family's preset filling what it left unset; the family is read from the base's
    config files (`base_configs`, from check_base; no weights) unless --family names it. With `data`, a real base's
    sample prompts are drawn from its captions; without, they stay unset until a second call."""
    from stylelora.models.family import folder_family
    from stylelora.presets import apply_preset

    t = config.train
    family = t.family or folder_family(base_configs)
    variants = config.data.caption_variants
    captions = ([form for item in data.items for form in caption_forms(item.caption, item.variants, variants)]
                if data is not None else None)
    return apply_preset(config, family, cuda=torch.cuda.is_available(), captions=captions,
                        triggers=data.triggers if data is not None else ())


def _with_early_coined_trigger_rules(config: TrainConfig, base_configs: Path, data: DataPlan) -> TrainConfig:
    """The coined-trigger rules applied from the tokenizer in the base's config folder, so that the settings block
    shows the values the run trains with; where the folder has none they are applied once the base loads."""
    tokenizer = folder_tokenizer(base_configs)
    return with_coined_trigger_rules(config, tokenizer, data.triggers) if tokenizer is not None else config


def check_base(config: TrainConfig) -> Path:
    """Raise now what the run raises as it loads the base, with the run's own checks, wherever they need no weights:
    a package --quantize-base or --optimizer needs that cannot be imported; a single-file base without config files
    or with another pipeline's (--base-config); a --family that is not the base's (SDXL or not). Returns the folder
    of config files the base loads with, so that the run looks it up once (a single file's header is read once)."""
    from stylelora.models.family import pipeline_config_folder, weightless_pipeline
    from stylelora.models.quantize import check_quantization

    t = config.train
    check_quantization(t.quantize_base)
    optimizer_arguments(config.optim.optimizer_args, optimizer_class(config.optim.optimizer))
    folder = pipeline_config_folder(t.base, config_dir=t.base_config, allow_pickle=t.allow_pickle)
    if t.family is not None:  # a detected family is read from this same folder
        check_family(config, weightless_pipeline(folder))
    return folder


def describe_settings(config: TrainConfig) -> str:
    """The base family and every setting that its preset, the TOML file or a flag chose, with where from."""
    from stylelora.presets import FAMILY_NAMES

    family = config.train.family
    lines = [f"base family: {family} ({FAMILY_NAMES[family]}; {config.source_of('train.family')})"]
    for key, source in config.sources:
        if key in ("train.family", "data.dir"):
            continue
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        shown = (f"{len(value)} prompts" if isinstance(value, tuple) else
                 "the base's (read when it loads)" if value is None else repr(value))  # e.g. the native resolution
        if key == "train.steps" and config.train.epochs is not None and "epochs" not in source:
            # --epochs wins over --steps, as in kohya; said here, where the given value is listed.
            shown += f", not used: --epochs {config.train.epochs} sets the steps"
        lines.append(f"  {key} = {shown}  ({source})")
    return "\n".join(lines)



def run_settings(config: TrainConfig) -> TrainConfig:
    """The config as saved with the run (config.toml, metadata, checkpoints): what it trains, not how it was started.

    Without this, re-using a run's config.toml would silently resume or overwrite.
    """
    return dataclasses.replace(config, train=dataclasses.replace(config.train, resume=None, overwrite=False))


def folder_tokenizer(folder: Path | None):
    """The base's (first) tokenizer from its config folder, which holds no weights; None where the folder has none
    (a single file without --base-config, or a hub id not yet found)."""
    if folder is None or not (folder / "tokenizer").is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "tokenizer")


def with_coined_trigger_rules(config: TrainConfig, tokenizer, triggers: tuple[str, ...]) -> TrainConfig:
    """`config` with what a coined trigger (one `tokenizer` splits into several tokens) changes, where the user left
    it to the defaults: made_up_company, where unset, on exactly when a trigger is coined; and the base family's
    values for a coined trigger (stylelora.presets.COINED_TRIGGER_PRESETS: on the toy base the text encoder's rate,
    and no text noise).

    Why: a coined trigger reaches the text encoder as fragments, and made-up company words (fragments too) teach the
    adapter which fragments are its trigger: the toy ink adapter (`inkstyle`, four tokens) drew its style on 0.94 of
    its prompts with them and on 0.58 without. An adapter whose trigger is one token gains nothing it needs and gives
    way in blends (docs/results.md, "A style the defaults were never tuned on")."""
    from stylelora.presets import apply_coined_trigger_preset

    coined = tuple(trigger for trigger in triggers if len(tokenizer.tokenize(trigger)) > 1)
    config = apply_coined_trigger_preset(config, coined)
    if config.train.made_up_company is not None:
        return config
    train = dataclasses.replace(config.train, made_up_company=bool(coined))
    source = (f"on: the base's tokenizer splits {', '.join(repr(t) for t in coined)} into several tokens" if coined
              else "off: every trigger is one token to the base's tokenizer" if triggers
              else "off: the captions have no trigger words")
    return with_sources(dataclasses.replace(config, train=train), {"train.made_up_company": source})


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    mixed = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[config.train.precision]
    # SDXL reads text encoder 1's penultimate layer, so the LoRA of its last layer gets no gradient (kohya trains
    # and writes it all the same): DDP must be told that some parameters sit out.
    unused = config.train.family == "sdxl" and config.network.train_text_encoder
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else []
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=config.optim.grad_accum,
                       cpu=_launched_on_cpus(), kwargs_handlers=handlers)


def _launched_on_cpus() -> bool:
    """True under torchrun / accelerate launch without a GPU: accelerate only sets up CPU (gloo) DDP when told."""
    import os

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("LOCAL_RANK") is not None
    return several and not torch.cuda.is_available()


def _printer(accelerator):
    def say(message: str) -> None:
        if accelerator.is_main_process and message:
            print(message, file=sys.stderr, flush=True)  # stdout carries only the adapter path

    return say


def check_output_dir(config: TrainConfig) -> Path | None:
    """Refuse an output folder this run must not write into, before anything is written anywhere; return the
    checkpoint that --resume names (None without --resume).

    A folder holding another training run is refused unless --resume continues it or --overwrite replaces it: the
    new run would replace its config.toml, metrics, loss plot, samples and skip report.
    """
    run_dir = config.output_dir
    _check_output_location(config, run_dir)
    if config.train.resume:
        return checkpoint.resolve_resume(config.train.resume, run_dir)
    existing = existing_run_files(run_dir)
    if existing and not config.train.overwrite:
        resumable = checkpoint.complete_checkpoints(run_dir)
        choices = ("Continue it with --resume latest, choose another --output, or pass --overwrite to start over "
                   "there (its checkpoints are deleted)." if resumable else
                   "Choose another --output, or pass --overwrite to replace its config.toml, logs and samples there.")
        raise ConfigError(f"{run_dir} already holds a training run ({', '.join(existing[:3])}). {choices}")
    return None


def existing_run_files(run_dir: Path) -> list[str]:
    """What shows that `run_dir` holds a training run worth keeping: an adapter (any .safetensors, whatever its
    output name) beside a run's log (metrics.csv), or a complete checkpoint.

    Why not config.toml or metrics.csv alone: --dry-run writes config.toml for the run it plans, and a run stopped
    before its first checkpoint left nothing to continue; refusing those would make the user pass --overwrite for
    nothing. Why not a .safetensors alone: a folder of downloaded adapters (A1111's models/Lora) is no run.
    """
    if not run_dir.is_dir():
        return []
    logged = (run_dir / METRICS_FILE).is_file()
    found = sorted(p.name for p in run_dir.glob("*.safetensors") if p.is_file()) if logged else []
    return found + [f"{checkpoint.CHECKPOINTS_DIR}/{p.name}" for p in checkpoint.complete_checkpoints(run_dir)]


def _check_output_location(config: TrainConfig, run_dir: Path) -> None:
    """The output must be a folder (or a path one can be made at) outside the data: a run writes loss.png and sample
    grids, which a later scan of the data folder would take for training images."""
    blocking = file_in_the_way(run_dir)
    if blocking is not None:
        raise ConfigError(f"--output {run_dir}: {blocking} is a file, not a folder. Give --output a folder "
                          "for the run's files (it is created if missing), e.g. --output outputs/NAME.")
    for role, folder in (("training data", config.data.dir), ("regularization (--reg-dir)", config.data.reg_dir)):
        if folder and run_dir.resolve().is_relative_to(Path(folder).resolve()):
            raise ConfigError(f"--output {run_dir} is the {role} folder {folder} or inside it: the run's loss "
                              "plot and sample images would be written into the dataset and trained on next time. "
                              "Choose an output folder outside it, e.g. --output outputs/NAME.")


def _clear_output_dir(config: TrainConfig, run_dir: Path, resume_from: Path | None, accelerator) -> None:
    """Remove what this run must not find: temp folders of checkpoints a killed run never finished and, with
    --overwrite (and no --resume), the replaced run's checkpoints."""
    if accelerator.is_main_process:
        checkpoint.remove_temp_checkpoints(run_dir)
        if resume_from is None and config.train.overwrite:
            shutil.rmtree(run_dir / checkpoint.CHECKPOINTS_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- 1. data


def prepare_data(config: TrainConfig, run_dir: Path | None, accelerator, say) -> DataPlan:
    """Scan and check every image; DataError (before any model loads) if none is usable. `run_dir`: where
    report_data writes the skip report once the run is planned, named in the lines said here; None where none is
    written (a dry run of a resume leaves the run's own report alone)."""
    items, report = scan_folder(config.data.dir, extra_trigger=config.data.trigger or None)
    checked = check_items(items)
    say(report.summary(left_out=frozenset(skipped.path for skipped in checked.skipped)))
    say(ignored_files_note(report, run_dir))
    say(caption_variants_note(items, config.data.caption_variants))
    if config.data.alpha_mask:
        say(alpha_mask_note(checked.kept))
    report_path = run_dir / SKIP_REPORT if run_dir is not None and checked.skipped else None
    if accelerator.is_main_process:
        say(skip_summary(checked.skipped, checked.total, report_path))
    kept, held = split_validation(checked.kept, config.data.validation_split, validation_seed(config))
    checked = CheckResult(kept=kept, skipped=checked.skipped)
    say(validation_note(held, len(kept) + len(held), config.train))
    reg_checked, reg_report = (prepare_reg_data(config, run_dir, say) if config.data.reg_dir else (None, None))
    reg = balanced_reg_images(reg_checked, checked.kept) if reg_checked else ()
    kept = tuple(c.item for c in checked.kept)
    unused = unused_folder_triggers(report, kept)
    say(unused_folder_triggers_note(unused))
    triggers = trigger_phrases(config, report, unused, kept)
    if reg_checked is not None:
        say(reg_conflicts_note(config, checked, reg_checked, triggers))
    return DataPlan(items=kept, checked=checked, report=report, triggers=triggers, reg=reg, reg_checked=reg_checked,
                    reg_report=reg_report, validation=tuple(held))


def ignored_files_note(report: ScanReport, run_dir: Path | None, file_name: str = SKIP_REPORT) -> str | None:
    """Where every ignored file is listed, when the scan's summary cannot name them all."""
    if len(report.ignored) <= IGNORED_NAMED or run_dir is None:
        return None
    return f"every ignored file is listed with its reason in {run_dir / file_name}"


def report_data(planned: TrainConfig, run_dir: Path | None, data: DataPlan, accelerator, say) -> None:
    """Write the skip reports (skipped images, ignored files, images upscaled a lot) into `run_dir` (None: write
    nothing) and warn about the images upscaled more than MAX_UPSCALE times. `planned`: the config with the
    resolution known (plan_batches), as the buckets follow it."""
    upscaled = upscaled_images([*data.checked.kept, *data.reg], dataset_options(planned).buckets)
    report_path = run_dir / SKIP_REPORT if run_dir is not None else None
    say(upscale_warning(upscaled, planned.data.resolution, report_path))
    if report_path is None or not accelerator.is_main_process:
        return
    write_skip_report(run_dir, data.checked.skipped, ignored=data.report.ignored,
                      upscaled=[(image.path, note) for image, note in upscaled_notes(upscaled)])
    if data.reg_checked is not None and (data.reg_checked.skipped or data.reg_report.ignored):
        write_skip_report(run_dir, data.reg_checked.skipped, file_name=REG_SKIP_REPORT,
                          ignored=data.reg_report.ignored)


def trigger_phrases(config: TrainConfig, report: ScanReport, unused: list[tuple[str, str]],
                    items: tuple[TrainItem, ...]) -> tuple[str, ...]:
    """--trigger and the kohya folders' trigger words, each once, in that order, but for the `unused` ones
    (unused_folder_triggers): captions win over the folder name (as in kohya), so the adapter never learns such a
    word, and the file's trigger words (A1111's activation text) must not ask users to type it."""
    left_out = {trigger for _, trigger in unused}
    trained = {item.folder for item in items}  # a folder whose images were all skipped or held out trains nothing
    triggers = [config.data.trigger] + [f.trigger for f in report.folders
                                        if f.trigger.strip() not in left_out and f.name in trained]
    return tuple(dict.fromkeys(t.strip() for t in triggers if t and t.strip()))


def unused_folder_triggers_note(unused: list[tuple[str, str]]) -> str | None:
    """A warning naming each kohya folder whose trigger word none of its captions hold (unused_folder_triggers)."""
    if not unused:
        return None
    named = "; ".join(f"{folder}: '{trigger}'" for folder, trigger in unused)
    return (f"warning: a folder's trigger words are in none of its captions ({named}). Captions win over the folder "
            "name, so the adapter does not learn them and they are not recorded as trigger words; add them to the "
            "captions (or pass --trigger WORDS, which puts them in front of every caption).")


def unused_folder_triggers(report: ScanReport, items: tuple[TrainItem, ...]) -> list[tuple[str, str]]:
    """(folder name, trigger) for each kohya folder whose trigger no caption (or caption variant) of it holds."""
    unused = []
    for folder in report.folders:
        if not folder.trigger.strip():
            continue
        pattern = trigger_pattern(folder.trigger.strip())
        texts = [text for item in items if item.folder == folder.name for text in (item.caption, *item.variants)]
        if texts and not any(pattern.search(text) for text in texts):
            unused.append((folder.name, folder.trigger.strip()))
    return unused


def prepare_reg_data(config: TrainConfig, run_dir: Path | None, say) -> tuple[CheckResult, ScanReport]:
    """Scan and check the regularization images (DataError naming them when none is usable)."""
    items, report = scan_folder(config.data.reg_dir, role="regularization")
    checked = check_items(items, role="regularization")
    summary = report.summary(left_out=frozenset(skipped.path for skipped in checked.skipped))
    # Every line prefixed: the lines after the first ("5 images have no caption …") read as the training data's.
    say("\n".join(f"regularization: {line}" for line in summary.splitlines()))
    say(ignored_files_note(report, run_dir, REG_SKIP_REPORT))
    if checked.skipped:
        report_path = run_dir / REG_SKIP_REPORT if run_dir is not None else None
        say("regularization: " + skip_summary(checked.skipped, checked.total, report_path))
    return checked, report


def reg_conflicts_note(config: TrainConfig, train: CheckResult, reg: CheckResult,
                       triggers: tuple[str, ...]) -> str | None:
    """A warning naming the regularization images that are training images too (the same file contents) or whose
    captions hold this run's trigger words; DataError when they are all the training images' own files (--reg-dir
    given the data folder or one of its kohya folders). Why: reg images are trained as what prompts without the
    trigger draw, so these pull the adapter back toward the base's look on the very images and words it is to
    learn (all of them: the run would teach nothing); kohya trains them without a word. A kohya reg folder is named
    after the class (1_woman), not the trigger."""
    trained = {image.path.resolve() for image in train.kept}
    if reg.kept and all(image.path.resolve() in trained for image in reg.kept):
        raise DataError(f"the images of --reg-dir {config.data.reg_dir} are the training images of "
                        f"{config.data.dir}, so they would be trained as regularization images against themselves. "
                        "Regularization images are other pictures of the class, without the style or character "
                        "(e.g. drawn by the base from the class prompt): point --reg-dir at such a folder, or leave "
                        "it out (base preservation, on by default, keeps prompts without the trigger close to the "
                        "base).")
    training = {image.sha256 for image in train.kept}
    copies = [image.item.key for image in reg.kept if image.sha256 in training]
    patterns = [trigger_pattern(trigger) for trigger in triggers]
    with_trigger = [image.item.key for image in reg.kept
                    if any(p.search(text) for p in patterns for text in (image.item.caption, *image.item.variants))]
    found = [f"{what} ({len(names)}): {', '.join(names[:5])}{f' +{len(names) - 5} more' if len(names) > 5 else ''}"
             for names, what in ((copies, "copies of training images"),
                                 (with_trigger, f"captions with the trigger words '{' / '.join(triggers)}'"))
             if names]
    if not found:
        return None
    return (f"warning: regularization images that work against the training: {'; '.join(found)}. They teach what "
            "prompts without the trigger draw: remove copies of training images from --reg-dir, and name a kohya "
            "reg folder after the class (1_woman, not 1_<trigger>) with the trigger kept out of its captions.")


def balanced_reg_images(checked: CheckResult, train: list[CheckedImage]) -> tuple[CheckedImage, ...]:
    """kohya's rule: reg images repeat (or are cut) so an epoch holds as many reg samples as training samples."""
    wanted = sum(c.item.repeats for c in train)
    cycle = [c.item.key for c in checked.kept for _ in range(c.item.repeats)]
    counts = Counter(cycle[k % len(cycle)] for k in range(wanted))
    return tuple(dataclasses.replace(c, item=dataclasses.replace(c.item, repeats=counts[c.item.key]))
                 for c in checked.kept if counts[c.item.key])


# ----------------------------------------------------------------------------- 2. models


def _load_base(config: TrainConfig, accelerator):
    from stylelora.models.load import PRECISIONS, load_base
    from stylelora.models.quantize import check_quantization, quantize_frozen_base

    quantize = config.train.quantize_base
    check_quantization(quantize)  # a missing bitsandbytes fails before anything loads
    if not accelerator.is_main_process:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # one loading bar, not one per process
    pipe = load_base(config.train.base, precision=config.train.precision, device=str(accelerator.device),
                     allow_pickle=config.train.allow_pickle, config_dir=config.train.base_config)
    if quantize != "none":  # before LoRA is added, so peft wraps the quantized layers with its bitsandbytes LoRA ones
        quantize_frozen_base(pipe, quantize, getattr(torch, PRECISIONS[config.train.precision]),
                             text_encoders=not config.network.train_text_encoder)
    return pipe


def check_family(config: TrainConfig, pipe) -> None:
    """Refuse a --family that names SDXL for a base that is not, or the reverse: the file's names, metadata and
    conditioning all follow the loaded model."""
    from stylelora.lora.components import base_family_label, is_sdxl, pipeline_models
    from stylelora.presets import FAMILY_NAMES

    family, models = config.train.family, pipeline_models(pipe)
    if (family == "sdxl") != is_sdxl(models):
        wanted = FAMILY_NAMES[family]
        article = "an" if wanted.startswith("S") else "a"  # "an SD 1.x", "an SDXL": said "ess-dee"
        raise ConfigError(f"train.family is {family!r} ({config.source_of('train.family')}) but the base "
                          f"{config.train.base} is an {base_family_label(models)} model; drop --family to use the "
                          f"detected one, or pass {article} {wanted} base.")


def model_geometry(pipe) -> dict[str, int]:
    """Native image size (UNet sample size × VAE factor) and the downsampling factor image sides must divide by."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    sample_size = pipe.unet.config.sample_size
    sample_size = sample_size if isinstance(sample_size, int) else min(sample_size)
    unet_factor = 2 ** (len(pipe.unet.config.down_block_types) - 1)
    return {"native_resolution": sample_size * vae_factor, "downsample_factor": vae_factor * unet_factor}


def _skip_clip_layers(config: TrainConfig, pipe) -> None:
    """--clip-skip, for the whole run: training, preservation, company words and sample grids."""
    if config.train.clip_skip > 1:
        try:
            skip_last_layers(pipe.text_encoder, config.train.clip_skip - 1)
        except ValueError as error:
            raise ConfigError(f"train.clip_skip: {error}") from None


def _add_lora(config: TrainConfig, pipe, start: AdapterFile | None = None, say=lambda message: None):
    """The run's LoRA on the UNet (and the text encoders it trains): fresh, or with --network-weights the file's."""
    from stylelora.lora.inject import add_lora

    n = config.network
    encoders = text_encoders(pipe)
    blocks = block_plan(config, pipe.unet.config, config.train.family == "sdxl")  # kohya's block lists, if set
    lora = add_lora(pipe.unet, pipe.text_encoder, rank=n.rank, alpha=n.alpha, unet_targets=n.unet_targets,
                    train_text_encoder=n.train_text_encoder, conv_rank=n.conv_rank, conv_alpha=n.conv_alpha,
                    text_encoder_2=encoders.get("text_encoder_2"), unet_shape=blocks and blocks.shape,
                    unet_lr_weight=blocks and blocks.lr_weight)
    if start is not None:
        say(copy_start_weights(start, pipeline_models(pipe), n))
    add_lora_dropout([pipe.unet, *encoders.values()], n)  # hooks that act only while the modules train
    pipe.vae.requires_grad_(False).eval()
    pipe.unet.train()
    for encoder in encoders.values():
        encoder.train(n.train_text_encoder)
    if config.train.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if n.train_text_encoder:
            for encoder in encoders.values():
                _enable_text_encoder_checkpointing(encoder)
    return lora


def _enable_text_encoder_checkpointing(text_encoder) -> None:
    # transformers 5.x renamed it; non-reentrant checkpointing works with a frozen base (inputs need no grad).
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------- 3. batches


def dataset_options(config: TrainConfig) -> DatasetOptions:
    d = config.data
    min_side, max_side = (d.min_side, d.max_side) if d.bucketing else (d.resolution, d.resolution)
    buckets = BucketConfig(resolution=d.resolution, step=d.bucket_step, min_side=min_side, max_side=max_side,
                           no_upscale=d.no_upscale)
    captions = CaptionOptions(shuffle_tags=d.shuffle_tags, keep_tokens=d.keep_tokens,
                              caption_dropout=d.caption_dropout, tag_dropout=d.tag_dropout,
                              variants=d.caption_variants)
    return DatasetOptions(buckets=buckets, captions=captions, random_crop=d.random_crop, flip=d.flip,
                          seed=config.train.seed, alpha_mask=d.alpha_mask)


def build_dataset(config: TrainConfig, data: DataPlan, pipe, accelerator):
    """The dataset with its latents encoded once up front, and a text-embedding cache when the TE is frozen."""
    d, device = config.data, accelerator.device
    cache_root = Path(d.cache_dir) if d.cache_dir else config.output_dir / "cache"
    options = dataset_options(config)
    latent_cache = None
    if d.cache != "none":
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        latent_cache = LatentCache(lambda pixels: encode_pixels(pipe.vae, pixels.to(device), upcast=sdxl),
                                   model_identity("vae", pipe.vae),
                                   cache_root / "latents" if d.cache == "disk" else None)
    dataset = TrainingDataset(data.checked.kept, options, latent_cache=latent_cache, reg_images=data.reg,
                              prior_loss_weight=d.prior_loss_weight)
    if latent_cache is not None:
        # With a shared disk cache the main process encodes and the others then find every entry.
        with accelerator.main_process_first() if d.cache == "disk" else contextlib.nullcontext():
            dataset.cache_latents(batch_size=CACHE_ENCODE_BATCH, max_pixels=CACHE_ENCODE_PIXELS)
    text_cache = None
    if not config.network.train_text_encoder and options.captions.is_static and d.cache != "none":
        # Frozen encoders (both of SDXL's, as kohya's sdxl_train_network caches them): each caption encoded once.
        te_2, tokenizer_2 = getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None)
        identity = model_identity("text_encoder", pipe.text_encoder) + f"+vocab{len(pipe.tokenizer)}"
        identity += f"+clipskip{config.train.clip_skip}" if config.train.clip_skip > 1 else ""  # another reading
        identity += f"+tokens{d.max_token_length}" if d.max_token_length > 75 else ""  # and a longer one
        if te_2 is not None:
            identity += "+" + model_identity("text_encoder_2", te_2) + f"+vocab{len(tokenizer_2)}"
        text_cache = TextEmbeddingCache(text_encode_fn(pipe.text_encoder, pipe.tokenizer, device, te_2, tokenizer_2,
                                                       d.max_token_length),
                                        identity, cache_root / "text" if d.cache == "disk" else None)
    return dataset, text_cache


def build_datasets(config: TrainConfig, data: DataPlan, pipe, accelerator):
    """(training dataset, text cache, held-out images' Validation or None), every latent cached; the VAE is freed
    after when nothing decodes again."""
    dataset, text_cache = build_dataset(config, data, pipe, accelerator)
    validation = held_out(config, data, dataset, accelerator)
    if dataset.latent_cache is not None and not config.train.samples:
        release_vae(pipe)
    return dataset, text_cache, validation


def held_out(config: TrainConfig, data: DataPlan, dataset: TrainingDataset, accelerator) -> Validation | None:
    """The validation loader over the held-out images (None without --validation-split), their latents cached
    beside the training images' while the VAE is loaded."""
    if not data.validation:
        return None
    held = validation_dataset(data.validation, dataset.options, dataset.latent_cache)
    if held.latent_cache is not None:
        with accelerator.main_process_first() if config.data.cache == "disk" else contextlib.nullcontext():
            held.cache_latents(batch_size=CACHE_ENCODE_BATCH, max_pixels=CACHE_ENCODE_PIXELS)
    return build_validation(config, held, accelerator)


def release_vae(pipe) -> None:
    """Free the VAE's weights once every latent is cached and no sample will be decoded (--no-samples): nothing
    reads it again, and on SD 1.5 it is 320 MB of fp32 weights held through every training step."""
    pipe.vae.to("meta")
    return_freed_memory()


# ----------------------------------------------------------------------------- 4. optimizer and accelerate


def _assemble(config, accelerator, run_dir, pipe, lora, dataset, text_cache, sampler, loader, data) -> Run:
    from diffusers import DDPMScheduler

    optimizer = build_optimizer(config, lora)
    lr_scheduler = build_lr_scheduler(config, optimizer)  # stepped by us once per optimizer step, not prepared
    encoders = text_encoders(pipe)
    trained = {"unet": pipe.unet, **{name: model for name, model in encoders.items() if getattr(lora, name)}}
    *prepared, optimizer = accelerator.prepare(*trained.values(), optimizer)
    wrapped = {**encoders, **dict(zip(trained, prepared))}
    trained_modules = list(prepared)
    decoys = _decoys(config, data, pipe.tokenizer)
    models = TrainModels(unet=wrapped["unet"], text_encoder=wrapped["text_encoder"], tokenizer=pipe.tokenizer,
                         vae=None if dataset.latent_cache is not None else pipe.vae, device=accelerator.device,
                         dtype=pipe.unet.dtype, text_cache=text_cache,
                         triggers=data.triggers, decoys=decoys, company=_company(config, data, pipe, decoys),
                         unwrapped=(pipe.unet, *encoders.values()), sdxl="text_encoder_2" in encoders,
                         text_encoder_2=wrapped.get("text_encoder_2"), tokenizer_2=getattr(pipe, "tokenizer_2", None),
                         max_tokens=config.data.max_token_length)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config,  # the base sampler's noise schedule
                                                **zero_terminal_snr(config.train.zero_terminal_snr))
    # Each process draws its own noise; the seed makes every run (and every resume) draw the same.
    generator = torch.Generator().manual_seed(config.train.seed * 1009 + accelerator.process_index)
    trainable = checkpoint.trainable_tensors({"unet": pipe.unet, **encoders})
    num_reg = sum(c.item.repeats for c in data.reg)
    facts = RunFacts(items=data.items, num_train_images=len(dataset) - num_reg, num_reg_images=num_reg,
                     trigger=", ".join(data.triggers),
                     prediction_type=prediction_type(noise_scheduler), started_at=time.time(),
                     world_size=accelerator.num_processes, batches_per_epoch=len(sampler),
                     company_words=models.company, base_hashes=_base_hashes(config, accelerator))
    return Run(config=config, accelerator=accelerator, run_dir=run_dir, pipe=pipe, models=models, trainable=trainable,
               dataset=dataset, sampler=sampler, loader=loader, noise_scheduler=noise_scheduler, optimizer=optimizer,
               lr_scheduler=lr_scheduler, generator=generator, facts=facts, trained_modules=trained_modules,
               images=data_identity(data))


def _base_hashes(config: TrainConfig, accelerator) -> tuple[tuple[str, str], ...]:
    from stylelora.generate.base_identity import kohya_base_hashes

    # Only the main process writes metadata; hashing gigabytes on every process would only cost time.
    return tuple(kohya_base_hashes(config.train.base).items()) if accelerator.is_main_process else ()


def _decoys(config: TrainConfig, data: DataPlan, tokenizer) -> tuple[str, ...]:
    t = config.train
    wanted = (t.preserve_base > 0 and t.preserve_decoys > 0) or t.decoy_company > 0
    if not wanted or not data.triggers:
        return ()
    captions = [item.caption for item in data.items] + [checked.item.caption for checked in data.reg]
    return decoy_words(tokenizer, captions, data.triggers)


def _company(config: TrainConfig, data: DataPlan, pipe, decoys: tuple[str, ...]) -> tuple[str, ...]:
    if config.train.decoy_company <= 0 or not decoys:
        return ()
    captions = [item.caption for item in data.items]
    encode = text_encode_fn(pipe.text_encoder, pipe.tokenizer, next(pipe.text_encoder.parameters()).device)
    with adapters_disabled(pipe.text_encoder):  # the base's reading of each word, whatever the LoRA holds
        quiet = company_words(encode, pipe.tokenizer, captions, data.triggers, decoys)
    if not config.train.made_up_company:
        return quiet
    # As many made-up words as quiet ones: what another adapter's trigger most often is (preservation.made_up_words).
    return quiet + made_up_words(pipe.tokenizer, words_of([*captions, *data.triggers]), count=len(quiet))


def describe_run(run: Run, start_step: int) -> str:
    from stylelora.presets import coined_trigger_choices

    c, acc = run.config, run.accelerator
    per_step = c.train.batch_size * c.optim.grad_accum * acc.num_processes
    epochs = c.train.steps * c.optim.grad_accum / max(1, len(run.sampler))
    lora_params = sum(p.numel() for p in run.trainable.values())
    lines = [
        f"base {c.train.base} ({c.data.resolution} px, {run.facts.prediction_type} prediction); LoRA rank "
        f"{c.network.rank} alpha {c.network.alpha:g} on the UNet ({c.network.unet_targets})"
        + (_text_encoders_trained(run.pipe) if c.network.train_text_encoder else "")
        + f": {lora_params / 1e6:.2f} M trainable",
        f"{len(run.dataset)} samples per epoch in {len(set(run.dataset.buckets))} bucket(s), "
        f"{len(run.sampler)} batches per epoch per process; cache: {c.data.cache}",
        f"world size {acc.num_processes} ({acc.device}, {c.train.precision}): {c.train.steps} steps × batch "
        f"{c.train.batch_size} × accumulation {c.optim.grad_accum} × {acc.num_processes} process(es) = "
        f"{per_step} samples per step, {epochs:.1f} epochs; LR warmup {warmup_steps(c)} steps",
    ]
    lines.append(_describe_preservation(c, run.models.triggers, run.models.decoys, run.models.company))
    # Named again here: where the base's folder holds no tokenizer they were set after the settings were printed,
    # once the base loaded (with_coined_trigger_rules). One line per reason, each naming the values it set.
    by_source: dict[str, list[str]] = {}
    for key, source in coined_trigger_choices(c):
        section, name = key.split(".")
        by_source.setdefault(source, []).append(f"{key} = {getattr(getattr(c, section), name):g}")
    lines += [f"{', '.join(values)} ({source})" for source, values in by_source.items()]
    if start_step:
        lines.append(f"resuming at step {start_step} from {run.last_checkpoint}")
    return "\n".join(lines)


def _text_encoders_trained(pipe) -> str:
    return " and both text encoders" if len(text_encoders(pipe)) > 1 else " and text encoder"


def preservation_off(config: TrainConfig, triggers: tuple[str, ...]) -> str | None:
    """Why base preservation is off for this run (a line for the run's opening and for --dry-run), or None."""
    if config.train.preserve_base <= 0:
        return "base preservation: off (--preserve-base 0): the adapter may act on prompts without its trigger"
    if not triggers:
        return ("base preservation: off, the captions have no trigger words (use a <repeats>_<trigger> folder or "
                "--trigger WORD to tie the adapter to a word)")
    return None


def _describe_preservation(config: TrainConfig, triggers: tuple[str, ...], decoys: tuple[str, ...],
                           company_pool: tuple[str, ...]) -> str:
    off = preservation_off(config, triggers)
    if off:
        return off
    if decoys:
        decoy_note = f"{config.train.preserve_decoys:.0%} of them with one of {len(decoys)} decoy words in its place"
    elif config.train.preserve_decoys > 0:
        decoy_note = "no decoy words: the tokenizer has no whole word that the captions do not use"
    else:
        decoy_note = "no decoy words (--preserve-decoys 0)"
    company = ""
    if company_pool:  # empty unless --decoy-company is on (_company)
        if config.train.made_up_company:  # the pool is the quiet vocabulary words, then as many made-up ones
            half = COMPANY_WORDS_SHOWN // 2
            shown = ", ".join(company_pool[:half]) + ", …, " + ", ".join(company_pool[-half:])
            kind = "words: decoys the base reads least and made-up words"
        else:
            more = " …" if len(company_pool) > COMPANY_WORDS_SHOWN else ""
            shown, kind = ", ".join(company_pool[:COMPANY_WORDS_SHOWN]) + more, "decoy words the base reads least"
        company = (f"; {config.train.decoy_company:.0%} of the samples with one of the {len(company_pool)} {kind} "
                   f"beside the trigger ({shown})")
    return (f"base preservation: weight {config.train.preserve_base:g} on half of each batch, captions without "
            f"{' / '.join(repr(t) for t in triggers)}, {decoy_note}{company}")


# ----------------------------------------------------------------------------- 5. resume


def with_resumed_warmup(config: TrainConfig, resume_state: dict | None) -> TrainConfig:
    """A resumed run with no --warmup-steps keeps the warmup its checkpoint's run had. Why: an unset warmup follows
    the steps, so resuming a 20-step run (warmup 2) at step 20 with --steps 400 (warmup 40) would drop the rate
    to half and warm it up again."""
    if resume_state is None or config.optim.warmup_steps is not None:
        return config
    saved = resume_state["config"]
    warmup = saved.get("optim", {}).get("warmup_steps")
    if warmup is None:
        warmup = warmup_steps(with_values(config, {"train.steps": saved["train"]["steps"]}))
    if warmup == warmup_steps(config):
        return config  # the same as today's default: nothing to record
    return with_sources(with_values(config, {"optim.warmup_steps": warmup}),
                        {"optim.warmup_steps": f"kept from the resumed run ({saved['train']['steps']} steps)"})


def resumed_schedule_note(run: Run, state: dict | None) -> str | None:
    """A line when a resume changes --steps and so where the rate schedule ends: the rate jumps at the resumed step
    (a cosine stretched from 20 to 40 steps goes from near 0 back to mid-height), which a user should not discover in
    the loss plot. None when nothing moved."""
    if state is None or state["config"]["train"]["steps"] == run.config.train.steps:
        return None
    before, now = state["lr_scheduler"]["_last_lr"][0], run.lr_scheduler.get_last_lr()[0]
    if math.isclose(before, now, rel_tol=1e-3):
        return None  # a constant schedule: the rate is the same whatever the length
    return (f"resumed with --steps {run.config.train.steps} (the checkpoint's run had "
            f"{state['config']['train']['steps']}): the learning-rate schedule now ends at step "
            f"{run.config.train.steps}, so the UNet rate continues at {now:.2g} instead of {before:.2g}.")


def data_identity(data: DataPlan) -> dict[str, dict[str, str]]:
    """What a checkpoint records of the images it trained on: {"train"/"reg": {folder/name: sha256 of the file}}."""
    return {"train": {c.item.key: c.sha256 for c in data.checked.kept}, "reg": {c.item.key: c.sha256 for c in data.reg}}


def check_resume(planned: TrainConfig, buckets: list, processes: int, data: DataPlan,
                 path: Path | None) -> dict | None:
    """Checkpoint `path`'s training state (None without --resume), refused before the base loads where its settings
    or its batch order do not fit the run planned from the base's config files (plan_batches: `planned`, each
    sample's bucket and the process count). restore() checks again once the base has loaded."""
    if path is None:
        return None
    from stylelora.data.buckets import BucketBatchSampler

    state = checkpoint.read_state(path)
    current = config_to_dict(planned)
    if planned.train.made_up_company is None:  # decided once the base's tokenizer loads; restore() compares it
        current["train"]["made_up_company"] = state["config"].get("train", {}).get("made_up_company")
    images = data_identity(data)
    check_resumed_settings(state, current, images, path)
    sampler = BucketBatchSampler(buckets, planned.train.batch_size, seed=planned.train.seed, num_replicas=processes)
    load_sampler_state(sampler, state, images, path)
    return state


def check_resumed_settings(state: dict, current: dict, images: dict, path: Path) -> None:
    changes = checkpoint.image_changes(state.get("images"), images)
    checkpoint.check_resumable(state["config"], current, path, image_changes=changes)


def load_sampler_state(sampler, state: dict, images: dict, path: Path) -> None:
    """Continue the checkpoint's batch order; refused, naming the images added or removed, if the data changed."""
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as error:
        changes = checkpoint.image_changes(state.get("images"), images)
        since = f" Since the checkpoint: {changes}." if changes else ""
        raise checkpoint.ResumeError(f"cannot resume from {path}: {error}{since}") from None


def restore(run: Run, path: Path, state: dict) -> int:
    """Load checkpoint `path` (its training `state` read) into the run, refusing one made with other settings;
    returns its step."""
    check_resumed_settings(state, config_to_dict(run.config), run.images, path)
    load_sampler_state(run.sampler, state, run.images, path)
    checkpoint.restore_weights_and_rng(path, process_index=run.accelerator.process_index, trainable=run.trainable,
                                       generator=run.generator)
    load_with_new_learning_rates(run.optimizer, run.lr_scheduler, state)  # a resume may lower the rates
    if run.accelerator.scaler is not None and state.get("grad_scaler"):
        run.accelerator.scaler.load_state_dict(state["grad_scaler"])
    run.epoch, run.position = state["sampler"]["epoch"], state["sampler"]["position"]
    run.last_checkpoint = path
    return state["step"]


# ----------------------------------------------------------------------------- 6. train


def train(run: Run, start_step: int, stop_requested=lambda: False) -> None:
    batches = endless_batches(run)
    t = run.config.train
    if t.sample_at_first and start_step == 0:
        write_samples(run, 0)  # the base's own drawing of the prompts, to compare the grids after with
    for step in range(start_step + 1, t.steps + 1):
        started = time.perf_counter()
        lrs = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
        loss, grad_norm, norms = optimizer_step(run, batches, step)
        run.lr_scheduler.step()
        run.log.record(step, loss, lrs, grad_norm, time.perf_counter() - started, norms)
        if run.validation is not None and (step == t.steps or step % t.validate_every == 0):
            run.log.record_validation(step, measure(run.validation, run.models, run.noise_scheduler, run.config,
                                                    run.accelerator, run.trained_modules))
        if step == t.steps or (t.sample_every and step % t.sample_every == 0):
            write_samples(run, step)
        # The last step too (kohya's --save_state saves the state at the end): `--resume latest --steps N` then
        # continues from where the run ended, whatever --steps was, instead of redoing the steps since a checkpoint.
        saved = bool(t.save_every) and (step % t.save_every == 0 or step == t.steps)
        if saved:
            save(run, step)
        if stop_requested() and step < t.steps:
            if not saved:
                save(run, step)  # the steps since the last checkpoint are kept: --resume latest continues here
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_after_the_step(enabled: bool):
    """While the steps run, Ctrl-C (SIGINT, also the app's Stop) lets the step in progress finish, saves a checkpoint
    there and stops; a second Ctrl-C stops at once. Yields whether a stop was asked for.

    Why: an interrupt mid-step would keep only the last --save-every checkpoint, losing every step since (all of
    them with checkpoints off). Only in one process: under DDP the processes would have to agree on the step first.
    """
    import signal
    import threading

    from tqdm.auto import tqdm

    from stylelora.signals import handling

    requested = threading.Event()

    def ask_to_stop(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        # Above the progress bar, as RunLog.say writes: printed, it was glued to the bar's line (and the app,
        # which leaves bar lines out of its log, lost it).
        tqdm.write("stopping after this step, with a checkpoint (Ctrl-C again stops at once)", file=sys.stderr)

    if not enabled:
        yield lambda: False
        return
    with handling(signal.SIGINT, ask_to_stop) as handled:
        yield requested.is_set if handled else (lambda: False)


def endless_batches(run: Run) -> Iterator[dict]:
    """Batches epoch after epoch, tracking the epoch and position a checkpoint must record."""
    while True:
        run.sampler.set_epoch(run.epoch)  # keeps a resumed position when the epoch is the checkpoint's
        run.dataset.set_epoch(run.epoch)
        for batch in run.loader:
            run.position += 1
            yield batch
        run.epoch, run.position = run.epoch + 1, 0


def optimizer_step(run: Run, batches: Iterator[dict], step: int) -> tuple[float, float | None, NormReport | None]:
    """One optimizer step over `grad_accum` batches; returns (mean loss over processes, gradient norm, what
    --scale-weight-norms did, None when it is off)."""
    acc, losses, grad_norm, norms = run.accelerator, [], None, None
    for _ in range(run.config.optim.grad_accum):
        batch = next(batches)
        with acc.accumulate(*run.trained_modules):
            with acc.autocast():
                loss = loss_step(batch, run.models, run.noise_scheduler, run.config, run.generator)
            # Averaged over processes so every process sees the same value and all stop together on NaN.
            mean_loss = acc.reduce(loss.detach().float(), reduction="mean").item()
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"Training stopped at step {step}: the loss became {mean_loss}.", step)
            acc.backward(loss)
            if acc.sync_gradients:
                grad_norm = _clip_gradients(run, step)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients and run.config.optim.scale_weight_norms:
                norms = cap_module_norms(run.models.unwrapped or run.trained_modules,
                                         run.config.optim.scale_weight_norms)
        losses.append(mean_loss)
    return sum(losses) / len(losses), grad_norm, norms


def _clip_gradients(run: Run, step: int) -> float:
    max_norm = run.config.optim.max_grad_norm or math.inf  # inf: measure the norm, clip nothing
    norm = float(run.accelerator.clip_grad_norm_(list(run.trainable.values()), max_norm))
    # Under fp16 the grad scaler expects the odd inf and skips that step itself; elsewhere it means divergence.
    if not math.isfinite(norm) and run.accelerator.scaler is None:
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"Training stopped at step {step}: the gradient norm became {norm}.", step)
    return norm


def _after_divergence(run: Run, step: int) -> str:
    """What to do next, naming only remedies that differ from what this run used; a resume may change them
    (checkpoint.RESUME_MAY_CHANGE).

    The checkpoint to resume from is one saved before step - 1: step - 1's weights are the ones that gave the
    non-finite loss or gradients, and a resume replays the same batch and noise exactly, so it would stop again.
    """
    o, t = run.config.optim, run.config.train
    lower = f"--unet-lr {o.unet_lr / 10:g}"
    if run.config.network.train_text_encoder and o.text_encoder_lr:
        lower += f" --text-encoder-lr {o.text_encoder_lr / 10:g}"
    remedies = [f"a lower learning rate (e.g. {lower})"]
    if not 0 < o.max_grad_norm <= 1:  # 0 clips nothing; above 1 clips less than the usual value
        remedies.append("--max-grad-norm 1")
    if t.precision != "fp32":
        remedies.append("--precision fp32")
    fixes = ", or ".join(remedies)
    found = checkpoint.complete_checkpoints(run.run_dir)
    good = [path for path in found if checkpoint.checkpoint_step(path) < step - 1]
    if good:
        spec = "latest" if good[-1] == found[-1] else str(good[-1])
        newer = "" if spec == "latest" else (f" (not the latest, {found[-1].name}: it was saved at or after the "
                                             "weights that diverged, and a resume there stops again)")
        where = f"The last good checkpoint is {good[-1]}{newer}; resume from it with --resume {spec} and {fixes}"
    else:
        overwrite = "--overwrite and " if existing_run_files(run.run_dir) else ""
        where = (f"No checkpoint was saved before the weights that diverged (--save-every N saves them); start "
                 f"again with {overwrite}{fixes}")
    return f"The weights were not updated with it. {where}. No adapter was written for this run."


def write_samples(run: Run, step: int) -> None:
    if not run.config.train.samples or not run.config.train.sample_prompts:
        return
    if run.accelerator.is_main_process:
        prompts = fill_trigger(run.config.train.sample_prompts, run.facts.trigger)
        with run.accelerator.autocast():
            path = save_samples(run.pipe, prompts, run.config, sample_path(run.run_dir, step))
        run.log.say(f"step {step}: samples {path}")
        run.log.flush()
    run.accelerator.wait_for_everyone()


def save(run: Run, step: int) -> None:
    acc = run.accelerator
    state = {"step": step, "optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict(),
             "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
             "sampler": run.sampler.state_dict(position=run.position), "config": config_to_dict(run.config),
             "images": run.images}
    name = f"{run.config.train.output_name}-step{step:06d}.safetensors"
    run.last_checkpoint = checkpoint.save_checkpoint(
        run.run_dir, step, accelerator=acc, trainable=run.trainable, training_state=state,
        rng_state=checkpoint.capture_rng(run.generator), keep=run.config.train.keep_checkpoints,
        write_adapter=lambda folder: write_adapter(run, folder / name, step))
    run.log.flush()


# ----------------------------------------------------------------------------- 7. adapter


def write_adapter(run: Run, path: Path, step: int) -> Path:
    from stylelora.lora.io import save_adapter
    from stylelora.models.load import PRECISIONS

    t = run.config.train
    metadata = adapter_metadata(run.config, run.facts, step)
    return save_adapter(path, run.pipe.unet, run.pipe.text_encoder, metadata=metadata, fmt=t.format,
                        dtype=getattr(torch, PRECISIONS[t.save_precision]),
                        text_encoder_2=getattr(run.pipe, "text_encoder_2", None))


def write_share_bundle(run: Run, adapter: Path) -> None:
    """NAME.preview.png, NAME.json (A1111 sidecar) and README.md (model card) beside the adapter."""
    from stylelora.share import PREVIEW_NAME, write_bundle
    from stylelora.train.samples import SAMPLES_DIR

    samples = run.run_dir / SAMPLES_DIR
    grid = sample_path(run.run_dir, run.config.train.steps)
    write_bundle(adapter, preview=samples / PREVIEW_NAME if run.config.train.samples else None, grid=grid)


def finish(run: Run) -> Path:
    """Write OUTPUT/NAME.safetensors (main process) and return its path on every process."""
    path = run.config.adapter_path
    if run.accelerator.is_main_process:
        write_adapter(run, path, run.config.train.steps)
        save_config(run.config, run.run_dir / CONFIG_FILE)
        write_share_bundle(run, path)
        run.log.say(f"adapter written: {path}")
    run.accelerator.wait_for_everyone()
    return path
