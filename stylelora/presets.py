"""Owns the base families' presets: the default of every option marked `preset` in stylelora.config, per family.

The toy world's values are the toy preset and nothing else: a real base gets the values its users run, each cited
beside it. `apply_preset` fills only the options a run left unset (a flag or the TOML file always wins) and records
where each value came from, so `config.toml`, the adapter's metadata and the start of the run can say so.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stylelora.config import FAMILIES, OPTION_SPECS, ConfigError, TrainConfig, with_sources, with_values

FAMILY_NAMES = {"toy": "toy base", "sd1": "SD 1.x", "sd2": "SD 2.x (512, epsilon)", "sd2-v": "SD 2.x (768, v-prediction)",
                "sdxl": "SDXL"}
TOY_SAMPLE_PROMPTS = (
    "{trigger}, a red circle on a white background",
    "{trigger}, a blue square on a black background",
    "{trigger}, a green triangle on a gray background",
    "a yellow star on a beige background",
)
DATA_PROMPTS = "from the data"  # the sample-prompt preset of real bases: drawn from the dataset's own captions
SAMPLE_PROMPTS_WITH_TRIGGER = 3


@dataclass(frozen=True)
class Value:
    """A preset value and where it comes from. `per_optimizer` values depend on optim.optimizer; `cuda` on the GPU."""

    value: Any
    source: str
    per_optimizer: dict[str, Any] | None = None
    cpu: Any = None  # the value without CUDA, when it differs

    def resolve(self, *, optimizer: str = "adamw", cuda: bool = False) -> Any:
        """The value a run with `optimizer`, on CUDA or not, gets."""
        if self.per_optimizer is not None:
            return self.per_optimizer[optimizer]
        return self.cpu if self.cpu is not None and not cuda else self.value


# Sources, cited once. Real-base values are what kohya sd-scripts documents for LoRA, diffusers' LoRA examples run,
# and what A1111 uses when it samples; the toy values were measured on the toy world (docs/results.md).
KOHYA_SD = "kohya-ss/sd-scripts docs/train_network.md §3.1 (--unet_lr 1e-4, --text_encoder_lr 1e-5, fp16)"
KOHYA_SDXL = ("kohya-ss/sd-scripts docs/sdxl_train_network.md §3 (--unet_lr 1e-4, --text_encoder_lr1/2 1e-5, bf16, "
              "gradient checkpointing recommended)")
DIFFUSERS_SD = "diffusers examples/text_to_image/README.md, LoRA (--train_batch_size=1, --resolution=512)"
DIFFUSERS_SDXL = "diffusers examples/text_to_image/README_sdxl.md, LoRA (--train_batch_size=1, --resolution=1024)"
SD2_V = "stabilityai/stable-diffusion-2-1: 768 px, v-prediction (its scheduler_config.json)"
PRODIGY = "Prodigy README: lr=1.0 (the optimizer estimates the step size; lr is a multiplier)"
A1111 = "AUTOMATIC1111 txt2img defaults (20 steps, CFG 7)"
TOY = "measured on the toy world (docs/results.md)"
# Caption dropout and text noise on the toy base: what lets an adapter keep its style beside another adapter's
# trigger and text encoder (docs/results.md "Blending"); a real base gets what its users run.
TOY_STACKING = "measured on the toy world: adapters that keep their style when stacked (docs/results.md, Blending)"
NO_CAPTION_DROPOUT = ("kohya-ss/sd-scripts library/train_util.py (--caption_dropout_rate default 0.0); diffusers "
                      "train_text_to_image_lora_sdxl.py (--proportion_empty_prompts default 0)")
# kohya leaves checkpointing off unless asked; OneTrainer turns it on for every model, SD 1.5 included. Its memory
# saving is what fits a 512 px run on an 8 GB GPU, and it brings the default run's peak under the 0.35x of a full
# fine-tune that docs/benchmarks.md measures (0.36x without it).
NO_TEXT_NOISE = ("kohya-ss/sd-scripts and diffusers' LoRA scripts add no noise to the text encoder's output; the "
                 "toy base's 0.2 is not measured on a real text encoder, whose hidden states have another scale")
ONETRAINER_CHECKPOINTING = "OneTrainer modules/util/config/TrainConfig.py: gradient_checkpointing on by default"
NOT_ON_CPU = "; fp32 without CUDA (half-precision autocast is slow on CPU)"


def _lrs(adamw: float, source: str) -> Value:
    return Value(adamw, f"{source}; prodigy 1.0: {PRODIGY}", per_optimizer={"adamw": adamw, "adamw8bit": adamw, "prodigy": 1.0})


def _real_base(*, resolution: int, resolution_source: str, te_lr: float, lr_source: str, precision: str,
               checkpointing: bool, checkpointing_source: str, batch_source: str) -> dict[str, Value]:
    return {
        "optim.unet_lr": _lrs(1e-4, lr_source),
        "optim.text_encoder_lr": _lrs(te_lr, lr_source),
        "optim.text_encoder_2_lr": _lrs(te_lr, lr_source),
        "train.batch_size": Value(1, batch_source),
        "data.resolution": Value(resolution, resolution_source),
        "train.gradient_checkpointing": Value(checkpointing, checkpointing_source),
        "train.precision": Value(precision, lr_source + NOT_ON_CPU, cpu="fp32"),
        "train.sample_prompts": Value(DATA_PROMPTS, "the dataset's captions: a few with the trigger, one without"),
        "train.sample_steps": Value(20, A1111),
        "train.sample_guidance": Value(7.0, A1111),
        "data.caption_dropout": Value(0.0, NO_CAPTION_DROPOUT),
        "train.text_noise": Value(0.0, NO_TEXT_NOISE),
    }


PRESETS: dict[str, dict[str, Value]] = {
    "toy": {
        "optim.unet_lr": Value(1e-3, TOY, per_optimizer={"adamw": 1e-3, "adamw8bit": 1e-3, "prodigy": 1.0}),
        "optim.text_encoder_lr": Value(2e-4, TOY, per_optimizer={"adamw": 2e-4, "adamw8bit": 2e-4, "prodigy": 1.0}),
        # The toy base has one text encoder; the value only matters for a small SDXL-architecture base.
        "optim.text_encoder_2_lr": Value(2e-4, TOY, per_optimizer={"adamw": 2e-4, "adamw8bit": 2e-4, "prodigy": 1.0}),
        "train.batch_size": Value(16, TOY),
        "data.resolution": Value(None, "the base's native size (32 px for the toy base)"),
        "train.gradient_checkpointing": Value(False, "a small model: nothing to save"),
        "train.precision": Value("fp32", TOY),
        "train.sample_prompts": Value(TOY_SAMPLE_PROMPTS, "toy-world scenes, three with the trigger"),
        "train.sample_steps": Value(20, TOY),
        "train.sample_guidance": Value(5.0, TOY),
        "data.caption_dropout": Value(0.0, TOY_STACKING),
        "train.text_noise": Value(0.2, TOY_STACKING),
    },
    "sd1": _real_base(resolution=512, resolution_source=DIFFUSERS_SD, te_lr=1e-5, lr_source=KOHYA_SD,
                      precision="fp16", checkpointing=True, checkpointing_source=ONETRAINER_CHECKPOINTING,
                      batch_source=DIFFUSERS_SD),
    "sd2": _real_base(resolution=512, resolution_source="stabilityai/stable-diffusion-2-1-base: 512 px",
                      te_lr=1e-5, lr_source=KOHYA_SD, precision="fp16", checkpointing=True,
                      checkpointing_source=ONETRAINER_CHECKPOINTING, batch_source=DIFFUSERS_SD),
    "sd2-v": _real_base(resolution=768, resolution_source=SD2_V, te_lr=1e-5, lr_source=KOHYA_SD, precision="fp16",
                        checkpointing=True, checkpointing_source="768 px activations: kohya-ss/sd-scripts "
                        "docs/train_network.md recommends it when memory is tight", batch_source=DIFFUSERS_SD),
    "sdxl": _real_base(resolution=1024, resolution_source=DIFFUSERS_SDXL, te_lr=1e-5, lr_source=KOHYA_SDXL,
                       precision="bf16", checkpointing=True, checkpointing_source=KOHYA_SDXL,
                       batch_source=DIFFUSERS_SDXL),
}
# What a family's preset changes for a coined trigger (one its base's tokenizer splits into several tokens), over the
# values above; `apply_coined_trigger_preset` applies it once the tokenizer is known. On the toy base the one-token
# triggers train their text encoder at 2e-4, and a coined one at that rate stays weak in every blend; and text noise,
# which keeps a one-token trigger's style through another adapter's text encoder, covers much of the smaller
# difference between a coined trigger's fragments and the made-up words beside it, and a faint style stays faint.
TOY_COINED = ("measured on the toy world: a coined trigger's text encoder learns its fragments at the UNet's rate "
              "(docs/results.md, A trigger the tokenizer splits)")
TOY_COINED_TEXT_ENCODER_LR = Value(1e-3, TOY_COINED, per_optimizer={"adamw": 1e-3, "adamw8bit": 1e-3, "prodigy": 1.0})
TOY_COINED_NO_TEXT_NOISE = ("measured on the toy world: without text noise a faint coined style shows more often (a "
                            "drop shadow on 0.61 of its prompts over three seeds, against 0.46) and its blends are a "
                            "tie (docs/results.md, Text noise and a coined trigger)")
COINED_TRIGGER_PRESETS: dict[str, dict[str, Value]] = {
    "toy": {"optim.text_encoder_lr": TOY_COINED_TEXT_ENCODER_LR, "optim.text_encoder_2_lr": TOY_COINED_TEXT_ENCODER_LR,
            "train.text_noise": Value(0.0, TOY_COINED_NO_TEXT_NOISE)},
}
PRESET_KEYS = tuple(spec.dotted for spec in OPTION_SPECS if spec.option.preset)
TEXT_ENCODER_LRS = ("optim.text_encoder_lr", "optim.text_encoder_2_lr")
# The real families without SDXL's second text encoder.
ONE_TEXT_ENCODER_FAMILIES = ("sd1", "sd2", "sd2-v")


def preset_value(family: str, dotted: str, *, optimizer: str = "adamw", cuda: bool = False) -> Any:
    """The preset's value of one option (None for the toy resolution: the base's native size)."""
    return PRESETS[family][dotted].resolve(optimizer=optimizer, cuda=cuda)


def sampling_defaults(family: str) -> tuple[int, float]:
    """(steps, CFG scale) for an image drawn without them: the family's sample-grid values, so `generate` draws as
    the run's samples did (A1111's 20 and 7 on SD 1.x/2.x and SDXL, 20 and 5 on the toy base)."""
    return preset_value(family, "train.sample_steps"), preset_value(family, "train.sample_guidance")


def base_sampling_defaults(base: str, *, config_dir: str | None = None, allow_pickle: bool = False
                           ) -> tuple[int, float]:
    """sampling_defaults of the family of base `base` (the --base forms), read from its config files, no weights.
    A base whose configs are not at hand fails with its own message when it loads; it is no toy, so it gets the
    real families' values meanwhile."""
    from stylelora.models.family import detect_family
    from stylelora.models.load import BaseModelError

    try:
        family = detect_family(base, config_dir=config_dir, allow_pickle=allow_pickle)
    except BaseModelError:
        family = "sd1"
    return sampling_defaults(family)


