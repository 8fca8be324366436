"""Reads/writes adapter .safetensors files (kohya or diffusers layout) atomically, with kohya/modelspec metadata."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save
from torch import nn

from stylelora.atomic import write_bytes_atomic
from stylelora.lora import components, formats, lycoris
from stylelora.lora.inject import add_lora_from_state, module_ranks

FORMATS = ("kohya", "diffusers")
# diffusers keeps the peft LoraConfig of each model in this metadata entry (loaders/lora_base.py).
DIFFUSERS_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
DIFFUSERS_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


# ----------------------------------------------------------------------------- hashes


def _hash_after_header(buffer: io.BufferedIOBase) -> str:
    """sha256 of a safetensors stream's tensor bytes, i.e. everything after the 8-byte size + JSON header."""
    header_size = int.from_bytes(buffer.read(8), "little")
    buffer.seek(8 + header_size)
    digest = hashlib.sha256()
    for chunk in iter(lambda: buffer.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def safetensors_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) the way kohya's train_util.precalculate_safetensors_hashes computes them.

    The model hash covers only the tensor bytes, so editing metadata later keeps it valid (A1111's
    additional-networks "addnet" hash). The legacy hash is sha256 of 64 KiB at offset 1 MiB of the file as
    serialised with only the ss_* metadata, first 8 hex digits (empty-read hash for files under 1 MiB).
    """
    training_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialised = save(state, training_metadata)
    model_hash = _hash_after_header(io.BytesIO(serialised))
    legacy_hash = hashlib.sha256(serialised[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


MODELSPEC_HASH_KEY = "modelspec.hash_sha256"


def hash_metadata(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The hash keys of a file about to hold `state` with `metadata`, from one in-memory serialisation: kohya's
    sshs_model_hash / sshs_legacy_hash, and, where the metadata follows the SAI model spec, modelspec.hash_sha256.

    The model spec defines hash_sha256 as "0x" + lowercase sha256 of all tensor content after the header, which is
    how sd-scripts' reference check (library/sai_model_spec.py) recomputes it from a file; sd-scripts leaves writing
    it to a TODO, so files it saves lack the key. Those are the bytes sshs_model_hash covers (a safetensors file lays
    out its tensors the same whatever its metadata), so both keys come from one pass over them: an SDXL-size adapter
    is not hashed twice.
    """
    model_hash, legacy_hash = safetensors_hashes(state, metadata)
    hashes = {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    if any(key.startswith("modelspec.") for key in metadata):
        hashes[MODELSPEC_HASH_KEY] = f"0x{model_hash}"
    return hashes


def file_model_hash(path: str | os.PathLike) -> str:
    """sshs_model_hash recomputed from a file on disk (what A1111 shows for the file)."""
    with open(path, "rb") as handle:
        return _hash_after_header(handle)


def file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(sshs_model_hash, sha256 of the whole file) in one read: the tensor bytes' hash A1111 shows (CivitAI's
    AutoV3), and the file's, header included, that CivitAI lists as SHA256 (AutoV2: its first 10 digits)."""
    whole, tensors = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as handle:
        size = handle.read(8)
        whole.update(size + handle.read(int.from_bytes(size, "little")))
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            whole.update(chunk)
            tensors.update(chunk)
    return tensors.hexdigest(), whole.hexdigest()


# ----------------------------------------------------------------------------- metadata


