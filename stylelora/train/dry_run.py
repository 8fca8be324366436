"""Owns `stylelora train --dry-run`: everything a run decides before it loads weights, saved and summarised.

It scans and checks the data (the skip report as a real run writes it), makes the refusals a run makes as it loads
the base wherever they need only config files, a .safetensors header or an import (check_base), reads the base's
config files to detect its family, resolves every setting (preset, file, flag), writes OUTPUT/config.toml and prints
images, buckets, steps and epochs. No weights are loaded, nothing is trained, no adapter is written. Like a run, it
refuses an output folder that holds another training run unless --overwrite or --resume is given.

With --resume it makes the run's resume checks (the checkpoint's settings and batch order, check_resume) and leaves
the run folder's config.toml and skip report alone: they describe the run the checkpoint belongs to (a refused
resume points users at that config.toml). Its plan goes to OUTPUT/resume-plan.toml instead.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from stylelora.config import TrainConfig, save_config, warmup_steps, with_epoch_steps, with_model_defaults
from stylelora.presets import FAMILY_NAMES

RESUME_PLAN_FILE = "resume-plan.toml"  # a dry run's plan of a resume (the run's config.toml stays as it was)


def dry_run(config: TrainConfig) -> Path:
    """Resolve and check everything for `config`; write OUTPUT/config.toml (OUTPUT/resume-plan.toml with --resume)
    and return its path."""
    from stylelora.train.block_settings import check_against_base
    from stylelora.train.losses import check_schedule
    from stylelora.train.network_weights import describe_start, start_weights
    from stylelora.train.sample_prompts import ignored_options_note
    from stylelora.train.loop import (CONFIG_FILE, check_base, check_output_dir, check_resume, describe_settings,
                                      preservation_off, prepare_data, report_data, with_family_preset,
                                      with_resumed_warmup)

    def say(message: str) -> None:
        if message:
            print(message, file=sys.stderr, flush=True)

    run_dir = config.output_dir
    resume_from = check_output_dir(config)  # a finished run's config.toml and skip report are not replaced by a plan
    reports = None if resume_from else run_dir  # a resume's are the checkpoint's run's
    process = SimpleNamespace(is_main_process=True)
    data = prepare_data(config, reports, process, say)
    base_configs = check_base(config)  # as the run does: the data first, then what loading the base would refuse
    config = with_family_preset(config, base_configs, data)
    config, buckets, batches, processes = plan_batches(config, base_configs, data, say)
    state = check_resume(config, buckets, processes, data, resume_from)  # what the run refuses before loading
    config, start = start_weights(config, state, say, base_configs)
    blocks = check_against_base(config, base_configs)
    schedule_note = check_schedule(config, base_configs)
    report_data(config, reports, data, process, say)
    config = with_resumed_warmup(config, state)
    path = save_config(config, run_dir / (RESUME_PLAN_FILE if resume_from else CONFIG_FILE))
    say(describe_settings(config))
    say(ignored_options_note(config.train.sample_prompts or ()))
    say(summary(config, buckets, batches, len(data.items), processes))
    say(preservation_off(config, data.triggers) or "")  # `say` skips an empty line
    say(describe_start(start))
    say(blocks)
    say(schedule_note)
    say(f"dry run: nothing trained, no adapter written; the settings are in {path}")
    return path


def plan_batches(config: TrainConfig, base_configs: Path, data,
                 say=lambda message: None) -> tuple[TrainConfig, list, int, int]:
    """The settings a run of `config` (the family preset applied) will train with, its samples' buckets, one
    process's batches per epoch and the process count, worked out from the base's config files (`base_configs`,
    from check_base) and the images' sizes, without loading weights. The run calls it to check --epochs with
    --warmup-steps before the base loads."""
    from stylelora.data.buckets import BucketBatchSampler
    from stylelora.data.captions import long_captions_note
    from stylelora.data.dataset import TrainingDataset
    from stylelora.models.family import folder_geometry
    from stylelora.train.loop import dataset_options, folder_tokenizer, run_settings, with_coined_trigger_rules

    t = config.train
    config = run_settings(with_model_defaults(config, **folder_geometry(base_configs)))
    tokenizer = folder_tokenizer(base_configs)
    if tokenizer is not None:  # without one the run decides when it loads the base
        config = with_coined_trigger_rules(config, tokenizer, data.triggers)
        say(long_captions_note(data.items, tokenizer, config.data.caption_variants, config.data.max_token_length))
    dataset = TrainingDataset(data.checked.kept, dataset_options(config), reg_images=data.reg)
    # Under `accelerate launch` each process gets its share of the batches, as in the run.
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    batches = len(BucketBatchSampler(dataset.buckets, t.batch_size, seed=t.seed, num_replicas=processes, rank=0))
    return with_epoch_steps(config, batches), dataset.buckets, batches, processes


def summary(config: TrainConfig, buckets: list, batches_per_epoch: int, images: int, processes: int = 1) -> str:
    c = config
    per_bucket = Counter(buckets)
    shown = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(per_bucket.items())[:8])
    shown += f", +{len(per_bucket) - 8} more" if len(per_bucket) > 8 else ""
    epochs = c.train.steps * c.optim.grad_accum / max(1, batches_per_epoch)
    return "\n".join([
        f"family {c.train.family} ({FAMILY_NAMES[c.train.family]}), preset values marked above",
        f"{images} images, {len(buckets)} samples per epoch (with repeats) in {len(per_bucket)} bucket(s): {shown}",
        f"{c.train.steps} steps × batch {c.train.batch_size} × accumulation {c.optim.grad_accum}: "
        f"{batches_per_epoch} batches per epoch{' per process' if processes > 1 else ''}, "
        f"{epochs:.1f} epochs; LR warmup {warmup_steps(c)} steps",
        f"resolution {c.data.resolution} px, precision {c.train.precision}, gradient checkpointing "
        f"{'on' if c.train.gradient_checkpointing else 'off'}, quantized base: {c.train.quantize_base}",
    ])
