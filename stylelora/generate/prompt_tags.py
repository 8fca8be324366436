"""A1111 `<lora:name:weight>` prompt tags: parsing, writing, and resolving names safely inside an adapters folder.

Weights follow A1111's Lora extension so PNG parameters mean the same in both tools: `<lora:name:W>` sets both
weights; `<lora:name:TE:UNET>` is text encoder first, then UNet; `te=`/`unet=` name them explicitly; `lbw=` gives
per-block weights as A1111's LoRA Block Weight extension reads them (stylelora.lora.block_weights). Names resolve
only to `.safetensors` files inside the adapters folder: no absolute paths, no `..`, no symlinks leading out.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from stylelora.lora.block_weights import BlockWeightError, parse_ratios
from stylelora.lora.spec import AdapterSpec

TAG_PATTERN = re.compile(r"<(?:lora|lyco):([^<>]*)>")  # A1111 reads <lyco:...> (LyCORIS' old tag) as <lora:...>
OTHER_NETWORK_PATTERN = re.compile(r"<(hypernet|embedding|ti):[^<>]*>", re.IGNORECASE)
STRAY_TAG_PATTERN = re.compile(r"<\s*(?:lora|lyco)\s*:[^<>]{0,40}", re.IGNORECASE)  # what is left of a tag mistyped
ADAPTER_SUFFIX = ".safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# A training checkpoint's resume state (stylelora.train.checkpoint's CHECKPOINTS_DIR / step-N / WEIGHTS_FILE, named
# here without importing torch): raw LoRA weights that only --resume reads, listed beside the step's loadable adapter.
CHECKPOINT_FOLDER, CHECKPOINT_STATE = "checkpoints", "lora_weights.safetensors"
# A run's disk latent cache (OUTPUT/cache/.../<sha256>.safetensors): tensors, not adapters.
CACHE_FOLDER, CACHE_ENTRY = "cache", re.compile(r"^[0-9a-f]{32,}$")


class PromptTagError(ValueError):
    """A <lora:...> tag cannot be used; the message names the tag and what to write instead."""


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag as written: the adapter name, its two weights and its block weights (`lbw=`, or None)."""

    name: str
    unet_weight: float = 1.0
    te_weight: float = 1.0
    blocks: str | None = None

    def to_text(self) -> str:
        return format_lora_tag(self.name, self.unet_weight, self.te_weight, self.blocks)


def format_weight(value: float) -> str:
    """Shortest text that reads back as the same float (1.0 -> "1", 0.35 -> "0.35")."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def format_lora_tag(name: str, unet_weight: float, te_weight: float | None = None, blocks: str | None = None) -> str:
    """`<lora:name:W>`, or `<lora:name:te=T:unet=U>` when the weights differ (unambiguous in every tool), with
    `:lbw=BLOCKS` last when the adapter has block weights."""
    te_weight = unet_weight if te_weight is None else te_weight
    lbw = "" if blocks is None else f":lbw={blocks}"
    if float(te_weight) == float(unet_weight):
        return f"<lora:{name}:{format_weight(unet_weight)}{lbw}>"
    return f"<lora:{name}:te={format_weight(te_weight)}:unet={format_weight(unet_weight)}{lbw}>"


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptTagError(f"{tag}: weight {text!r} is not a number (write e.g. <lora:name:0.8>).") from None
    if not math.isfinite(value):
        raise PromptTagError(f"{tag}: weight {text!r} must be finite.")
    return value


def tag_name(body: str) -> str:
    """The adapter name of a tag's body (what TAG_PATTERN captures): the text before its first ':', as A1111 reads
    it; the weights after it are not read, so a tag with a bad weight still has its name."""
    return body.split(":", 1)[0].strip()


def _parse_tag(body: str) -> LoraTag:
    tag = f"<lora:{body}>"
    name, items = tag_name(body), body.split(":")[1:]
    if not name:
        raise PromptTagError(f"{tag} has no adapter name: write <lora:NAME:WEIGHT>.")
    positional = [_number(item, tag) for item in items if "=" not in item]
    named = dict(item.split("=", 1) for item in items if "=" in item)
    unknown = sorted(set(named) - {"te", "unet", "lbw"})
    if unknown or len(positional) > 2:
        raise PromptTagError(
            f"{tag}: only <lora:NAME:W>, <lora:NAME:TE_W:UNET_W>, te=/unet= and lbw= are supported "
            f"(got {', '.join(unknown) or 'more than two weights'}; dyn is not)."
        )
    blocks = named["lbw"].strip() if "lbw" in named else None
    if blocks is not None:
        try:
            parse_ratios(blocks)
        except BlockWeightError as error:
            raise PromptTagError(f"{tag}: {error}") from None
    te_weight = positional[0] if positional else 1.0
    te_weight = _number(named["te"], tag) if "te" in named else te_weight
    unet_weight = positional[1] if len(positional) > 1 else te_weight
    unet_weight = _number(named["unet"], tag) if "unet" in named else unet_weight
    return LoraTag(name=name, unet_weight=unet_weight, te_weight=te_weight, blocks=blocks)


def clean_prompt(prompt: str) -> str:
    """Whitespace runs to one space, no dangling commas: what is left when tags are cut out of a prompt."""
    text = re.sub(r"\s+", " ", prompt).strip()
    text = re.sub(r"(\s*,\s*)+", ", ", text)
    return text.strip(", ").strip()


def parse_prompt(prompt: str) -> tuple[str, list[LoraTag]]:
    """(prompt without tags, the tags in order). Refuses other tools' network tags rather than encode them as text."""
    other = OTHER_NETWORK_PATTERN.search(prompt)
    if other:
        raise PromptTagError(f"{other.group(0)}: only <lora:...> tags are supported; remove it from the prompt.")
    tags = [_parse_tag(match.group(1)) for match in TAG_PATTERN.finditer(prompt)]
    text = TAG_PATTERN.sub(" ", prompt)
    stray = STRAY_TAG_PATTERN.search(text)
    if stray:  # else it would reach the text encoder as words, and no adapter would load
        raise PromptTagError(f"{stray.group(0).strip()!r} is not a whole tag: write <lora:NAME:WEIGHT> in lower "
                             "case, closed with '>'.")
    return clean_prompt(text), tags


