"""Text-to-image with a fused adapter blend: one request in, images plus the exact parameters that made them out.

`generate` resolves everything that could differ between two runs (random seed, default size and sampler,
<lora:...> tags, trigger words) before sampling and records it, so the parameters written into a PNG are enough
to make the same image again (`request_from_parameters`). Each image of a batch has its own seeded generator
(seed, seed+1, ...), so image i of a batch is the image a batch-1 request with seed+i gives.
"""
from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stylelora.generate import prompt_schedule
from stylelora.generate.pngmeta import GenerationParams, LoraUse, parse_parameters, save_png
from stylelora.generate.prompt_tags import TAG_PATTERN
from stylelora.generate.stack import AdapterStack
from stylelora.lora.spec import AdapterSpec, as_specs

MAX_SEED = 2**32 - 1  # A1111's seed range; -1 asks for a random one
BLEND_MODE_FIELD = "Blend mode"  # in the PNG parameters when not "sum" (A1111 keeps fields it does not know)
DIAL_FIELD = "Weight dial"  # in the PNG parameters when the weights moved the readings (generate.reading_dial)
CLIP_SKIP_FIELD = "Clip skip"  # A1111's, in the PNG parameters when above 1
ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass(frozen=True)
class GenerateRequest:
    """What the user asked for. None/-1 fields are resolved by `generate` and recorded in the results."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    cfg: float = 5.0
    sampler: str | None = None  # None: the base's own scheduler
    seed: int = -1
    width: int | None = None  # None: the base's native size
    height: int | None = None
    batch_size: int = 1
    loras: tuple[AdapterSpec, ...] = ()
    adapters_dir: Path | None = None  # where <lora:name:w> tags in the prompt are looked up
    add_triggers: bool = False
    blend_mode: str | None = None  # how layers several adapters share combine; None: blend_modes.DEFAULT_MODE
    dial: str | None = None  # what the weights turn (reading_dial.DIALS); None: the LoRA weights, as A1111
    clip_skip: int = 1  # A1111's: the prompt read from the text encoder's N-th layer from the end (SD 1.x/2.x)

    def __post_init__(self) -> None:
        from stylelora.generate.reading_dial import check_dial
        from stylelora.lora.blend_modes import check_mode

        object.__setattr__(self, "loras", as_specs(self.loras))
        object.__setattr__(self, "blend_mode", check_mode(self.blend_mode))
        object.__setattr__(self, "dial", check_dial(self.dial))


@dataclass(frozen=True)
class GeneratedImage:
    """One image and the parameters that reproduce it."""

    image: Any  # PIL.Image.Image
    params: GenerationParams

    @property
    def parameters_text(self) -> str:
        return self.params.to_text()

    def save(self, path: str | os.PathLike) -> Path:
        return save_png(self.image, self.params, path)


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with nothing left to chance: the prompt read (tags cut out), specs, seed, size; and what the PNG
    records: the prompt as typed (tags in place) and each adapter use (the prompt's tags, then the adapters given
    beside it) with the name its tag gives it."""

    prompt: str
    specs: tuple[AdapterSpec, ...]
    seed: int
    width: int
    height: int
    request: GenerateRequest
    typed_prompt: str
    uses: tuple[tuple[str, AdapterSpec], ...]


