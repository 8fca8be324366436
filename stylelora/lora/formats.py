"""Converts LoRA weights between peft state dicts and kohya/A1111 keys, naming modules from the live model.

kohya sd-scripts names a LoRA module `<prefix>_<module path with "." -> "_">`, where the path is the
*diffusers* layout for SD1.x (sd-scripts trains SD1.x on a diffusers-compatible UNet), e.g.
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`, and the transformers CLIP layout
with its `text_model.` root for the text encoder, e.g. `lora_te_text_model_encoder_layers_0_self_attn_q_proj`.
Each module has `.lora_down.weight` (= peft lora_A), `.lora_up.weight` (= peft lora_B) and `.alpha`
(a 0-d tensor holding the real alpha; the applied scale is alpha / rank, as in peft).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from stylelora.lora.layers import adaptable_layers

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
# SD1.x/2.x: which model of the pipeline each kohya prefix names (SDXL's: lora/components.py).
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "text_encoder": TEXT_ENCODER_PREFIX}
# kohya suffix -> peft suffix, per LoRA module
KOHYA_TO_PEFT_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
PEFT_TO_KOHYA_SUFFIX = {peft: kohya for kohya, peft in KOHYA_TO_PEFT_SUFFIX.items()}
ALPHA_SUFFIX = "alpha"
# Tensor kinds other trainers write that plain LoRA cannot represent, with what they are: a module is named by the
# first of these its tensors show (a DoRA module also has lora_down / lora_up; an (IA)^3 one also has `.weight`).
FOREIGN_SUFFIX_HINTS = {
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "diff": "LyCORIS full-weight diff",
    "on_input": "LyCORIS (IA)^3",
    "oft_": "OFT / BOFT",
    "a1.weight": "LyCORIS GLoRA",
    "w_norm": "LyCORIS norm-layer tuning",
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "lora_mid": "LyCORIS LoCon with Tucker decomposition",
    "scale": "a .scale multiplier beside tensors that are not LoRA factors",
}
# peft's names for the two factors, which A1111 (network_lora.py) and ComfyUI also read under kohya module names.
KOHYA_SUFFIX_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
SUPPORTED_KINDS = "LoRA and LoCon (lora_down / lora_up / alpha or .scale), LyCORIS LoHa and LoKr"


@dataclass(frozen=True)
class KohyaNames:
    """Two-way map between one model's module paths and their kohya names (prefix included)."""

    prefix: str
    by_path: dict[str, str]
    by_name: dict[str, str]
    ambiguous: dict[str, tuple[str, ...]]
    layers: dict[str, nn.Module]

    def name_of(self, path: str) -> str:
        if path not in self.by_path:
            raise KeyError(path)
        name = self.by_path[path]
        if name in self.ambiguous:
            raise ValueError(f"kohya name {name} is ambiguous: modules {', '.join(self.ambiguous[name])} share it.")
        return name


def kohya_path_root(model: nn.Module) -> str:
    """The path root kohya names include but this model lacks (transformers >= 5 flattened CLIPTextModel.text_model)."""
    is_flat_clip_text = type(model).__name__.startswith("CLIPTextModel") and not hasattr(model, "text_model")
    return "text_model." if is_flat_clip_text else ""


def kohya_names(model: nn.Module, prefix: str) -> KohyaNames:
    """Map every Linear/Conv2d of `model` (peft wrappers resolved) to its kohya name, and back."""
    root = kohya_path_root(model)
    layers = dict(adaptable_layers(model))
    by_path = {path: f"{prefix}_{(root + path).replace('.', '_')}" for path in layers}
    paths_per_name: dict[str, list[str]] = defaultdict(list)
    for path, name in by_path.items():
        paths_per_name[name].append(path)
    ambiguous = {name: tuple(paths) for name, paths in paths_per_name.items() if len(paths) > 1}
    by_name = {name: paths[0] for name, paths in paths_per_name.items() if len(paths) == 1}
    return KohyaNames(prefix=prefix, by_path=by_path, by_name=by_name, ambiguous=ambiguous, layers=layers)


def _examples(items, limit: int = 3) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def split_peft_key(key: str) -> tuple[str, str]:
    for suffix in PEFT_TO_KOHYA_SUFFIX:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ValueError(key)


