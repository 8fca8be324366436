"""Base families and their presets: detection from config files, flags winning, sources kept, dry run, samples."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from stylelora.config import load_config
from stylelora.models.family import detect_family, folder_family
from stylelora.models.load import TOY_BASE_DIR
from stylelora.presets import PRESET_KEYS, PRESETS, apply_preset, prompts_from_captions
from train_fixtures import REPO, subprocess_env, write_kohya_dataset

CONFIGS = REPO / "stylelora" / "models" / "configs"


def config_only_base(folder: Path, unet: dict, *, scheduler: dict | None = None, second_encoder: bool = False) -> Path:
    """A diffusers folder holding only config files: family detection and --dry-run read no weights."""
    index = {"_class_name": "StableDiffusionXLPipeline" if second_encoder else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    if second_encoder:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    files = {"model_index.json": index, "unet/config.json": unet,
             "scheduler/scheduler_config.json": scheduler or {"prediction_type": "epsilon"},
             "vae/config.json": {"block_out_channels": [128, 256, 512, 512]}}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content), encoding="utf-8")
    return folder


SD15_UNET = json.loads((CONFIGS / "sd15" / "unet.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("unet, scheduler, second_encoder, family", [
    (SD15_UNET, None, False, "sd1"),
    ({**SD15_UNET, "cross_attention_dim": 1024}, None, False, "sd2"),
    ({**SD15_UNET, "cross_attention_dim": 1024}, {"prediction_type": "v_prediction"}, False, "sd2-v"),
    ({**SD15_UNET, "cross_attention_dim": 2048, "addition_embed_type": "text_time"}, None, True, "sdxl"),
    ({**SD15_UNET, "cross_attention_dim": 32}, None, False, "toy"),  # a tiny test base: the small-model preset
])
def test_family_is_read_from_config_files(tmp_path, unet, scheduler, second_encoder, family):
    base = config_only_base(tmp_path, unet, scheduler=scheduler, second_encoder=second_encoder)
    assert folder_family(base) == family
    assert detect_family(str(base)) == family


def test_the_shipped_toy_base_is_the_toy_family():
    assert detect_family("toy") == "toy" and folder_family(TOY_BASE_DIR) == "toy"


def test_every_family_has_every_preset_option_with_a_source():
    for family, values in PRESETS.items():
        assert set(values) == set(PRESET_KEYS), family
        assert all(value.source for value in values.values()), family


def test_real_bases_do_not_get_toy_values():
    config = apply_preset(load_config(None, {"data.dir": "d"}), "sd1", cuda=True, captions=["a"], triggers=())
    assert config.optim.unet_lr <= 3e-4 and config.train.batch_size <= 4 and config.data.resolution == 512
    assert config.train.precision == "fp16"  # on CUDA; fp32 without it
    assert apply_preset(load_config(None, {"data.dir": "d"}), "sd1", cuda=False).train.precision == "fp32"
    # Checkpointing is what keeps a default SD run at a third of a full fine-tune's memory (docs/benchmarks.md).
    assert config.train.gradient_checkpointing and "OneTrainer" in config.source_of("train.gradient_checkpointing")
    toy = apply_preset(load_config(None, {"data.dir": "d"}), "toy", cuda=False)
    assert toy.train.gradient_checkpointing is False
    # Caption dropout as kohya and diffusers run it on real bases. Text noise is measured on the toy base's text
    # encoder only, so a real base trains without it; the toy base gets the recipe whose adapters stack.
    assert config.data.caption_dropout == 0 and "kohya" in config.source_of("data.caption_dropout")
    assert config.train.text_noise == 0 and "kohya" in config.source_of("train.text_noise")
    assert (toy.data.caption_dropout, toy.train.text_noise) == (0, 0.2)
    assert "stacked" in toy.source_of("train.text_noise")


def test_flags_and_file_win_over_the_preset_and_sources_say_so(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nbatch_size = 3\n", encoding="utf-8")
    config = apply_preset(load_config(path, {"data.dir": "d", "optim.unet_lr": 5e-5}), "sdxl", cuda=False)
    assert (config.train.batch_size, config.optim.unet_lr, config.data.resolution) == (3, 5e-5, 1024)
    assert config.source_of("train.batch_size") == "file run.toml"
    assert config.source_of("optim.unet_lr") == "flag"
    assert config.source_of("data.resolution").startswith("preset sdxl: ")
    assert config.source_of("train.family") == "detected from the base's config files"


def test_real_base_sample_prompts_come_from_the_captions_with_one_leak_check():
    captions = [f"zorb, a {c} zorb on a white background" for c in ("red", "blue", "green", "pink")] + ["a cat"]
    prompts = prompts_from_captions(captions, ("zorb",))
    assert len(prompts) == 4 and all("zorb" in p for p in prompts[:3])
    assert "zorb" not in prompts[3]  # the same scene without the trigger shows any leak
    config = apply_preset(load_config(None, {"data.dir": "d"}), "sd1", cuda=False)
    assert config.train.sample_prompts is None  # not before the data is scanned
    config = apply_preset(config, "sd1", cuda=False, captions=captions, triggers=("zorb",))
    assert config.train.sample_prompts == prompts


def test_a_caption_with_a_double_dash_makes_a_sample_prompt_without_options():
    """" --" starts a kohya per-prompt option: a caption's own must not stop the sample grid mid-run."""
    from stylelora.train.sample_prompts import SamplePrompt, parse_sample_prompt

    prompts = prompts_from_captions(["zorb, a red zorb --sitting, smiling"], ("zorb",))
    assert [parse_sample_prompt(p) for p in prompts] == [SamplePrompt("zorb, a red zorb -sitting, smiling"),
                                                         SamplePrompt("a red -sitting, smiling")]
    for caption in ("zorb, a poster --- 0 stars", "zorb, a\xa0--w b"):  # three dashes; a space the strip turns
        for prompt in prompts_from_captions([caption], ("zorb",)):     # into " --" once the trigger is gone
            assert parse_sample_prompt(prompt).width is None and " --" not in prompt


