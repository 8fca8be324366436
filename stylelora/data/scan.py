"""Owns finding training items in a folder: kohya `N_trigger/` layout, flat folder, or metadata.jsonl.

Three layouts are understood, checked in this order:

1. `DATA/metadata.jsonl`: one JSON object per line with `file_name` (relative to DATA) and `text`
   (the caption; `caption` is accepted too). This is the diffusers / Hugging Face imagefolder layout.
2. kohya layout: `DATA/<repeats>_<trigger words>/img.png` with an optional `img.txt` (or `img.caption`)
   next to it. `10_zorb creature` means every image in it is seen 10 times per epoch and its trigger
   words are "zorb creature". DATA may also *be* such a folder.
3. flat folder: images + same-name `.txt` / `.caption` files directly in DATA, each seen once per epoch.

An image without a caption uses its folder's trigger words (and is listed in the report). Nothing is
opened here beyond caption text: whether an image decodes is `checks.py`'s job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from stylelora.data.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_EXTENSIONS = (".txt", ".caption")  # first one found wins, as in kohya's caption_extension
# Formats people drop into folders that Pillow cannot read: say so instead of ignoring them silently.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".psd", ".raw", ".cr2", ".nef", ".svg"})
# Operating-system litter that is not worth a line in the report (__MACOSX: the resource forks a zip made on a Mac
# unpacks to; advice to rename it to 10___MACOSX would be wrong).
JUNK_FILE_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
METADATA_FILE = "metadata.jsonl"
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
# A name kohya's parser would read as a repeat count that is not a whole number of at least 1 (-1_x, 0.5_x, 1,5_x).
BAD_REPEATS_FOLDER = re.compile(r"^([-+]?\d*[.,]?\d+)_(.+)$")
# kohya datasets repeat a folder 1-100 times; a number this large in `<number>_<words>` is more likely a year or an
# id ("2024_03_commissions") than a repeat count, so the report says how the name was read.
LARGE_REPEATS = 1000
FOLDER_ROLES = {"training": "training data folder", "regularization": "regularization folder (--reg-dir)"}


@dataclass(frozen=True)
class TrainItem:
    """One training image and the caption it is trained with."""

    path: Path
    caption: str  # a caption file's lines joined as tags
    repeats: int = 1
    folder: str = ""  # kohya folder name ("10_zorb"), the key of ss_tag_frequency / ss_dataset_dirs
    variants: tuple[str, ...] = ()  # the file's lines when it has several: alternatives with --caption-variants

    @property
    def key(self) -> str:
        """Stable, human-readable id of the image: folder/name."""
        return f"{self.folder}/{self.path.name}" if self.folder else self.path.name


@dataclass(frozen=True)
class IgnoredFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class FolderSummary:
    name: str
    repeats: int
    trigger: str
    image_count: int


@dataclass
class ScanReport:
    """What the scan found and every decision it made on the user's behalf."""

    root: Path
    layout: str  # "kohya", "flat" or "metadata.jsonl"
    folders: list[FolderSummary] = field(default_factory=list)
    uncaptioned: list[tuple[Path, str]] = field(default_factory=list)  # (image, caption used instead)
    ignored: list[IgnoredFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def image_count(self) -> int:
        return sum(f.image_count for f in self.folders)

    def summary(self, left_out: frozenset[Path] = frozenset()) -> str:
        """A few human lines: what will be trained, and what was filled in or left out. left_out: images the checks
        skip (reported with their reasons on their own), which are not listed as trained without a caption."""
        parts = ", ".join(
            f"{f.name} ({f.image_count} images × {f.repeats} repeats"
            + (f", trigger '{f.trigger}')" if f.trigger else ")")
            for f in self.folders
        )
        lines = [f"Found {self.image_count} images in {self.root} ({self.layout} layout): {parts}."]
        uncaptioned = [(path, caption) for path, caption in self.uncaptioned if path not in left_out]
        with_trigger = [(path, caption) for path, caption in uncaptioned if caption]
        if with_trigger:
            lines.append(f"{len(with_trigger)} images have no caption and train with the trigger words alone: "
                         f"{_first_five(f'{p.name} → {c!r}' for p, c in with_trigger)}.")
        if len(with_trigger) < len(uncaptioned):
            empty = [path.name for path, caption in uncaptioned if not caption]
            # A caption file is not read in the metadata.jsonl layout, so advising one there would not help.
            where = (f'Give each a "text" in {METADATA_FILE}' if self.layout == METADATA_FILE
                     else "Write NAME.txt beside each")
            lines.append(f"{len(empty)} images have no caption and no trigger words, so they train with an empty "
                         f"caption: {_first_five(empty)}. {where}, or pass --trigger WORD.")
        if self.ignored:
            lines.append(f"Ignored {len(self.ignored)} files: "
                         f"{_first_five(f'{i.path.name} ({i.reason})' for i in self.ignored)}.")
        lines.extend(self.warnings)
        return "\n".join(lines)


def _first_five(texts) -> str:
    texts = list(texts)
    return "; ".join(texts[:5]) + (f" (+{len(texts) - 5} more)" if len(texts) > 5 else "")


def scan_folder(root: str | Path, *, extra_trigger: str | None = None,
                role: str = "training") -> tuple[list[TrainItem], ScanReport]:
    """Find the training items under `root` (see the module docstring for the layouts).

    `extra_trigger` is put in front of every caption that does not already contain it (as whole words),
    so that `keep_tokens=1` keeps it in place when tags are shuffled. `role` ("training" or "regularization")
    names the folder in errors, so a bad --reg-dir is not reported as the training data.
    Raises DataError when `root` is missing or holds no images at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{FOLDER_ROLES[role]} {root} does not exist or is not a folder")
    if (root / METADATA_FILE).is_file():
        items, report = _scan_metadata(root)
    elif _kohya_folders(root) or (KOHYA_FOLDER.match(root.name) and _list_images(root, [])):
        items, report = _scan_kohya(root)
    else:
        items, report = _scan_flat(root)
    if not items:
        raise DataError(_no_images_message(root, report, role))
    if extra_trigger and extra_trigger.strip():
        items = [_with_trigger(item, extra_trigger.strip()) for item in items]
        _report_trigger(report, extra_trigger.strip())
    return items, report


def _report_trigger(report: ScanReport, trigger: str) -> None:
    """The report as the items now read with --trigger: captions filled in carry it, and a flat folder shows it."""
    report.uncaptioned = [(path, add_trigger(caption, trigger)) for path, caption in report.uncaptioned]
    report.folders = [replace(f, trigger=trigger) if not f.trigger else f for f in report.folders]


def trigger_pattern(trigger: str) -> re.Pattern:
    """The trigger phrase as whole words, any case ("zorb" matches "Zorb," but not "zorbs")."""
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)


def add_trigger(caption: str, trigger: str) -> str:
    """`trigger, caption` unless the caption already contains the trigger as whole words."""
    if not trigger:
        return caption
    if trigger_pattern(trigger).search(caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def dataset_dirs(items: list[TrainItem]) -> dict[str, dict[str, int]]:
    """kohya's `ss_dataset_dirs` metadata: {folder: {"n_repeats": r, "img_count": n}}."""
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        entry = dirs.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs


def read_caption(image: Path, report: ScanReport, found: list[Path]) -> tuple[str, tuple[str, ...]] | None:
    """The caption of `image` from its caption files `found` (its entry of `caption_files`: `.txt` before
    `.caption`) as (its lines joined as tags, its lines when there are several), or None when there is none or
    it is empty."""
    if not found:
        return None
    lines = [_caption_lines(_read_text(path, report)) for path in found]
    # The first with text wins: an empty a.txt left by a tagger beside a written a.caption is not the caption.
    chosen = next((index for index, text in enumerate(lines) if text), 0)
    if len(set(lines)) > 1:
        other = 1 if chosen == 0 else 0
        why = f" ({found[other].name} is empty)" if not lines[other] else ""
        report.warnings.append(f"{image.name} has both {found[0].name} and {found[1].name} with different "
                               f"text; using {found[chosen].name}{why}.")
    return _caption_and_variants(lines[chosen]) if lines[chosen] else None


def _caption_lines(text: str) -> tuple[str, ...]:
    """A caption file's non-empty lines: tags or phrases to join like tags (not glue into one word), or with
    --caption-variants alternatives (kohya's --enable_wildcard reads them so: one line each time)."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _caption_and_variants(lines: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """TrainItem's caption (the lines joined as tags) and variants (the lines, where there are several)."""
    return ", ".join(lines), (lines if len(lines) > 1 else ())


def caption_files(folder: Path) -> dict[Path, list[Path]]:
    """The caption files in `folder` by the image they belong to (its path without suffix), `.txt` before `.caption`.

    The extension is matched in any case, as image extensions are: `b.TXT` captions `b.png` (Windows and macOS
    find it whatever its case, so kohya datasets made there have them); where both cases exist, the lowercase wins.
    """
    rank = {ext: i for i, ext in enumerate(CAPTION_EXTENSIONS)}
    found: dict[Path, list[Path]] = {}
    for path in sorted(folder.iterdir(), key=lambda p: (rank.get(p.suffix.lower(), len(rank)),
                                                        p.suffix != p.suffix.lower(), p.name)):
        if path.suffix.lower() in rank and path.is_file():
            found.setdefault(path.with_suffix(""), []).append(path)
    return found


def _read_text(path: Path, report: ScanReport) -> str:
    """A caption file's text: UTF-8 (a BOM dropped), or UTF-16 with its BOM (Windows Notepad's "Unicode"); other
    encodings are read as UTF-8 with a warning naming the file, since the characters it cannot read become '�'."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("utf-8-sig", errors="replace")
            # Named with its folder: kohya datasets repeat file names (10_a/0001.txt, 5_b/0001.txt).
            report.warnings.append(f"{path.parent.name}/{path.name} is not UTF-8 text: the characters that could not "
                                   "be read became '�' in its caption. Save it as UTF-8.")
    return text


def _scan_kohya(root: Path) -> tuple[list[TrainItem], ScanReport]:
    report = ScanReport(root=root, layout="kohya")
    folders = _kohya_folders(root) or [root]  # DATA may itself be "10_name"
    if folders != [root]:
        _report_kohya_root_leftovers(root, folders, report)
    items: list[TrainItem] = []
    for folder in folders:
        _check_folder_name(folder)
        repeats_text, trigger = KOHYA_FOLDER.match(folder.name).groups()
        repeats = int(repeats_text)
        if repeats >= LARGE_REPEATS:
            report.warnings.append(f"{folder.name} is read as {repeats} repeats per epoch with the trigger words "
                                   f"'{trigger.strip()}'. If {repeats_text} is a date or a number in the name, not a "
                                   "repeat count, rename the folder to <repeats>_<trigger words>, e.g. 10_mystyle.")
        if repeats < 1:
            report.ignored.append(IgnoredFile(folder, "0 repeats: the folder would never be trained on"))
            continue
        found = _scan_images_with_captions(folder, trigger.strip(), repeats, report)
        report.folders.append(FolderSummary(folder.name, repeats, trigger.strip(), len(found)))
        items.extend(found)
    return items, report


def _check_folder_name(folder: Path) -> None:
    """Refuse a kohya folder whose name is not UTF-8 (a Shift-JIS or Latin-1 name unzipped on Linux): its trigger
    words would be undecodable bytes, which the tokenizer rejects with a traceback after the base has loaded."""
    try:
        folder.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"the folder name {printable(folder.name)} (in {printable(str(folder.parent))}) is not UTF-8 "
                        "text, so its trigger words cannot be read; it was probably unzipped from an archive made on "
                        "another system. Rename it, e.g. to 10_mystyle (or unzip the archive with its encoding, e.g. "
                        "unzip -O cp932).") from None


def printable(text: str) -> str:
    """`text` with the undecodable bytes of a file name (Python keeps them as surrogates: a Shift-JIS or Latin-1 name
    unzipped on Linux) shown as \\xNN, so it can be written as UTF-8 or shown instead of failing the run."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _report_kohya_root_leftovers(root: Path, folders: list[Path], report: ScanReport) -> None:
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name.lower() in JUNK_FILE_NAMES:
            continue
        if entry.is_dir() and entry not in folders:
            report.ignored.append(IgnoredFile(entry, _bad_repeats_reason(entry.name) or "folder name does not start "
                                              f"with '<repeats>_', e.g. rename it to 10_{entry.name}"))
        elif entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            report.ignored.append(IgnoredFile(entry, "image directly in the data folder: in the kohya layout "
                                                     "images go in a <repeats>_<trigger> folder"))
        elif entry.is_file() and entry.suffix.lower() in CAPTION_EXTENSIONS:
            report.ignored.append(IgnoredFile(entry, "caption directly in the data folder: in the kohya layout "
                                                     "it goes beside its image in a <repeats>_<trigger> folder"))


def _scan_flat(root: Path) -> tuple[list[TrainItem], ScanReport]:
    report = ScanReport(root=root, layout="flat")
    items = _scan_images_with_captions(root, "", 1, report)
    report.folders.append(FolderSummary(root.name, 1, "", len(items)))
    return items, report


def _scan_images_with_captions(folder: Path, trigger: str, repeats: int, report: ScanReport) -> list[TrainItem]:
    images = _list_images(folder, report.ignored)
    image_stems = {str(path.with_suffix("")).lower() for path in images}
    captions = caption_files(folder)
    # Names match in any case, as on Windows and macOS, where kohya finds Photo.txt for photo.png.
    by_lower = {str(stem).lower(): paths for stem, paths in sorted(captions.items(), reverse=True)}
    for path in sorted(p for stem, paths in captions.items() if str(stem).lower() not in image_stems for p in paths):
        report.ignored.append(IgnoredFile(path, _orphan_caption_reason(path, image_stems)))
    _report_shared_names(folder, images, by_lower, report)
    items = []
    for image in images:
        stem = image.with_suffix("")
        found = captions.get(stem) or by_lower.get(str(stem).lower(), [])
        read = read_caption(image, report, found)
        if read is None:
            report.uncaptioned.append((image, trigger))
        caption, variants = read or (trigger, ())
        items.append(TrainItem(path=image, caption=caption, repeats=repeats, folder=folder.name, variants=variants))
    return items


def _orphan_caption_reason(path: Path, image_stems: set[str]) -> str:
    """Why a caption file captions nothing, with the rename that fixes the common case: a.png.txt (some taggers
    write the image's whole name) for a.png, where kohya reads a.txt."""
    image = path.with_suffix("")
    if image.suffix.lower() in IMAGE_EXTENSIONS and str(image.with_suffix("")).lower() in image_stems:
        return f"caption without an image of the same name: for {image.name}, name it {image.stem}{path.suffix}"
    return "caption without an image of the same name"


def _report_shared_names(folder: Path, images: list[Path], captions: dict[str, list[Path]],
                         report: ScanReport) -> None:
    """Warn about images that differ only in extension (a.png and a.jpg): both train, with the one caption file of
    that name. Why: it is usually one picture saved twice (a conversion that kept the original), which then counts
    double, and the caption written for one is used for the other; kohya trains both without a word (and its
    latent cache files, named by stem, collide)."""
    by_stem: dict[str, list[Path]] = {}
    for image in images:
        by_stem.setdefault(str(image.with_suffix("")).lower(), []).append(image)
    shared = [(stem, paths) for stem, paths in by_stem.items() if len(paths) > 1]
    if not shared:
        return
    named = _first_five(" and ".join(path.name for path in paths)
                        + (f" (captioned by {captions[stem][0].name})" if captions.get(stem) else "")
                        for stem, paths in shared)
    report.warnings.append(f"warning: in {folder.name}, images that differ only in their extension all train: {named}. "
                           "If one is a copy of another (a converted file beside its original), remove it: it would "
                           "count twice.")


def _list_images(folder: Path, ignored: list[IgnoredFile]) -> list[Path]:
    """Image files directly in `folder`, sorted; unusable non-caption files are added to `ignored`."""
    images = []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if path.name.startswith(".") or path.name.lower() in JUNK_FILE_NAMES:
            continue
        if path.is_dir():
            ignored.append(IgnoredFile(path, _subfolder_reason(path, kohya=bool(KOHYA_FOLDER.match(folder.name)))))
            continue
        if suffix in IMAGE_EXTENSIONS:
            images.append(path)
        elif suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
            ignored.append(IgnoredFile(path, f"{suffix} images cannot be read: convert them to PNG or JPEG"))
        elif suffix not in CAPTION_EXTENSIONS and path.name != METADATA_FILE:
            ignored.append(IgnoredFile(path, "not an image or caption file"))
    return images


def _subfolder_reason(path: Path, kohya: bool) -> str:
    """Why a subfolder is not scanned, and the fix. In a flat data folder the kohya fix is a rename; saying so
    matters most when the images are all in subfolders (`my-art/portraits/`), where nothing else would train."""
    if kohya:
        return "subfolder, not scanned: put its images directly in a <repeats>_<trigger> folder or give it its own"
    bad_repeats = _bad_repeats_reason(path.name)
    if bad_repeats:
        return f"subfolder, not scanned: {bad_repeats}"
    return f"subfolder, not scanned: to train its images, rename it to <repeats>_<trigger>, e.g. 10_{path.name}"


def _bad_repeats_reason(name: str) -> str | None:
    """For a folder named like `-1_style` or `0.5_style`: the repeat count must be a whole number of at least 1."""
    match = BAD_REPEATS_FOLDER.match(name)
    if match is None:
        return None
    return (f"its repeat count {match[1]} is not a whole number of at least 1 (how many times each image is seen "
            f"per epoch): rename it to e.g. 1_{match[2]} or 10_{match[2]}")


def _kohya_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and KOHYA_FOLDER.match(p.name))