def apply_preset(config: TrainConfig, family: str, *, cuda: bool, captions: Sequence[str] | None = None,
                 triggers: Sequence[str] = ()) -> TrainConfig:
    """`config` with every preset option it left unset taken from `family`'s preset, and the sources recorded.

    captions/triggers: the dataset's, for a real base's sample prompts (a few with the trigger, one without); while
    they are None (before the data is scanned) those prompts stay unset, and a second call fills them.
    """
    if family not in PRESETS:
        raise ConfigError(f"train.family must be one of {', '.join(FAMILIES)} (got {family!r}); e.g. --family sd1")
    _check_second_text_encoder_lr(config, family)
    _check_clip_skip(config, family)
    filled: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for dotted in PRESET_KEYS:
        section, key = dotted.split(".")
        if getattr(getattr(config, section), key) is not None:
            continue
        value = preset_value(family, dotted, optimizer=config.optim.optimizer, cuda=cuda)
        if dotted in TEXT_ENCODER_LRS and not config.network.train_text_encoder:
            continue
        if dotted == "optim.text_encoder_2_lr" and config.optim.text_encoder_lr is not None:
            # --text-encoder-lr alone sets both of SDXL's encoders, as sd-scripts' --text_encoder_lr does.
            filled[dotted] = config.optim.text_encoder_lr
            sources[dotted] = f"optim.text_encoder_lr ({config.source_of('optim.text_encoder_lr')})"
            continue
        if value == DATA_PROMPTS:
            if captions is None:
                continue
            value = prompts_from_captions(captions, triggers)
        filled[dotted] = value
        sources[dotted] = f"preset {family}: {PRESETS[family][dotted].source}"
    resolved = with_values(config, {**filled, "train.family": family})
    if config.train.family is None:
        sources["train.family"] = "detected from the base's config files"
    return with_sources(resolved, sources)


