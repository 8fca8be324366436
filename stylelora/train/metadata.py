"""Owns the metadata written into every adapter a run saves: kohya ss_* keys, modelspec keys, the full config."""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from stylelora.config import TrainConfig, config_to_dict, warmup_steps
from stylelora.data.captions import tag_frequency
from stylelora.data.scan import TrainItem, dataset_dirs
from stylelora.lora.io import kohya_metadata

PRECISION_NAMES = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # kohya's ss_mixed_precision values
# What sd-scripts and the SAI model spec call each family: (ss_base_model_version, ss_v2, modelspec.architecture).
# sd-scripts marks a v-prediction SD 2.x base "sd_v2_v" (model_util.get_model_version_str_for_sd1_sd2), which is
# how model sites tell SD 2.x 768-v from 512.
FAMILY_METADATA = {
    "toy": ("sd_v1", "False", "stable-diffusion-v1/lora"),
    "sd1": ("sd_v1", "False", "stable-diffusion-v1/lora"),
    "sd2": ("sd_v2", "True", "stable-diffusion-v2-512/lora"),
    "sd2-v": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora"),
}
# modelspec.implementation as sd-scripts writes it (sai_model_spec.build_metadata): an SDXL LoRA's keys follow
# Stability's generative-models (SGM) names, an SD 1.x/2.x LoRA's follow diffusers.
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
MODELSPEC_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}


# Options that hold a path on the training machine. The file is shared, so it names them as kohya names the base
# (ss_sd_model_name: the file's name, not where it lay); OUTPUT/config.toml keeps the full paths for reruns.
# The first are always local; a base or its config folder may instead be a hub id ("owner/name"), kept as it is.
ALWAYS_LOCAL_OPTIONS = (("data", "dir"), ("data", "reg_dir"), ("data", "cache_dir"), ("train", "output"),
                        ("train", "resume"), ("network", "weights"))
LOCAL_PATH_OPTIONS = ALWAYS_LOCAL_OPTIONS + (("train", "base"), ("train", "base_config"))


def shareable_path(value: str | None, *, local: bool = False) -> str | None:
    """A local file or folder as its name alone; anything else (toy, a hub id, unset) as it is.

    local: the option always names a path here. Existence alone is not enough to tell: a resumed-from checkpoint is
    deleted by rotation before the final save, and `~/models/sd15` is expanded by the loader, not the shell."""
    if not value:
        return value
    if local or Path(value).expanduser().exists() or _typed_as_path(value):
        return re.split(r"[\\/]", value.rstrip("/\\"))[-1] or value  # a Windows path's name too, on any OS
    return value


def _typed_as_path(value: str) -> bool:
    """Written as a path on this machine, not as a hub id `owner/name`: absolute, home- or dot-relative, with a
    backslash, or deeper than owner/name."""
    return Path(value).is_absolute() or value.startswith(("~", ".")) or "\\" in value or value.count("/") > 1


def _shareable_settings(config: TrainConfig) -> dict:
    settings = config_to_dict(config)
    for section, key in LOCAL_PATH_OPTIONS:
        if key in settings.get(section, {}):
            settings[section][key] = shareable_path(settings[section][key],
                                                    local=(section, key) in ALWAYS_LOCAL_OPTIONS)
    return settings


@dataclass(frozen=True)
class RunFacts:
    """What the metadata says about the data and the run that the config alone does not know."""

    items: tuple[TrainItem, ...]  # the images actually trained on (after the checks)
    num_train_images: int  # images × repeats, as kohya counts them
    num_reg_images: int  # regularization samples per epoch (0: none)
    trigger: str
    prediction_type: str
    started_at: float
    world_size: int
    batches_per_epoch: int
    company_words: tuple[str, ...] = ()  # the decoy words trained beside the trigger (the first: a stand-in word)
    # kohya's ss_sd_model_hash / ss_new_sd_model_hash of a single-file base (stylelora.generate.base_identity), so
    # that model sites, A1111 and `stylelora blend` can tell which base an adapter was trained on; () otherwise.
    base_hashes: tuple[tuple[str, str], ...] = ()