def _scan_metadata(root: Path) -> tuple[list[TrainItem], ScanReport]:
    report = ScanReport(root=root, layout="metadata.jsonl")
    items: dict[Path, TrainItem] = {}
    records = _read_metadata(root / METADATA_FILE)
    _check_caption_column(root / METADATA_FILE, records)
    for line_number, record in records:
        path = _listed_path(root, record["file_name"])
        if path in items:
            report.warnings.append(f"{METADATA_FILE} line {line_number}: {record['file_name']} is listed twice; "
                                   "the first entry is used.")
            continue
        if not path.is_file():
            report.ignored.append(IgnoredFile(path, f"listed in {METADATA_FILE} line {line_number} but missing"))
            continue
        lines = _caption_lines(_metadata_caption(record, root / METADATA_FILE, line_number))
        if not lines:
            report.uncaptioned.append((path, ""))
        caption, variants = _caption_and_variants(lines)
        items[path] = TrainItem(path=path, caption=caption, repeats=1, folder=_metadata_folder(root, path),
                                variants=variants)
    listed = set(items)
    for path in _list_images(root, []):
        if path.resolve() not in listed:
            report.ignored.append(IgnoredFile(path, f"not listed in {METADATA_FILE}"))
    _report_unread_caption_files(items.values(), report)
    _report_unlisted_kohya_folders(root, listed, report)
    report.folders.extend(_folders_of(list(items.values())))
    return list(items.values()), report