def _check_second_text_encoder_lr(config: TrainConfig, family: str) -> None:
    """Refuse --text-encoder-2-lr on an SD 1.x/2.x base: it has one text encoder, and the flag would do nothing.
    Only the flag: a run's saved config.toml holds the preset's value for every family, and must load back."""
    if family in ONE_TEXT_ENCODER_FAMILIES and config.source_of("optim.text_encoder_2_lr") == "flag":
        raise ConfigError(f"--text-encoder-2-lr sets SDXL's second text encoder, but the base {config.train.base} is "
                          f"{FAMILY_NAMES[family]}, which has one: set its rate with --text-encoder-lr and drop "
                          "--text-encoder-2-lr.")


def _check_clip_skip(config: TrainConfig, family: str) -> None:
    """Refuse a clip skip on SDXL: its conditioning is both encoders' layer before the last already, and neither
    sd-scripts' SDXL trainer nor A1111 moves it."""
    if family == "sdxl" and config.train.clip_skip > 1:
        raise ConfigError(f"train.clip_skip is {config.train.clip_skip}, but an SDXL base reads both text encoders' "
                          "layer before the last already (kohya's SDXL scripts and A1111 do not move it): drop "
                          "--clip-skip.")


def apply_coined_trigger_preset(config: TrainConfig, coined: Sequence[str]) -> TrainConfig:
    """`config` with its family's values for a coined trigger (COINED_TRIGGER_PRESETS) where the family's preset
    chose the value; a flag or the TOML file always wins. `coined`: the triggers the base's tokenizer splits."""
    family = config.train.family
    entries = COINED_TRIGGER_PRESETS.get(family, {})
    if not coined or not entries:
        return config
    filled: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for dotted, entry in entries.items():
        source = config.source_of(dotted)
        if not source.startswith(f"preset {family}:"):
            continue  # set by the user (--text-encoder-lr sets both encoders), or unset (no text encoder trains)
        filled[dotted] = entry.resolve(optimizer=config.optim.optimizer, cuda=False)  # none depends on CUDA
        sources[dotted] = f"{_coined_source_prefix(family)}{', '.join(repr(t) for t in coined)}: {entry.source}"
    return with_sources(with_values(config, filled), sources)