def peft_to_kohya(peft_state: dict[str, torch.Tensor], ranks: dict[str, tuple[int, float]],
                  names: KohyaNames) -> dict[str, torch.Tensor]:
    """peft state (`<path>.lora_A.weight`, ...) + per-path (rank, alpha) -> kohya state with `.alpha` tensors."""
    kohya: dict[str, torch.Tensor] = {}
    unknown_kind, unknown_path = [], []
    for key, tensor in peft_state.items():
        try:
            path, suffix = split_peft_key(key)
        except ValueError:
            unknown_kind.append(key)
            continue
        if path not in names.by_path or path not in ranks:
            unknown_path.append(key)
            continue
        name = names.name_of(path)
        kohya[f"{name}.{PEFT_TO_KOHYA_SUFFIX[suffix]}"] = tensor
        kohya[f"{name}.{ALPHA_SUFFIX}"] = torch.tensor(float(ranks[path][1]), dtype=torch.float32)
    if unknown_kind or unknown_path:
        raise ValueError(
            f"Cannot write {len(unknown_kind) + len(unknown_path)} of {len(peft_state)} peft tensors as kohya LoRA: "
            f"{len(unknown_kind)} are not lora_A/lora_B weights (e.g. {_examples(unknown_kind)}; DoRA, biases and "
            f"embeddings have no kohya LoRA key), {len(unknown_path)} name no Linear/Conv2d adapter of the "
            f"{names.prefix} model (e.g. {_examples(unknown_path)})."
        )
    return kohya


def _foreign_kind(suffixes) -> str:
    """What a module with these foreign tensor suffixes is, by the first FOREIGN_SUFFIX_HINTS marker they show."""
    for marker, kind in FOREIGN_SUFFIX_HINTS.items():
        if any(suffix.startswith(marker) for suffix in suffixes):
            return kind
    return "tensors of unknown kind (" + ", ".join(f".{suffix}" for suffix in sorted(suffixes)) + ")"


@dataclass(frozen=True)
class KohyaModules:
    """A kohya state dict grouped by LoRA module, in file order (see group_kohya_modules)."""

    modules: dict[str, dict[str, torch.Tensor]]  # {module name: {suffix: tensor}}, every key of the file
    foreign_keys: tuple[str, ...]  # keys plain LoRA cannot load (not .lora_down.weight / .lora_up.weight / .alpha)

    def incomplete(self) -> list[str]:
        """Modules that lack lora_down.weight or lora_up.weight."""
        return [name for name, parts in self.modules.items() if not set(KOHYA_TO_PEFT_SUFFIX) <= set(parts)]

    def foreign_kinds(self) -> dict[str, list[str]]:
        """{what it is (DoRA, LyCORIS (IA)^3, ...): module names} of the modules plain LoRA cannot load."""
        suffixes: dict[str, set[str]] = defaultdict(set)
        for key in self.foreign_keys:
            name, _, suffix = key.partition(".")
            suffixes[name].add(suffix)
        kinds: dict[str, list[str]] = defaultdict(list)
        for name, found in suffixes.items():
            kinds[_foreign_kind(found)].append(name)
        return dict(kinds)

    def refuse_foreign(self, file_name: str = "The file") -> None:
        """Raise naming what the foreign modules are (DoRA, LyCORIS (IA)^3, ...) when the file is not plain LoRA."""
        kinds = self.foreign_kinds()
        if not kinds:
            return
        found = "; ".join(f"{kind} in {len(names)} modules (e.g. {_examples(names, 2)})"
                          for kind, names in kinds.items())
        raise ValueError(
            f"{file_name} holds {found}, which stylelora cannot apply: it applies {SUPPORTED_KINDS}. Use this file in "
            "A1111 or ComfyUI, or ask its author for a LoRA, LoHa or LoKr version."
        )


