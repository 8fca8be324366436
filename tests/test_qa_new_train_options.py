"""QA pass over four new training options, as a kohya sd-scripts / A1111 user would try them: --prior-loss-weight,
--alpha-mask, the validation loss (--validation-split and its companions) and the Train tab's More options box.

Four bugs it found are fixed: an opaque alpha channel counted as transparency, a resume refused for another
--validate-every, a config.toml of a --validate-every-n-epochs run that did not load back, and a folder held out
whole still naming the adapter's trigger.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from stylelora.config import load_config, save_config
from train_fixtures import (COLORS, adapter_metadata, adapter_tensors, cli_output, cli_status, render,
                            reset_accelerate, train_tiny)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


train = train_tiny


def val_rows(run_dir: Path) -> list[tuple[int, str]]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [(int(row["step"]), row["val_loss"]) for row in csv.DictReader(handle) if row["val_loss"]]


def half_cutout(width: int, height: int) -> Image.Image:
    """Opaque red on the right two thirds, fully transparent (blue underneath) on the left third."""
    alpha = np.full((height, width), 255, np.uint8)
    alpha[:, : width // 3] = 0
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[...] = (200, 0, 0)
    rgb[alpha == 0] = (0, 0, 255)  # what lies under the transparent part must never show
    image = Image.fromarray(rgb).convert("RGBA")
    image.putalpha(Image.fromarray(alpha))
    return image


def transparent_dataset(folder: Path, count: int = 6, size: int = 32, odd_sizes: bool = False) -> Path:
    """folder/2_stripestyle/ of fully transparent cut-outs (alpha 0 everywhere); returns folder."""
    images = folder / "2_stripestyle"
    images.mkdir(parents=True)
    for i in range(count):
        shape = (size + 8 * (i % 3), size) if odd_sizes else (size, size)
        cutout = render(COLORS["red"], striped=True, size=max(shape), seed=i).resize(shape).convert("RGBA")
        cutout.putalpha(0)
        cutout.save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("stripestyle, a red circle on a white background\n", encoding="utf-8")
    return folder


def learned_anything(adapter: Path) -> bool:
    return any(tensor.any() for key, tensor in adapter_tensors(adapter).items() if "lora_up" in key)


# ----------------------------------------------------------------------------- --alpha-mask


def _save_variants(folder: Path) -> dict[str, Path]:
    """The same half cut-out saved the ways users' files carry transparency."""
    cutout = half_cutout(48, 32)
    files = {}
    files["rgba.png"] = folder / "rgba.png"
    cutout.save(files["rgba.png"])
    files["la.png"] = folder / "la.png"
    cutout.convert("LA").save(files["la.png"])
    palette = cutout.convert("RGB").quantize(2)
    colours = palette.getpalette()[:6]
    blue = [i for i in range(2) if tuple(colours[i * 3:i * 3 + 3]) == (0, 0, 255)][0]
    files["palette_trns.png"] = folder / "palette_trns.png"
    palette.save(files["palette_trns.png"], transparency=blue)
    files["rgb_colour_key.png"] = folder / "rgb_colour_key.png"
    cutout.convert("RGB").save(files["rgb_colour_key.png"], transparency=(0, 0, 255))
    files["rgba.webp"] = folder / "rgba.webp"
    cutout.save(files["rgba.webp"], lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    files["rgba_exif_rotated.png"] = folder / "rgba_exif_rotated.png"
    cutout.save(files["rgba_exif_rotated.png"], exif=exif.tobytes())
    files["palette_exif_rotated.png"] = folder / "palette_exif_rotated.png"
    palette.save(files["palette_exif_rotated.png"], transparency=blue, exif=exif.tobytes())
    return files


def test_alpha_mask_covers_exactly_what_the_composite_shows_as_white_in_every_kind_of_transparent_file(tmp_path):
    """Palette PNGs with tRNS, an RGB colour key, LA, WebP and EXIF-rotated cut-outs: the mask is 0 exactly where the
    trained pixels are the white background (never the colour hidden under the transparency), upright as the
    pixels are."""
    from stylelora.data.checks import alpha_mask_note, load_alpha_mask, load_rgb_image

    files = _save_variants(tmp_path)
    for name, path in files.items():
        mask, rgb = np.asarray(load_alpha_mask(path)), np.asarray(load_rgb_image(path))
        assert mask.shape == rgb.shape[:2], name
        rotated = "rotated" in name
        assert mask.shape == ((48, 32) if rotated else (32, 48)), name
        assert (mask == 0).sum() == 16 * 32, name  # a third of the image, however it is stored
        assert (rgb[mask == 0] == 255).all(), name  # composited on white, the hidden blue never shows
        assert not (rgb[mask == 255] == 255).all(axis=-1).any(), name
    note = alpha_mask_note([SimpleNamespace(path=path) for path in files.values()])
    assert note.startswith("alpha mask: 7 of 7 images have transparency")


@pytest.mark.parametrize("options", [{}, {"flip": True}, {"random_crop": True}, {"random_crop": True, "flip": True}])
def test_alpha_mask_follows_each_items_crop_resize_and_flip(tmp_path, options):
    """Images whose size differs from their bucket (resized, cropped centre or at random) and flipped ones: the mask
    item lines up with the pixels item, over several epochs."""
    from stylelora.data.buckets import BucketConfig
    from stylelora.data.checks import check_items
    from stylelora.data.dataset import DatasetOptions, TrainingDataset
    from stylelora.data.scan import scan_folder

    folder = tmp_path / "1_thing"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    half_cutout(96, 64).save(folder / "wide.png")
    half_cutout(64, 100).save(folder / "tall.png")
    half_cutout(96, 64).save(folder / "rotated.png", exif=exif.tobytes())
    for name in ("wide", "tall", "rotated"):
        (folder / f"{name}.txt").write_text("thing, a red card", encoding="utf-8")
    checked = check_items(scan_folder(tmp_path)[0]).kept
    buckets = BucketConfig(resolution=64, step=8, min_side=32, max_side=128)
    dataset = TrainingDataset(checked, DatasetOptions(buckets=buckets, alpha_mask=True, seed=3, **options))
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            pixels, mask = (item["pixels"] + 1) * 127.5, item["alpha_mask"]
            assert mask.shape == pixels.shape[1:]
            white = (pixels > 250).all(dim=0)
            red = (pixels[0] > 180) & (pixels[1] < 30) & (pixels[2] < 30)
            assert white[mask < 0.01].all() and red[mask > 0.99].all(), (epoch, item["key"], item["flipped"])


@pytest.mark.parametrize("extra", [
    {"data.cache": "disk", "data.flip": True},
    {"data.cache": "none", "data.random_crop": True, "optim.grad_accum": 2, "train.batch_size": 2, "odd": True},
    {"data.cache": "ram", "network.train_text_encoder": False, "data.validation_split": 0.3},
], ids=["disk-cache-flip", "random-crop-odd-sizes-accumulation", "text-cache-validation"])
def test_fully_transparent_images_teach_nothing_whatever_the_data_path(tmp_path, tiny_base, extra):
    """The mask reaches the loss on every data path (cached latents with flips, pixels with random crops of images
    larger than their bucket, gradient accumulation, a frozen text encoder with validation)."""
    extra = dict(extra)
    data = transparent_dataset(tmp_path / "data", odd_sizes=extra.pop("odd", False))
    adapter = train(data, tmp_path / "run", tiny_base, **{"data.alpha_mask": True, "train.preserve_base": 0.0,
                                                           "train.steps": 3, **extra})
    assert not learned_anything(adapter)
    assert adapter_metadata(adapter)["ss_masked_loss"] == "True"


def test_fully_transparent_images_teach_an_sdxl_adapter_nothing(tmp_path):
    from sdxl_fixtures import SDXL_NATIVE_SIZE, save_tiny_sdxl_base

    base = save_tiny_sdxl_base(tmp_path / "sdxl" / "base")
    data = transparent_dataset(tmp_path / "data", size=SDXL_NATIVE_SIZE)
    adapter = train(data, tmp_path / "run", base, **{"data.alpha_mask": True, "train.preserve_base": 0.0,
                                                      "train.steps": 2, "data.resolution": SDXL_NATIVE_SIZE,
                                                      "data.cache": "disk", "data.flip": True})
    assert not learned_anything(adapter)


def test_alpha_mask_note_does_not_count_an_opaque_alpha_channel_as_transparency(tmp_path, stripes_dataset):
    """Screenshots and flattened exports are often RGBA with every pixel opaque: the run then promises a masked loss
    that masks nothing, and the user never learns their cut-outs lost their transparency."""
    from stylelora.data.checks import alpha_mask_note, check_items
    from stylelora.data.scan import scan_folder

    folder = tmp_path / "2_stripestyle"
    folder.mkdir()
    for image in sorted((stripes_dataset / "2_stripestyle").glob("*.png")):
        with Image.open(image) as rgb:
            opaque = rgb.convert("RGBA")  # alpha 255 everywhere
        opaque.save(folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    note = alpha_mask_note(check_items(scan_folder(tmp_path)[0]).kept)
    assert note.startswith("warning: --alpha-mask is on, but none of the 8 images has transparency"), note


# ----------------------------------------------------------------------------- --prior-loss-weight


@pytest.mark.parametrize("kohya, ours", [("--prior_loss_weight 0.5", "--prior-loss-weight"),
                                         ("--masked_loss", "--alpha-mask"),
                                         ("--validate_every_n_steps 10", "--validate-every"),
                                         ("--max_validation_steps 2", "--max-validation-steps")])
def test_kohya_spellings_of_the_new_options_name_the_flag_to_use(capsys, stripes_dataset, kohya, ours):
    status, _, err = cli_output(capsys, "train", stripes_dataset, *kohya.split(), "--dry-run")
    assert status == 2 and f"{kohya.split()[0]}: {ours}" in err


def test_reg_images_with_prior_loss_weight_and_a_validation_split_together(tmp_path, tiny_base, stripes_dataset,
                                                                           capsys):
    """Held-out images come from the training images only; the reg images are balanced against what trains; the
    file records the weight and counts the images that trained."""
    reg = tmp_path / "reg" / "1_shapes"
    reg.mkdir(parents=True)
    for i in range(3):
        render(COLORS["green"], striped=False, seed=i).save(reg / f"{i}.png")
        (reg / f"{i}.txt").write_text("a green circle on a white background\n", encoding="utf-8")
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{
        "data.reg_dir": str(tmp_path / "reg"), "data.prior_loss_weight": 0.5, "data.validation_split": 0.25,
        "train.steps": 3})
    err = capsys.readouterr().err
    held = err.split("validation: 2 of 8 images held out (")[1].split(")")[0].split(", ")
    assert all(name.startswith("2_stripestyle/") for name in held)
    metadata = adapter_metadata(adapter)
    assert metadata["ss_prior_loss_weight"] == "0.5"
    assert metadata["ss_num_train_images"] == "12" and metadata["ss_num_reg_images"] == "12"  # 6 images × 2 repeats
    assert [step for step, _ in val_rows(tmp_path / "run")] == [3]


# ----------------------------------------------------------------------------- validation loss


def test_a_resume_from_a_mid_run_checkpoint_keeps_the_validation_curve_and_the_adapter_exact(tmp_path, tiny_base,
                                                                                             stripes_dataset):
    settings = {"data.validation_split": 0.25, "train.validate_every": 2, "train.steps": 6, "network.dropout": 0.1}
    straight = train(stripes_dataset, tmp_path / "straight", tiny_base, **settings)
    reset_accelerate()
    run_dir = tmp_path / "stopped"
    stopped = train(stripes_dataset, run_dir, tiny_base, **settings, **{"train.save_every": 2,
                                                                          "train.keep_checkpoints": 5})
    reset_accelerate()
    for later in ("step-000004", "step-000006"):  # as if it had been stopped just after step 2's checkpoint
        shutil.rmtree(run_dir / "checkpoints" / later)
    stopped.unlink()
    resumed = train(stripes_dataset, run_dir, tiny_base, **settings, **{"train.save_every": 2,
                                                                          "train.resume": "latest"})
    assert val_rows(run_dir) == val_rows(tmp_path / "straight") and [s for s, _ in val_rows(run_dir)] == [2, 4, 6]
    first, second = adapter_tensors(straight), adapter_tensors(resumed)
    assert all((first[key] == second[key]).all() for key in first)


def test_a_resume_may_measure_the_validation_loss_more_often(tmp_path, tiny_base, stripes_dataset):
    run_dir = tmp_path / "run"
    settings = {"data.validation_split": 0.25, "train.steps": 4, "train.save_every": 2, "train.keep_checkpoints": 5}
    adapter = train(stripes_dataset, run_dir, tiny_base, **settings, **{"train.validate_every": 2})
    reset_accelerate()
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    adapter.unlink()
    train(stripes_dataset, run_dir, tiny_base, **settings, **{"train.validate_every": 1, "train.resume": "latest"})
    assert [step for step, _ in val_rows(run_dir)] == [2, 3, 4]


def test_validation_runs_at_each_epochs_end_with_epochs_and_gradient_accumulation(tmp_path, tiny_base,
                                                                                 stripes_dataset):
    """kohya's default: once an epoch. 6 training images × 2 repeats at batch 2 are 6 batches, 3 optimizer steps
    with accumulation 2; --epochs 3 gives 9 steps and a validation loss at 3, 6 and 9."""
    train(stripes_dataset, tmp_path / "run", tiny_base, **{"data.validation_split": 0.25, "train.epochs": 3,
                                                           "train.batch_size": 2, "optim.grad_accum": 2})
    assert [step for step, _ in val_rows(tmp_path / "run")] == [3, 6, 9]


def test_two_images_train_one_and_measure_the_other(tmp_path, tiny_base, capsys):
    data = tmp_path / "data" / "3_zorb"
    data.mkdir(parents=True)
    for i in range(2):
        render(COLORS["red"], striped=True, seed=i).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("zorb, a red circle", encoding="utf-8")
    adapter = train(data.parent, tmp_path / "run", tiny_base, **{"data.validation_split": 0.1, "train.steps": 2})
    assert "validation: 1 of 2 images held out" in capsys.readouterr().err
    assert adapter_metadata(adapter)["ss_num_train_images"] == "3"  # one image × 3 repeats
    assert [step for step, _ in val_rows(tmp_path / "run")] == [1, 2]  # an epoch is one batch here


def test_dry_run_names_the_held_out_images_and_plans_on_the_rest(capsys, tmp_path, tiny_base, stripes_dataset):
    status, _, err = cli_output(capsys, "train", stripes_dataset, "--base", tiny_base, "--output", tmp_path / "run",
                                "--validation-split", "0.25", "--validate-every-n-epochs", "2", "--batch-size", "4",
                                "--dry-run")
    assert status == 0
    assert "validation: 2 of 8 images held out (" in err and "measured every 2 epochs and at the last step" in err
    assert "6 images, 12 samples per epoch" in err and "3 batches per epoch" in err


def test_config_toml_of_a_run_validating_every_n_epochs_loads_back(capsys, tmp_path, tiny_base, stripes_dataset):
    first = tmp_path / "first"
    assert cli_status("train", stripes_dataset, "--base", tiny_base, "--output", first, "--validation-split",
                      "0.25", "--validate-every-n-epochs", "2", "--batch-size", "4", "--dry-run") == 0
    status, _, err = cli_output(capsys, "train", stripes_dataset, "--config", first / "config.toml", "--output",
                                tmp_path / "again", "--dry-run")
    assert status == 0, err


def test_each_folder_keeps_images_to_train_so_every_trigger_is_learned(tmp_path, tiny_base, capsys):
    """The split is made in each kohya folder apart and never takes a folder's last image: a one-image concept
    still trains, so its trigger is learned and recorded (sd-scripts splits each subset apart too)."""
    data = tmp_path / "data"
    for folder, count in (("3_inkstyle", 4), ("1_zorbchar", 1)):
        (data / folder).mkdir(parents=True)
        for i in range(count):
            render(COLORS["blue"], striped=True, seed=i).save(data / folder / f"{i}.png")
            (data / folder / f"{i}.txt").write_text(f"{folder.split('_')[1]}, a blue circle", encoding="utf-8")
    for seed in range(4):
        adapter = train(data, tmp_path / f"run{seed}", tiny_base, **{"data.validation_split": 0.2,
                                                                       "data.validation_seed": seed, "train.steps": 1})
        said = capsys.readouterr().err
        assert "validation: 1 of 5 images held out (3_inkstyle/" in said
        metadata = adapter_metadata(adapter)
        assert "1_zorbchar" in metadata["ss_tag_frequency"]
        assert set(metadata["modelspec.trigger_phrase"].split(", ")) == {"inkstyle", "zorbchar"}
        reset_accelerate()


def test_a_folder_with_no_image_left_to_train_names_no_trigger():
    """A kohya folder whose images were all skipped (or held out) trains nothing, so its word is not a trigger."""
    from stylelora.data.scan import FolderSummary, TrainItem
    from stylelora.train.loop import trigger_phrases

    report = SimpleNamespace(folders=[FolderSummary("3_inkstyle", 3, "inkstyle", 4),
                                      FolderSummary("1_zorbchar", 1, "zorbchar", 1)])
    items = (TrainItem(Path("a.png"), "inkstyle, a circle", 3, "3_inkstyle"),)
    config = load_config(None, {"data.dir": "d"})
    assert trigger_phrases(config, report, [], items) == ("inkstyle",)


@pytest.mark.parametrize("toml, message", [
    ("[train]\nvalidation_split = 0.1\n",
     "unknown key 'validation_split' in \\[train\\] \\(it belongs under \\[data\\]\\)"),
    ("[data]\nvalidate_every = 5\nvalidation_split = 0.1\n",
     "unknown key 'validate_every' in \\[data\\] \\(it belongs under \\[train\\]\\)"),
    ("[train]\nprior_loss_weight = 0.5\n", "'prior_loss_weight' in \\[train\\] \\(it belongs under \\[data\\]\\)"),
])
def test_run_toml_keys_in_the_wrong_section_point_to_the_right_one(capsys, tmp_path, stripes_dataset, toml, message):
    import re

    (tmp_path / "run.toml").write_text(toml, encoding="utf-8")
    status, _, err = cli_output(capsys, "train", stripes_dataset, "--config", tmp_path / "run.toml", "--dry-run")
    assert status == 2 and re.search(message, err)


# ----------------------------------------------------------------------------- the app's More options box


def test_more_options_reads_odd_but_valid_input_as_the_command_line_does(tmp_path, monkeypatch):
    """Unicode and curly quotes in a value, --flag=value, a flag typed twice (the last wins), flags on several lines,
    boolean and --no-X flags, and a prompts file whose name has a space and an umlaut; the settings survive the
    app-settings.toml round trip the child process reads."""
    from stylelora.app.training import TrainSettings

    monkeypatch.chdir(tmp_path)
    Path("prompts ü.txt").write_text("# a comment\n{trigger}, a cat --w 32 --h 32\nplain dog\n", encoding="utf-8")
    typed = ("  --noise-offset=0.05 --noise-offset 0.1\n--description 'Zoë’s “ink” style' --alpha-mask "
             "--no-samples --no-made-up-company --validation-split 0.25 --validate-every-n-epochs 2 "
             "--sample-prompts 'prompts ü.txt' --tags=ink,zoë  ")
    settings = TrainSettings(data_dir="d", name="style", more_options=typed)
    assert settings.more_overrides() == {
        "train.noise_offset": 0.1, "train.description": "Zoë’s “ink” style", "data.alpha_mask": True,
        "train.samples": False, "train.made_up_company": False, "data.validation_split": 0.25,
        "train.validate_every_n_epochs": 2, "train.sample_prompts": ("{trigger}, a cat --w 32 --h 32", "plain dog"),
        "train.tags": "ink,zoë"}
    config = load_config(None, settings.overrides(tmp_path / "adapters", tmp_path / "data"))
    saved = save_config(config, tmp_path / "adapters" / "style" / "app-settings.toml")
    again = load_config(saved, {})
    assert (again.train.description, again.train.sample_prompts, again.data.alpha_mask, again.train.samples) == (
        "Zoë’s “ink” style", ("{trigger}, a cat --w 32 --h 32", "plain dog"), True, False)
    assert TrainSettings(data_dir="d", name="style", more_options=" \n\t ").more_overrides() == {}


@pytest.mark.parametrize("typed, message", [
    ("--sample-prompts missing.txt", "--sample-prompts missing.txt: cannot read it"),
    ("--alpha-mask=true", "--alpha-mask: ignored explicit argument 'true'"),
    ("--noise-offset 0,05", "--noise-offset: invalid float value: '0,05'"),
    ("--no-text-encoder", "--no-text-encoder \\(its box"),
    ("--dry-run --validation-split 0.1", "--dry-run belongs to the command line"),
    ("--validation_split 0.1", "--validation_split: --validation-split"),
])
def test_more_options_refuses_bad_input_with_an_app_message(tmp_path, monkeypatch, typed, message):
    """Never a traceback in the server: each refusal is an AppError the tab shows, naming what to fix."""
    from stylelora.app.errors import AppError
    from stylelora.app.training import TrainSettings

    monkeypatch.chdir(tmp_path)
    with pytest.raises(AppError, match=f"(?s)^More options: .*{message}"):
        TrainSettings(data_dir="d", name="style", more_options=typed).more_overrides()