def run_train(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylelora.cli", "train", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_on_an_sd15_base_resolves_sd_defaults_and_writes_no_adapter(tmp_path):
    base = config_only_base(tmp_path / "sd15", SD15_UNET)  # config files only: a dry run loads no weights
    data = write_kohya_dataset(tmp_path / "data", count=4, size=64)
    out = tmp_path / "out"
    result = run_train(str(data), "--base", str(base), "--output", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    settings = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert settings["train"]["family"] == "sd1"
    assert settings["optim"]["unet_lr"] <= 3e-4 and settings["train"]["batch_size"] <= 4
    assert settings["data"]["resolution"] == 512 and settings["data"]["caption_dropout"] == 0
    assert "stripestyle" in settings["train"]["sample_prompts"][0]
    assert not list(out.glob("*.safetensors")) and not (out / "samples").exists()
    assert "4 images" in result.stderr and "epochs" in result.stderr and "family sd1" in result.stderr
    assert "# preset sd1: kohya-ss/sd-scripts" in (out / "config.toml").read_text(encoding="utf-8")
    assert result.stdout.strip().endswith("config.toml")


@pytest.mark.parametrize("trigger, made_up, text_encoder_lr, text_noise", [("stripestyle", False, 2e-4, 0.2),
                                                                           ("inkstyle", True, 1e-3, 0.0)])
def test_dry_run_says_what_a_coined_trigger_changes(tmp_path, trigger, made_up, text_encoder_lr, text_noise):
    """The toy tokenizer reads `stripestyle` as one token and `inkstyle` as four: only a coined trigger trains beside
    made-up words, with its text encoder at the toy's coined-trigger rate and no text noise, and the dry run says so
    before anything loads."""
    data = write_kohya_dataset(tmp_path / "data", count=4, trigger=trigger)
    result = run_train(str(data), "--output", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out" / "config.toml").read_text(encoding="utf-8")
    settings = tomllib.loads(text)
    assert settings["train"]["made_up_company"] is made_up
    assert settings["optim"]["text_encoder_lr"] == text_encoder_lr
    assert settings["train"]["text_noise"] == text_noise
    assert ("splits 'inkstyle' into several tokens" in result.stderr) == made_up
    assert ("# preset toy, coined trigger 'inkstyle': measured on the toy world" in text) == made_up


def test_dry_run_names_the_captions_the_text_encoder_cuts(tmp_path):
    data = write_kohya_dataset(tmp_path / "data", count=4)
    long_caption = next(data.rglob("*.txt"))
    long_caption.write_text("stripestyle, " + ", ".join(["a red circle on a white background"] * 12),
                            encoding="utf-8")
    result = run_train(str(data), "--output", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr
    image = long_caption.with_suffix(".png")
    expected = (f"1 caption is longer than the text encoder's 75 tokens and cut there, so its last tags are never "
                f"trained on: {image.parent.name}/{image.name} (")
    assert expected in result.stderr and "Token indices sequence length" not in result.stderr


def test_dry_run_says_base_preservation_is_off_without_a_trigger(tmp_path):
    from PIL import Image

    data = tmp_path / "flat"
    data.mkdir()
    for i, color in enumerate(["red", "blue", "green", "white"]):
        Image.new("RGB", (32, 32), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {color} square", encoding="utf-8")
    result = run_train(str(data), "--output", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "base preservation: off, the captions have no trigger words" in result.stderr  # as the run would say
    assert "made_up_company = False  (off: the captions have no trigger words)" in result.stderr


@pytest.mark.parametrize("family, flags, expected", [
    ("toy", {}, (1e-3, 1e-3, 0.0)),  # the toy preset's values for a coined trigger
    ("toy", {"optim.text_encoder_lr": 5e-4}, (5e-4, 5e-4, 0.0)),  # a flag wins (and sets the second encoder too)
    ("toy", {"optim.text_encoder_2_lr": 3e-4}, (1e-3, 3e-4, 0.0)),
    ("toy", {"train.text_noise": 0.3}, (1e-3, 1e-3, 0.3)),
    ("toy", {"optim.optimizer": "prodigy"}, (1.0, 1.0, 0.0)),  # prodigy's multiplier stays 1
    ("toy", {"network.train_text_encoder": False}, (None, None, 0.0)),
    ("sd1", {}, (1e-5, 1e-5, 0.0)),  # a real base keeps what its users run
    ("sdxl", {}, (1e-5, 1e-5, 0.0)),
])
def test_a_coined_trigger_changes_only_the_values_a_familys_preset_chose(family, flags, expected):
    from stylelora.config import load_config
    from stylelora.presets import apply_coined_trigger_preset, apply_preset, coined_trigger_choices

    config = apply_preset(load_config(None, {"data.dir": "d", **flags}), family, cuda=False)
    one_token = apply_coined_trigger_preset(config, ())
    coined = apply_coined_trigger_preset(config, ("inkstyle",))
    assert one_token == config
    assert (coined.optim.text_encoder_lr, coined.optim.text_encoder_2_lr, coined.train.text_noise) == expected
    without_noise = dataclasses.replace(coined.train, text_noise=config.train.text_noise)
    assert without_noise == config.train and coined.network == config.network and coined.data == config.data
    # What the run's start line reports: exactly the values the rule set, with the rule as their source.
    changed = sorted(key for key, source in coined.sources if config.source_of(key) != source)
    assert [key for key, _ in coined_trigger_choices(coined)] == changed
    assert coined_trigger_choices(one_token) == []


def test_sample_prompts_file_and_its_errors(tmp_path):
    from stylelora.train.command import build_parser, overrides_from_args

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya's comment line\na castle\n\n  a dog  \n", encoding="utf-8")
    args = build_parser().parse_args(["train", "d", "--sample-prompts", str(prompts), "--no-samples"])
    overrides = overrides_from_args(args)
    assert overrides["train.sample_prompts"] == ("a castle", "a dog") and overrides["train.samples"] is False
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n", encoding="utf-8")
    result = run_train("d", "--sample-prompts", str(empty))
    assert result.returncode == 2 and "holds no prompt" in result.stderr


@pytest.mark.parametrize("flags, sdxl, expected", [
    ([], False, (20, 7.0)),  # SD 1.5 as A1111 draws it, not the toy base's CFG 5
    ([], True, (20, 7.0)),
    (["--cfg", "4.5"], True, (20, 4.5)),  # a flag wins
    (["--steps", "30", "--cfg", "6"], False, (30, 6.0)),
])
def test_generate_takes_steps_and_cfg_from_the_bases_family(tmp_path, flags, sdxl, expected):
    """`generate` drew every base at CFG 5, the toy base's value, where A1111 users of SD 1.x and SDXL expect 7."""
    import argparse

    from stylelora.generate.command import add_generate_parsers, request_from_args

    unet = {**SD15_UNET, "cross_attention_dim": 2048, "addition_embed_type": "text_time"} if sdxl else SD15_UNET
    base = config_only_base(tmp_path, unet, second_encoder=sdxl)
    parser = argparse.ArgumentParser()
    add_generate_parsers(parser.add_subparsers())
    for real in (str(base), "toy"):
        request = request_from_args(parser.parse_args(["generate", "a cat", "--base", real, *flags]))
        assert (request.steps, request.cfg) == (expected if real != "toy" or flags else (20, 5.0))


def test_the_apps_generate_tab_starts_at_its_first_bases_steps_and_cfg(tmp_path):
    from stylelora.app.service import AppService

    base = config_only_base(tmp_path / "sd15", SD15_UNET)
    assert AppService(tmp_path, bases=("toy", str(base))).sampling_defaults() == (20, 5.0)
    assert AppService(tmp_path, bases=(str(base), "toy")).sampling_defaults() == (20, 7.0)