def kohya_metadata(*, rank: int, alpha: float, output_name: str, tag_frequency: dict[str, dict[str, int]],
                   dataset_dirs: dict[str, dict[str, int]], num_train_images: int, steps: int,
                   learning_rate: float, unet_lr: float | None, text_encoder_lr: float | None,
                   resolution: tuple[int, int] | int, training_started_at: float, title: str | None = None,
                   trigger_phrase: str | None = None, conv_rank: int | None = None, conv_alpha: float | None = None,
                   implementation: str = "diffusers", extra: dict[str, str] | None = None,
                   network_args: dict[str, str] | None = None) -> dict[str, str]:
    """kohya sd-scripts' ss_* training metadata + Stability modelspec keys for an SD1.x LoRA, all as strings.

    tag_frequency: {dataset dir: {tag: count}}; dataset_dirs: {dataset dir: {"n_repeats": r, "img_count": n}}.
    A text_encoder_lr of None means the text encoder was not trained. network_args: more of kohya's network_args
    (as strings), beside the conv_dim / conv_alpha a conv rank adds.
    """
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    date = datetime.datetime.fromtimestamp(int(training_started_at)).isoformat()
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_num_train_images": str(num_train_images),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(steps),
        "ss_learning_rate": str(learning_rate),
        "ss_unet_lr": str(unet_lr if unet_lr is not None else learning_rate),
        "ss_text_encoder_lr": str(text_encoder_lr if text_encoder_lr is not None else 0.0),
        "ss_network_train_unet_only": str(text_encoder_lr is None),
        # kohya writes the resolution as a Python tuple string.
        "ss_resolution": str((width, height)),
        "ss_training_started_at": str(training_started_at),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title or output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": date,
        "modelspec.prediction_type": "epsilon",
    }
    if trigger_phrase:
        metadata["modelspec.trigger_phrase"] = trigger_phrase
    args = dict(network_args or {})
    if conv_rank is not None:
        conv_alpha = alpha if conv_alpha is None else conv_alpha
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_alpha)), **args}
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    metadata.update(extra or {})
    return metadata


def _check_metadata(metadata: dict[str, str]) -> None:
    wrong = [f"{key}={type(value).__name__}" for key, value in metadata.items() if not isinstance(value, str)]
    if wrong or not all(isinstance(key, str) for key in metadata):
        raise TypeError(
            f"safetensors metadata keys and values must be str; {len(wrong)} are not: {', '.join(wrong[:5])}."
        )


# ----------------------------------------------------------------------------- model -> tensors


def _has_adapter(model: nn.Module | None, adapter_name: str) -> bool:
    return model is not None and adapter_name in (getattr(model, "peft_config", None) or {})


