"""`stylelora blend`: a weighted mix of adapters saved as one kohya-format adapter, exactly or at a chosen rank.

Per module the blend is delta = sum_i w_i * alpha_i/r_i * up_i @ down_i (UNet weight for lora_unet_*, text-encoder
weight for lora_te_*). `exact` stores that sum losslessly by concatenating ranks (weights folded into the up
matrices, alpha = total rank so the scale is 1). `rank=R` stores the best rank-R approximation (truncated SVD) and
reports the relative Frobenius error ||delta - approx|| / ||delta|| of every module. `blend_mode` (see
`stylelora.lora.blend_modes`) replaces the sum where several inputs share a module; the file stays a plain kohya LoRA.
A ties merge is not low rank, so unless `exact` it is stored, by SVD, at the rank the sum would have.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stylelora.atomic import check_file_target
from stylelora.lora import blend_modes, formats
from stylelora.lora.block_weights import BlockLayout, BlockWeightError
from stylelora.lora.components import UNKNOWN_ARCHITECTURE, adapter_architecture
from stylelora.lora.inspect import BLEND_METADATA_KEY, trigger_words
from stylelora.lora.spec import AdapterSpec, as_specs


@dataclass
class ModuleTerms:
    """One module's contributions: (w * scale * up (out, r), down (r, n)) pairs, and the file layout to write."""

    out_features: int
    down_shape: tuple[int, ...]  # trailing shape of lora_down: (in,) or (in, kh, kw)
    up_is_conv: bool
    up_terms: list = field(default_factory=list)
    down_terms: list = field(default_factory=list)