def with_kohya_suffixes(kohya_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with peft's `.lora_A.weight` / `.lora_B.weight` under kohya module names renamed to kohya's
    `.lora_down.weight` / `.lora_up.weight`, as A1111 and ComfyUI read them (some converters write them so)."""
    renamed = {}
    for key, tensor in kohya_state.items():
        name, _, suffix = key.partition(".")
        alias = KOHYA_SUFFIX_ALIASES.get(suffix)
        # A module holding both spellings is left alone, for the foreign-tensor refusal to name.
        keep = alias is None or f"{name}.{alias}" in kohya_state
        renamed[key if keep else f"{name}.{alias}"] = tensor
    return renamed


def group_kohya_modules(kohya_state: dict[str, torch.Tensor]) -> KohyaModules:
    """Group kohya keys `<module>.<suffix>` by module; nothing is refused here, callers choose what to check."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in kohya_state.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
        if suffix not in KOHYA_TO_PEFT_SUFFIX and suffix != ALPHA_SUFFIX:
            foreign.append(key)
    return KohyaModules(modules=modules, foreign_keys=tuple(foreign))


def module_rank_alpha(name: str, parts: dict[str, torch.Tensor]) -> tuple[int, float]:
    if set(KOHYA_TO_PEFT_SUFFIX) - set(parts):
        raise ValueError(f"LoRA module {name} has {sorted(parts)} but needs both lora_down.weight and lora_up.weight.")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(
            f"LoRA module {name}: lora_down has rank {rank} but lora_up {tuple(up.shape)} expects {up.shape[1]}."
        )
    # kohya convention: a file without .alpha means alpha == rank (scale 1).
    alpha = float(parts[ALPHA_SUFFIX].item()) if ALPHA_SUFFIX in parts else float(rank)
    return rank, alpha


def fit_to_layer(tensor: torch.Tensor, layer: nn.Module, *, is_down: bool = False) -> torch.Tensor:
    """Reshape between 2-d and (.., 1, 1) weights: some trainers store a Linear LoRA as 1x1 conv or the reverse, and
    LyCORIS stores a kh x kw convolution's down factor flat, (r, in·kh·kw), which A1111 fits to the layer too."""
    if isinstance(layer, nn.Linear) and tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor.flatten(1)
    if isinstance(layer, nn.Conv2d) and tensor.dim() == 2:
        kernel = tuple(layer.weight.shape[1:])  # (in / groups, kh, kw)
        if is_down and kernel[1:] != (1, 1) and tensor.shape[1] == kernel[0] * kernel[1] * kernel[2]:
            return tensor.reshape(tensor.shape[0], *kernel)
        return tensor[:, :, None, None]
    return tensor


def kohya_to_peft(kohya_state: dict[str, torch.Tensor],
                  names: KohyaNames) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """kohya state of ONE model (keys `<names.prefix>_...`) -> (peft state, per-path (rank, alpha))."""
    peft_state, ranks, _ = kohya_to_peft_matching(kohya_state, names, max_unmatched=0.0)
    return peft_state, ranks


def kohya_to_peft_matching(kohya_state: dict[str, torch.Tensor], names: KohyaNames, *, max_unmatched: float = 0.5
                           ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]], list[str]]:
    """Like kohya_to_peft, but the modules this model lacks are left out and listed, as A1111 and ComfyUI apply
    the rest of a file: (peft state, ranks, unmatched module names). Refuses (ValueError) when more than
    `max_unmatched` of the file's modules have no layer here: then the file targets another base."""
    grouped = group_kohya_modules(kohya_state)
    grouped.refuse_foreign()
    modules = grouped.modules
    unknown = [name for name in modules if name not in names.by_name and name not in names.ambiguous]
    ambiguous = [name for name in modules if name in names.ambiguous]
    if len(unknown) + len(ambiguous) > max_unmatched * len(modules):
        raise ValueError(
            f"{len(unknown) + len(ambiguous)} of {len(modules)} LoRA modules in the file do not match exactly one "
            f"layer of this {names.prefix} model: {len(unknown)} unknown (e.g. {_examples(unknown)}), "
            f"{len(ambiguous)} ambiguous (e.g. {_examples(ambiguous)}). Was it trained for another base "
            f"architecture (SDXL files use lora_te1_/lora_te2_ and input_blocks)?"
        )
    peft_state: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    unmatched = set(unknown) | set(ambiguous)
    for name, parts in modules.items():
        if name in unmatched:
            continue
        path = names.by_name[name]
        ranks[path] = module_rank_alpha(name, parts)
        for kohya_suffix, peft_suffix in KOHYA_TO_PEFT_SUFFIX.items():
            peft_state[f"{path}.{peft_suffix}"] = fit_to_layer(parts[kohya_suffix], names.layers[path],
                                                                is_down=peft_suffix == "lora_A.weight")
    return peft_state, ranks, sorted(unmatched)


def module_component(name: str) -> str | None:
    """"unet" or "text_encoder" for a kohya module name (any text encoder: lora_te_, SDXL's lora_te1_/lora_te2_)."""
    if name.startswith(UNET_PREFIX + "_"):
        return "unet"
    return "text_encoder" if name.startswith(TEXT_ENCODER_PREFIX) else None


def split_kohya_state(kohya_state: dict[str, torch.Tensor],
                      prefixes: dict[str, str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{prefix: {...}} for each of `prefixes`' kohya prefixes (default SD1.x/2.x: lora_unet, lora_te); refuses keys
    of other models (lora_te1_/lora_te2_ for SD1.x, lora_te_ for SDXL's prefixes)."""
    prefixes = COMPONENT_PREFIXES if prefixes is None else prefixes
    parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes.values()}
    other = []
    for key, tensor in kohya_state.items():
        for prefix in parts:
            # lora_te1_/lora_te2_ start with "lora_te" but not "lora_te_": they are SDXL's two text encoders.
            if key.startswith(prefix + "_"):
                parts[prefix][key] = tensor
                break
        else:
            other.append(key)
    if other:
        sdxl = "lora_te1" in parts
        hint = "not an SDXL kohya LoRA (lora_te_ means SD1.x/2.x)" if sdxl else \
            "not an SD1.x kohya LoRA (lora_te1_/lora_te2_ mean SDXL)"
        raise ValueError(
            f"{len(other)} of {len(kohya_state)} keys are none of {', '.join(p + '_*' for p in parts)} "
            f"(e.g. {_examples(other)}): {hint}."
        )
    return parts
