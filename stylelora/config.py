"""Owns the typed, frozen description of a training run: defaults, TOML load/save, and validation with clear errors.

A run is one `TrainConfig` with four sections, each a frozen dataclass:

    data     where the images are and how they become training samples (captions, buckets, cache)
    network  the LoRA: rank, alpha, which UNet layers, whether the text encoder gets one
    optim    optimizer, learning rates, LR schedule, accumulation, clipping
    train    base model, output, steps, batch, precision, loss options, checkpoints, samples, resume

`load_config(toml_path, overrides)` is the only way in: defaults < TOML file < overrides (CLI flags), then
every field is checked once and every problem is reported together, each naming the field and how to fix it.
The result is never mutated; settings that depend on the base model (resolution, bucket step) are filled in
later by `with_model_defaults`, which returns a new config. No torch import here: `stylelora --help` and
config errors stay instant.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from stylelora.atomic import write_text_atomic
from stylelora.kohya_flags import KOHYA_FLAGS

DATA_CACHES = ("ram", "disk", "none")
UNET_TARGETS = ("attn", "kohya", "locon")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial")
# kohya's --loss_type; the last two read a scale c, set over the timesteps by a schedule (stylelora.train.losses).
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_LOSSES = ("huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
PRECISIONS = ("fp32", "fp16", "bf16")
FORMATS = ("kohya", "diffusers")
FAMILIES = ("toy", "sd1", "sd2", "sd2-v", "sdxl")
QUANTIZATIONS = ("none", "nf4", "int8")
TRIGGER_PLACEHOLDER = "{trigger}"
SEED_LIMIT = 2**63  # torch generators take a signed 64-bit seed; a larger one fails at the first sample grid


class ConfigError(ValueError):
    """A run option is wrong; the message names each bad field and says how to fix it."""


# ----------------------------------------------------------------------------- the one home of each option
#
# Every option is declared once, below, as a dataclass field with an `Option` in its metadata: default, help,
# CLI flag, TOML key (section + field name), an example for error messages and, when the app shows it, its widget.
# The `stylelora train` parser, the validation messages, the options table in docs/training.md and the app's Train
# tab are all derived from these declarations.


@dataclass(frozen=True)
class Widget:
    """How the app's Train tab shows an option: its label and the range of the number box."""

    label: str
    minimum: float | None = None
    maximum: float | None = None
    empty: str = "the base family's"  # what an empty box means, for an option whose default is unset


@dataclass(frozen=True)
class Option:
    help: str
    flag: str | None = None  # None: "--" + the field name with dashes; "" for the positional DATA_DIR
    example: str | None = None  # a valid value, shown in error messages ("e.g. --rank 16")
    choices: tuple[str, ...] = ()
    widget: Widget | None = None  # shown in the app's Train tab when set
    cli: bool = True  # False: set in the TOML file only
    preset: bool = False  # unset, it takes its base family's value (stylelora.presets)
    nargs: str | None = None  # a list option given as several words on the command line (argparse's nargs)
    comma_list: bool = False  # text of comma-separated numbers, which run.toml may also give as a number or an array


def option(default: Any, help: str, **details: Any) -> Any:
    """A dataclass field carrying its `Option` (see the comment above)."""
    return field(default=default, metadata={"option": Option(help=help, **details)})


@dataclass(frozen=True)
class DataConfig:
    dir: str = option("", "training images: kohya `<repeats>_<trigger>/` folders, a flat folder of images + .txt "
                          "captions, or a folder with metadata.jsonl", flag="", example="datasets/toy-stripes")
    trigger: str = option("", "trigger word(s) added in front of every caption (\"\" = none)",
                          widget=Widget("Extra trigger word (optional)"))
    # kohya's reg folder: trained alongside, as many reg samples per epoch as training samples, so the adapter keeps
    # what the base draws for prompts without the trigger.
    reg_dir: str = option("", "regularization images (kohya reg folder, same layouts): as many reg samples per "
                              "epoch as training samples, so prompts without the trigger keep the base's look",
                          example="datasets/toy-plain")
    alpha_mask: bool = option(False, "weigh each pixel's loss by the image's alpha channel, so transparent parts "
                                     "(a cut-out character's background) are not learned (kohya's --alpha_mask "
                                     "with --masked_loss); images without alpha count whole")
    # kohya's --validation_split / --validation_seed (stylelora.train.validation): images held out to score.
    validation_split: float = option(0.0, "fraction of the training images held out to measure a validation loss "
                                          "on, never trained (kohya's --validation_split)", example="0.1")
    validation_seed: int | None = option(None, "seed that picks the held-out images and their noise (unset: "
                                               "--seed)", example="0")
    # kohya's --prior_loss_weight (DreamBooth's λ): below 1 the reg images pull less against the style.
    prior_loss_weight: float = option(1.0, "loss weight of the --reg-dir images against the training images' 1 "
                                           "(kohya's --prior_loss_weight)", example="0.5")
    shuffle_tags: bool = option(False, "shuffle comma-separated caption tags")
    keep_tokens: int = option(1, "leading comma-separated tags that shuffling and tag dropout leave alone",
                              example="1")
    # Per base family (stylelora.presets): 0 everywhere, kohya's and diffusers' default. A dropped caption puts part
    # of the style into the unconditional prediction, which guidance subtracts wherever a prompt reads the trigger
    # only partly (a weight below 1, another trigger beside it): measured on the toy base (docs/results.md).
    caption_dropout: float | None = option(None, "probability of training a sample with an empty caption (more: "
                                                 "guidance exaggerates the style less, but the style fades sooner "
                                                 "at weights below 1 and beside other triggers)", example="0.05",
                                           preset=True)
    tag_dropout: float = option(0.0, "probability of dropping each caption tag", example="0.1")
    # kohya's --enable_wildcard. Off, a caption file's lines are joined as tags (a tagger that writes one tag a line).
    caption_variants: bool = option(False, "a caption file's lines, and each {a|b|c} in a caption, are "
                                           "alternatives: one is drawn each time the image is seen (kohya's "
                                           "--enable_wildcard); off, the lines are joined as tags",
                                    widget=Widget("Caption lines are alternatives (one drawn each time)"))
    max_token_length: int = option(75, "caption tokens the text encoder reads, in windows of 75 laid side by side "
                                       "(kohya's --max_token_length: 150 or 225 for long tag captions; generation "
                                       "reads long prompts the same way)", example="225",
                                   widget=Widget("Caption tokens (75, 150 or 225)", minimum=75, maximum=225))
    resolution: int | None = option(None, "training size in pixels", example="512", preset=True,
                                    widget=Widget("Resolution (empty = the base's)", minimum=8))
    bucketing: bool = option(True, "aspect-ratio buckets (--no-bucketing: every image center-cropped square)",
                             flag="--no-bucketing")
    bucket_step: int | None = option(None, "bucket side step (unset: the base's downsampling factor, 8 for the toy "
                                           "base, 64 for SD 1.x/2.x, 32 for SDXL)", example="8")
    min_side: int | None = option(None, "smallest bucket side (unset: resolution / 2)", example="16")
    max_side: int | None = option(None, "largest bucket side (unset: resolution × 2)", example="64")
    no_upscale: bool = option(False, "never upscale an image to fit a bucket")
    flip: bool = option(False, "random horizontal flips")
    random_crop: bool = option(False, "random crops instead of center crops (needs --cache none)")
    cache: str = option("ram", "latent (and frozen text-encoder output) cache", choices=DATA_CACHES, example="ram")
    cache_dir: str | None = option(None, "folder of the disk cache (unset: OUTPUT/cache)")