def share_fields(config: TrainConfig, facts: RunFacts) -> dict[str, str]:
    """The SAI model-spec fields model sites read: description, license and a thumbnail of the newest preview."""
    from stylelora.presets import FAMILY_NAMES
    from stylelora.share import PREVIEW_NAME, thumbnail_data_uri
    from stylelora.train.samples import SAMPLES_DIR

    t = config.train
    trigger = f", trigger '{facts.trigger}'" if facts.trigger else ""
    description = t.description or (f"{FAMILY_NAMES[t.family]} LoRA{trigger}, trained with stylelora "
                                    f"on {len(facts.items)} images.")
    fields = {"modelspec.description": description, "modelspec.license": t.license,
              **({"modelspec.author": t.author} if t.author else {}), **({"modelspec.tags": t.tags} if t.tags else {})}
    preview = config.output_dir / SAMPLES_DIR / PREVIEW_NAME
    if t.samples and preview.is_file():
        fields["modelspec.thumbnail"] = thumbnail_data_uri(preview)
    return fields


def adapter_metadata(config: TrainConfig, facts: RunFacts, step: int) -> dict[str, str]:
    """All-string metadata for the adapter at `step`; `ss_training_args` is the run's whole config as JSON, local
    paths by their names alone."""
    d, n, o, t = config.data, config.network, config.optim, config.train
    samples_per_step = t.batch_size * o.grad_accum * facts.world_size
    extra = {
        "ss_training_args": json.dumps(_shareable_settings(config), sort_keys=True),
        # Which settings came from the base family's preset, the TOML file or a flag (the rest: declared defaults).
        "ss_stylelora_config_sources": json.dumps(dict(config.sources), sort_keys=True),
        "ss_stylelora_base_family": t.family,
        **dict(zip(("ss_base_model_version", "ss_v2", "modelspec.architecture"), FAMILY_METADATA[t.family])),
        **share_fields(config, facts),
        "ss_sd_model_name": shareable_path(t.base),
        **dict(facts.base_hashes),
        "ss_seed": str(t.seed),
        **_optimization_metadata(config),
        "ss_batch_size_per_device": str(t.batch_size),
        "ss_total_batch_size": str(samples_per_step),
        "ss_gradient_accumulation_steps": str(o.grad_accum),
        "ss_preserve_base": str(t.preserve_base),
        "ss_preserve_decoys": str(t.preserve_decoys),
        "ss_decoy_company": str(t.decoy_company),
        # What the split blend reads another adapter's coined trigger as (stylelora.generate.trigger_order).
        "ss_stylelora_company_words": json.dumps(list(facts.company_words)),
        "ss_text_noise": str(t.text_noise),
        "ss_mixed_precision": PRECISION_NAMES[t.precision],
        "ss_gradient_checkpointing": str(t.gradient_checkpointing),
        "ss_enable_bucket": str(d.bucketing),
        "ss_min_bucket_reso": str(d.min_side),
        "ss_max_bucket_reso": str(d.max_side),
        "ss_bucket_reso_steps": str(d.bucket_step),
        "ss_bucket_no_upscale": str(d.no_upscale),
        "ss_caption_dropout_rate": str(d.caption_dropout),
        "ss_caption_tag_dropout_rate": str(d.tag_dropout),
        "ss_shuffle_caption": str(d.shuffle_tags),
        "ss_keep_tokens": str(d.keep_tokens),
        "ss_clip_skip": str(t.clip_skip),
        "ss_max_token_length": str(d.max_token_length),
        "ss_flip_aug": str(d.flip),
        "ss_random_crop": str(d.random_crop),
        "ss_cache_latents": str(d.cache != "none"),
        "ss_num_batches_per_epoch": str(facts.batches_per_epoch),
        "ss_num_reg_images": str(facts.num_reg_images),
        "ss_epoch": str(step * o.grad_accum // max(1, facts.batches_per_epoch)),  # epochs completed by `step`
        # The epochs the whole run takes, and when this file was written: what model sites show as Epochs and date.
        "ss_num_epochs": str(t.epochs or math.ceil(t.steps / math.ceil(max(1, facts.batches_per_epoch) / o.grad_accum))),
        "ss_training_finished_at": str(time.time()),
        "ss_network_unet_targets": n.unet_targets,
        # The SAI model spec's words, as sd-scripts writes them: "epsilon" or "v" (the scheduler's is "v_prediction").
        "modelspec.prediction_type": MODELSPEC_PREDICTION_TYPES.get(facts.prediction_type, facts.prediction_type),
    }
    return kohya_metadata(
        rank=n.rank, alpha=n.alpha, output_name=t.output_name,
        tag_frequency=tag_frequency(facts.items, variants=d.caption_variants),
        dataset_dirs=dataset_dirs(list(facts.items)), num_train_images=facts.num_train_images, steps=step,
        learning_rate=o.unet_lr, unet_lr=o.unet_lr, text_encoder_lr=o.text_encoder_lr if n.train_text_encoder else None,
        resolution=d.resolution, training_started_at=facts.started_at, title=t.output_name,
        trigger_phrase=facts.trigger or None, conv_rank=n.conv_rank, conv_alpha=n.conv_alpha, extra=extra,
        network_args=_network_args(config),
        implementation=SGM_IMPLEMENTATION if t.family == "sdxl" else "diffusers",
    )


def _optimization_metadata(config: TrainConfig) -> dict[str, str]:
    """sd-scripts' ss_ keys for how the run optimized: optimizer, schedule, loss, noise and dropout."""
    n, o, t = config.network, config.optim, config.train
    return {
        # as sd-scripts writes it: the optimizer, then its --optimizer_args in parentheses
        "ss_optimizer": o.optimizer + (f"({','.join(o.optimizer_args)})" if o.optimizer_args else ""),
        "ss_lr_scheduler": o.lr_scheduler,
        # kohya's argument names; sd-scripts keeps them out of its metadata, so a file would not say how it restarted
        **({"ss_lr_scheduler_num_cycles": str(o.lr_scheduler_num_cycles)}
           if o.lr_scheduler == "cosine_with_restarts" else {}),
        **({"ss_lr_scheduler_power": str(o.lr_scheduler_power)} if o.lr_scheduler == "polynomial" else {}),
        "ss_lr_warmup_steps": str(warmup_steps(config)),
        "ss_max_grad_norm": str(o.max_grad_norm),
        "ss_scale_weight_norms": str(o.scale_weight_norms or None),  # kohya writes None when off
        "ss_min_snr_gamma": str(t.min_snr_gamma),
        "ss_debiased_estimation": str(t.debiased_estimation_loss),
        "ss_loss_type": t.loss_type,
        "ss_huber_schedule": t.huber_schedule,
        "ss_huber_c": str(t.huber_c),
        "ss_noise_offset": str(t.noise_offset),
        "ss_prior_loss_weight": str(config.data.prior_loss_weight),
        "ss_masked_loss": str(config.data.alpha_mask),  # sd-scripts' key: its masks here come from the alpha
        # kohya writes None for these when they are off
        "ss_multires_noise_iterations": str(t.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(t.multires_noise_discount),
        "ss_ip_noise_gamma": str(t.ip_noise_gamma or None),
        "ss_noise_offset_random_strength": str(t.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": str(t.ip_noise_gamma_random_strength),
        **({"ss_network_dropout": str(n.dropout)} if n.dropout else {}),  # sd-scripts' key for --network_dropout
        "ss_zero_terminal_snr": str(t.zero_terminal_snr),
        **({"ss_min_timestep": str(t.min_timestep), "ss_max_timestep": str(t.max_timestep)}
           if t.min_timestep or t.max_timestep else {}),  # kohya's argument names, written when they bound the draw
    }


def _network_args(config: TrainConfig) -> dict[str, str] | None:
    """kohya's ss_network_args beyond conv_dim / conv_alpha: LoRA+ and the block lists, written as given."""
    from stylelora.train.block_settings import DIM_KEYS, LR_WEIGHT_KEYS

    o, n = config.optim, config.network
    args = {"loraplus_lr_ratio": str(o.loraplus_lr_ratio)} if o.loraplus_lr_ratio else {}
    args |= {key: getattr(o, key) for key in LR_WEIGHT_KEYS if getattr(o, key) is not None}
    if any(getattr(o, key) is not None for key in LR_WEIGHT_KEYS) and o.block_lr_zero_threshold:
        args["block_lr_zero_threshold"] = str(o.block_lr_zero_threshold)
    args |= {key: getattr(n, key) for key in DIM_KEYS if getattr(n, key) is not None}
    args |= {key: str(getattr(n, key)) for key in ("rank_dropout", "module_dropout") if getattr(n, key)}
    return args or None
