"""Reads one adapter file in any layout we accept (kohya, diffusers-peft, plain peft) as kohya keys + metadata.

The kohya and diffusers layouts are read by `stylelora.lora.io.load_adapter_state` (LyCORIS modules in a kohya
file as the plain LoRA of the same change: `stylelora.lora.lycoris`); this module adds the plain
peft layout (`PeftModel.save_pretrained`: `adapter_model.safetensors` with `base_model.model.*` keys and the
alphas in `adapter_config.json` beside it) and reports which layout a file had, for `inspect` and errors.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from stylelora.lora import formats, lycoris
from stylelora.lora.io import is_diffusers_peft_layout, load_adapter_state

LAYOUTS = ("kohya", "diffusers", "peft")
PEFT_KEY_PREFIX = "base_model.model."
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
# A peft text-encoder adapter names CLIP paths; transformers >= 5 flattened away the `text_model.` root.
TEXT_ENCODER_PATH_ROOTS = ("text_model.", "encoder.layers.")


class AdapterFileError(ValueError):
    """An adapter file cannot be used; the message names the file, says why, and what to do instead."""


@dataclass(frozen=True)
class AdapterFile:
    """One adapter file's tensors under kohya names (whatever layout it had on disk), metadata and layout."""

    path: Path
    layout: str
    state: dict = field(repr=False)
    metadata: dict[str, str]
    file_size: int
    peft_config: dict | None = None
    lycoris: dict[str, int] = field(default_factory=dict)  # {"LoHa"|"LoKr"|"LoCon (Tucker)": modules read as LoRA}


def weights_path(path: str | os.PathLike) -> Path:
    """The weights file: `path` itself, or the `adapter_model.safetensors` inside a peft adapter folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / PEFT_WEIGHTS_NAME
        if not inside.is_file():
            raise AdapterFileError(
                f"{path} is a folder without {PEFT_WEIGHTS_NAME}; pass an adapter .safetensors file "
                f"(or a peft adapter folder written by save_pretrained){_files_in(path)}."
            )
        return inside
    return path


def _files_in(folder: Path) -> str:
    """", such as FILE" naming the .safetensors files right in `folder`: a training run's folder holds its adapter
    (OUTPUT/NAME.safetensors), which users pass the folder of, as they would to A1111's Lora folder. Only files
    that are adapters by their header: a checkpoint folder's training state is not one."""
    files = sorted(str(path) for path in folder.glob("*.safetensors") if not path.name.startswith(".")
                   and _is_adapter(path))
    if not files:
        return ""
    more = f" (or one of {len(files) - 2} more)" if len(files) > 3 else f" (or {files[2]})" if len(files) == 3 else ""
    return ", such as " + " or ".join(files[:2]) + more


def _is_adapter(path: Path) -> bool:
    try:
        check_adapter_file(path)
    except (OSError, ValueError):
        return False
    return True


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read an adapter in kohya, diffusers or peft layout. Refuses pickles (.ckpt/.pt/.bin) and unknown layouts."""
    path = weights_path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        load_adapter_state(path)  # raises the library's own refusal: pickle (why) or file not found
    keys = _header_keys(path)
    peft_config = None
    if keys and all(key.startswith(PEFT_KEY_PREFIX) for key in keys):
        peft_config = _read_peft_config(path)
        state, metadata = _read_peft_state(path, peft_config)
        layout = "peft"
    else:
        state, metadata = load_adapter_state(path)
        layout = "kohya" if all(key.startswith("lora_") for key in keys) else "diffusers"
    return AdapterFile(path=path, layout=layout, state=state, metadata=metadata,
                       file_size=path.stat().st_size, peft_config=peft_config, lycoris=dict(lycoris.kinds_in(keys)))


def read_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """(tensor names, metadata) from the safetensors header only: cheap even for large files."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(
            f"{Path(path).name} is not a readable .safetensors file ({error}). It may be truncated: copy it again."
        ) from error


def check_adapter_file(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """Cheap validation of a candidate adapter (e.g. an upload): size cap, safetensors header, LoRA layout.

    Returns the layout ("kohya", "diffusers" or "peft"); reads only the header, never the tensors.
    """
    path = Path(path)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise AdapterFileError(
            f"{path.name} is {size / 2**20:.1f} MiB; adapters up to {max_bytes / 2**20:.0f} MiB are accepted."
        )
    keys, _ = read_header(path)
    if keys and all(key.startswith(PEFT_KEY_PREFIX) for key in keys):
        return "peft"
    if keys and all(key.startswith(("lora_unet_", "lora_te")) for key in keys):
        return "kohya"
    if is_diffusers_peft_layout(keys):
        return "diffusers"
    raise AdapterFileError(
        f"{path.name} is a safetensors file but not a LoRA adapter ({len(keys)} tensors, e.g. "
        f"{', '.join(sorted(keys)[:3]) or 'none'})."
    )


def _header_keys(path: Path) -> list[str]:
    return read_header(path)[0]


def _read_peft_config(weights: Path) -> dict:
    config_path = weights.with_name(PEFT_CONFIG_NAME)
    if not config_path.is_file():
        raise AdapterFileError(
            f"{weights.name} is in peft layout (base_model.model.* keys) but {config_path} is missing; it holds "
            "lora_alpha, without which the adapter's strength is unknown. Keep the two files together."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("use_dora"):
        raise AdapterFileError(f"{weights.name} is a DoRA adapter (use_dora in {PEFT_CONFIG_NAME}); only LoRA loads.")
    return config


def _module_alpha(config: dict, path: str, rank: int) -> float:
    """The kohya alpha giving peft's scale for this module (rsLoRA's alpha/sqrt(r) becomes alpha*sqrt(r)/r)."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    pattern = get_pattern_key(list(patterns), path)
    alpha = float(patterns.get(pattern, config.get("lora_alpha", rank)))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _read_peft_state(weights: Path, config: dict):
    """peft `base_model.model.<path>.lora_A.weight` keys -> kohya keys with `.alpha` from the config."""
    import torch
    from safetensors.torch import load_file

    raw = load_file(str(weights))
    _, metadata = read_header(weights)
    kohya, odd = {}, []
    for key, tensor in raw.items():
        try:
            peft_path, suffix = formats.split_peft_key(key[len(PEFT_KEY_PREFIX):])
        except ValueError:
            odd.append(key)
            continue
        is_text_encoder = peft_path.startswith(TEXT_ENCODER_PATH_ROOTS)
        path = "text_model." + peft_path if is_text_encoder and not peft_path.startswith("text_model.") else peft_path
        prefix = formats.TEXT_ENCODER_PREFIX if is_text_encoder else formats.UNET_PREFIX
        name = f"{prefix}_{path.replace('.', '_')}"
        kohya[f"{name}.{formats.PEFT_TO_KOHYA_SUFFIX[suffix]}"] = tensor
        if suffix == "lora_A.weight":
            alpha = _module_alpha(config, peft_path, tensor.shape[0])
            kohya[f"{name}.{formats.ALPHA_SUFFIX}"] = torch.tensor(alpha, dtype=torch.float32)
    if odd:
        raise AdapterFileError(
            f"{weights.name}: {len(odd)} of {len(raw)} peft tensors are not lora_A/lora_B weights "
            f"(e.g. {', '.join(sorted(odd)[:3])}); biases, embeddings and DoRA magnitudes cannot be applied as LoRA."
        )
    return kohya, metadata