@dataclass(frozen=True)
class NetworkConfig:
    rank: int = option(16, "LoRA rank", example="16", widget=Widget("Rank", minimum=1))
    alpha: float = option(16.0, "LoRA alpha; scale = alpha / rank", example="16", widget=Widget("Alpha", minimum=0.01))
    unet_targets: str = option("kohya", "UNet layers: attn (attention projections), kohya (what sd-scripts "
                                        "trains), locon (plus the 3x3 convs)", choices=UNET_TARGETS, example="kohya")
    train_text_encoder: bool = option(True, "a LoRA on the text encoder too (--no-text-encoder: the UNet only)",
                                      flag="--no-text-encoder",
                                      widget=Widget("Train the text encoder"))
    conv_rank: int | None = option(None, "rank of the conv layers with --unet-targets locon", example="8")
    conv_alpha: float | None = option(None, "alpha of the conv layers (unset: network.alpha)", example="4")
    # kohya's --network_weights: stylelora.train.network_weights says how a file is fitted to this run's LoRA.
    weights: str | None = option(None, "start from this LoRA file's weights instead of a fresh LoRA (kohya's "
                                       "--network_weights): continue an adapter on more images or steps; its rank "
                                       "and targets must match this run's", flag="--network-weights",
                                 example="outputs/my-style/my-style.safetensors")
    dim_from_weights: bool = option(False, "take the rank, alpha, conv rank and alpha and --unet-targets from "
                                           "--network-weights' file instead of --rank and the rest (kohya's "
                                           "--dim_from_weights)")
    # sd-scripts' LoRA dropouts (stylelora.train.lora_dropout): off by default there too.
    dropout: float = option(0.0, "while training, drop each element of a LoRA module's down-factor output with this "
                                 "probability (kohya's --network_dropout; 0.1 is a common value; 0 = off)",
                            flag="--network-dropout", example="0.1")
    rank_dropout: float = option(0.0, "while training, drop each rank of a LoRA module per sample with this "
                                      "probability (kohya's network_args rank_dropout; 0 = off)", example="0.1")
    module_dropout: float = option(0.0, "while training, skip a whole LoRA module in a forward pass with this "
                                        "probability (kohya's network_args module_dropout; 0 = off)", example="0.1")
    # kohya's network_args block_dims & co. (stylelora.train.block_settings): one value per UNet block, in its order.
    block_dims: str | None = option(None, "LoRA rank per UNet block, comma-separated in kohya's block order (25 "
                                          "values on SD 1.x/2.x, 23 on SDXL; 0 = no LoRA there; kohya's network_args "
                                          "block_dims)", comma_list=True, example=",".join("2444" + "8" * 16 + "44442"))
    block_alphas: str | None = option(None, "LoRA alpha per UNet block, as --block-dims (kohya's block_alphas; "
                                            "unset: --alpha)", comma_list=True,
                                      example=",".join("1222" + "4" * 16 + "22221"))
    conv_block_dims: str | None = option(None, "rank of the 3x3 convs per UNet block with --unet-targets locon, as "
                                               "--block-dims (kohya's conv_block_dims; unset: --conv-rank)",
                                         comma_list=True, example=",".join("0000" + "4" * 20 + "0"))
    conv_block_alphas: str | None = option(None, "alpha of the 3x3 convs per UNet block (kohya's conv_block_alphas; "
                                                 "unset: --conv-alpha)", comma_list=True, example=",".join("1" * 25))


# What network.dim_from_weights takes from the --network-weights file (stylelora.train.network_weights).
DIM_FROM_WEIGHTS_KEYS = ("rank", "alpha", "conv_rank", "conv_alpha", "unet_targets", "block_dims", "block_alphas",
                         "conv_block_dims", "conv_block_alphas")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = option("adamw", "optimizer", choices=OPTIMIZERS, example="adamw")
    unet_lr: float | None = option(None, "UNet learning rate (a multiplier for prodigy)", example="1e-4", preset=True,
                                   widget=Widget("UNet LR (empty = the base family's)", minimum=0))
    text_encoder_lr: float | None = option(None, "text-encoder learning rate", example="5e-5", preset=True,
                                           widget=Widget("Text-encoder LR (empty = the base family's)", minimum=0))
    # SDXL's second text encoder (OpenCLIP bigG); --text-encoder-lr alone sets both, as sd-scripts' --text_encoder_lr.
    text_encoder_2_lr: float | None = option(None, "learning rate of SDXL's second text encoder (unset: the "
                                                   "text-encoder learning rate when one is given, else the base "
                                                   "family's)", example="5e-5", preset=True)
    weight_decay: float = option(1e-2, "AdamW weight decay", example="0.01")
    # kohya's --optimizer_args, read as sd-scripts reads them (stylelora.train.optim.optimizer_arguments).
    optimizer_args: tuple[str, ...] = option((), "more of the optimizer's own arguments, KEY=VALUE each (kohya's "
                                                 "--optimizer_args: Prodigy's d_coef=2 use_bias_correction=True "
                                                 "safeguard_warmup=True, AdamW's betas=0.9,0.99)", nargs="+",
                                             example="betas=0.9,0.99")
    lr_scheduler: str = option("cosine", "learning-rate schedule", choices=LR_SCHEDULERS, example="cosine")
    lr_scheduler_num_cycles: int = option(1, "hard restarts of cosine_with_restarts (kohya's "
                                             "--lr_scheduler_num_cycles)", example="3")
    lr_scheduler_power: float = option(1.0, "power of the polynomial schedule's decay (kohya's --lr_scheduler_power; "
                                            "1 = linear)", example="2")
    warmup_steps: int | None = option(None, "LR warmup steps (unset: a tenth of the steps, at most 50)", example="50")
    grad_accum: int = option(1, "gradient accumulation steps", example="1")
    # LoRA+ (Hayou et al., arXiv 2402.12354): the up factor starts at zero and needs a larger step than the down one.
    loraplus_lr_ratio: float = option(0.0, "learning rate of each LoRA's up factor as a multiple of its down "
                                           "factor's (LoRA+; kohya's network_args loraplus_lr_ratio; 16 is the "
                                           "paper's; 0 = off)", example="16")
    # kohya's network_args down/mid/up_lr_weight (stylelora.train.block_settings): the UNet's rate per block.
    down_lr_weight: str | None = option(None, "UNet learning-rate multiplier per input block, IN00 first (12 values "
                                              "on SD 1.x/2.x, 9 on SDXL), or a curve: sine, cosine, linear, "
                                              "reverse_linear, zeros, each with an optional +BASE; 0 = no LoRA there "
                                              "(kohya's network_args down_lr_weight)", comma_list=True,
                                        example="sine+0.5")
    mid_lr_weight: str | None = option(None, "UNet learning-rate multiplier of the middle block (3 values on SDXL: "
                                             "its resnet, attention, resnet; kohya's mid_lr_weight)", comma_list=True,
                                       example="0.5")
    up_lr_weight: str | None = option(None, "UNet learning-rate multiplier per output block, OUT00 first, as "
                                            "--down-lr-weight (kohya's up_lr_weight)", comma_list=True,
                                      example=",".join("1" * 12))
    block_lr_zero_threshold: float = option(0.0, "block multipliers at or below this become 0: no LoRA in that block "
                                                 "(kohya's block_lr_zero_threshold)", example="0.1")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = no clipping)", example="1.0")
    # sd-scripts' max-norm regularization: off by default there too (stylelora.lora.max_norm says why one uses it).
    scale_weight_norms: float = option(0.0, "cap each LoRA module's weight change at this norm after every step "
                                            "(kohya's --scale_weight_norms; 1 is its starting point; 0 = off)",
                                       example="1.0")


