"""`stylelora inspect`: what an adapter file is (layout, base family, ranks, modules, triggers, training, hashes).

Works without a base model: everything comes from the file's keys, shapes and metadata. Trigger words are also
what `--add-triggers` puts in front of prompts.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

# Metadata that is big or shown elsewhere; every other ss_* key is listed as a training setting.
BLEND_METADATA_KEY = "stylelora.blend"  # written by stylelora.lora.blend
NOT_TRAINING_SETTINGS = {"ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_datasets"}
REPEATS_FOLDER = re.compile(r"^\d+_(.+)$")
SDXL_TEXT_ENCODER_PREFIXES = {"text_encoder_1": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _json(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except (json.JSONDecodeError, TypeError):
        return default


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """modelspec.trigger_phrase (comma-separated), else kohya dataset folder names `<repeats>_<trigger>`."""
    phrase = metadata.get("modelspec.trigger_phrase", "")
    if phrase.strip():
        return [word.strip() for word in phrase.split(",") if word.strip()]
    folders = list(_json(metadata.get("ss_dataset_dirs"), {})) or list(_json(metadata.get("ss_tag_frequency"), {}))
    words = [match.group(1).strip() for folder in folders if (match := REPEATS_FOLDER.match(Path(folder).name))]
    return list(dict.fromkeys(word for word in words if word))


def with_trigger_words(prompt: str, words: list[str]) -> str:
    """`prompt` with the trigger words it does not hold yet put in front, each once. In front, because that is where
    training captions carry them (kohya's keep_tokens keeps them there): the toy adapters draw nothing with their
    trigger last, and the character only on half of the images."""
    prompt = (prompt or "").strip()
    tags = [tag.strip().lower() for tag in prompt.split(",")]
    # A word counts as there when a tag is it or starts with it ("sks dog running"), not when it is only the subject
    # of a phrase: `a red zorb on a white background` still lacks the character's trigger tag `zorb`.
    missing = [word for word in dict.fromkeys(words)
               if not any(tag == word.lower() or tag.startswith(word.lower() + " ") for tag in tags)]
    return ", ".join([*missing, prompt] if prompt else missing)


def trained_clip_skip(metadata: dict[str, str]) -> int | None:
    """The clip skip kohya's metadata says the adapter was trained at (`ss_clip_skip`), or None where it records
    none (kohya writes "None"; files from other tools lack the key)."""
    value = metadata.get("ss_clip_skip", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def company_words(metadata: dict[str, str]) -> list[str]:
    """The words stylelora trained beside the adapter's trigger as decoy company, quiet vocabulary words first
    (none for a file trained elsewhere or without company)."""
    words = _json(metadata.get("ss_stylelora_company_words"), [])
    return [str(word) for word in words if isinstance(word, str) and word.strip()] if isinstance(words, list) else []


def adapter_trigger_words(path: str | os.PathLike) -> list[str]:
    """Trigger words of an adapter file, from its header only (for the app's "add triggers" button)."""
    from stylelora.lora.adapter_file import read_header, weights_path

    return trigger_words(read_header(weights_path(path))[1])


def tag_frequencies(metadata: dict[str, str]) -> dict[str, int]:
    """{tag: count} over all dataset folders of ss_tag_frequency, most frequent first."""
    total: Counter = Counter()
    for tags in _json(metadata.get("ss_tag_frequency"), {}).values():
        if isinstance(tags, dict):
            total.update({str(tag).strip(): int(count) for tag, count in tags.items()})
    return dict(total.most_common())


def _module_shapes(state: dict) -> dict[str, dict[str, Any]]:
    """{kohya module: {"rank", "alpha", "conv"}} from lora_down shapes and .alpha tensors."""
    from stylelora.lora.formats import group_kohya_modules

    modules: dict[str, dict[str, Any]] = {}
    for name, parts in group_kohya_modules(state).modules.items():
        entry = modules[name] = {}
        down = parts.get("lora_down.weight")
        if down is not None:
            entry["rank"] = int(down.shape[0])
            entry["conv"] = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
        entry["alpha"] = float(parts["alpha"].item()) if "alpha" in parts else float(entry.get("rank", 0))
    return modules


def _rank_summary(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pairs = Counter((entry.get("rank"), entry["alpha"]) for entry in modules.values())
    (rank, alpha), _ = pairs.most_common(1)[0] if pairs else ((None, None), 0)
    summary = {"rank": rank, "alpha": alpha, "mixed": len(pairs) > 1}
    if len(pairs) > 1:
        summary["rank_alpha_counts"] = {f"{r}/{a:g}": n for (r, a), n in pairs.most_common()}
    conv = [entry for entry in modules.values() if entry.get("conv")]
    if conv:
        summary["conv_modules"] = len(conv)
    return summary


def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Everything `stylelora inspect` shows, as a JSON-ready dict."""
    from stylelora.lora.adapter_file import read_adapter_file
    from stylelora.lora.components import adapter_architecture
    from stylelora.lora.formats import module_component
    from stylelora.lora.io import file_hashes

    file = read_adapter_file(path)
    metadata = file.metadata
    modules = _module_shapes(file.state)
    computed, file_sha256 = file_hashes(file.path)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for k, t in file.state.items() if not k.endswith(".alpha"))
    return {
        "file": str(file.path),
        "file_size": file.file_size,
        "format": file.layout,
        "lycoris": file.lycoris,
        "unsupported": _unsupported_kinds(file.state),
        "title": metadata.get("modelspec.title") or metadata.get("ss_output_name") or file.path.stem,
        "architecture": adapter_architecture(file.state, metadata),
        "base_model": {key: metadata[key] for key in ("ss_base_model_version", "modelspec.architecture",
                                                      "ss_sd_model_name", "ss_v2") if key in metadata}
                      or ({"peft.base_model_name_or_path": file.peft_config.get("base_model_name_or_path")}
                          if file.peft_config else {}),
        **_rank_summary(modules),
        "modules": _module_counts(modules, module_component),
        "dtypes": dict(dtypes),
        "trigger_words": trigger_words(metadata),
        "training": {key: _json(value, value) for key, value in sorted(metadata.items())
                     if key.startswith("ss_") and key not in NOT_TRAINING_SETTINGS},
        "tag_frequency": tag_frequencies(metadata),
        "dataset_dirs": _json(metadata.get("ss_dataset_dirs"), {}),
        "modelspec": {key.removeprefix("modelspec."): value for key, value in metadata.items()
                      if key.startswith("modelspec.")},
        "blend": _json(metadata.get(BLEND_METADATA_KEY), None),
        "hash": _hash_report(metadata, computed, file_sha256),
    }


def _hash_report(metadata: dict[str, str], computed: str, file_sha256: str) -> dict[str, Any]:
    """The file's hashes as computed, beside those its metadata states. The tensor-bytes hash is stated twice by
    files stylelora and kohya write: sshs_model_hash (hex) and the SAI model spec's hash_sha256 ("0x" + hex);
    matches_metadata says whether every one stated is the file's (None: neither is)."""
    from stylelora.lora.io import MODELSPEC_HASH_KEY

    stored = metadata.get("sshs_model_hash")
    spec = metadata.get(MODELSPEC_HASH_KEY)
    stated = {key: value for key, value in (("sshs_model_hash", stored), (MODELSPEC_HASH_KEY, spec))
              if value is not None}
    differing = [key for key, value in stated.items() if value.lower().removeprefix("0x") != computed]
    return {"sshs_model_hash": stored, "modelspec_hash_sha256": spec, "computed": computed,
            "a1111_short": computed[:12], "matches_metadata": None if not stated else not differing,
            "differs": differing, "sshs_legacy_hash": metadata.get("sshs_legacy_hash"), "file_sha256": file_sha256,
            "civitai_autov2": file_sha256[:10].upper()}


def _hash_check(hashes: dict[str, Any]) -> str:
    """How the computed tensor hash compares with the ones the metadata states, for the text report."""
    if hashes["matches_metadata"] is None:
        return "no sshs_model_hash or modelspec.hash_sha256 in metadata"
    if hashes["matches_metadata"]:
        return "matches metadata"
    return f"DIFFERS from metadata's {' and '.join(hashes['differs'])} (changed since, or hashed another way)"


def _unsupported_kinds(state: dict) -> dict[str, int]:
    """{kind: module count} of the modules stylelora cannot apply (DoRA, LyCORIS (IA)^3, ...): what the file is,
    where generating or blending with it is refused."""
    from stylelora.lora.formats import group_kohya_modules

    return {kind: len(names) for kind, names in group_kohya_modules(state).foreign_kinds().items()}


def _module_counts(modules: dict[str, Any], module_component) -> dict[str, int]:
    """{"unet": n, "text_encoder": n} (every text encoder); SDXL files add "text_encoder_1" / "text_encoder_2"."""
    counts = {component: sum(1 for n in modules if module_component(n) == component)
              for component in ("unet", "text_encoder")}
    for key, prefix in SDXL_TEXT_ENCODER_PREFIXES.items():
        count = sum(1 for name in modules if name.startswith(prefix))
        if count:
            counts[key] = count
    return counts


def _text_encoder_counts(counts: dict[str, int]) -> str:
    if not any(key in counts for key in SDXL_TEXT_ENCODER_PREFIXES):
        return f"text encoder {counts['text_encoder']}"
    return (f"text encoders {counts['text_encoder']} ({counts.get('text_encoder_1', 0)} lora_te1, "
            f"{counts.get('text_encoder_2', 0)} lora_te2)")


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def format_inspect(info: dict[str, Any], max_tags: int = 15) -> str:
    """A human-readable report of inspect_adapter's dict."""
    from stylelora.lora.formats import SUPPORTED_KINDS

    rank = f"rank {info['rank']}, alpha {info['alpha']:g}" if info["rank"] is not None else "no modules"
    if info.get("mixed"):
        counts = ", ".join(f"{pair}×{count}" for pair, count in info["rank_alpha_counts"].items())
        rank += f" (most modules; per module rank/alpha: {counts})"
    hashes = info["hash"]
    lines = [
        f"{info['title']}  ({Path(info['file']).name}, {_human_size(info['file_size'])}, {info['format']} layout)",
        f"  architecture   {info['architecture']}",
        f"  base model     {', '.join(f'{k}={v}' for k, v in info['base_model'].items()) or 'not recorded'}",
        f"  network        {rank}" + (f", {info['conv_modules']} conv modules" if info.get("conv_modules") else ""),
        f"  modules        UNet {info['modules']['unet']}, {_text_encoder_counts(info['modules'])}",
        *([f"  LyCORIS        {', '.join(f'{kind} {count}' for kind, count in info['lycoris'].items())} modules, "
           "read as plain LoRA of the same change (the rank shown is that LoRA's)"] if info.get("lycoris") else []),
        *([f"  NOT LOADABLE   {', '.join(f'{kind}: {count} modules' for kind, count in info['unsupported'].items())}; "
           f"stylelora applies {SUPPORTED_KINDS} only: use this file in A1111 or ComfyUI"]
          if info.get("unsupported") else []),
        f"  dtypes         {', '.join(f'{k}×{n}' for k, n in info['dtypes'].items())}",
        f"  trigger words  {', '.join(info['trigger_words']) or 'none recorded'}",
        *_model_spec_lines(info["modelspec"]),
        # Which hash is which: A1111 and CivitAI's AutoV3 hash the tensors only, CivitAI's SHA256 the whole file.
        f"  hash           {hashes['a1111_short']} (A1111's Lora hash, CivitAI AutoV3: sha256 of the tensors "
        f"{hashes['computed']}, {_hash_check(hashes)})",
        f"  file sha256    {hashes['file_sha256']} (CivitAI SHA256; AutoV2 {hashes['civitai_autov2']})",
    ]
    merged = info["modelspec"].get("merged_from")
    if info.get("blend"):
        blend = info["blend"]
        inputs = ", ".join(f"{i['title']} (unet {i['unet_weight']:g}, te {i['te_weight']:g}"
                           + (f", lbw={i['lbw']}" if "lbw" in i else "") + ")" for i in blend["inputs"])
        how = f"rank {blend['rank']} SVD, max relative error {blend['max_relative_error']:.2e}" if blend["rank"] else "exact"
        lines.append(f"  merged from    {inputs}; {how}")
    elif merged:
        lines.append(f"  merged from    {merged}")
    if info["training"]:
        lines.append("  training")
        lines += [f"    {key.removeprefix('ss_'):<24} {_short(_when(key, value))}"
                  for key, value in info["training"].items()]
    if info["tag_frequency"]:
        top = list(info["tag_frequency"].items())[:max_tags]
        more = len(info["tag_frequency"]) - len(top)
        shown = ", ".join(f"{tag} ({count})" for tag, count in top)
        lines.append(f"  tags           {shown}" + (f", +{more} more" if more > 0 else ""))
    return "\n".join(lines)


SHARED_SPEC_FIELDS = ("description", "license", "date", "resolution")


def _model_spec_lines(spec: dict[str, str]) -> list[str]:
    """The model-spec fields model sites show (the thumbnail by its size, not its base64 text)."""
    lines = [f"  {key:<14} {_short(spec[key])}" for key in SHARED_SPEC_FIELDS if spec.get(key)]
    thumbnail = spec.get("thumbnail", "")
    if thumbnail:
        kind = thumbnail.partition(";")[0].removeprefix("data:")
        lines.append(f"  thumbnail      {kind}, {len(thumbnail) * 3 // 4 // 1024} KiB (data URI)")
    return lines


def _when(key: str, value: Any) -> Any:
    """kohya's ss_training_started_at / _finished_at (seconds since 1970) as a UTC date and time a reader can read."""
    import datetime

    if not key.endswith("_at"):
        return value
    try:
        moment = datetime.datetime.fromtimestamp(float(value), tz=datetime.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return value
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