def _listed_path(root: Path, file_name: str) -> Path:
    """The image a metadata.jsonl `file_name` names. A name with backslashes (written on Windows, as
    os.path.join makes them there) is read with slashes when only that spelling exists: on Linux and macOS a
    backslash is part of the file name, and every image in a subfolder would be reported missing."""
    path = root / file_name
    if "\\" in file_name and not path.exists():
        path = root / file_name.replace("\\", "/")
    return path.resolve()


def _metadata_folder(root: Path, path: Path) -> str:
    """The folder an image listed in metadata.jsonl is counted under (ss_tag_frequency / ss_dataset_dirs keys): its
    folder relative to DATA, or DATA's name. An image outside DATA (`../x.png`, an absolute path) counts under its
    folder's name alone, as kohya names dataset dirs, so the adapter never carries a local path."""
    try:
        relative = path.parent.relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.parent.name
    return root.resolve().name if relative == "." else relative


def _check_caption_column(path: Path, records: list[tuple[int, dict]]) -> None:
    """Refuse a metadata.jsonl whose captions are under another name ("prompt", "tags", ...): without this
    every image would train with an empty caption. diffusers' scripts refuse it too (--caption_column)."""
    if not records or any("text" in record or "caption" in record for _, record in records):
        return
    others = sorted({key for _, record in records for key, value in record.items()
                     if key != "file_name" and isinstance(value, (str, list))})
    if others:
        raise DataError(f'{path} has no "text" column, so no image would get its caption; its lines hold '
                        f'{", ".join(["file_name", *others])}. Name the caption column "text" ("caption" is read '
                        'too), e.g. {"file_name": "img.png", "text": "a caption"}.')