@dataclass(frozen=True)
class TrainSection:
    base: str = option("toy", "base model: toy | diffusers folder | .safetensors file | cached hub id", example="toy")
    base_config: str | None = option(None, "diffusers config folder for a single-file base")
    allow_pickle: bool = option(False, "allow a pickle .ckpt base (only for files you trust)")
    family: str | None = option(None, "base family whose preset fills the options marked 'preset' (unset: detected "
                                      "from the base's config files)", choices=FAMILIES, example="sd1")
    # QLoRA for diffusion: the frozen weights stored 4- or 8-bit (bitsandbytes), LoRA trained on top in fp32.
    quantize_base: str = option("none", "store the frozen UNet (and the text encoder when it is not trained) "
                                        "quantized", choices=QUANTIZATIONS, example="nf4")
    output: str | None = option(None, "run folder (unset: outputs/NAME); gets NAME.safetensors, config.toml, "
                                      "samples, logs")
    output_name: str | None = option(None, "adapter file name without .safetensors (unset: the data folder's name)",
                                     example="my-style")
    steps: int = option(1000, "optimizer steps", example="1000", widget=Widget("Steps", minimum=1))
    # kohya's --max_train_epochs, which wins over --max_train_steps there too.
    epochs: int | None = option(None, "train this many passes over the data (repeats included) instead of "
                                      "train.steps: the steps follow from the batches an epoch holds",
                                example="10", widget=Widget("Epochs (empty = the steps above)", minimum=1,
                                                            empty="train the steps above"))
    batch_size: int | None = option(None, "images per batch per process", example="2", preset=True,
                                    widget=Widget("Batch size (empty = the base family's)", minimum=1))
    seed: int = option(0, "seed for LoRA init, batch order and noise", example="0", widget=Widget("Seed", minimum=0))
    precision: str | None = option(None, "frozen base weights and autocast; LoRA weights and optimizer state stay "
                                         "fp32", choices=PRECISIONS, example="bf16", preset=True)
    # sd-scripts' --min_timestep / --max_timestep: train only part of the schedule (e.g. the late, detailed steps).
    min_timestep: int = option(0, "smallest training timestep drawn (kohya's --min_timestep)", example="0")
    max_timestep: int | None = option(None, "training timesteps drawn stay below this (kohya's --max_timestep; unset: "
                                            "the schedule's length, 1000)", example="1000")
    min_snr_gamma: float = option(5.0, "min-SNR loss weighting gamma (0 = plain MSE)", example="5")
    # Lin et al., arXiv 2305.08891: a schedule whose last step is pure noise, for bases fine-tuned on one (most are
    # v-prediction); sd-scripts' --zero_terminal_snr, off there too.
    zero_terminal_snr: bool = option(False, "rescale the training noise schedule so that its last timestep is pure "
                                            "noise (kohya's --zero_terminal_snr), for a base fine-tuned with it")
    debiased_estimation_loss: bool = option(False, "weight each sample by 1/sqrt(SNR) as well (kohya's "
                                                   "--debiased_estimation_loss), so nearly clean timesteps count "
                                                   "less; on top of min-SNR (--min-snr-gamma 0 for it alone, as "
                                                   "kohya's defaults have it)")
    loss_type: str = option("l2", "loss between prediction and target (kohya's --loss_type): l2 (squared), l1, or "
                                  "huber / smooth_l1 (pseudo-Huber: outlier images pull less)", choices=LOSS_TYPES,
                            example="huber")
    huber_schedule: str = option("snr", "scale of the huber losses over the timesteps (kohya's --huber_schedule): "
                                        "snr, exponential or constant", choices=HUBER_SCHEDULES, example="snr")
    huber_c: float = option(0.1, "scale of the huber losses on the noisiest timesteps (kohya's --huber_c)",
                            example="0.1")
    noise_offset: float = option(0.0, "noise offset (kohya's --noise_offset): each noise sample shifted by this "
                                      "times a random constant per channel, so the adapter can learn images darker "
                                      "or lighter overall than the base draws", example="0.05")
    noise_offset_random_strength: bool = option(False, "draw each batch's noise offset evenly between 0 and "
                                                       "train.noise_offset (kohya's --noise_offset_random_strength)")
    multires_noise_iterations: int = option(0, "multi-resolution noise (kohya's --multires_noise_iterations): this "
                                               "many layers of ever coarser noise added to each noise sample, so the "
                                               "adapter can change contrast and layout more (6-10 are usual; 0 = "
                                               "off)", example="6")
    multires_noise_discount: float = option(0.3, "weight of multi-resolution noise's coarser layers, raised to each "
                                                 "layer's number (kohya's --multires_noise_discount)", example="0.3")
    ip_noise_gamma: float = option(0.0, "input perturbation (kohya's --ip_noise_gamma): the latents are noised with "
                                        "this much extra noise that the target leaves out (0.1 is usual; 0 = off)",
                                   example="0.1")
    ip_noise_gamma_random_strength: bool = option(False, "draw each batch's input perturbation evenly between 0 and "
                                                         "train.ip_noise_gamma (kohya's "
                                                         "--ip_noise_gamma_random_strength)")
    # See stylelora/train/preservation.py. On by default: a character or style should show up when asked for, not
    # everywhere.
    preserve_base: float = option(1.0, "weight of the loss that keeps the base model's output on captions with the "
                                       "trigger words removed, so the adapter acts only when its trigger is in the "
                                       "prompt (0 = off)", example="1.0")
    preserve_decoys: float = option(0.5, "share of those trigger-free captions that get a random other word in the "
                                         "trigger's place, so the adapter answers its own trigger, not any new word",
                                    example="0.5")
    # On by default, as base preservation is: its decoys teach "another word where the trigger goes means the base",
    # and a stacked prompt has another adapter's trigger there. 0.25 (with caption dropout 0) makes every toy adapter
    # act beside another trigger and keeps its own rate; 0.5 weakens a character. docs/results.md "Blending".
    decoy_company: float = option(0.25, "share of the captions with the trigger that also get another word beside "
                                        "it, one the base barely reads (as another adapter's trigger), so the "
                                        "adapter still acts when a prompt names other adapters' triggers too "
                                        "(0 = captions as written)",
                                  example="0.25")
    # Unset: on exactly when the base's tokenizer splits a trigger into several tokens
    # (train.loop.with_coined_trigger_rules).
    # On the toy base the ink adapter, whose trigger `inkstyle` is four tokens, then draws its style on 0.94 of its
    # prompts instead of 0.58; pastel, whose trigger is one token, keeps pastel on beside coined triggers with it but
    # gives way in blends (split: stripes+pastel 0.94 -> 0.29). docs/results.md, "A style the defaults were never
    # tuned on".
    made_up_company: bool | None = option(None, "make half of the company words made-up words, as coined triggers "
                                                "are, so the adapter tells its own trigger from another that its "
                                                "base never saw (a trigger-free copy with such a word is trained "
                                                "toward the base; unset: on when the base's tokenizer splits a "
                                                "trigger into several tokens)")
    # Per base family (stylelora.presets): the toy base 0.2, measured (it keeps a soft style beside another adapter's
    # text encoder: toy stripes+pastel 0.10 -> 0.73); real bases 0 until measured on their text encoders, whose
    # hidden states have another scale. docs/results.md "Blending".
    clip_skip: int = option(1, "read captions from the text encoder's N-th layer from the end, as kohya's "
                            "--clip_skip (2 for bases trained that way, such as NovelAI-lineage anime models; SD "
                            "1.x/2.x); the layers after it get no LoRA, and generate with --clip-skip N",
                            example="2", widget=Widget("Clip skip (2 for anime bases)", minimum=1, maximum=12))
    text_noise: float | None = option(None, "std of Gaussian noise added to the text encoder's hidden states while "
                                            "training (0 = off), so the adapter still acts when another adapter's "
                                            "text-encoder LoRA moves its prompt", example="0.2", preset=True)
    gradient_checkpointing: bool | None = option(None, "trade compute for memory", preset=True)
    save_every: int = option(250, "checkpoint every N steps (0 = none; the final adapter is always written)",
                             example="250", widget=Widget("Checkpoint every N steps (0 = none)", minimum=0))
    # kohya's --save_every_n_epochs / --sample_every_n_epochs: turned into steps once the epoch's batches are known.
    save_every_n_epochs: int | None = option(None, "checkpoint every N epochs instead of --save-every's steps "
                                                   "(kohya's --save_every_n_epochs)", example="1")
    sample_every_n_epochs: int | None = option(None, "sample grid every N epochs instead of --sample-every's steps "
                                                     "(kohya's --sample_every_n_epochs)", example="1")
    keep_checkpoints: int = option(3, "keep the last K checkpoints", example="3")
    validate_every: int | None = option(None, "validation loss every N steps, with --validation-split (kohya's "
                                              "--validate_every_n_steps; unset: at each epoch's end)", example="100")
    validate_every_n_epochs: int | None = option(None, "validation loss every N epochs instead (kohya's "
                                                       "--validate_every_n_epochs)", example="1")
    max_validation_steps: int | None = option(None, "batches one validation loss takes at most (kohya's "
                                                    "--max_validation_steps; unset: every held-out image)",
                                              example="4")
    sample_every: int = option(250, "sample grid every N steps (0 = only at the end)", example="250",
                               widget=Widget("Sample grid every N steps (0 = at the end)", minimum=0))
    samples: bool = option(True, "sample grids during and at the end of the run (--no-samples: no sample grids)",
                           flag="--no-samples")
    sample_at_first: bool = option(False, "a sample grid before the first step too, to compare the others with: "
                                          "the base's own drawing of the prompts, or the --network-weights file's "
                                          "(kohya's --sample_at_first)")
    sample_prompts: tuple[str, ...] | None = option(None, "sample grid prompts, one a line of FILE in kohya's syntax "
                                                          "(`PROMPT --n NEGATIVE --w 512 --h 768 --d SEED --l CFG "
                                                          "--s STEPS`; # starts a comment); {trigger} is replaced by "
                                                          "the trigger words (toy: shapes; other bases: drawn from "
                                                          "the dataset's captions, plus one without the trigger)",
                                                    flag="--sample-prompts", preset=True)
    sample_seed: int = option(0, "seed of the first sample column", example="0")
    sample_steps: int | None = option(None, "sampling steps of the sample grid", example="20", preset=True)
    sample_guidance: float | None = option(None, "CFG scale of the sample grid", example="5.0", preset=True)
    resume: str | None = option(None, "continue a run exactly from a checkpoint folder, or latest", example="latest")
    format: str = option("kohya", "adapter key layout", choices=FORMATS, example="kohya")
    # kohya's --save_precision: the file people share; the weights keep training (and checkpoints resume) in fp32.
    save_precision: str = option("fp32", "precision of the adapter files written (kohya's --save_precision): fp16 "
                                         "or bf16 halve them; training and resuming stay fp32", choices=PRECISIONS,
                                 example="fp16")
    license: str = option("unspecified", "license named in the adapter's metadata and model card (e.g. "
                                         "CC-BY-4.0, openrail++)", example="CC-BY-4.0")
    description: str = option("", "one-line description in the adapter's metadata, sidecar and model card (\"\" = "
                                   "written from the family, trigger words and dataset size)")
    # kohya's --metadata_author / --metadata_tags: the SAI model spec's author and tags, which model sites read.
    author: str = option("", "author named in the adapter's metadata (modelspec.author)", example="jane")
    tags: str = option("", "comma-separated tags in the adapter's metadata (modelspec.tags)",
                       example="style, watercolor")
    overwrite: bool = option(False, "start a new run in a folder that already holds one")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    # Where each value came from ((dotted key, "flag" | "file run.toml" | "preset sd1: <source>" | ...), ...); an
    # option absent here has its declared default. Not part of the settings: equal configs may differ in it.
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def source_of(self, dotted: str) -> str:
        return dict(self.sources).get(dotted, "default")

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output or Path("outputs") / (self.train.output_name or "run"))

    @property
    def adapter_path(self) -> Path:
        return self.output_dir / f"{self.train.output_name}.safetensors"


SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig) if f.name != "sources"}
SECTION_CLASSES = {"data": DataConfig, "network": NetworkConfig, "optim": OptimConfig, "train": TrainSection}


@dataclass(frozen=True)
class OptionSpec:
    """One declared option, flattened: where it lives (section.key), its Python type and default, its `Option`."""

    dotted: str
    type: Any  # the field's type without `| None`
    optional: bool  # None is allowed (unset: derived from other settings or the base model)
    default: Any
    option: Option

    @property
    def key(self) -> str:
        return self.dotted.partition(".")[2]

    @property
    def section(self) -> str:
        return self.dotted.partition(".")[0]

    @property
    def flag(self) -> str | None:
        """The command-line flag ("DATA_DIR" for the positional data folder), or None for a TOML-only option."""
        if not self.option.cli:
            return None
        if self.option.flag == "":
            return "DATA_DIR"  # the one positional argument
        return self.option.flag or "--" + self.key.replace("_", "-")


def _spec(section: str, f: dataclasses.Field, hints: dict[str, Any]) -> OptionSpec:
    hint = hints[f.name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    return OptionSpec(f"{section}.{f.name}", base, optional, f.default, f.metadata["option"])


OPTION_SPECS: tuple[OptionSpec, ...] = tuple(
    _spec(name, f, typing.get_type_hints(cls)) for name, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls)
)
OPTIONS_BY_NAME = {spec.dotted: spec for spec in OPTION_SPECS}
CLI_FLAGS = {spec.dotted: spec.flag for spec in OPTION_SPECS if spec.flag}
OPTIONS_BY_KEY = {spec.key: spec for spec in OPTION_SPECS}  # keys are unique across sections


def default_text(spec: OptionSpec) -> str:
    """The default as help and docs show it ("" when there is nothing to show: unset, empty, or a flag's off)."""
    value = spec.default
    if value is None or value == "" or spec.type is bool or isinstance(value, tuple):
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- load