@dataclass(frozen=True)
class BlendReport:
    """What `blend` wrote: mode, rank, per-module relative Frobenius error (all 0 for exact)."""

    path: Path
    mode: str  # "exact" | "svd"
    rank: int | None
    module_errors: dict[str, float]
    module_ranks: dict[str, int]
    blend_mode: str = "sum"  # how modules that several inputs share were combined (blend_modes.MODES)

    @property
    def max_error(self) -> float:
        return max(self.module_errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return statistics.fmean(self.module_errors.values()) if self.module_errors else 0.0

    def summary(self, worst: int = 5) -> str:
        top = max(self.module_ranks.values(), default=0)
        ranks = (f" rank {self.rank}" if self.rank else f" at the inputs' total rank (up to {top}; the exact mode, "
                 "--exact, keeps every rank)" if self.mode == "svd" else f" (ranks up to {top})")
        how = "" if self.blend_mode == "sum" else f", blend mode {self.blend_mode}"
        lines = [f"{len(self.module_errors)} modules, {self.mode}{ranks}{how}; "
                 f"relative error max {self.max_error:.3e}, mean {self.mean_error:.3e}"]
        if self.mode == "svd":
            ranked = sorted(self.module_errors.items(), key=lambda item: -item[1])[:worst]
            lines += [f"  {error:.3e}  {name}" for name, error in ranked]
        return "\n".join(lines)


def _group_modules(state: dict, file_name: str) -> dict[str, dict[str, Any]]:
    grouped = formats.group_kohya_modules(state)
    grouped.refuse_foreign(file_name)
    incomplete = grouped.incomplete()
    if incomplete:
        raise ValueError(f"{file_name}: modules without both lora_down and lora_up: {', '.join(incomplete[:3])}.")
    return grouped.modules


def _unet_layout_config(file) -> dict:
    """The UNet config whose block numbering an adapter's kohya names follow: the toy base's for a toy adapter, the
    published SDXL or SD 1.5 one (SD 2.x numbers its blocks as SD 1.x does, with Linear proj_in/proj_out) by the
    file's family."""
    from stylelora.lora.components import SDXL_ARCHITECTURE
    from stylelora.lora.sd15 import sd15_config
    from stylelora.lora.sdxl import sdxl_config

    if file.metadata.get("ss_stylelora_base_family") == "toy":
        from stylelora.models.family import base_unet_config

        return base_unet_config("toy")
    architecture = adapter_architecture(file.state, file.metadata)
    if architecture.startswith(SDXL_ARCHITECTURE):
        return sdxl_config("unet")
    if architecture.startswith("stable-diffusion-v2"):  # SD 1.x's blocks; Linear proj_in/out, a 1024-wide context
        return {**sd15_config("unet"), "use_linear_projection": True, "cross_attention_dim": 1024}
    if architecture.startswith("stable-diffusion-v1"):
        return sd15_config("unet")
    raise BlockWeightError(f"{file.path.name}: its base family is not known ({architecture}), so its UNet blocks "
                           "cannot be numbered; apply the block weights at generation (--lora FILE:W:lbw=...), where "
                           "the base is loaded.")


def _in_family_layout(modules: dict, file, unet_config: dict | None) -> dict:
    """The modules under the names and in the shapes kohya writes for their layers. Names: an SD 1.x/2.x UNet's
    modules under diffusers paths, an SDXL one's under SAI ones (other tools write either; A1111 and ComfyUI read
    both, diffusers only kohya's), so the blend loads everywhere and two inputs spelling a layer apart add up. Shapes:
    a convolution's (r, in, kh, kw) and (out, r, 1, 1), a Linear's (r, in) and (out, r); other trainers store a 1x1
    convolution Linear-shaped or the reverse, and LyCORIS a kh x kw one flat, which diffusers refuses. The UNet's
    layers are those of `unet_config`, else of the file's family (its published config, built weightless); a file of
    no known family keeps its UNet names and shapes. The text encoders (CLIP) have only Linear layers."""
    for name, parts in modules.items():
        if formats.module_component(name) == "text_encoder":
            for suffix in formats.KOHYA_TO_PEFT_SUFFIX:
                if parts[suffix].dim() == 4 and tuple(parts[suffix].shape[2:]) == (1, 1):
                    parts[suffix] = parts[suffix].flatten(1)
    layers = _unet_layers(modules, file, unet_config)
    laid_out: dict[str, dict] = {}
    spelled: dict[str, str] = {}  # written name: the name the file gives it
    for name, parts in modules.items():
        written, layer = layers.get(name, (name, None))
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if layer is None or up.shape[0] != layer.weight.shape[0] or down[0].numel() != layer.weight[0].numel():
            written = name  # not this family's layer: `_add_terms` compares the inputs' shapes
        else:
            parts["lora_down.weight"] = formats.fit_to_layer(down, layer, is_down=True)
            parts["lora_up.weight"] = formats.fit_to_layer(up, layer)
        if written in spelled:
            raise ValueError(f"{file.path.name} holds one layer twice, as {spelled[written]} and as {name}: the file "
                             "is damaged or two files were merged by hand. Keep one of the two spellings.")
        laid_out[written], spelled[written] = parts, name
    return laid_out


def _unet_layers(modules: dict, file, unet_config: dict | None) -> dict:
    """{kohya name, either spelling: (the name kohya writes, weightless layer)} of the UNet the file's modules name
    ({} for an unknown family)."""
    if not any(formats.module_component(name) == "unet" for name in modules):
        return {}
    try:
        config = unet_config or _unet_layout_config(file)
    except BlockWeightError:
        return {}
    return _family_unet_layers(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _family_unet_layers(config_json: str) -> dict:
    """_unet_layers' map for one UNet config, built once (SDXL's weightless UNet takes ~0.5 s), for every input."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from stylelora.lora.components import component_names

    with init_empty_weights():
        names = component_names({"unet": UNet2DConditionModel.from_config(json.loads(config_json))}, "unet")
    return {name: (names.by_path[path], names.layers[path]) for name, path in names.by_name.items()}


def _block_multiplier(spec: AdapterSpec, file, unet_config: dict | None):
    """kohya module name -> the multiplier of `spec.blocks` for the UNet block it is in (1 where it has none), on
    `unet_config`'s blocks (None: those of the file's family)."""
    if spec.blocks is None:
        return lambda name: 1.0
    layout = BlockLayout.from_config(unet_config or _unet_layout_config(file))
    unet_multiplier = layout.multiplier_of(spec.blocks)
    return lambda name: unet_multiplier(name) if formats.module_component(name) == "unet" else 1.0


def _add_terms(terms: dict[str, ModuleTerms], modules: dict, spec: AdapterSpec, file,
               unet_config: dict | None = None) -> None:
    file_name, block_multiplier = file.path.name, _block_multiplier(spec, file, unet_config)
    for name, parts in modules.items():
        weight = spec.weight_for(formats.module_component(name)) * block_multiplier(name)
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        entry = terms.setdefault(name, ModuleTerms(out_features=up.shape[0], down_shape=tuple(down.shape[1:]),
                                                   up_is_conv=up.dim() == 4))
        # (r, in) and (r, in, 1, 1) are the same Linear; anything else is another architecture.
        if (up.shape[0], _numel(tuple(down.shape[1:]))) != (entry.out_features, _numel(entry.down_shape)):
            raise ValueError(
                f"{file_name}: module {name} has shape {(up.shape[0],) + tuple(down.shape[1:])} but another input has "
                f"{(entry.out_features,) + entry.down_shape}: the adapters were made for different base architectures."
            )
        if weight != 0.0:
            entry.up_terms.append(up.reshape(up.shape[0], rank) * (float(weight) * alpha / rank))
            entry.down_terms.append(down.reshape(rank, -1))


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _exact(entry: ModuleTerms):
    import torch

    return torch.cat(entry.up_terms, dim=1), torch.cat(entry.down_terms, dim=0), 0.0


def _truncated_svd(entry: ModuleTerms, rank: int):
    """Best rank-`rank` factors of (sum of ups) @ (sum of downs), and the relative Frobenius error.

    The sum has rank K <= total input rank, so QR of both factors reduces the SVD to a K x K matrix:
    delta = Qa (Ra Rb^T) Qb^T, and the singular values of Ra Rb^T are those of delta.
    """
    import torch

    ups, downs = (torch.cat(entry.up_terms, dim=1).double(), torch.cat(entry.down_terms, dim=0).double())
    q_up, r_up = torch.linalg.qr(ups)
    q_down, r_down = torch.linalg.qr(downs.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    keep = max(1, min(rank, int(s.numel())))
    root = s[:keep].sqrt()
    # Split the singular values evenly so neither factor carries all the magnitude (kinder to fp16 files).
    new_up = (q_up @ u[:, :keep]) * root
    new_down = root[:, None] * (vh[:keep] @ q_down.T)
    total = float(s.square().sum())
    error = (float(s[keep:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return new_up.float(), new_down.float(), error


def _module_tensors(name: str, entry: ModuleTerms, up, down, dtype) -> dict:
    import torch

    rank = up.shape[1]
    up = up.reshape(up.shape[0], rank, 1, 1) if entry.up_is_conv else up
    down = down.reshape(rank, *entry.down_shape)
    return {
        f"{name}.lora_down.weight": down.to(dtype).contiguous(),
        f"{name}.lora_up.weight": up.to(dtype).contiguous(),
        # alpha == rank: the scale is 1, the weights already sit in the up matrices.
        f"{name}.alpha": torch.tensor(float(rank), dtype=torch.float32),
    }


def _read_inputs(specs):
    from stylelora.lora.adapter_file import read_adapter_file

    files = [read_adapter_file(spec.path) for spec in specs]
    # One entry per input, not per file name: a run's file is named after its data folder, so the same dataset
    # trained on SD 1.5 and on SDXL gives two `my-art.safetensors`.
    families = [(f.path, adapter_architecture(f.state, f.metadata)) for f in files]
    known = {family for _, family in families if family != UNKNOWN_ARCHITECTURE}
    if len(known) > 1:
        raise ValueError(
            "These adapters were made for different base models and cannot be blended: "
            + ", ".join(f"{path} ({family})" for path, family in families) + "."
        )
    return files


def blend(specs, out_path: str | os.PathLike, rank: int | None = None, exact: bool = False,
          dtype: Any = None, blend_mode: str | None = None, license: str | None = None,
          thumbnail: str | None = None, unet_config: dict | None = None, overwrite: bool = False) -> BlendReport:
    """Write the weighted blend of `specs` (AdapterSpecs or "FILE:W[:TE_W]") to `out_path` in kohya format.

    exact=True: reproduces the live blend (sum: concatenated ranks; ties: every rank of the merged delta).
    rank=R: truncated SVD at rank R. Neither: the sum exact, a ties merge by SVD at the inputs' total rank per module.
    dtype: e.g. torch.float16 for a smaller file (default float32). blend_mode: as `generate --blend-mode`
    (None: blend_modes.DEFAULT_FILE_MODE, the sum); a mode that cannot be a static file is refused with the reason.
    license: modelspec.license (None: the inputs' license when they all share one, else "unspecified").
    thumbnail: modelspec.thumbnail, a data-URI image (share.thumbnail_data_uri).
    unet_config: the UNet config of the base the blend is for, whose blocks `lbw=` block weights number (None: the
    published layout of the files' family; a file of no known family then refuses block weights).
    overwrite: replace `out_path` if it exists (else refused before any work, so a blend never silently replaces one).
    """
    import torch

    specs = as_specs(specs)
    blend_mode = blend_modes.check_static(blend_mode or blend_modes.DEFAULT_FILE_MODE)
    if not specs:
        raise ValueError("Nothing to blend: give at least one adapter as FILE:WEIGHT.")
    if exact and rank is not None:
        raise ValueError("Choose --exact or --rank R, not both: exact keeps every rank, --rank R truncates.")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}.")
    check_file_target("--out", str(out_path), ".safetensors", example="my-blend.safetensors",
                      kind="a kohya .safetensors file", overwrite=True)  # an existing file: the message below
    if any(Path(out_path).resolve() == Path(spec.path).resolve() for spec in specs):
        raise ValueError(f"{out_path} is one of the adapters being blended: writing there would replace it. "
                         "Give the blend another name.")
    if Path(out_path).exists() and not overwrite:
        raise ValueError(f"{out_path} exists already: give the blend another name, or replace it (`stylelora blend "
                         "--overwrite`, or tick 'overwrite' in the app's Blend tab).")
    files = _read_inputs(specs)
    terms: dict[str, ModuleTerms] = {}
    for spec, file in zip(specs, files):
        modules = _in_family_layout(_group_modules(file.state, file.path.name), file, unet_config)
        _add_terms(terms, modules, spec, file, unet_config)
    state, errors, ranks = {}, {}, {}
    for name, entry in terms.items():
        if not entry.up_terms:
            continue  # every input that has this module has weight 0 there
        module_rank = rank
        if blend_mode != "sum" and len(entry.up_terms) > 1:
            inputs_rank = sum(up.shape[1] for up in entry.up_terms)
            up, down, _ = blend_modes.merged_factors(list(zip(entry.up_terms, entry.down_terms)), blend_mode)
            entry = replace(entry, up_terms=[up], down_terms=[down])
            # A ties merge is not low rank: kept whole, a layer's factors grow toward its full width (the file 7x
            # the inputs on the toy base, gigabytes on SD 1.5). By default it keeps the sum's size instead.
            module_rank = rank if rank is not None or exact else inputs_rank
        up, down, error = _exact(entry) if module_rank is None else _truncated_svd(entry, module_rank)
        state.update(_module_tensors(name, entry, up, down, dtype or torch.float32))
        errors[name], ranks[name] = error, up.shape[1]
    if not state:
        raise ValueError("Every weight is 0: the blend would change nothing. Give at least one non-zero weight.")
    # Ranks can differ per module in every mode (merged factors, `lbw=` zeroing one input's blocks, --rank above a
    # module's total rank), and diffusers misreads per-module alphas there: see uniform_alpha. Where every module has
    # one rank the sum's alphas already equal it, and up is multiplied by exactly 1.
    blend_modes.uniform_alpha(state, float(max(ranks.values())))
    mode = "exact" if not any(errors.values()) and rank is None else "svd"
    metadata = _blend_metadata(specs, files, Path(out_path), mode, rank, ranks, errors, blend_mode)
    metadata["modelspec.license"] = license or _shared_license(files)
    if thumbnail:
        metadata["modelspec.thumbnail"] = thumbnail
    _write(out_path, state, metadata)
    return BlendReport(path=Path(out_path), mode=mode, rank=rank, module_errors=errors, module_ranks=ranks,
                       blend_mode=blend_mode)


def _write(out_path, state, metadata) -> None:
    from stylelora.lora.io import hash_metadata, write_safetensors_atomic

    metadata.update(hash_metadata(state, metadata))
    write_safetensors_atomic(out_path, state, metadata)


def _merged_tag_frequency(files) -> dict:
    merged: dict[str, dict[str, int]] = {}
    for file in files:
        for folder, tags in json.loads(file.metadata.get("ss_tag_frequency") or "{}").items():
            target = merged.setdefault(folder, {})
            for tag, count in tags.items():
                target[tag] = target.get(tag, 0) + int(count)
    return merged


def _shared_license(files) -> str:
    """The inputs' license when every input names the same one; a mix of licenses is not ours to pick."""
    licenses = {f.metadata.get("modelspec.license") or "unspecified" for f in files}
    return licenses.pop() if len(licenses) == 1 else "unspecified"


# What kohya's train_network.py records of the base when it is a path: its file name, A1111's legacy 8-digit hash
# and the file's sha256 (stylelora.generate.base_identity.kohya_base_hashes). Model sites and A1111 show them.
BASE_IDENTITY_KEYS = ("ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash")
NOT_A_HASH = {"NOFILE", "IsADirectory"}  # what kohya writes in a hash key for a missing file or a folder


def shared_base_identity(files) -> dict[str, str]:
    """The base the inputs agree they were trained on: each of BASE_IDENTITY_KEYS that every input records with one
    value. Two different hashes mean two different bases, and then nothing is said, not even a shared file name
    (two files of one name); an input that records no hash leaves it out (its base is not known to be that one)."""
    identity = {}
    for key in BASE_IDENTITY_KEYS:
        values = [f.metadata.get(key) or None for f in files]
        if key != "ss_sd_model_name":
            values = [None if value in NOT_A_HASH else value for value in values]
            if len(set(values) - {None}) > 1:
                return {}
        if values and None not in values and len(set(values)) == 1:
            identity[key] = values[0]
    return identity


def _blend_metadata(specs, files, out_path: Path, mode, rank, ranks, errors, blend_mode="sum") -> dict[str, str]:
    from stylelora.lora.io import file_model_hash

    first = files[0].metadata
    titles = [f.metadata.get("modelspec.title") or f.path.stem for f in files]
    used = [f for spec, f in zip(specs, files) if spec.unet_weight or spec.text_encoder_weight]
    triggers = [word for f in used for word in trigger_words(f.metadata)]
    top_rank = max(ranks.values())
    inputs = [{"file": f.path.name, "title": t, "unet_weight": s.unet_weight, "te_weight": s.text_encoder_weight,
               "sshs_model_hash": file_model_hash(f.path)} | ({} if s.blocks is None else {"lbw": s.blocks})
              for s, f, t in zip(specs, files, titles)]
    blend_info = {"mode": mode, "rank": rank, "blend_mode": blend_mode, "inputs": inputs,
                  "max_relative_error": max(errors.values()), "mean_relative_error": statistics.fmean(errors.values())}
    described = [f"{t} (unet {s.unet_weight:g}, te {s.text_encoder_weight:g}"
                 + ("" if s.blocks is None else f", lbw={s.blocks}") + ")" for s, t in zip(specs, titles)]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(top_rank),
        "ss_network_alpha": str(float(top_rank)),
        "ss_output_name": out_path.stem,
        "ss_tag_frequency": json.dumps(_merged_tag_frequency(files)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": out_path.stem,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.merged_from": ", ".join(titles),
        "modelspec.description": "blend of " + ", ".join(described)
        + ("" if blend_mode == "sum" else f", blend mode {blend_mode}"),
        BLEND_METADATA_KEY: json.dumps(blend_info),
        "format": "pt",
    }
    for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture",
                "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type"):
        if key in first:
            metadata[key] = first[key]
    metadata.update(shared_base_identity(used))
    if triggers:
        metadata["modelspec.trigger_phrase"] = ", ".join(dict.fromkeys(triggers))
    return metadata