def _report_unread_caption_files(items, report: ScanReport) -> None:
    """List the caption files beside images listed in metadata.jsonl: the file's "text" is the caption in this
    layout, so a NAME.txt there is not read, which should not pass without a word."""
    for folder in sorted({item.path.parent for item in items}):
        for paths in caption_files(folder).values():
            report.ignored.extend(IgnoredFile(path, f"caption file not read: in the {METADATA_FILE} layout the "
                                                    f'captions are its "text" values') for path in paths)


def _report_unlisted_kohya_folders(root: Path, listed: set[Path], report: ScanReport) -> None:
    """metadata.jsonl wins over `<repeats>_<trigger>` folders beside it; say so when their images are not listed,
    since a stale metadata.jsonl in a kohya dataset would otherwise leave those folders out without a word."""
    unlisted: dict[str, int] = {}
    for folder in _kohya_folders(root):
        count = sum(1 for path in _list_images(folder, []) if path.resolve() not in listed)
        if count:
            unlisted[folder.name] = count
    if unlisted:
        named = ", ".join(f"{name} ({count} images)" for name, count in unlisted.items())
        report.warnings.append(f"{root / METADATA_FILE} decides what is trained, so the images of {named} that it does "
                               f"not list are left out. To train the kohya folders, move {METADATA_FILE} away.")


