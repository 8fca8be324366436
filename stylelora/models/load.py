"""Base model loading: turns "toy" | hub id | diffusers folder | single checkpoint file into a StableDiffusionPipeline
(SD 1.x/2.x and the toy base) or a StableDiffusionXLPipeline (SDXL: two text encoders), chosen by the model's family.

One code path for the shipped toy base and real Stable Diffusion models. Everything runs offline: hub ids and
single-file configs are looked up in the local Hugging Face cache only. Every refusal says what to do instead.
torch and diffusers are imported inside functions so that importing this module stays cheap.
"""
from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

TOY_BASE_DIR = Path(__file__).parent / "toy" / "base"
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# "owner/name", as the hub spells repo ids; anything else that does not exist on disk is reported as a missing path.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files from_single_file reads from a config folder to build each pipeline component.
REQUIRED_CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
SDXL_CONFIG_FILES = ("text_encoder_2/config.json",)  # and a tokenizer_2 folder
SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
# The pipeline classes a base can be, with the arguments each is built with: no safety checker (SD), no invisible
# watermark (SDXL; diffusers adds one when the invisible-watermark package happens to be installed).
PIPELINE_ARGUMENTS = {
    SD_PIPELINE: {"safety_checker": None, "requires_safety_checker": False},
    SDXL_PIPELINE: {"add_watermarker": False},
}
# Key prefix of the UNet in original-layout (CompVis / A1111) single-file checkpoints.
ORIGINAL_UNET_PREFIX = "model.diffusion_model."
# Checkpoint families (as diffusers names them) stylelora loads, and the hub repos whose
# configs describe them, tried in order in the local cache. The first of each is diffusers' own default.
SINGLE_FILE_CONFIG_REPOS = {
    "v1": (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "runwayml/stable-diffusion-v1-5",
        "CompVis/stable-diffusion-v1-4",
    ),
    "v2": ("stabilityai/stable-diffusion-2-1",),
    "xl_base": ("stabilityai/stable-diffusion-xl-base-1.0",),
}
SDXL_MODEL_TYPES = ("xl_base",)
# diffusers' refusal of a checkpoint tensor whose shape is not the one the config files give the model.
SHAPE_MISMATCH = re.compile(r"because (\S+) expected shape torch\.Size\((\[[\d, ]*\])\), "
                            r"but got torch\.Size\((\[[\d, ]*\])\)")


class BaseModelError(Exception):
    """The base model could not be loaded; the message says why and what to do about it."""


@dataclass(frozen=True)
class BaseSource:
    """Where a base model comes from, decided from the spec with filesystem checks only (no heavy imports)."""

    kind: str  # "folder" | "single_file" | "hub"
    location: str  # folder or file path, or hub repo id