def native_size(pipe: Any) -> int:
    """The base's training resolution: latent sample size times the VAE's downscale factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def _size_multiple(pipe: Any) -> int:
    # diffusers' SD pipeline wants multiples of 8, and the VAE maps vae_scale_factor pixels to one latent.
    return math.lcm(8, int(pipe.vae_scale_factor))


def _check_request(request: GenerateRequest, width: int | None, height: int | None, multiple: int) -> None:
    """Refuse values no base can use; None sizes (the base's native one) are not checked. precheck_request calls it
    with the multiple every base needs (8) before a base loads, resolve_request again with the base's own."""
    problems = []
    if request.steps < 1:
        problems.append(f"steps must be >= 1 (got {request.steps})")
    if request.batch_size < 1:
        problems.append(f"batch size must be >= 1 (got {request.batch_size})")
    if not math.isfinite(request.cfg) or request.cfg < 0:  # below 0 guidance pushes away from the prompt
        problems.append(f"CFG scale must be 0 or more (got {request.cfg}; 5-7 is usual, 1 turns guidance off)")
    if isinstance(request.clip_skip, bool) or not isinstance(request.clip_skip, int) or request.clip_skip < 1:
        problems.append(f"clip skip counts layers from the end from 1, A1111's default (got {request.clip_skip!r}; "
                        "2, the layer before the last, is what models trained with kohya's --clip_skip 2 want)")
    tag = TAG_PATTERN.search(request.negative_prompt)
    if tag:
        problems.append(f"the negative prompt holds {tag.group(0)}: adapters load from the prompt only (there the "
                        "tag would be read as words); move it to the prompt, or remove it")
    if not -1 <= request.seed <= MAX_SEED:
        problems.append(f"seed must be -1 (random) or 0..{MAX_SEED} (got {request.seed})")
    sizes = [size for size in (width, height) if size is not None]
    if any(size % multiple or size <= 0 for size in sizes):
        problems.append(f"size {_size_text(width)}x{_size_text(height)} must be positive multiples of {multiple} "
                        f"for this base (e.g. {_nearest_size(width, multiple)}x{_nearest_size(height, multiple)})")
    if problems:
        raise ValueError("Cannot generate: " + "; ".join(problems) + ".")


def _size_text(size: int | None) -> str:
    return "native" if size is None else str(size)


def _nearest_size(size: int | None, multiple: int) -> str:
    return "native" if size is None else str(max(multiple, round(size / multiple) * multiple))


def _merge_specs(specs: list[AdapterSpec]) -> tuple[AdapterSpec, ...]:
    """One spec per file: the same adapter twice (flag and tag) adds its weights, as two LoRAs would."""
    merged: dict[Path, AdapterSpec] = {}
    for spec in specs:
        key = spec.path.resolve()
        if key in merged:
            old = merged[key]
            if old.blocks != spec.blocks:
                raise ValueError(f"{spec.path.name} is given twice with different block weights (lbw={old.blocks} "
                                 f"and lbw={spec.blocks}); give it once.")
            spec = AdapterSpec(old.path, old.unet_weight + spec.unet_weight,
                               old.text_encoder_weight + spec.text_encoder_weight, spec.blocks)
        merged[key] = spec
    return tuple(merged.values())


def _weights_text(unet: float, te: float) -> str:
    # Rounded so that 0.1 + 0.2 reads 0.3; A1111 users read weights as 1.0, 0.5.
    unet, te = round(float(unet), 6), round(float(te), 6)
    return f"{unet!r}" if unet == te else f"UNet {unet!r}, text encoder {te!r}"


def doubled_adapter_notes(chosen: tuple[AdapterSpec, ...], tagged: list[AdapterSpec]) -> list[str]:
    """One note per adapter that is both chosen (--lora, the app's list) and tagged in the prompt, or tagged twice.

    The weights add up, as A1111 adds a tag to the same LoRA chosen elsewhere (and as `_merge_specs` does); but a
    user who picked an adapter in one place and pasted a prompt with its tag rarely means to double it."""
    from stylelora.generate.prompt_tags import adapter_name

    def by_file(specs) -> dict[Path, list[AdapterSpec]]:
        grouped: dict[Path, list[AdapterSpec]] = {}
        for spec in specs:
            grouped.setdefault(spec.path.resolve(), []).append(spec)
        return grouped

    def total(specs: list[AdapterSpec]) -> tuple[float, float]:
        return sum(s.unet_weight for s in specs), sum(s.text_encoder_weight for s in specs)

    in_prompt, mine_by_file, notes = by_file(tagged), by_file(chosen), []
    for key, theirs in in_prompt.items():
        if key not in mine_by_file and len(theirs) > 1:  # the same tag twice: A1111 adds these up too
            weights = " and ".join(_weights_text(s.unet_weight, s.text_encoder_weight) for s in theirs)
            notes.append(f"{adapter_name(theirs[0].path)} is tagged {len(theirs)} times in the prompt ({weights}): "
                         f"they add up to {_weights_text(*total(theirs))}, as in A1111. Tag it once.")
    for key, mine in mine_by_file.items():
        if key not in in_prompt:
            continue
        (unet, te), theirs = total(mine), total(in_prompt[key])
        weight = "weight" if unet == te else "weights"
        notes.append(f"{adapter_name(in_prompt[key][0].path)} is both chosen ({weight} {_weights_text(unet, te)}) "
                     f"and tagged in the prompt ({_weights_text(*theirs)}): they add up to "
                     f"{_weights_text(unet + theirs[0], te + theirs[1])}, as in A1111. Remove one to use the "
                     "other's weight alone.")
    return notes


def _add_triggers(typed: str, prompt: str, adapters: list) -> tuple[str, str]:
    """(the prompt as typed, the prompt read) with the adapters' trigger words the prompt read lacks in front of
    each: the PNG records the first, and the second is what reading it back gives."""
    from stylelora.lora.inspect import trigger_words, with_trigger_words

    read = with_trigger_words(prompt, [word for adapter in adapters for word in trigger_words(adapter.metadata)])
    added = read.removesuffix(prompt).removesuffix(", ") if prompt else read
    return ", ".join(part for part in (added, typed) if part), read


def precheck_request(request: GenerateRequest) -> list[str]:
    """Fail fast, before a base model is loaded: tags parse and resolve, adapter files exist and are safetensors.
    Returns notes on what the request does that its user may not mean (doubled_adapter_notes), for the CLI to print
    and the app to show."""
    from stylelora.lora.adapter_file import read_header, weights_path
    from stylelora.generate.prompt_tags import parse_prompt, resolve_tags
    from stylelora.lora.io import load_adapter_state

    # Steps, seed, batch and a size no base takes fail here, not after minutes of loading a real base.
    _check_request(request, request.width, request.height, 8)
    _, tags = parse_prompt(request.prompt)
    tagged = resolve_tags(tags, request.adapters_dir)
    notes = []
    for spec in list(request.loras) + tagged:
        path = weights_path(spec.path)
        if path.suffix != ".safetensors" or not path.is_file():
            load_adapter_state(path)  # raises the loader's own refusal (pickle, not found)
        notes += clip_skip_notes(path, read_header(path)[1], request.clip_skip)
    return doubled_adapter_notes(request.loras, tagged) + notes


def clip_skip_notes(path: Path, metadata: dict[str, str], clip_skip: int) -> list[str]:
    """A note where kohya's metadata says the adapter was trained reading another layer (`ss_clip_skip`): its text
    encoder's LoRA learned that layer, so it is drawn as trained only with the same clip skip (A1111 does not
    say so; its users learn it from the model page)."""
    from stylelora.lora.inspect import trained_clip_skip

    trained = trained_clip_skip(metadata)
    if trained is None or trained == clip_skip:
        return []
    return [f"{path.stem} was trained with clip skip {trained} (kohya's ss_clip_skip); set clip skip to {trained} "
            f"(--clip-skip {trained}, A1111's Clip skip) to draw it as it was trained."]


def resolve_request(pipe: Any, stack: AdapterStack, request: GenerateRequest) -> ResolvedRequest:
    """Everything decided before sampling; files are loaded (and checked) here, the weights not yet touched."""
    from stylelora.generate.prompt_tags import adapter_name, list_adapters, parse_prompt, resolve_tags

    prompt, tags = parse_prompt(request.prompt)
    # The prompt's tags first, as the PNG records them (the others' tags after the prompt): drawn again from it, the
    # adapters fuse in the same order, which the image depends on bit for bit.
    uses = resolve_tags(tags, request.adapters_dir) + list(request.loras)
    specs = _merge_specs(uses)
    adapters = [stack.load(spec.path) for spec in specs]
    typed = request.prompt.strip()
    if request.add_triggers:
        typed, prompt = _add_triggers(typed, prompt,
                                      [a for a, s in zip(adapters, specs) if s.unet_weight or s.te_weight])
    size = native_size(pipe)
    width = size if request.width is None else request.width  # 0 is refused below, not read as "native"
    height = size if request.height is None else request.height
    _check_request(request, width, height, _size_multiple(pipe))
    seed = secrets.randbelow(MAX_SEED + 1) if request.seed == -1 else request.seed
    adapters = list_adapters(request.adapters_dir) if specs and request.adapters_dir is not None else {}
    named = tuple((adapter_name(spec.path, adapters), spec) for spec in uses)
    return ResolvedRequest(prompt, specs, seed, width, height, request, typed, named)


def _params(pipe: Any, stack: AdapterStack, resolved: ResolvedRequest, sampler: str) -> GenerationParams:
    from stylelora.generate.base_identity import base_identity

    identity = base_identity(pipe)
    loras = tuple(
        LoraUse(name, float(spec.unet_weight), spec.text_encoder_weight, stack.load(spec.path).short_hash,
                spec.blocks)
        for name, spec in resolved.uses
    )
    request = resolved.request
    used = len([spec for spec in resolved.specs if spec.unet_weight or spec.te_weight])
    extra = {BLEND_MODE_FIELD: request.blend_mode} if used > 1 and request.blend_mode != "sum" else {}
    if used and request.dial != "weights":
        extra[DIAL_FIELD] = request.dial
    if request.clip_skip > 1:
        extra[CLIP_SKIP_FIELD] = str(request.clip_skip)
    return GenerationParams(
        prompt=resolved.typed_prompt, negative_prompt=request.negative_prompt, steps=request.steps,
        cfg_scale=float(request.cfg), sampler=sampler, seed=resolved.seed, width=resolved.width,
        height=resolved.height, model=identity.name, model_hash=identity.hash, loras=loras, extra=extra,
    )


def _step_callback(progress: ProgressCallback | None, total: int):
    if progress is None:
        return None

    def on_step_end(pipe, step, timestep, callback_kwargs):
        progress(step + 1, total)
        return callback_kwargs

    return on_step_end


def generate(pipe: Any, stack: AdapterStack | None, request: GenerateRequest, *,
             progress: ProgressCallback | None = None) -> list[GeneratedImage]:
    """Images for `request` with its adapters fused; holds the stack's lock while sampling (requests queue)."""
    import torch

    from stylelora.generate.samplers import make_scheduler

    stack = stack or AdapterStack.for_pipe(pipe)
    resolved = resolve_request(pipe, stack, request)
    seeds = [resolved.seed + i for i in range(request.batch_size)]
    with stack.applied(resolved.specs, request.blend_mode, request.dial):
        # The pipeline's scheduler is shared too: swap in this request's under the same lock, then put it back.
        original_scheduler = pipe.scheduler
        scheduler, sampler_name = make_scheduler(original_scheduler, request.sampler)
        pipe.scheduler = scheduler
        try:
            pipe.set_progress_bar_config(disable=True)
            # Read as A1111 reads them: (word:1.2), [from:to:when], past 75 tokens, clip skip.
            output = prompt_schedule.draw(
                pipe, [resolved.prompt] * len(seeds), [request.negative_prompt] * len(seeds), steps=request.steps,
                guidance_scale=request.cfg, clip_skip=request.clip_skip, then=_step_callback(progress, request.steps),
                width=resolved.width, height=resolved.height, output_type="pil",
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
        finally:
            pipe.scheduler = original_scheduler
    params = _params(pipe, stack, resolved, sampler_name)
    return [GeneratedImage(image, params.with_seed(seed)) for image, seed in zip(output.images, seeds)]


def request_from_parameters(text: str, adapters_dir: str | os.PathLike | None, *,
                            stack: AdapterStack | None = None, check_files: bool = False) -> GenerateRequest:
    """The request that makes the image described by A1111 `parameters` text again (its tags resolved in
    adapters_dir, a name two files share told apart by its recorded hash). With a stack, or with check_files (read
    from the files, before any base loads), each adapter's hash is checked against the recorded one."""
    params = parse_parameters(text)
    if adapters_dir is not None and Path(adapters_dir).is_dir() and params.loras:
        from stylelora.generate.prompt_tags import list_adapters, resolve_by_hash

        adapters = list_adapters(adapters_dir)
        params = replace(params, loras=tuple(replace(lora, name=resolve_by_hash(lora.name, lora.hash, adapters))
                                             for lora in params.loras))
    request = GenerateRequest(
        prompt=params.prompt_with_tags, negative_prompt=params.negative_prompt, steps=params.steps,
        cfg=params.cfg_scale, sampler=params.sampler, seed=params.seed, width=params.width, height=params.height,
        adapters_dir=Path(adapters_dir) if adapters_dir is not None else None,
        # Written only when not "sum": A1111's files (and ours before blend modes) are plain sums.
        blend_mode=params.extra.get(BLEND_MODE_FIELD, "sum"), dial=params.extra.get(DIAL_FIELD),
        clip_skip=_clip_skip(params.extra.get(CLIP_SKIP_FIELD, "1")),
    )
    if stack is not None or check_files:
        _check_lora_hashes(params, request, stack)
    return request


def _clip_skip(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"Clip skip: {text!r} in the parameters is not a whole number (A1111 writes 2, say)."
                         ) from None


def _check_lora_hashes(params: GenerationParams, request: GenerateRequest, stack: AdapterStack | None) -> None:
    """Refuse where an adapter file is not the one the image records (by A1111's short hash; read from the file
    where there is no stack)."""
    from stylelora.generate.prompt_tags import resolve_adapter_name
    from stylelora.generate.stack import A1111_SHORT_HASH_LENGTH
    from stylelora.lora.io import file_model_hash

    changed = []
    for lora in params.loras:
        if not lora.hash or request.adapters_dir is None:
            continue
        path = resolve_adapter_name(lora.name, request.adapters_dir)
        found = stack.load(path).short_hash if stack else file_model_hash(path)[:A1111_SHORT_HASH_LENGTH]
        if not found.startswith(lora.hash) and not lora.hash.startswith(found):
            changed.append(f"{lora.name} (recorded {lora.hash}, file {found})")
    if changed:
        raise ValueError(
            "These adapters are not the files the image was made with, so it would not come out the same: "
            + "; ".join(changed) + ". Put those files back in the adapters folder, or give the adapters to use "
            "yourself (a prompt with their tags, or --lora)."
        )


def with_overrides(request: GenerateRequest, **changes: Any) -> GenerateRequest:
    """A copy of `request` with some fields changed (grids, the app's "same but seed+1")."""
    return replace(request, **changes)
