"""Owns which base family a model is (toy, sd1, sd2, sd2-v, sdxl), read from its config files without its weights.

The family picks the preset (stylelora.presets). It is told apart by architecture, as diffusers and kohya do:
two text encoders or `addition_embed_type = "text_time"` is SDXL; cross-attention width 768 is SD 1.x, 1024 is
SD 2.x (v-prediction → the 768 px model). The shipped toy base, and any other small model of the same
architecture (the test suites' tiny bases), takes the toy preset.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from stylelora.models.load import (
    TOY_BASE_DIR,
    BaseModelError,
    _cached_snapshot,
    check_config_dir_applies,
    resolve_base_source,
    single_file_config_folder,
)

PIPELINE_MODELS = ("unet", "text_encoder", "text_encoder_2")  # the pipeline attributes weightless_pipeline fills


def family_from_configs(unet: dict, scheduler: dict, *, has_second_text_encoder: bool, is_toy: bool) -> str:
    """The family of a model described by its UNet and scheduler configs."""
    if is_toy:
        return "toy"
    if has_second_text_encoder or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    width = unet.get("cross_attention_dim")
    if width == 768:
        return "sd1"
    if width == 1024:
        return "sd2-v" if scheduler.get("prediction_type") == "v_prediction" else "sd2"
    return "toy"  # a small model of SD architecture: the toy preset's values are the ones measured at that scale


def folder_family(folder: Path) -> str:
    """The family of a diffusers folder (model_index.json, unet/config.json, scheduler/scheduler_config.json)."""
    configs = folder_configs(folder)
    return family_from_configs(configs["unet"], configs["scheduler"],
                               has_second_text_encoder="text_encoder_2" in configs["index"],
                               is_toy=folder.resolve() == TOY_BASE_DIR.resolve())


def folder_geometry(folder: Path) -> dict[str, int]:
    """Native image size and downsampling factor (as train.loop.model_geometry gives them), from config files."""
    configs = folder_configs(folder)
    vae_factor = 2 ** (len(configs["vae"].get("block_out_channels", (0, 0, 0, 0))) - 1)
    sample_size = configs["unet"].get("sample_size", 64)
    sample_size = sample_size if isinstance(sample_size, int) else min(sample_size)
    unet_factor = 2 ** (len(configs["unet"].get("down_block_types", (0, 0, 0, 0))) - 1)
    return {"native_resolution": sample_size * vae_factor, "downsample_factor": vae_factor * unet_factor}


def folder_configs(folder: Path) -> dict[str, dict]:
    """A diffusers folder's model_index.json and its UNet, VAE and scheduler configs, as dicts ({} where absent)."""
    def read(name: str) -> dict:
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    return {"index": read("model_index.json"), "unet": read("unet/config.json"), "vae": read("vae/config.json"),
            "scheduler": read("scheduler/scheduler_config.json")}


def config_folder(spec: str, *, config_dir: str | None = None, allow_pickle: bool = False) -> Path | None:
    """The folder of config files that describes base `spec`; None for a single file without config_dir (the configs
    loading finds for it: pipeline_config_folder). A config_dir is refused or checked against the file as loading
    does it."""
    source = resolve_base_source(spec, allow_pickle=allow_pickle)
    check_config_dir_applies(spec, source, config_dir)
    if source.kind == "folder":
        return Path(source.location)
    if source.kind == "hub":
        snapshot = _cached_snapshot(source.location)
        if snapshot is None:
            raise BaseModelError(f"{spec} is not in the local Hugging Face cache; download it on a machine with "
                                 f"internet (`hf download {spec}`) and copy the cache here, or pass a local folder.")
        return snapshot
    return single_file_config_folder(Path(source.location), config_dir) if config_dir is not None else None


def pipeline_config_folder(spec: str, *, config_dir: str | None = None, allow_pickle: bool = False) -> Path:
    """The folder of config files loading builds base `spec` from (a single file without config_dir: the cached
    configs of its checkpoint type), or the refusal loading would give; no weights are read."""
    source = resolve_base_source(spec, allow_pickle=allow_pickle)
    if source.kind == "single_file":
        return single_file_config_folder(Path(source.location), config_dir)
    return config_folder(spec, config_dir=config_dir, allow_pickle=allow_pickle)


def base_unet_config(spec: str, *, config_dir: str | None = None, allow_pickle: bool = False,
                     cached: bool = False) -> dict | None:
    """The UNet config of the base `spec`, from its config files (no weights); None for a single file without a
    config folder. cached: a single file without one gets the configs loading finds in the Hugging Face cache,
    None where there are none (commands that never load the base have no later check to leave it to)."""
    folder = config_folder(spec, config_dir=config_dir, allow_pickle=allow_pickle)
    if folder is None and cached:
        folder = _cached_single_file_configs(spec, allow_pickle)
    return None if folder is None else folder_configs(folder)["unet"] or None


def _cached_single_file_configs(spec: str, allow_pickle: bool) -> Path | None:
    try:
        return pipeline_config_folder(spec, allow_pickle=allow_pickle)
    except BaseModelError:  # no cached configs (or a file whose type cannot be read): the caller says what to pass
        return None


def detect_family(spec: str, *, config_dir: str | None = None, allow_pickle: bool = False) -> str:
    """The family of the base `spec` (the --base forms), from the config files it loads with: no weights are read."""
    return folder_family(pipeline_config_folder(spec, config_dir=config_dir, allow_pickle=allow_pickle))


def weightless_pipeline(folder: Path) -> SimpleNamespace:
    """A stand-in for the pipeline a diffusers folder builds, without weights: its unet, text_encoder and
    text_encoder_2 (None where the folder has no such model) each carry only the `config` the loaded model would
    have. Checks that read only configs (train.loop.check_family) can then run before anything loads."""
    from diffusers.configuration_utils import FrozenDict
    from transformers import AutoConfig

    configs = folder_configs(folder)
    models = dict.fromkeys(PIPELINE_MODELS)
    for name in PIPELINE_MODELS:
        if (configs["index"].get(name) or [None])[0] is None or not (folder / name / "config.json").is_file():
            continue
        # What a loaded diffusers model's `config` is (keys readable as attributes), and transformers' own config.
        config = FrozenDict(configs["unet"]) if name == "unet" else AutoConfig.from_pretrained(folder / name)
        models[name] = SimpleNamespace(config=config)
    return SimpleNamespace(**models)