def load_base(
    spec: str = "toy",
    *,
    precision: str = "fp32",
    device: str | None = None,
    allow_pickle: bool = False,
    config_dir: str | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion base model on `device`: a StableDiffusionPipeline (safety checker off) for SD 1.x/2.x
    and the toy base, a StableDiffusionXLPipeline (no watermark) for SDXL.

    spec: "toy" (the shipped toy base), a local diffusers folder, a single `.safetensors` checkpoint, a pickle
    checkpoint (`.ckpt`/`.pt`/`.pth`/`.bin`, only with allow_pickle=True) or a hub id already in the local cache.
    config_dir: for single files, a diffusers folder (or cached hub id) with the matching architecture's configs.
    """
    _check_precision(precision)
    source = resolve_base_source(spec, allow_pickle=allow_pickle)
    check_config_dir_applies(spec, source, config_dir)
    device = _resolve_device(device, precision)
    import torch

    dtype = getattr(torch, PRECISIONS[precision])
    if source.kind == "folder":
        pipe = _load_diffusers_folder(source.location, dtype)
    elif source.kind == "hub":
        pipe = _load_cached_hub_model(source.location, dtype)
    else:
        pipe = _load_single_file(Path(source.location), config_dir, dtype)
    return pipe.to(device)


def resolve_base_source(spec: str, *, allow_pickle: bool = False) -> BaseSource:
    """Classify `spec` and refuse what cannot work, before anything heavy is imported or read."""
    if not isinstance(spec, str) or not spec.strip():
        raise BaseModelError('No base model given: pass "toy", a diffusers folder, a .safetensors file or a hub id.')
    if spec == "toy":
        if not (TOY_BASE_DIR / "model_index.json").is_file():
            raise BaseModelError(
                f"The toy base model is not built yet (expected a diffusers folder at {TOY_BASE_DIR}). "
                "Build it once with `stylelora toy build-base`, then retry."
            )
        return BaseSource("folder", str(TOY_BASE_DIR))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(
                f"{path} is a folder but not a diffusers model folder (it has no model_index.json). Pass the folder "
                "written by `save_pretrained`, a single .safetensors checkpoint, or a hub id."
            )
        return BaseSource("folder", str(path))
    if path.is_file():
        return BaseSource("single_file", str(_check_checkpoint_suffix(path, allow_pickle)))
    if HUB_ID_PATTERN.match(spec) and not spec.startswith("."):
        return BaseSource("hub", spec)
    raise BaseModelError(
        f"Base model not found: {path.resolve()} does not exist. Check the path, or pass \"toy\", a diffusers folder, "
        'a .safetensors file or a hub id like "stable-diffusion-v1-5/stable-diffusion-v1-5".'
    )


def check_config_dir_applies(spec: str, source: BaseSource, config_dir: str | None) -> None:
    """Refuse a config folder for a base that carries its own configs (a diffusers folder or hub id)."""
    if config_dir is not None and source.kind != "single_file":
        raise BaseModelError(
            f"config_dir only applies to single-file checkpoints; {spec!r} is a diffusers model (folder or hub id) "
            "that carries its own configs. Drop config_dir (CLI: --base-config)."
        )


def _check_checkpoint_suffix(path: Path, allow_pickle: bool) -> Path:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return path
    if suffix in PICKLE_SUFFIXES:
        if allow_pickle:
            return path
        raise BaseModelError(
            f"Refusing to load {path.name}: {suffix} files are Python pickles, and unpickling a file can run "
            "arbitrary code from whoever made it. Prefer a .safetensors version of this model. If you trust the "
            "file, pass allow_pickle=True (CLI: --allow-pickle); it is then read with torch's weights_only loader, "
            "which accepts tensors only."
        )
    raise BaseModelError(
        f"Unsupported checkpoint file {path.name}: expected a .safetensors file (or, with --allow-pickle, "
        f"one of {', '.join(PICKLE_SUFFIXES)}), or a diffusers folder."
    )


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BaseModelError(f"Unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")


def _resolve_device(device: str | None, precision: str) -> str:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except (RuntimeError, ValueError) as error:
        raise BaseModelError(f"Unknown device {device!r}: use cpu, cuda or cuda:N.") from error
    if device_type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"Device {device!r} requested but this torch build sees no CUDA GPU; use device cpu.")
    if device_type == "cpu" and precision == "fp16":
        raise BaseModelError(
            "fp16 on CPU is refused: many CPU kernels have no half-precision version, so it is slow or fails "
            "mid-run. Use precision bf16 (half the memory, supported on CPU) or fp32."
        )
    return device


def pipeline_class_name(folder: Path) -> str:
    """SD_PIPELINE or SDXL_PIPELINE for a diffusers folder, from its model_index.json; refuses other pipelines."""
    index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    name = index.get("_class_name")
    has_text_encoder = (index.get("text_encoder") or [None])[0] is not None
    if name == SDXL_PIPELINE or ("text_encoder_2" in index and has_text_encoder and "unet" in index):
        return SDXL_PIPELINE
    if name in (None, SD_PIPELINE):
        return SD_PIPELINE
    raise BaseModelError(
        f"{folder} holds a {name}; stylelora trains and generates with Stable Diffusion 1.x/2.x "
        f"({SD_PIPELINE}) and SDXL base ({SDXL_PIPELINE}) models. Pass one of those."
    )


def _pipeline_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def _load_diffusers_folder(folder: str, dtype: Any) -> StableDiffusionPipeline:
    name = pipeline_class_name(Path(folder))
    return _pipeline_class(name).from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                 **_streamed_components(Path(folder), dtype),
                                                 **PIPELINE_ARGUMENTS[name])


def _load_cached_hub_model(repo_id: str, dtype: Any) -> StableDiffusionPipeline:
    snapshot = _cached_snapshot(repo_id)
    if snapshot is None:
        raise BaseModelError(
            f"{repo_id} is not in the local Hugging Face cache, and stylelora works offline. On a machine with "
            f"internet run `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`) "
            "and copy the cache folder (~/.cache/huggingface/hub) here, or pass a local diffusers folder or "
            f".safetensors file instead. If you meant a local path, {Path(repo_id).resolve()} does not exist."
        )
    name = pipeline_class_name(snapshot)
    try:
        return _pipeline_class(name).from_pretrained(repo_id, dtype=dtype, local_files_only=True,
                                                     **_streamed_components(snapshot, dtype),
                                                     **PIPELINE_ARGUMENTS[name])
    except OSError as error:
        raise BaseModelError(
            f"{repo_id} is only partly in the local Hugging Face cache ({error}). Re-run `hf download {repo_id}` "
            "on a machine with internet and copy the cache here, or pass a local diffusers folder."
        ) from error


# ----------------------------------------------------------------------------- weights read straight into the dtype
# diffusers and transformers read a whole .safetensors file (memory-mapped) and cast it tensor by tensor, so the file's
# pages stay resident until every tensor is cast: loading an fp32 SD 1.5 UNet as bf16 peaked at 5.3 GB for a 1.6 GB
# result. The pipeline's big models are instead built weightless and filled one tensor at a time with plain reads,
# each cast to the run's dtype as it arrives: the peak is the loaded model plus one tensor. A component this cannot
# read exactly (no .safetensors file, other key names, an fp32-pinned module) is left to the library's own loader.

STREAMED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHTS_NAMES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}
READ_CHUNK_BYTES = 16 * 2**20  # a cast tensor is read this much at a time
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _streamed_components(folder: Path, dtype: Any) -> dict[str, Any]:
    """{component: model in `dtype`} for the pipeline's models whose weights can be streamed (see above)."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    loaded = {}
    for component in STREAMED_COMPONENTS:
        library, class_name = (index.get(component) or [None, None])[:2]
        if library in WEIGHTS_NAMES and class_name and (folder / component / "config.json").is_file():
            model = _stream_model(folder / component, library, class_name, dtype)
            if model is not None:
                loaded[component] = model
    return loaded


def _stream_model(folder: Path, library: str, class_name: str, dtype: Any) -> Any:
    """The model in `folder` with its weights read tensor by tensor into `dtype`; None: let the library load it."""
    import importlib

    from accelerate import init_empty_weights

    files = _weight_files(folder, WEIGHTS_NAMES[library])
    headers = [_safetensors_header(file) for file in files] if files else None
    model_class = getattr(importlib.import_module(library), class_name, None)
    if not headers or model_class is None or getattr(model_class, "_keep_in_fp32_modules", None):
        return None
    if any(info["dtype"] not in SAFETENSORS_DTYPES for _, header in headers for info in header.values()):
        return None
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (e.g. position ids) real
        if library == "diffusers":
            model = model_class.from_config(model_class.load_config(folder))
        else:
            from transformers import AutoConfig

            model = model_class(AutoConfig.from_pretrained(folder))
    expected = set(model.state_dict())
    non_persistent = {name for name, _ in model.named_buffers()} - expected  # some files still hold them
    in_files = {name for _, header in headers for name in header} - non_persistent
    if in_files != expected:
        return None  # legacy or renamed keys: the library's loader converts them
    state = {}
    for file, (start, header) in zip(files, headers):
        for name, tensor in _read_safetensors(file, start, header, dtype):
            if name in expected:
                state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    if library == "diffusers":
        model.register_to_config(_name_or_path=str(folder))
    else:  # what transformers' from_pretrained records
        model.config._name_or_path, model.config.dtype = str(folder), dtype
    return model.eval()


def _weight_files(folder: Path, weights_name: str) -> list[Path] | None:
    """The model's .safetensors file, or its shards as its index lists them; None when it has neither."""
    if (folder / weights_name).is_file():
        return [folder / weights_name]
    index = folder / f"{weights_name}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        if all((folder / shard).is_file() for shard in shards):
            return [folder / shard for shard in shards]
    return None


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset where the tensor data starts, {name: {"dtype", "shape", "data_offsets"}}) of a .safetensors file."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(size))
        except (ValueError, UnicodeDecodeError) as error:
            raise BaseModelError(f"{path} is not a readable .safetensors file ({error}). It may be truncated: "
                                 "download it again.") from error
    header.pop("__metadata__", None)
    return 8 + size, header