def _peft_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def kohya_state_from_models(unet: nn.Module, text_encoder: nn.Module | None, adapter_name: str = "default", *,
                            text_encoder_2: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The kohya state dict of one adapter on the UNet (and on each text encoder that has one).

    SD1.x/2.x: lora_unet_<diffusers path>, lora_te_; SDXL (text_encoder_2 given, or a text_time UNet) as sd-scripts
    writes it: lora_unet_<SAI/SGM path>, lora_te1_, lora_te2_ (see stylelora.lora.components).
    """
    if not _has_adapter(unet, adapter_name):
        raise ValueError(f"The UNet has no LoRA adapter named {adapter_name!r}; call add_lora first.")
    models = components.models_dict(unet, text_encoder, text_encoder_2)
    kohya: dict[str, torch.Tensor] = {}
    for component, model in models.items():
        if _has_adapter(model, adapter_name):
            state, ranks = _one_linear_alpha(model, _peft_state(model, adapter_name), module_ranks(model, adapter_name))
            kohya.update(formats.peft_to_kohya(state, ranks, components.component_names(models, component)))
    return kohya


def _one_linear_alpha(model: nn.Module, state: dict[str, torch.Tensor], ranks: dict[str, tuple[int, float]]):
    """The state and ranks with every linear module at the alpha most of them have: a module trained at another
    (kohya's block_alphas) keeps its exact weight change, its up factor scaled by its alpha / that alpha.

    Why: diffusers (0.42) reads a kohya file's attention alphas under names no module has
    (…attn1.processor.to_k_lora…), so those modules load at the file's most common alpha, and a file with several
    linear alphas draws another image there than in A1111 or ComfyUI.
    Convolutions keep their own alpha (kohya's conv_alpha), which diffusers reads."""
    from stylelora.lora.layers import is_wide_conv

    layers = dict(model.named_modules())
    linear = {path: shape for path, shape in ranks.items() if not is_wide_conv(layers[path].get_base_layer())}
    if len({alpha for _, alpha in linear.values()}) < 2:
        return state, ranks
    (common, _), = Counter(alpha for _, alpha in linear.values()).most_common(1)
    state, ranks = dict(state), dict(ranks)
    for path, (rank, alpha) in linear.items():
        if alpha != common:
            key = f"{path}.lora_B.weight"
            state[key] = state[key] * (alpha / common)
            ranks[path] = (rank, common)
    return state, ranks


def _portable_lora_config(ranks: dict[str, tuple[int, float]], model: nn.Module, adapter_name: str) -> dict:
    """The LoraConfig fields diffusers needs to rebuild the adapter, without fields newer peft versions added."""
    config = model.peft_config[adapter_name]
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
    }


def diffusers_state_from_models(unet: nn.Module, text_encoder: nn.Module | None, adapter_name: str = "default", *,
                                text_encoder_2: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(`unet.<path>.lora_A.weight`-style state, {"unet.r": ..., "text_encoder.r": ...} adapter metadata).

    Same layout as StableDiffusion(XL)Pipeline.save_lora_weights given peft state dicts. Text-encoder keys keep
    the `text_model.` root of the classic CLIP layout: diffusers strips it for a flattened transformers 5
    CLIPTextModel, and older diffusers/transformers need it.
    """
    if not _has_adapter(unet, adapter_name):
        raise ValueError(f"The UNet has no LoRA adapter named {adapter_name!r}; call add_lora first.")
    state, config = {}, {}
    for component, model in components.models_dict(unet, text_encoder, text_encoder_2).items():
        if not _has_adapter(model, adapter_name):
            continue
        root = formats.kohya_path_root(model)
        prefix = DIFFUSERS_PREFIXES[component]
        state.update({f"{prefix}.{root}{k}": v for k, v in _peft_state(model, adapter_name).items()})
        portable = _portable_lora_config(module_ranks(model, adapter_name), model, adapter_name)
        config.update({f"{prefix}.{k}": v for k, v in portable.items()})
    return state, config


# ----------------------------------------------------------------------------- files


def write_safetensors_atomic(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `state` to `path` so that readers see the old file or the new one, never a partial one.

    Serialised in memory, then written by the project's one atomic writer: temp file in the same folder,
    fsync, rename; the file gets the umask's permissions like every other file we write.
    """
    _check_metadata(metadata)
    return write_bytes_atomic(path, save(state, metadata))


def _tensors_for_file(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies; weights cast to `dtype` when given, alphas kept fp32 (an fp16 alpha would round)."""
    def file_dtype(key: str, tensor: torch.Tensor) -> torch.dtype:
        return tensor.dtype if dtype is None or key.endswith(".alpha") else dtype

    return {key: t.detach().to("cpu", dtype=file_dtype(key, t)).contiguous() for key, t in state.items()}


def save_adapter(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None, *,
                 metadata: dict[str, str], fmt: str = "kohya", adapter_name: str = "default",
                 dtype: torch.dtype | None = None, text_encoder_2: nn.Module | None = None) -> Path:
    """Save one adapter of the UNet (+ text encoders, when they have that adapter) as a .safetensors file.

    fmt "kohya": lora_unet_*/lora_te_* keys (SDXL: SAI UNet names, lora_te1_*/lora_te2_*) that A1111, ComfyUI,
    kohya and diffusers load. fmt "diffusers": peft keys under unet./text_encoder./text_encoder_2. with the
    LoraConfig in `lora_adapter_metadata`. Both get the
    kohya sshs_model_hash / sshs_legacy_hash and modelspec.hash_sha256 of the tensors actually written (hash_metadata).
    dtype: e.g. torch.float16 to halve the file (default: the adapter's own dtype, fp32).
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown adapter format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"Adapter files must end in .safetensors, got {Path(path).name}.")
    _check_metadata(metadata)
    metadata = dict(metadata)
    if fmt == "kohya":
        state = _tensors_for_file(kohya_state_from_models(unet, text_encoder, adapter_name,
                                                          text_encoder_2=text_encoder_2), dtype)
    else:
        raw_state, adapter_config = diffusers_state_from_models(unet, text_encoder, adapter_name,
                                                                text_encoder_2=text_encoder_2)
        state = _tensors_for_file(raw_state, dtype)
        metadata[DIFFUSERS_ADAPTER_METADATA_KEY] = json.dumps(adapter_config, indent=2, sort_keys=True)
    metadata.setdefault("format", "pt")
    metadata.update(hash_metadata(state, metadata))
    return write_safetensors_atomic(path, state, metadata)


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# Files that sit beside an adapter and get passed for it: a generated image, A1111's sidecar, the model card.
NOT_ADAPTER_SUFFIXES = {".png": "an image", ".jpg": "an image", ".jpeg": "an image", ".webp": "an image",
                        ".json": "a JSON file, such as A1111's sidecar", ".md": "a model card", ".toml": "a config",
                        ".txt": "a text file"}


def adapter_beside(path: Path) -> str:
    """", e.g. NAME.safetensors beside it" when that file exists (a sidecar or preview named after its adapter)."""
    stem = path.name.split(".")[0]
    twin = path.with_name(f"{stem}.safetensors")
    return f", e.g. {twin}" if twin.is_file() else ""


def missing_adapter_message(path: Path) -> str:
    """Adapter file not found, with a hint where the user typed an adapter's name instead of its file."""
    file, sep, weight = str(path).rpartition("=")
    if sep and Path(file).is_file():  # FILE=0.8, as some tools' configs write it
        return f"Adapter file not found: {path}; a weight follows a colon: {file}:{weight}"
    hint = "" if path.suffix else (" (give the file's path with .safetensors, or name an adapter of the adapters "
                                   "folder in the prompt as <lora:NAME:W>)")
    return f"Adapter file not found: {path}{hint}"


def _read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(missing_adapter_message(path))
    if path.suffix != ".safetensors":
        if path.suffix in PICKLE_SUFFIXES:
            why = "it is a pickle file, and unpickling can run arbitrary code hidden in it"
        elif path.suffix.lower() in NOT_ADAPTER_SUFFIXES:
            # An image or a sidecar, not a model: "convert it" would send the user looking for a converter.
            raise ValueError(f"{path.name} is not an adapter ({NOT_ADAPTER_SUFFIXES[path.suffix.lower()]}): give "
                             f"the adapter's .safetensors file{adapter_beside(path)}.")
        else:
            why = "only .safetensors files are read, because they hold plain tensors and cannot run code"
        raise ValueError(
            f"Refusing to load {path.name}: {why}. Convert it to .safetensors with a tool you trust, then load that."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Adapter file not found: {path} is a folder")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def _diffusers_to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Our/diffusers peft layout (`unet.<path>.lora_A.weight`) -> kohya keys, alphas from `lora_adapter_metadata`."""
    from peft.utils.other import get_pattern_key

    config = json.loads(metadata.get(DIFFUSERS_ADAPTER_METADATA_KEY, "{}"))
    # A second text encoder means SDXL: its encoders are lora_te1/lora_te2 and its UNet keeps diffusers paths here
    # (lora_unet_down_blocks_…), which the SDXL readers accept besides SAI names.
    sdxl = any(key.startswith("text_encoder_2.") for key in state)
    kohya_prefixes = components.SDXL_PREFIXES if sdxl else components.SD_PREFIXES
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        path, suffix = formats.split_peft_key(rest)
        if component in components.TEXT_ENCODERS and not path.startswith("text_model."):
            path = "text_model." + path
        name = f"{kohya_prefixes[component]}_{path.replace('.', '_')}"
        kohya[f"{name}.{formats.PEFT_TO_KOHYA_SUFFIX[suffix]}"] = tensor
        if suffix == "lora_A.weight":
            rank = tensor.shape[0]
            alpha = config.get(f"{component}.lora_alpha", rank)
            patterns = config.get(f"{component}.alpha_pattern", {})
            pattern = get_pattern_key(list(patterns), path)
            kohya[f"{name}.{formats.ALPHA_SUFFIX}"] = torch.tensor(float(patterns.get(pattern, alpha)))
    return kohya


def is_diffusers_peft_layout(keys) -> bool:
    """Whether tensor names (a state dict's keys) are diffusers' peft layout: unet./text_encoder.… ending in
    .lora_A.weight / .lora_B.weight (no adapter name: a peft model's own state names its adapter, `.default.`)."""
    prefixes = tuple(f"{prefix}." for prefix in DIFFUSERS_PREFIXES.values())
    suffixes = tuple(f".{suffix}" for suffix in formats.PEFT_TO_KOHYA_SUFFIX)
    keys = list(keys)
    return bool(keys) and all(key.startswith(prefixes) and key.endswith(suffixes) for key in keys)


def load_adapter_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(kohya state dict, metadata) of an adapter file in kohya or our diffusers layout, LyCORIS modules read as
    the plain LoRA of the same change (stylelora.lora.lycoris), peft's lora_A / lora_B suffixes under kohya names as
    lora_down / lora_up. Refuses pickles."""
    state, metadata = _read_safetensors(path)
    if state and all(key.startswith(("lora_unet_", "lora_te")) for key in state):
        state = formats.with_kohya_suffixes(state)
        if lycoris.needs_rewrite(state):
            try:
                return lycoris.as_plain_lora(state), metadata
            except ValueError as error:  # an incomplete module: name the file, one of several --lora perhaps
                raise ValueError(f"{Path(path).name}: {error}") from None
        return state, metadata
    if is_diffusers_peft_layout(state):
        return _diffusers_to_kohya(state, metadata), metadata
    sample = ", ".join(sorted(state)[:3])
    raise ValueError(
        f"{Path(path).name} is not a LoRA in kohya (lora_unet_*/lora_te_*) or diffusers-peft "
        f"(unet.*.lora_A.weight) layout; {len(state)} tensors, e.g. {sample}. Older diffusers layouts "
        f"(.lora.down.weight, lora_linear_layer) load through diffusers' pipe.load_lora_weights."
    )


def load_adapter_into(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None, *,
                      adapter_name: str = "default", text_encoder_2: nn.Module | None = None) -> dict[str, str]:
    """Our own loader: attach the file's LoRA to the UNet / text encoder(s) as peft adapter `adapter_name`.

    Returns the file's metadata. A file of the other family (SD1.x/2.x vs SDXL) is refused in one sentence; every
    part is converted (and checked) before any model is touched.
    """
    state, metadata = load_adapter_state(path)
    formats.group_kohya_modules(state).refuse_foreign(Path(path).name)
    models = components.models_dict(unet, text_encoder, text_encoder_2)
    components.check_adapter_family(Path(path).name, state, metadata, models)
    prefixes = components.component_prefixes(models)
    parts = formats.split_kohya_state(state, prefixes)
    converted = {}
    for component, prefix in prefixes.items():
        if not parts[prefix]:
            continue
        if models.get(component) is None:
            raise ValueError(f"{Path(path).name} has {component} LoRA weights but no {component} was given.")
        converted[component] = formats.kohya_to_peft(parts[prefix], components.component_names(models, component))
    for component, (peft_state, ranks) in converted.items():
        add_lora_from_state(models[component], peft_state, ranks, adapter_name)
    return metadata
