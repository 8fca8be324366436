"""The adapter stack: loaded adapters cached as low-rank factors, their weighted sum fused into the base weights.

Fusing (W = W0 + sum_i w_i * alpha_i/r_i * up_i @ down_i) makes a blend cost nothing per denoising step, unlike
running every LoRA branch at every layer. The original W0 of each touched layer is kept, so switching blends or
clearing recomputes from W0 and restores it bit for bit. Fused weights are shared state: everything that changes
or reads them under a blend goes through `stack.lock` (`with stack.applied(specs): ...`).
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylelora.generate import reading_dial
from stylelora.lora import blend_modes
from stylelora.lora.adapter_file import AdapterFile, AdapterFileError, read_adapter_file, weights_path
from stylelora.lora.block_weights import BlockLayout, BlockWeightError
from stylelora.lora.spec import AdapterSpec, as_specs

STACK_ATTRIBUTE = "_stylelora_adapter_stack"
A1111_SHORT_HASH_LENGTH = 12


class AdapterStackError(ValueError):
    """An adapter cannot be applied to this base; nothing was changed. The message says why and what to do."""


# ----------------------------------------------------------------------------- loaded adapters


@dataclass(frozen=True)
class LowRank:
    """One module's LoRA as matrices: delta W = scale * up @ down, reshaped to the layer's weight shape."""

    up: Any  # (out, rank) fp32
    down: Any  # (rank, in * kh * kw) fp32
    scale: float  # alpha / rank


@dataclass
class LoadedAdapter:
    """An adapter file checked against this base and kept as per-layer low-rank factors."""

    file: AdapterFile
    modules: dict[tuple[str, str], LowRank] = field(repr=False)
    signature: tuple[int, int]  # (mtime_ns, size) when read: a changed file is read again
    _hash: str | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def identity(self) -> tuple[Path, tuple[int, int]]:
        """The file as read (path and signature): how a blend's plan tells its adapters apart."""
        return self.path, self.signature

    @property
    def name(self) -> str:
        return self.file.path.stem if self.file.path.name != "adapter_model.safetensors" else self.file.path.parent.name

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    @property
    def model_hash(self) -> str:
        """sha256 of the tensor bytes (kohya sshs_model_hash / A1111 "addnet" hash), computed once."""
        if self._hash is None:
            from stylelora.lora.io import file_model_hash

            self._hash = file_model_hash(self.path)
        return self._hash

    @property
    def short_hash(self) -> str:
        return self.model_hash[:A1111_SHORT_HASH_LENGTH]

    def module_count(self, component: str) -> int:
        return sum(1 for comp, _ in self.modules if comp == component)


def _file_signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _examples(items, limit: int = 3) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _delta_shape(up, down) -> tuple[int, ...] | None:
    """Shape of up @ down as a layer weight, or None when up is not (out, r) / (out, r, 1, 1)."""
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return None
    return (up.shape[0],) + tuple(down.shape[1:])


def _component_factors(file: AdapterFile, component: str, kohya_part: dict, names) -> dict:
    """{(component, path): LowRank} for one model, or AdapterStackError listing every shape mismatch."""
    from stylelora.lora import formats

    try:
        peft_state, ranks, unmatched = formats.kohya_to_peft_matching(kohya_part, names)
    except ValueError as error:
        raise AdapterStackError(
            f"{file.path.name} does not fit this base's {component}: {error} Nothing was applied."
        ) from error
    if unmatched:
        import warnings

        # A1111 and ComfyUI apply what matches; refusing the whole file for a few extra modules helps nobody.
        warnings.warn(f"{file.path.name}: {len(unmatched)} of {len(unmatched) + len(ranks)} {component} LoRA modules "
                      f"have no layer in this base and are skipped (e.g. {_examples(unmatched, 3)}); the other "
                      f"{len(ranks)} are applied.", stacklevel=2)
    factors, mismatched = {}, []
    for path, (rank, alpha) in ranks.items():
        down, up = peft_state[f"{path}.lora_A.weight"], peft_state[f"{path}.lora_B.weight"]
        weight = names.layers[path].weight
        if _delta_shape(up, down) != tuple(weight.shape):
            file_shape = tuple(up.shape[:1]) + tuple(down.shape[1:])
            mismatched.append(f"{names.by_path[path]} {file_shape} vs layer {tuple(weight.shape)}")
            continue
        factors[(component, path)] = LowRank(
            up=up.reshape(up.shape[0], rank).to(weight.device, dtype=_torch().float32),
            down=down.reshape(rank, -1).to(weight.device, dtype=_torch().float32),
            scale=alpha / rank,
        )
    if mismatched:
        raise AdapterStackError(
            f"{file.path.name} was made for a different base architecture: {len(mismatched)} of {len(ranks)} "
            f"{component} LoRA modules have other shapes than this base's layers (e.g. {_examples(mismatched, 2)}). "
            "Use a base of the family the adapter was trained on (see `stylelora inspect`). Nothing was applied."
        )
    return factors


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------- the stack