def _read_safetensors(path: Path, start: int, header: dict, dtype: Any) -> Iterator[tuple[str, Any]]:
    """(name, tensor) in file order, floating-point ones in `dtype`. Each is read with plain reads straight into its
    own tensor, or through one small reused buffer when it must be cast: no memory map and no full-size temporary."""
    import math

    import torch

    buffers: dict[Any, Any] = {}  # file dtype -> reused read buffer (casts only)
    with open(path, "rb", buffering=0) as handle:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            stored = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
            count = math.prod(info["shape"])
            if end - begin != count * stored.itemsize:
                raise BaseModelError(f"{path} is damaged: tensor {name} holds {end - begin} bytes, its shape needs "
                                     f"{count * stored.itemsize}. Download the file again.")
            tensor = torch.empty(info["shape"], dtype=dtype if stored.is_floating_point else stored)
            handle.seek(start + begin)
            if tensor.dtype == stored:
                _read_exactly(handle, tensor.reshape(-1), path, name)
            else:
                buffer = buffers.setdefault(stored, torch.empty(READ_CHUNK_BYTES // stored.itemsize, dtype=stored))
                flat = tensor.reshape(-1)
                for first in range(0, count, len(buffer)):
                    part = buffer[: min(len(buffer), count - first)]
                    _read_exactly(handle, part, path, name)
                    flat[first : first + len(part)].copy_(part)
            yield name, tensor


def _read_exactly(handle: Any, tensor: Any, path: Path, name: str) -> None:
    """Fill the contiguous 1-D `tensor` with its size in bytes from `handle`."""
    import torch

    data = tensor.view(torch.uint8).numpy()
    if data.size and handle.readinto(data) != data.size:
        raise BaseModelError(f"{path} ends inside tensor {name}: the file is truncated. Download it again.")


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id` (main revision) holding model_index.json, or None; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _load_single_file(path: Path, config_dir: str | None, dtype: Any) -> StableDiffusionPipeline:
    model_type = _single_file_model_type(path)
    config_folder = _single_file_config(path, model_type, config_dir)
    name = SDXL_PIPELINE if model_type in SDXL_MODEL_TYPES else SD_PIPELINE
    # With a local config folder and local_files_only, diffusers neither downloads nor guesses configs.
    # Pickle files are read by diffusers' load_state_dict with torch.load(weights_only=True).
    try:
        pipe = _pipeline_class(name).from_single_file(
            str(path), config=str(config_folder), local_files_only=True, dtype=dtype, **PIPELINE_ARGUMENTS[name]
        )
    except ValueError as error:
        mismatch = SHAPE_MISMATCH.search(str(error))
        if mismatch is None:
            raise
        raise _mismatched_configs_error(path, config_folder, config_dir, *mismatch.groups()) from error
    # from_single_file leaves name_or_path unset; PNG parameters read it for A1111's `Model` and `Model hash`.
    pipe.register_to_config(_name_or_path=str(path))
    return pipe


def _mismatched_configs_error(path: Path, folder: Path, config_dir: str | None, tensor: str, expected: str,
                              found: str) -> BaseModelError:
    # diffusers' own advice (ignore_mismatched_sizes) would load random weights in place of the file's.
    configs = f"the --base-config folder {folder}" if config_dir is not None else f"the cached configs in {folder}"
    return BaseModelError(
        f"{path.name} does not match {configs}: its tensor {tensor} has shape {found}, but those configs build it "
        f"with shape {expected}. Pass the config files of the same architecture as the checkpoint (--base-config "
        "DIR), e.g. the diffusers folder of the model the file was made from."
    )


def single_file_config_folder(path: Path, config_dir: str | None) -> Path:
    """The folder of configs from_single_file builds checkpoint `path` from: `config_dir`, else the cached configs
    of its checkpoint type; refused as loading refuses it (none found, another pipeline class). Reads the file's
    tensor names and the few tensors type detection needs, not its weights."""
    return _single_file_config(path, _single_file_model_type(path), config_dir)


def _single_file_model_type(path: Path) -> str:
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        with _open_safetensors(path) as handle:
            return _checkpoint_model_type(path, _LazySafetensors(handle))
    return _checkpoint_model_type(path, _load_pickle_weights_only(path))


def _checkpoint_model_type(path: Path, checkpoint: Mapping) -> str:
    """Which checkpoint family the file holds (diffusers' detection), refusing what this pipeline cannot hold."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(name.startswith(ORIGINAL_UNET_PREFIX) for name in checkpoint):
        # A LoRA passed as the base is a likely mix-up in a LoRA app; diffusers would fail with a vague error.
        looks_like_lora = any("lora" in name.lower() for name in checkpoint)
        hint = " It looks like a LoRA adapter: load it on top of a base model instead." if looks_like_lora else ""
        raise BaseModelError(
            f"{path.name} is not a full Stable Diffusion checkpoint: it has no UNet weights "
            f"({ORIGINAL_UNET_PREFIX}* keys).{hint}"
        )
    model_type = infer_diffusers_model_type(checkpoint)
    if model_type not in SINGLE_FILE_CONFIG_REPOS:
        raise BaseModelError(
            f"{path.name} looks like a {model_type!r} checkpoint; stylelora trains Stable Diffusion 1.x/2.x "
            "and SDXL base bases only. Pass an SD 1.5, SD 2.x or SDXL base checkpoint, or a diffusers folder."
        )
    return model_type


def _open_safetensors(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise BaseModelError(
            f"{path} is not a readable .safetensors file ({error}). It may be truncated: download it again."
        ) from error


class _LazySafetensors(Mapping):
    """A .safetensors file's tensors by name, each read only when asked: type detection needs a few, not GBs."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._names = list(handle.keys())
        self._name_set = set(self._names)

    def __getitem__(self, name: str) -> Any:
        if name not in self._name_set:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _load_pickle_weights_only(path: Path) -> Mapping:
    """Read a pickle checkpoint with torch's weights_only unpickler, which accepts only tensors and containers."""
    import pickle

    import torch

    try:
        # mmap keeps this inspection cheap for zip-format checkpoints (torch >= 1.6 saves); old formats can't mmap.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise BaseModelError(
            f"Refusing {path.name}: it holds Python objects besides tensors, which the safe weights_only loader "
            f"will not unpickle ({error}). Convert it to .safetensors on a machine you trust, or use another copy."
        ) from error
    except (RuntimeError, OSError, EOFError) as error:
        raise BaseModelError(f"{path} is not a readable checkpoint ({error}). It may be truncated.") from error
    # Training checkpoints nest the weights under "state_dict" (diffusers unwraps it the same way).
    while isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise BaseModelError(f"{path.name} does not hold a state dict (name -> tensor); it is not a model checkpoint.")
    return checkpoint


def _single_file_config(path: Path, model_type: str, config_dir: str | None) -> Path:
    """The folder of diffusers configs that tells from_single_file how to build each component."""
    if config_dir is not None:
        return _check_config_folder(_config_dir_folder(config_dir), model_type)
    candidates = SINGLE_FILE_CONFIG_REPOS[model_type]
    for repo_id in candidates:
        snapshot = _cached_snapshot(repo_id)
        if snapshot is not None:
            return _check_config_folder(snapshot, model_type)
    raise BaseModelError(
        f"{path.name} is a single-file SD {model_type} checkpoint. Building a pipeline from it needs the matching "
        f"diffusers config files, and none are in the local Hugging Face cache (looked for {', '.join(candidates)}). "
        "Either pass config_dir=<diffusers folder of the same architecture> (CLI: --base-config DIR), or on a "
        f'machine with internet run `hf download {candidates[0]} --include "*.json" --include "*.txt"` and copy the '
        "Hugging Face cache folder (~/.cache/huggingface/hub) here."
    )


def _config_dir_folder(config_dir: str) -> Path:
    folder = Path(config_dir).expanduser()
    if folder.is_dir():
        return folder
    snapshot = _cached_snapshot(config_dir) if HUB_ID_PATTERN.match(config_dir) else None
    if snapshot is not None:
        return snapshot
    raise BaseModelError(
        f"Config folder not found: {folder.resolve()} does not exist (nor is {config_dir!r} a hub id in the local "
        "cache). Pass a diffusers model folder (with model_index.json) of the same architecture as the checkpoint."
    )


def _check_config_folder(folder: Path, model_type: str = "v1") -> Path:
    sdxl = model_type in SDXL_MODEL_TYPES
    missing = [name for name in REQUIRED_CONFIG_FILES + (SDXL_CONFIG_FILES if sdxl else ()) if not (folder / name).is_file()]
    for tokenizer in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        if not any((folder / tokenizer / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            missing.append(f"{tokenizer}/vocab.json (or tokenizer.json)")
    if missing:
        raise BaseModelError(
            f"Config folder {folder} is incomplete: missing {', '.join(missing)}. Use a full diffusers folder "
            "(as written by save_pretrained, or a hub download of the base model's *.json and *.txt files)."
        )
    _check_pipeline_class(folder, sdxl)
    return folder


def _check_pipeline_class(folder: Path, sdxl: bool) -> None:
    pipeline_class = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    wanted = SDXL_PIPELINE if sdxl else SD_PIPELINE
    if pipeline_class not in (None, wanted):
        checkpoint = "an SDXL base checkpoint" if sdxl else "an SD 1.x/2.x checkpoint"
        raise BaseModelError(
            f"Config folder {folder} describes a {pipeline_class}, but the file is {checkpoint}; pass the "
            f"configs of a {wanted} of the same architecture."
        )