def prompt_with_tags(prompt: str, tags: list[LoraTag]) -> str:
    """The prompt as A1111 records it: as typed, its own tags where they were typed (the first of `tags`), then the
    rest of `tags` after it (parse_prompt gives back the text and `tags`). A tag of its own is kept as written unless
    `tags` says otherwise (a name resolved to the file's), then written anew where it stands."""
    given = iter(tags)

    def written(match: re.Match) -> str:
        tag = next(given, None)
        return match.group(0) if tag is None or _parse_tag(match.group(1)) == tag else tag.to_text()

    text = TAG_PATTERN.sub(written, prompt)
    return " ".join([text, *(tag.to_text() for tag in given)]).strip()


def without_trailing_tags(prompt: str) -> str:
    """`prompt` without the tags it ends with: what was typed before the tags the record puts after it (adapters
    given beside the prompt, or every one in files written before tags kept their place)."""
    trailing = re.search(rf"(?:\s*{TAG_PATTERN.pattern})+\s*\Z", prompt)
    return prompt[:trailing.start()] if trailing else prompt


# ----------------------------------------------------------------------------- name resolution


def _check_name(name: str) -> None:
    parts = name.split("/")
    if (
        "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise PromptTagError(
            f"Adapter name {name!r} is not allowed: use a name relative to the adapters folder, like "
            "'stripes' or 'styles/stripes', without '..', backslashes or absolute paths."
        )


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def list_adapters(folder: str | os.PathLike) -> dict[str, Path]:
    """{name: file} for every adapter under `folder`: relative path without .safetensors (peft folders by name)."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.rglob(f"*{ADAPTER_SUFFIX}")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not _inside(path, folder):
            continue  # temp files of atomic writes, hidden folders, symlinks out of the folder
        if path.name == CHECKPOINT_STATE and CHECKPOINT_FOLDER in relative.parts[:-1]:
            continue  # not an adapter: loading it fails
        if CACHE_ENTRY.match(path.stem) and CACHE_FOLDER in relative.parts[:-1]:
            continue
        key = relative.parent.as_posix() if path.name == PEFT_WEIGHTS_NAME else relative.with_suffix("").as_posix()
        found[key] = path
    return found


def is_checkpoint(name: str) -> bool:
    """Whether an adapter name (relative to the adapters folder) is one a training run saves with a checkpoint, in
    RUN/checkpoints/step-NNNNNN/. Offered beside finished adapters, a half-trained one would be picked by mistake;
    they stay usable by name (tags, typed names)."""
    folders = str(name).split("/")[:-1]
    return any(folder == CHECKPOINT_FOLDER and re.fullmatch(r"step-\d+", step) is not None
               for folder, step in zip(folders, folders[1:]))


def _unknown_name_hint(name: str, adapters: dict[str, Path]) -> str:
    """The finished adapters a mistyped name is closest to, else the first few of them (checkpoints left out: a
    run's dozen steps hid the adapters themselves)."""
    import difflib

    finished = [key for key in adapters if not is_checkpoint(key)]
    by_stem = {key.rsplit("/", 1)[-1]: key for key in finished}
    close = difflib.get_close_matches(name.removesuffix(ADAPTER_SUFFIX).rsplit("/", 1)[-1], list(by_stem), n=3)
    if close:
        return "did you mean " + " or ".join(by_stem[stem] for stem in close) + "?"
    shown = ", ".join(finished[:8]) or "none"
    return f"found: {shown}" + (f" and {len(finished) - 8} more" if len(finished) > 8 else "")


def resolve_adapter_name(name: str, folder: str | os.PathLike) -> Path:
    """The adapter file `name` means inside `folder`: exact relative name first, else a unique file of that stem."""
    _check_name(name)
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptTagError(
            f"Adapters folder {folder} does not exist; pass the folder holding your .safetensors adapters."
        )
    stem = name.removesuffix(ADAPTER_SUFFIX)
    for candidate in (folder / f"{stem}{ADAPTER_SUFFIX}", folder / stem / PEFT_WEIGHTS_NAME):
        if candidate.is_file():
            if not _inside(candidate, folder):
                raise PromptTagError(f"Adapter {name!r} is a link leading outside {folder}; refusing to load it.")
            return candidate
    adapters = list_adapters(folder)
    matches = [path for key, path in adapters.items() if key.rsplit("/", 1)[-1] == stem]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(sorted(k for k, p in adapters.items() if p in matches))
        raise PromptTagError(f"<lora:{name}> is ambiguous in {folder}: {names}. Write the name with its subfolder.")
    raise PromptTagError(f"No adapter named {name!r} in {folder} ({_unknown_name_hint(name, adapters)}).")


def resolve_tags(tags: list[LoraTag], folder: str | os.PathLike | None) -> list[AdapterSpec]:
    """AdapterSpecs for the tags, every name resolved inside `folder` before anything is loaded."""
    if tags and folder is None:
        raise PromptTagError(
            f"The prompt has {tags[0].to_text()} but no adapters folder was given to look names up in "
            "(CLI: --adapters-dir)."
        )
    return [AdapterSpec(resolve_adapter_name(tag.name, folder), tag.unet_weight, tag.te_weight, tag.blocks)
            for tag in tags]


def adapter_name(path: str | os.PathLike, adapters: dict[str, Path] | None = None) -> str:
    """The name a PNG's tag gives `path`: its file name without .safetensors (a peft folder's name), as A1111 names
    a LoRA (a subfolder in the name is not found by A1111 when typed, and civitai drops the tag's weight). Where
    another file of `adapters` (list_adapters of the adapters folder) has that name too, the relative name is
    kept, so that pasting the prompt back loads this file and not the other."""
    path = Path(path)
    stem = path.parent.name if path.name == PEFT_WEIGHTS_NAME else path.stem
    namesakes = [key for key in adapters or {} if key.rsplit("/", 1)[-1] == stem]
    if len(namesakes) < 2:
        return stem
    return next((key for key in namesakes if adapters[key].resolve() == path.resolve()), stem)


def resolve_by_hash(name: str, short_hash: str, adapters: dict[str, Path]) -> str:
    """For another tool's image: the relative name of the one file of `adapters` (list_adapters) named `name` whose
    A1111 short hash is `short_hash`; `name` itself where it is not shared, or where the hash tells nothing apart.
    The hash kohya stores in the header (sshs_model_hash) is read first; a file without one is hashed."""
    from stylelora.lora.adapter_file import read_header
    from stylelora.lora.io import file_model_hash

    matches = [key for key in adapters if key.rsplit("/", 1)[-1] == name]
    if len(matches) < 2 or not short_hash:
        return name

    def model_hash(path: Path) -> str:
        return read_header(path)[1].get("sshs_model_hash") or file_model_hash(path)

    same = [key for key in matches if model_hash(adapters[key]).startswith(short_hash)]
    return same[0] if len(same) == 1 else name