def _read_metadata(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs; a malformed line stops the scan, since guessing would train on junk."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not valid JSON ({error.msg}); each line must look like "
                            '{"file_name": "img.png", "text": "a caption"}') from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DataError(f'{path} line {number} has no "file_name": each line must look like '
                            '{"file_name": "img.png", "text": "a caption"}')
        records.append((number, record))
    return records


def _metadata_caption(record: dict, path: Path, line_number: int) -> str:
    """A record's "text" (or "caption"): a string, or a list of tags joined with ", " as kohya writes tags."""
    key = "text" if "text" in record else "caption"
    text = record.get(key)
    if text is None or isinstance(text, str):
        return (text or "").strip()
    if isinstance(text, list) and all(isinstance(tag, str) for tag in text):
        return ", ".join(tag.strip() for tag in text if tag.strip())
    raise DataError(f'{path} line {line_number}: "{key}" must be a caption string or a list of tag strings (got '
                    f'{json.dumps(text)[:80]}); e.g. {{"file_name": "img.png", "text": "a caption"}}')


def _folders_of(items: list[TrainItem]) -> list[FolderSummary]:
    return [FolderSummary(name, d["n_repeats"], "", d["img_count"]) for name, d in dataset_dirs(items).items()]


def _with_trigger(item: TrainItem, trigger: str) -> TrainItem:
    return TrainItem(path=item.path, caption=add_trigger(item.caption, trigger), repeats=item.repeats,
                     folder=item.folder, variants=tuple(add_trigger(line, trigger) for line in item.variants))


def _no_images_message(root: Path, report: ScanReport, role: str) -> str:
    hint = ("Expected one of: DATA/<repeats>_<trigger>/img.png (+ img.txt), a flat folder of images "
            "(+ same-name .txt captions), or DATA/metadata.jsonl with file_name and text.")
    project = root / "img"
    if project.is_dir() and _kohya_folders(project):  # the kohya_ss GUI's project folder: img/, reg/, model/, log/
        reg = " (and --reg-dir " + str(root / "reg") + ")" if (root / "reg").is_dir() else ""
        hint = f"{root} looks like a kohya_ss project folder: pass its image folder, {project}{reg}."
    elif report.layout == "kohya" and report.folders:  # right layout, empty folders: listing layouts would not help
        names = ", ".join(f.name for f in report.folders[:5]) + (" …" if len(report.folders) > 5 else "")
        hint = (f"Its <repeats>_<trigger> folders ({names}) hold no image files: put the images (PNG, JPEG, WEBP, "
                "…) directly in them.")
    ignored = "; ".join(f"{i.path.name}: {i.reason}" for i in report.ignored[:5])
    return f"no {role} images found in {root}. {hint}" + (f" Ignored: {ignored}." if ignored else "")