class AdapterStack:
    """Adapters applied to one pipeline by fusing their weighted deltas into its UNet and text encoder.

    One stack per pipeline (`AdapterStack.for_pipe`): the stack owns the backups of the original weights.
    """

    def __init__(self, pipe: Any) -> None:
        from stylelora.lora.components import pipeline_models

        self.models = pipeline_models(pipe)  # SDXL adds text_encoder_2
        # split: each adapter reads the prompt with its trigger moved after the others' (generate.trigger_order)
        self.tokenizers = {"text_encoder": getattr(pipe, "tokenizer", None),
                           "text_encoder_2": getattr(pipe, "tokenizer_2", None)}
        self.lock = threading.RLock()
        self._names: dict[str, Any] = {}
        self._cache: dict[Path, LoadedAdapter] = {}
        self._backups: dict[tuple[str, str], Any] = {}
        self._fused: dict[tuple[str, str], tuple] = {}
        self._active: tuple[AdapterSpec, ...] = ()
        self._mode = blend_modes.DEFAULT_MODE
        self._dial = reading_dial.DEFAULT_DIAL
        self._split = False  # whether the text encoders (and under "split" the cross-attention) run per adapter

    @classmethod
    def for_pipe(cls, pipe: Any) -> AdapterStack:
        """The pipeline's stack, created on first use: a second stack would take fused weights for originals."""
        stack = getattr(pipe, STACK_ATTRIBUTE, None)
        if stack is None:
            stack = cls(pipe)
            setattr(pipe, STACK_ATTRIBUTE, stack)
        return stack

    @property
    def active(self) -> tuple[AdapterSpec, ...]:
        """The specs currently fused (empty: the base weights, exactly)."""
        return self._active

    @property
    def mode(self) -> str:
        """The blend mode of the fused blend (see stylelora.lora.blend_modes)."""
        return self._mode

    @property
    def dial(self) -> str:
        """What the fused blend's weights turn (see stylelora.generate.reading_dial)."""
        return self._dial

    @property
    def fused_module_count(self) -> int:
        return len(self._fused)

    # -- loading

    def _kohya_names(self, component: str):
        from stylelora.lora.components import component_names

        if component not in self._names:  # SDXL: SAI/SGM UNet names, lora_te1_ / lora_te2_
            self._names[component] = component_names(self.models, component)
        return self._names[component]

    def load(self, path: str | os.PathLike) -> LoadedAdapter:
        """The adapter at `path`, read and checked once; read again only if the file changed on disk."""
        path = weights_path(path).resolve()
        if not path.exists():
            from stylelora.lora.io import missing_adapter_message

            raise AdapterFileError(missing_adapter_message(path))
        with self.lock:
            cached = self._cache.get(path)
        if cached is not None and path.is_file() and cached.signature == _file_signature(path):
            return cached
        loaded = self._read(path)
        with self.lock:
            self._cache[path] = loaded
        return loaded

    def _read(self, path: Path) -> LoadedAdapter:
        from stylelora.lora import formats
        from stylelora.lora.components import check_adapter_family, component_prefixes

        file = read_adapter_file(path)
        signature = _file_signature(file.path)
        prefixes = component_prefixes(self.models)
        try:  # a DoRA or (IA)^3 file is that on every base: say so before the family or the layer names
            formats.group_kohya_modules(file.state).refuse_foreign(path.name)
        except ValueError as error:
            raise AdapterStackError(f"{error} Nothing was applied.") from error
        try:
            check_adapter_family(path.name, file.state, file.metadata, self.models)  # one sentence, both families
        except ValueError as error:
            raise AdapterStackError(f"{error} Nothing was applied.") from error
        try:
            parts = formats.split_kohya_state(file.state, prefixes)
        except ValueError as error:
            raise AdapterStackError(f"{path.name}: {error} Nothing was applied.") from error
        modules: dict[tuple[str, str], LowRank] = {}
        for component, prefix in prefixes.items():
            if not parts[prefix]:
                continue
            if self.models[component] is None:
                raise AdapterStackError(f"{path.name} has {component} weights but this pipeline has no {component}.")
            modules.update(_component_factors(file, component, parts[prefix], self._kohya_names(component)))
        if not modules:
            raise AdapterStackError(f"{path.name} holds no LoRA modules.")
        return LoadedAdapter(file=file, modules=modules, signature=signature)

    def forget(self, path: str | os.PathLike) -> None:
        """Drop a cached adapter (e.g. after deleting its file); an active one stays fused until the next apply."""
        with self.lock:
            self._cache.pop(weights_path(path).resolve(), None)

    # -- fusing

    def apply(self, specs: Iterable[AdapterSpec | str], mode: str | None = None, dial: str | None = None) -> None:
        """Fuse exactly this blend (replacing the previous one). All files are checked before any weight changes.

        mode: how layers that several adapters touch combine (blend_modes.MODES; None: blend_modes.DEFAULT_MODE).
        dial: what the weights turn (reading_dial.DIALS; None: A1111's LoRA weights).
        """
        specs = as_specs(specs)
        mode, dial = blend_modes.check_mode(mode), reading_dial.check_dial(dial)
        with self.lock:
            adapters = [self.load(spec.path) for spec in specs]
            shares = None
            if dial == "reading":
                shares = {a.identity: reading_dial.reading_share(s) for s, a in zip(specs, adapters)}
                plan = self._plan([reading_dial.fused_spec(spec) for spec in specs], adapters)
            else:
                plan = self._plan(specs, adapters)
            try:
                self._fuse(plan, mode, shares)
            except BaseException:
                self._restore_all()
                raise
            self._active, self._mode, self._dial = specs, mode, dial

    def clear(self) -> None:
        """Back to the base weights, bit for bit."""
        with self.lock:
            self._restore_all()

    @contextmanager
    def applied(self, specs: Iterable[AdapterSpec | str], mode: str | None = None,
                dial: str | None = None) -> Iterator[AdapterStack]:
        """Hold the stack with this blend fused for the duration (other threads wait); stays fused afterwards."""
        with self.lock:
            self.apply(specs, mode, dial)
            yield self

    def _plan(self, specs, adapters) -> dict[tuple[str, str], list[tuple[Any, float, LowRank]]]:
        """{layer: [(adapter identity, weight, factors), ...]} in spec order; zero weights contribute nothing."""
        plan: dict[tuple[str, str], list] = {}
        for spec, adapter in zip(specs, adapters):
            identity = adapter.identity
            blocks = None if spec.blocks is None else self._multiplier_of(spec)
            for key, factors in adapter.modules.items():
                weight = spec.weight_for(key[0])
                if blocks is not None and key[0] == "unet":
                    weight *= blocks(key[1])
                if weight != 0.0:
                    plan.setdefault(key, []).append((identity, weight, factors))
        return plan

    def _multiplier_of(self, spec: AdapterSpec):
        try:
            return self._block_layout.multiplier_of(spec.blocks)
        except BlockWeightError as error:
            raise BlockWeightError(f"Block weights of {spec.name}: {error}") from None

    @functools.cached_property
    def _block_layout(self) -> BlockLayout:
        """The UNet's blocks in A1111's numbering, for `lbw=` block weights (read from its config on first use)."""
        return BlockLayout.from_config(self.models["unet"].config)

    def _layer_weight(self, key: tuple[str, str]):
        component, path = key
        return self._kohya_names(component).layers[path].weight

    def _fuse(self, plan, mode: str = blend_modes.DEFAULT_MODE, shares: dict | None = None) -> None:
        """shares: under the reading dial, how far each adapter's reading moves ({identity: share})."""
        torch = _torch()
        plan, split = self._split_plan(plan, mode, shares)
        # split: every layer that does not run per adapter is merged as ties (sign election per entry), rescaled
        # (blend_modes.ties_delta): where two adapters' deltas fight over an entry the winner keeps its push instead of
        # having it cancelled, which kept more of both in every measured pair than the plain sum (docs/results.md,
        # "Split's other layers as ties", "Ties rescaled")
        with torch.no_grad():
            for key in [key for key in self._fused if key not in plan]:
                self._restore(key)
            for key, terms in plan.items():
                signature = tuple((identity, weight) for identity, weight, _ in terms)
                if len(terms) > 1 and mode != "sum":
                    signature += (mode,)  # a layer one adapter touches is the same in every mode
                if self._fused.get(key) == signature:
                    continue  # this layer's contributions did not change: skip the matmul
                weight = self._layer_weight(key)
                original = self._backups.setdefault(key, weight.detach().clone())
                delta = _layer_delta(terms, original.device, mode).reshape(original.shape)
                weight.copy_((original.float() + delta).to(weight.dtype))
                self._fused[key] = signature
            self._install_split(split)

    def _split_plan(self, plan, mode: str, shares: dict | None = None):
        """(the layers to fuse, the layers that run per adapter or None) for `mode` and the dial's `shares`.

        Under "split" with two or more adapters, every text-encoder layer and every UNet cross-attention projection
        runs per adapter (split_attention), so none of them is fused: their weights stay the base's. Under the
        reading dial (shares given) every text-encoder layer runs per adapter, to move each adapter's reading."""
        from stylelora.generate import split_attention

        unet = self.models.get("unet")
        if shares is None and (mode != "split" or unet is None):
            return plan, None  # every other mode fuses every layer (no walk over the plan on each weight change)
        identities = list(dict.fromkeys(identity for terms in plan.values() for identity, _, _ in terms))
        side_by_side = mode == "split" and unet is not None and len(identities) > 1
        if not side_by_side and shares is None:
            return plan, None
        per_adapter = {key: terms for key, terms in plan.items()
                       if key[0] != "unet" or (side_by_side and split_attention.split_parts(unet, key[1]))}
        fused = {key: terms for key, terms in plan.items() if key not in per_adapter}
        return fused, (identities, per_adapter, shares, side_by_side)

    def _install_split(self, split) -> None:
        """Run the per-adapter layers of the split mode or the reading dial (or, with None, take them all out)."""
        from stylelora.generate import split_attention

        unet = self.models.get("unet")
        text_encoders = [name for name in self.models if name != "unet" and self.models[name] is not None]
        if split is None:
            if self._split:
                for name in text_encoders:
                    split_attention.uninstall_text_encoder(self.models[name])
                for parent in split_attention.cross_attention_modules(unet):
                    split_attention.uninstall_attention(unet, parent)
                self._split = False
            return
        identities, per_adapter, shares, side_by_side = split
        # variants[text encoder or cross-attention module][identity] = {submodule path: low-rank factors, the
        # weight and alpha/rank folded into up, in the layer's dtype (split_attention never forms the full matrix)}
        variants: dict[str, dict[Any, dict[str, Any]]] = {}
        for key, terms in per_adapter.items():
            original = self._layer_weight(key)
            owner, path = (key[0], key[1]) if key[0] != "unet" else split_attention.split_parts(unet, key[1])
            for identity, weight, factors in terms:
                value = ((weight * factors.scale * factors.up).to(original), factors.down.to(original))
                variants.setdefault(owner, {}).setdefault(identity, {})[path] = value
        in_order = lambda owner: [variants.get(owner, {}).get(identity, {}) for identity in identities]  # noqa: E731
        for name in text_encoders:
            split_attention.install_text_encoder(
                self.models[name], in_order(name), self._trigger_reorders(name, identities) if side_by_side else None,
                shares=[shares[identity] for identity in identities] if shares is not None else None,
                side_by_side=side_by_side)
        for parent in split_attention.cross_attention_modules(unet):
            if side_by_side:
                split_attention.install_attention(unet, parent, in_order(parent))
            else:  # the reading dial alone: every cross-attention module fused, as the previous blend may not be
                split_attention.uninstall_attention(unet, parent)
        self._split = True

    def _trigger_reorders(self, text_encoder: str, identities) -> list | None:
        """Per adapter, how its reading of the prompt moves its trigger after the other adapters' and reads their
        coined triggers as its stand-in word (None: nothing to move)."""
        from stylelora.generate.trigger_order import reorders_for
        from stylelora.lora.inspect import company_words, trigger_words

        tokenizer = self.tokenizers.get(text_encoder)
        if tokenizer is None:
            return None
        by_identity = {adapter.identity: adapter for adapter in self._cache.values()}
        metadata = [by_identity[identity].metadata if identity in by_identity else {} for identity in identities]
        return reorders_for(tokenizer, [trigger_words(m) for m in metadata],
                            [next(iter(company_words(m)), None) for m in metadata])

    def _restore(self, key) -> None:
        self._layer_weight(key).data.copy_(self._backups.pop(key))
        self._fused.pop(key, None)

    def _restore_all(self) -> None:
        with _torch().no_grad():
            for key in list(self._backups):
                self._restore(key)
        self._install_split(None)
        self._fused.clear()
        self._active = ()


def _layer_delta(terms, device, mode: str):
    """The layer's delta under the blend mode: for "sum" (and any single adapter) the plain weighted sum
    sum_i w_i * s_i * up_i @ down_i as one matmul over the concatenated ranks (blend_modes.sum_delta)."""
    return blend_modes.merged_delta(
        [((weight * factors.scale) * factors.up.to(device), factors.down.to(device)) for _, weight, factors in terms],
        mode)


def apply_adapters(pipe: Any, specs: Iterable[AdapterSpec | str], mode: str | None = None,
                   dial: str | None = None) -> AdapterStack:
    """Fuse adapters (specs or "FILE[:W[:TE_W]]" strings) into `pipe`; returns its stack (`.clear()` undoes it)."""
    stack = AdapterStack.for_pipe(pipe)
    stack.apply(specs, mode, dial)
    return stack