def coined_trigger_choices(config: TrainConfig) -> list[tuple[str, str]]:
    """(dotted key, source) of each value `apply_coined_trigger_preset` set in `config`, in the sources' order."""
    entries = COINED_TRIGGER_PRESETS.get(config.train.family, {})
    prefix = _coined_source_prefix(config.train.family)
    return [(dotted, source) for dotted, source in config.sources if dotted in entries and source.startswith(prefix)]


def _coined_source_prefix(family: str | None) -> str:
    return f"preset {family}, coined trigger "


def prompts_from_captions(captions: Sequence[str], triggers: Sequence[str]) -> tuple[str, ...]:
    """A few of the dataset's captions that carry a trigger, plus one with the trigger removed (leak check).

    Without trigger words, the first few distinct captions. Chosen deterministically (every 'nth' caption), so the
    grids of one dataset compare across runs.
    """
    from stylelora.data.captions import without_triggers
    from stylelora.train.sample_prompts import without_options

    distinct = list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))
    if not distinct:
        return ()
    with_trigger = [c for c in distinct if triggers and without_triggers(c, triggers) is not None]
    pool = with_trigger or distinct
    stride = max(1, len(pool) // SAMPLE_PROMPTS_WITH_TRIGGER)
    chosen = pool[::stride][:SAMPLE_PROMPTS_WITH_TRIGGER]
    if with_trigger:
        stripped = without_triggers(chosen[0], triggers)
        if stripped:
            chosen.append(stripped)
    # " --" starts a per-prompt option in a sample prompt (kohya's syntax): a caption's own must not read as one.
    return tuple(without_options(prompt) for prompt in chosen)