def load_config(toml_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < TOML file < overrides ({"optim.unet_lr": 1e-4, ...}; None values are "not given"), validated once."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    problems: list[str] = []
    sources: dict[str, str] = {}
    if toml_path is not None:
        from_file = _read_toml(Path(toml_path), problems)
        _merge(values, from_file)
        sources.update({f"{name}.{key}": f"file {Path(toml_path).name}" for name, table in from_file.items()
                        for key in table})
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or key not in _field_names(section):
            raise ConfigError(f"unknown setting {dotted!r}; valid ones: {', '.join(all_field_names())}")
        values[section][key] = value
        sources[dotted] = "flag"
    return with_sources(config_from_dict(values, problems=problems), sources)


def with_sources(config: TrainConfig, sources: dict[str, str]) -> TrainConfig:
    """`config` with `sources` recorded over the ones it had (see TrainConfig.sources)."""
    merged = {**dict(config.sources), **sources}
    return dataclasses.replace(config, sources=tuple(sorted(merged.items())))


def with_values(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """`config` with each dotted setting of `values` ({"optim.unet_lr": 1e-4, ...}) replaced; sources unchanged."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        section, key = dotted.split(".")
        by_section.setdefault(section, {})[key] = value
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changed)
                                          for section, changed in by_section.items()})


def config_from_dict(values: dict[str, dict[str, Any]], *, problems: list[str] | None = None) -> TrainConfig:
    """Build and validate a TrainConfig from {section: {key: value}}; raise one ConfigError listing every problem."""
    problems = list(problems or [])
    sections = {}
    for name, cls in SECTION_CLASSES.items():
        given = values.get(name, {})
        unknown = sorted(set(given) - set(_field_names(name)))
        for key in unknown:
            problems.append(f"unknown key {key!r} in [{name}]{_key_hint(key, name)}; valid keys: "
                            f"{', '.join(_field_names(name))}")
        typed = {key: _typed(name, key, value, problems) for key, value in given.items() if key not in unknown}
        sections[name] = cls(**{k: v for k, v in typed.items() if v is not _INVALID})
    config = TrainConfig(**sections)
    if not problems:
        problems.extend(_value_problems(config))
    if problems:
        raise ConfigError("invalid training settings:\n  - " + "\n  - ".join(problems))
    return _with_derived_defaults(config)


def _read_toml(path: Path, problems: list[str]) -> dict[str, dict[str, Any]]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML ({error}); see https://toml.io for the syntax") from None
    sections = {}
    for name, table in document.items():
        if name not in SECTIONS:
            hint = _key_hint(name, None, table)
            problems.append(f"{path.name}: unknown section or key {name!r} at the top level{hint}; settings go in the "
                            f"sections [{'], ['.join(SECTIONS)}]")
        elif not isinstance(table, dict):
            problems.append(f"{path.name}: {name!r} must be a [{name}] section, not a value")
        else:
            sections[name] = table
    return sections


def _key_hint(key: str, section: str | None, value: Any = None) -> str:
    """What an unknown TOML key (in [section], or at the top level: None, with its `value`) is likely meant to be:
    an option of another section, a kohya sd-scripts name (a kohya config file's keys are its flag names, in
    sections of its own), or a near spelling; "" when nothing is close. Why: a typo'd key is refused with the whole
    list of keys, and `max_train_steps = 10` called "unknown" alone would not say where `steps` goes."""
    import difflib

    if section is None and isinstance(value, dict):  # a misspelt section, or a kohya one ([training_arguments])
        close = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.75)
        if close:
            return f" (did you mean [{close[0]}]?)"
        hints = [f"{inner}{hint}" for inner in value if (hint := _key_hint(inner, None, value[inner]))]
        return f" (its keys: {'; '.join(hints)})" if hints else ""
    owners = [spec for spec in OPTION_SPECS if spec.key == key and spec.section != section]
    if owners:
        return f" (it belongs under [{owners[0].section}])"
    kohya = _kohya_name(key)
    if kohya:
        return f" (kohya sd-scripts' name; here: {kohya})"
    candidates = _field_names(section) if section else [*SECTIONS, *OPTIONS_BY_KEY]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    if not close:
        return ""
    if section or close[0] in SECTIONS:
        return f" (did you mean {close[0]!r}?)"
    return f" (did you mean {close[0]!r} under [{OPTIONS_BY_KEY[close[0]].section}]?)"


def _kohya_name(key: str) -> str | None:
    """Our option for a kohya sd-scripts option name, as a TOML key where its flag is one of ours, else the CLI's
    advice; None for a name kohya does not have."""
    advice = KOHYA_FLAGS.get(key.lower().replace("_", "-"))
    if advice is None:
        return None
    flag, _, rest = advice.partition(" ")
    spec = next((spec for spec in OPTION_SPECS if spec.flag == flag), None)
    return f"{spec.key} under [{spec.section}]{' ' + rest if rest else ''}" if spec else advice


def _merge(into: dict[str, dict[str, Any]], sections: dict[str, dict[str, Any]]) -> None:
    for name, table in sections.items():
        into[name].update(table)


def _field_names(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTION_CLASSES[section])]


def all_field_names() -> list[str]:
    return [f"{section}.{name}" for section in SECTION_CLASSES for name in _field_names(section)]


# ----------------------------------------------------------------------------- types

_INVALID = object()

def _typed(section: str, key: str, value: Any, problems: list[str]) -> Any:
    """`value` converted to the field's type (int → float, list → tuple), or _INVALID with a problem recorded."""
    spec = OPTIONS_BY_NAME[f"{section}.{key}"]
    base, optional = spec.type, spec.optional
    if value is None and optional:
        return None
    if spec.option.comma_list:
        value = _comma_text(value)
    converted = _convert(base, value)
    if converted is _INVALID:
        problems.append(f"{section}.{key} must be {_type_name(base)}{' (or left out)' if optional else ''} "
                        f"(got {value!r}){_example(f'{section}.{key}')}")
    return converted


def _comma_text(value: Any) -> Any:
    """A run.toml number or array of numbers as the comma-separated text the option takes (0.5 → "0.5", [1, 0] →
    "1,0", as kohya's network_args write them); anything else as it is, for the type check to refuse."""
    def number(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if number(value):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list) and value and all(number(item) for item in value):
        return ",".join(_comma_text(item) for item in value)
    return value


def _convert(base: Any, value: Any) -> Any:
    if base is bool:
        return value if isinstance(value, bool) else _INVALID
    if base is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if base is float:
        # inf and nan are refused here, once for every number: inf slips past the range rules (inf > 0) and would
        # only fail mid-run, as a NaN loss or an adapter that cannot be used.
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return _INVALID
        try:
            number = float(value)
        except OverflowError:  # a whole number too large for a float
            return _INVALID
        return number if math.isfinite(number) else _INVALID
    if base is str:
        return value if isinstance(value, str) else _INVALID
    if typing.get_origin(base) is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return tuple(value) if ok else _INVALID
    raise TypeError(f"no conversion for {base}")  # a new field type: add it here


def _type_name(base: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}
    return names.get(base, "a list of text")


# ----------------------------------------------------------------------------- values

EXAMPLES = {spec.dotted: spec.option.example for spec in OPTION_SPECS if spec.option.example}


def _example(dotted: str) -> str:
    example = EXAMPLES.get(dotted)
    if example is None:
        return ""
    flag = CLI_FLAGS.get(dotted)
    section, _, key = dotted.partition(".")
    toml = f"{key} = {example if _is_toml_literal(example) else repr(example)} under [{section}]"
    if flag and flag.startswith("--") and OPTIONS_BY_NAME[dotted].type is not bool:
        return f"; e.g. {flag} {example} (or {toml} in the --config file)"
    return f"; e.g. {toml} in the --config file"


def _is_toml_literal(text: str) -> bool:
    return bool(re.fullmatch(r"-?[\d.e+-]+|true|false", text))


def _choice(dotted: str, value: str, choices: tuple[str, ...]) -> str | None:
    if value in choices:
        return None
    return f"{dotted} must be one of {', '.join(choices)} (got {value!r}){_example(dotted)}"


def _rule(dotted: str, ok: bool, requirement: str, value: Any) -> str | None:
    return None if ok else f"{dotted} {requirement} (got {value!r}){_example(dotted)}"


def _value_problems(config: TrainConfig) -> list[str]:
    problems = _data_problems(config.data) + _network_problems(config.network)
    problems += _optim_problems(config.optim, config.network) + _train_problems(config.train, config.optim)
    problems += _validation_problems(config.data, config.train)
    return [p for p in problems if p] + _not_utf8_problems(config)


def _validation_problems(d: DataConfig, t: TrainSection) -> list[str | None]:
    keys = ("validate_every", "validate_every_n_epochs", "max_validation_steps")
    problems = [_rule(f"train.{key}", getattr(t, key) is None or getattr(t, key) >= 1, "must be at least 1",
                      getattr(t, key)) for key in keys]
    given = [f"train.{key}" for key in keys if getattr(t, key) is not None]
    if d.validation_seed is not None:
        given.append("data.validation_seed")
    if given and not d.validation_split:
        problems.append(f"{', '.join(given)} only apply to the validation loss, and no images are held out for "
                        "one: give --validation-split 0.1 (a tenth of the images), or leave them out")
    return problems


def _not_utf8_problems(config: TrainConfig) -> list[str]:
    """A setting that is not UTF-8 text: a path with a folder name unzipped from another system's encoding (Python
    keeps its bytes as surrogates). Refused here, since config.toml and the adapter's metadata are UTF-8 and writing
    them would fail after the base has loaded (a non-UTF-8 data folder also names the adapter)."""
    problems = []
    for name in SECTION_CLASSES:
        for key, value in dataclasses.asdict(getattr(config, name)).items():
            for text in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(text, str) and not _is_utf8(text):
                    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    problems.append(f"{name}.{key} is not UTF-8 text ({shown}): rename the file or folder with the "
                                    "undecodable bytes (e.g. unzip the archive with its encoding: unzip -O cp932)")
    return problems


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _data_problems(d: DataConfig) -> list[str | None]:
    positive_or_auto = "must be a positive multiple of data.bucket_step, or left out to use the base model's"
    problems = [
        _rule("data.dir", bool(d.dir.strip()), "is required: the folder of training images", d.dir),
        _rule("data.keep_tokens", d.keep_tokens >= 0, "must be 0 or more", d.keep_tokens),
        _rule("data.caption_dropout", d.caption_dropout is None or 0 <= d.caption_dropout <= 1,
              "is a probability between 0 and 1",
              d.caption_dropout),
        _rule("data.tag_dropout", 0 <= d.tag_dropout <= 1, "is a probability between 0 and 1", d.tag_dropout),
        _rule("data.max_token_length", d.max_token_length in (75, 150, 225), "is 75, 150 or 225 tokens (one, two "
              "or three windows of 75, as kohya's --max_token_length)", d.max_token_length),
        _choice("data.cache", d.cache, DATA_CACHES),
        _rule("data.validation_split", 0 <= d.validation_split < 1, "is a fraction from 0 (off) to below 1; 0.1 "
              "holds out a tenth of the images", d.validation_split),
        _rule("data.validation_seed", d.validation_seed is None or 0 <= d.validation_seed < SEED_LIMIT,
              "must be 0 or more and below 2**63", d.validation_seed),
        _rule("data.prior_loss_weight", d.prior_loss_weight >= 0, "must be 0 or more; 1 weighs a reg image as a "
              "training image", d.prior_loss_weight),
    ]
    if d.prior_loss_weight != 1 and not d.reg_dir:
        problems.append(f"data.prior_loss_weight ({d.prior_loss_weight:g}) weighs the regularization images, and "
                        "there are none: give --reg-dir FOLDER, or leave --prior-loss-weight out")
    for name in ("resolution", "bucket_step", "min_side", "max_side"):
        value = getattr(d, name)
        problems.append(_rule(f"data.{name}", value is None or value > 0, positive_or_auto, value))
    if d.random_crop and d.cache != "none":
        problems.append("data.random_crop needs data.cache = 'none': a cached latent is one fixed crop. "
                        "Use --cache none with random crops, or keep center crops (the default) and the cache")
    if d.cache_dir is not None and d.cache != "disk":
        problems.append(f"data.cache_dir is only used with data.cache = 'disk' (got cache = {d.cache!r}); "
                        "set --cache disk or drop cache_dir")
    return problems


def _network_problems(n: NetworkConfig) -> list[str | None]:
    problems = [
        _rule("network.rank", n.rank >= 1, "must be at least 1", n.rank),
        _rule("network.alpha", n.alpha > 0, "must be > 0 (scale = alpha / rank)", n.alpha),
        _choice("network.unet_targets", n.unet_targets, UNET_TARGETS),
    ]
    if (n.conv_rank is not None or n.conv_alpha is not None) and n.unet_targets != "locon":
        problems.append(f"network.conv_rank / conv_alpha only apply to network.unet_targets = 'locon' "
                        f"(got {n.unet_targets!r}); add --unet-targets locon or drop them")
    if n.dim_from_weights and not n.weights:
        problems.append("network.dim_from_weights takes the rank from network.weights' file, which is not set; add "
                        "--network-weights FILE or drop it")
    if n.conv_rank is not None:
        problems.append(_rule("network.conv_rank", n.conv_rank >= 1, "must be at least 1", n.conv_rank))
    if n.conv_alpha is not None:
        problems.append(_rule("network.conv_alpha", n.conv_alpha > 0, "must be > 0", n.conv_alpha))
    problems += [_rule(f"network.{key}", 0 <= getattr(n, key) < 1, "must be at least 0 (off) and below 1",
                       getattr(n, key)) for key in ("dropout", "rank_dropout", "module_dropout")]
    return problems + _block_problems(n, "network", ("block_dims", "block_alphas", "conv_block_dims",
                                                     "conv_block_alphas"))


def _optimizer_argument_problem(text: str) -> str | None:
    from stylelora.train.optim import optimizer_argument

    try:
        optimizer_argument(text)
    except ValueError as error:
        return f"optim.optimizer_args: {error}"
    return None


def _block_problems(section_values, section: str, keys: tuple[str, ...]) -> list[str | None]:
    """kohya's block lists (stylelora.train.block_settings): their syntax here, their lengths once the base is known."""
    from stylelora.train.block_settings import syntax_problem

    problems = [syntax_problem(key, getattr(section_values, key)) for key in keys
                if getattr(section_values, key) is not None]
    if section == "network" and section_values.unet_targets != "locon":
        problems += [f"network.{key} sets the 3x3 convs' LoRA, which only --unet-targets locon trains; add "
                     "--unet-targets locon or drop it" for key in ("conv_block_dims", "conv_block_alphas")
                     if getattr(section_values, key) is not None]
    if section == "optim" and section_values.block_lr_zero_threshold and all(
            getattr(section_values, key) is None for key in keys):
        problems.append("optim.block_lr_zero_threshold applies to --down-lr-weight, --mid-lr-weight and "
                        "--up-lr-weight, none of which is set; set one or drop it")
    return problems


def _optim_problems(o: OptimConfig, n: NetworkConfig) -> list[str | None]:
    problems = [
        _choice("optim.optimizer", o.optimizer, OPTIMIZERS),
        _choice("optim.lr_scheduler", o.lr_scheduler, LR_SCHEDULERS),
        _rule("optim.weight_decay", o.weight_decay >= 0, "must be 0 or more", o.weight_decay),
        _rule("optim.grad_accum", o.grad_accum >= 1, "must be at least 1 (1 = no accumulation)", o.grad_accum),
        _rule("optim.max_grad_norm", o.max_grad_norm >= 0, "must be 0 (no clipping) or more", o.max_grad_norm),
        _rule("optim.scale_weight_norms", o.scale_weight_norms >= 0, "must be 0 (off) or more, e.g. 1.0",
              o.scale_weight_norms),
        _rule("optim.loraplus_lr_ratio", o.loraplus_lr_ratio == 0 or o.loraplus_lr_ratio >= 1,
              "must be 0 (off) or at least 1; 16 is the LoRA+ paper's", o.loraplus_lr_ratio),
        _rule("optim.lr_scheduler_num_cycles", o.lr_scheduler_num_cycles >= 1, "must be at least 1",
              o.lr_scheduler_num_cycles),
        _rule("optim.lr_scheduler_power", o.lr_scheduler_power > 0, "must be > 0 (1 = linear decay)",
              o.lr_scheduler_power),
    ]
    # Said, not ignored as sd-scripts ignores them: a setting that changes nothing is a typo or a misunderstanding.
    if o.lr_scheduler_num_cycles != 1 and o.lr_scheduler != "cosine_with_restarts":
        problems.append(f"optim.lr_scheduler_num_cycles only applies to optim.lr_scheduler = 'cosine_with_restarts' "
                        f"(got {o.lr_scheduler!r}); add --lr-scheduler cosine_with_restarts or drop it")
    if o.lr_scheduler_power != 1 and o.lr_scheduler != "polynomial":
        problems.append(f"optim.lr_scheduler_power only applies to optim.lr_scheduler = 'polynomial' "
                        f"(got {o.lr_scheduler!r}); add --lr-scheduler polynomial or drop it")
    problems += [_optimizer_argument_problem(text) for text in o.optimizer_args]
    problems.append(_rule("optim.block_lr_zero_threshold", o.block_lr_zero_threshold >= 0, "must be 0 or more",
                          o.block_lr_zero_threshold))
    problems += _block_problems(o, "optim", ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    if o.unet_lr is not None:
        problems.append(_rule("optim.unet_lr", o.unet_lr > 0, "must be > 0", o.unet_lr))
    for key in ("text_encoder_lr", "text_encoder_2_lr"):  # SDXL's second encoder has its own
        lr = getattr(o, key)
        if lr is None:
            continue
        if not n.train_text_encoder:
            problems.append(f"optim.{key} is set but network.train_text_encoder is false "
                            "(--no-text-encoder); drop one of them")
        problems.append(_rule(f"optim.{key}", lr > 0, "must be > 0; to freeze the text encoder use --no-text-encoder",
                              lr))
    return problems


def _train_problems(t: TrainSection, o: OptimConfig) -> list[str | None]:
    problems = [
        _rule("train.base", bool(t.base.strip()), "is required: toy, a diffusers folder, a .safetensors file "
              "or a hub id", t.base),
        _rule("train.steps", t.steps >= 1, "must be at least 1", t.steps),
        _rule("train.batch_size", t.batch_size is None or t.batch_size >= 1, "must be at least 1", t.batch_size),
        _rule("train.seed", 0 <= t.seed < SEED_LIMIT, "must be 0 or more and below 2**63", t.seed),
        _rule("train.sample_seed", 0 <= t.sample_seed < SEED_LIMIT, "must be 0 or more and below 2**63",
              t.sample_seed),
        _choice("train.precision", t.precision, PRECISIONS) if t.precision is not None else None,
        _choice("train.quantize_base", t.quantize_base, QUANTIZATIONS),
        _choice("train.family", t.family, FAMILIES) if t.family is not None else None,
        _choice("train.format", t.format, FORMATS),
        _choice("train.save_precision", t.save_precision, PRECISIONS),
        _rule("train.min_timestep", t.min_timestep >= 0, "must be 0 or more", t.min_timestep),
        _rule("train.max_timestep", t.max_timestep is None or t.max_timestep > t.min_timestep,
              f"must be above train.min_timestep ({t.min_timestep}): timesteps are drawn from min up to below max",
              t.max_timestep),
        _rule("train.min_snr_gamma", t.min_snr_gamma >= 0, "must be 0 (off) or more; 5 is the usual value",
              t.min_snr_gamma),
        _rule("train.noise_offset", 0 <= t.noise_offset < 1, "must be in [0, 1); 0.05 is typical",
              t.noise_offset),
        _rule("train.multires_noise_iterations", t.multires_noise_iterations >= 0, "must be 0 (off) or more; 6 to "
              "10 are usual", t.multires_noise_iterations),
        _rule("train.multires_noise_discount", 0 < t.multires_noise_discount <= 1, "must be in (0, 1]; 0.3 is "
              "kohya's default", t.multires_noise_discount),
        _rule("train.ip_noise_gamma", 0 <= t.ip_noise_gamma < 1, "must be in [0, 1); 0.1 is usual",
              t.ip_noise_gamma),
        _choice("train.loss_type", t.loss_type, LOSS_TYPES),
        _choice("train.huber_schedule", t.huber_schedule, HUBER_SCHEDULES),
        _rule("train.huber_c", 0 < t.huber_c <= 1, "must be in (0, 1]; 0.1 is kohya's default", t.huber_c),
        _rule("train.preserve_base", t.preserve_base >= 0, "must be 0 (off) or more; 1 is the default",
              t.preserve_base),
        _rule("train.preserve_decoys", 0 <= t.preserve_decoys <= 1,
              "is a share between 0 (triggers only removed) and 1 (always a decoy word); 0.5 is the default",
              t.preserve_decoys),
        _rule("train.decoy_company", 0 <= t.decoy_company <= 1,
              "is a share between 0 (captions as written) and 1 (always a decoy word beside the trigger); 0.25 is "
              "the default", t.decoy_company),
        _rule("train.clip_skip", t.clip_skip >= 1, "counts layers from the end from 1 (the last, the default); 2 "
              "is the layer before it", t.clip_skip),
        _rule("train.text_noise", t.text_noise is None or 0 <= t.text_noise <= 1,
              "is a noise std between 0 (off) and 1; 0.2 is the toy base's default", t.text_noise),
        _rule("train.save_every", t.save_every >= 0, "must be 0 (no checkpoints) or more", t.save_every),
        *[_rule(f"train.{key}", getattr(t, key) is None or getattr(t, key) >= 1, "must be at least 1 (one epoch)",
                getattr(t, key)) for key in ("save_every_n_epochs", "sample_every_n_epochs")],
        _rule("train.keep_checkpoints", t.keep_checkpoints >= 1, "must be at least 1", t.keep_checkpoints),
        _rule("train.sample_every", t.sample_every >= 0, "must be 0 (only at the end) or more", t.sample_every),
        _rule("train.sample_steps", t.sample_steps is None or t.sample_steps >= 1, "must be at least 1",
              t.sample_steps),
        _rule("train.sample_guidance", t.sample_guidance is None or t.sample_guidance >= 1,
              "must be 1 (no guidance) or more", t.sample_guidance),
    ]
    huber_set = (t.huber_schedule, t.huber_c) != (TrainSection.huber_schedule, TrainSection.huber_c)
    if huber_set and t.loss_type not in HUBER_LOSSES:
        problems.append(f"train.huber_schedule / huber_c only apply to train.loss_type = 'huber' or 'smooth_l1' "
                        f"(got {t.loss_type!r}); add --loss-type huber or drop them")
    for flag, value in (("noise_offset", t.noise_offset), ("ip_noise_gamma", t.ip_noise_gamma)):
        if getattr(t, f"{flag}_random_strength") and not value:
            problems.append(f"train.{flag}_random_strength only applies with train.{flag} above 0; add e.g. "
                            f"--{flag.replace('_', '-')} 0.1 or drop it")
    if t.multires_noise_discount != TrainSection.multires_noise_discount and not t.multires_noise_iterations:
        problems.append("train.multires_noise_discount only applies with train.multires_noise_iterations above 0; "
                        "add e.g. --multires-noise-iterations 6 or drop it")
    if t.epochs is not None:
        problems.append(_rule("train.epochs", t.epochs >= 1, "must be at least 1", t.epochs))
    if o.warmup_steps is not None and t.epochs is None:  # with epochs, checked once the steps are known
        problems.append(_rule("optim.warmup_steps", 0 <= o.warmup_steps < max(1, t.steps),
                              f"must be 0 or more and smaller than train.steps = {t.steps}", o.warmup_steps))
    elif o.warmup_steps is not None:
        problems.append(_rule("optim.warmup_steps", o.warmup_steps >= 0, "must be 0 or more", o.warmup_steps))
    if t.output_name is not None:
        ok = t.output_name.strip() not in ("", ".", "..") and not re.search(r"[\\/:*?\"<>|]", t.output_name)
        problems.append(_rule("train.output_name", ok,
                              "must be a plain file name (not . or ..; no / \\ : * ? \" < > |)", t.output_name))
    if t.resume is not None:
        problems.append(_rule("train.resume", bool(t.resume.strip()), "must be a checkpoint folder or 'latest'",
                              t.resume))
    return problems + [_sample_prompt_problem(line) for line in t.sample_prompts or ()]


def _sample_prompt_problem(line: str) -> str | None:
    from stylelora.train.sample_prompts import parse_sample_prompt

    try:
        parse_sample_prompt(line)
    except ValueError as error:
        return f"train.sample_prompts: {error}"
    return None


def warmup_steps(config: TrainConfig) -> int:
    """The run's LR warmup: optim.warmup_steps, or unset a tenth of the final steps, at most 50. Worked out when
    used, not stored: a saved config.toml then holds no warmup the user never chose, which --epochs or a resume
    with more --steps would take for theirs."""
    if config.optim.warmup_steps is not None:
        return config.optim.warmup_steps
    return min(50, config.train.steps // 10)


def with_epoch_steps(config: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    """With train.epochs, the steps those epochs take at `batches_per_epoch` (one process's); ConfigError when a
    given warmup is not shorter than that. Checkpoints and sample grids every N epochs become every N × an epoch's
    steps."""
    config = _with_epoch_intervals(config, batches_per_epoch)
    epochs, accumulation = config.train.epochs, config.optim.grad_accum
    if epochs is None:
        return config
    steps = max(1, math.ceil(epochs * batches_per_epoch / accumulation))
    warmup = config.optim.warmup_steps
    if warmup is not None and warmup >= steps:
        raise ConfigError(f"optim.warmup_steps = {warmup} is not shorter than the {steps} steps that "
                          f"train.epochs = {epochs} takes; lower --warmup-steps or raise --epochs")
    source = f"{epochs} epochs × {batches_per_epoch} batches" + (f" / accumulation {accumulation}"
                                                                 if accumulation > 1 else "")
    given = dict(config.sources).get("train.steps")
    if given and "epochs" not in given:  # --epochs wins over --steps, as in kohya: say so where the steps are listed
        source += f"; the {config.train.steps} steps given ({given}) are not used"
    return with_sources(with_values(config, {"train.steps": steps}), {"train.steps": source})


def _with_epoch_intervals(config: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    t, per_epoch = config.train, max(1, math.ceil(batches_per_epoch / config.optim.grad_accum))
    validate_epochs = t.validate_every_n_epochs
    if validate_epochs is None and t.validate_every is None and config.data.validation_split > 0:
        validate_epochs = 1  # kohya's default: a validation loss at the end of each epoch
    values, sources = {}, {}
    for every, epochs, count in (("save_every", "save_every_n_epochs", t.save_every_n_epochs),
                                 ("sample_every", "sample_every_n_epochs", t.sample_every_n_epochs),
                                 ("validate_every", "validate_every_n_epochs", validate_epochs)):
        if count is not None:
            values[f"train.{every}"] = count * per_epoch
            given = dict(config.sources).get(f"train.{every}")
            sources[f"train.{every}"] = f"train.{epochs} = {count} × {per_epoch} steps an epoch" + (
                f"; the {getattr(config.train, every)} given ({given}) is not used" if given else "")
    return with_sources(with_values(config, values), sources) if values else config


def _with_derived_defaults(config: TrainConfig) -> TrainConfig:
    """Fill what follows from other fields alone: output name and folder. (The base family's preset fills
    learning rates, batch, precision and samples later: stylelora.presets.apply_preset; the warmup follows the
    final steps: warmup_steps.)"""
    name = config.train.output_name or _folder_name(config.data.dir) or "run"
    output = config.train.output or str(Path("outputs") / name)
    train = dataclasses.replace(config.train, output_name=name, output=output)
    return dataclasses.replace(config, train=train)


def _folder_name(folder: str) -> str:
    """The name a folder is known by, "" for none. Why absolute: `train .` or `train ..` (run from inside the
    dataset) would otherwise name the adapter "run" or "..", the latter a hidden file `...safetensors`."""
    folder = folder.rstrip("/\\")
    return Path(os.path.abspath(folder)).name if folder else ""


def with_model_defaults(config: TrainConfig, *, native_resolution: int, downsample_factor: int) -> TrainConfig:
    """A new config with resolution and bucket sides filled from the base model; raises ConfigError if they clash."""
    d = config.data
    step = d.bucket_step or downsample_factor
    resolution = d.resolution or native_resolution
    min_side = d.min_side or max(step, resolution // 2 // step * step)
    max_side = d.max_side or max(resolution, resolution * 2 // step * step)
    problems = []
    if step % downsample_factor:
        problems.append(f"data.bucket_step = {step} must be a multiple of {downsample_factor}, this base model's "
                        f"downsampling factor (VAE × UNet); e.g. --config with bucket_step = {downsample_factor}")
    for name, value in (("resolution", resolution), ("min_side", min_side), ("max_side", max_side)):
        if value % step:
            problems.append(f"data.{name} = {value} must be a multiple of the bucket step {step}; e.g. "
                            f"{max(step, value // step * step)}")
    if not min_side <= resolution <= max_side:
        problems.append(f"data sides must satisfy min_side ≤ resolution ≤ max_side (got {min_side} ≤ {resolution} "
                        f"≤ {max_side})")
    if problems:
        raise ConfigError("invalid training settings for this base model:\n  - " + "\n  - ".join(problems))
    data = dataclasses.replace(d, resolution=resolution, bucket_step=step, min_side=min_side, max_side=max_side)
    return dataclasses.replace(config, data=data)


# ----------------------------------------------------------------------------- save


def config_to_dict(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} with TOML-able values; unset (None) options are left out, as TOML has no null."""
    result = {}
    for name in SECTION_CLASSES:
        section = dataclasses.asdict(getattr(config, name))
        result[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items() if v is not None}
    return result


def config_to_toml(config: TrainConfig) -> str:
    """The settings as TOML; a value that did not come from its declared default says where it came from."""
    lines, section = [], ""
    for line in tomli_w.dumps(config_to_dict(config)).splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line)
        section = header.group(1) if header else section
        key = re.match(r"(\w+) = ", line)
        source = config.source_of(f"{section}.{key.group(1)}") if key else "default"
        lines.append(line if source == "default" else f"{line}  # {source}")
    return "\n".join(lines) + "\n"


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the config as TOML via a temp file + rename (readers see the old file or the new one)."""
    return write_text_atomic(path, config_to_toml(config))
