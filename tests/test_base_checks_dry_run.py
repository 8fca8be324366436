"""The base checks a run makes as it loads the base: a single file whose config folder has other widths is refused
in one sentence, and `train --dry-run` (and the run, before any weights load) raises the same errors the loading
raises wherever they need only config files, a .safetensors header or an import. An adapter trained on a single file
records kohya's hashes of it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gen_fixtures import save_tiny_base, tiny_pipeline
from sdxl_fixtures import save_tiny_sdxl_base
from stylelora.config import ConfigError, load_config
from stylelora.models.load import BaseModelError, load_base
from test_load import add_to_hf_cache, empty_hf_cache, original_sd_layout  # noqa: F401 - a fixture among them
from train_fixtures import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OTHER_WIDTH = 48  # the single file's text width; tiny_sd_base's is 32
SD_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # where loading looks for a v1 file's configs first


@pytest.fixture(scope="module")
def wide_single_file(tmp_path_factory) -> Path:
    """tiny_sd_base's architecture at text and cross-attention width 48, as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("wide") / "tiny-wide.safetensors"
    state = original_sd_layout(tiny_pipeline(cross_attention_dim=OTHER_WIDTH))
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def wide_configs(tmp_path_factory) -> Path:
    """The diffusers folder the wide single file was made from (its matching configs)."""
    return save_tiny_base(tmp_path_factory.mktemp("wide_configs") / "base", cross_attention_dim=OTHER_WIDTH)


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    return save_tiny_sdxl_base(tmp_path_factory.mktemp("sdxl") / "base")


def overrides(data: Path, output: Path, base: Path | str, **extra) -> dict:
    return tiny_overrides(data, output, base, **{"train.sample_every": 0, **extra})


def plan(data: Path, output: Path, base: Path | str, **extra) -> Path:
    from stylelora.train.dry_run import dry_run

    return dry_run(load_config(None, overrides(data, output, base, **extra)))


# ----------------------------------------------------------------------------- a config folder of other widths

MISMATCH = (r"tiny-wide.safetensors does not match {configs} .*: its tensor \S+ has shape \[[\d, ]+\], but those "
            r"configs build it with shape \[[\d, ]+\]\. Pass the config files of the same architecture")


@pytest.mark.parametrize("cached", [False, True])
def test_a_single_file_with_configs_of_other_widths_is_refused_in_one_sentence(
        wide_single_file, tiny_sd_base, empty_hf_cache, cached):
    if cached:  # the configs loading finds in the Hugging Face cache, not a --base-config folder
        add_to_hf_cache(empty_hf_cache, SD_CONFIG_REPO, tiny_sd_base, configs_only=True)
    config_dir = None if cached else str(tiny_sd_base)
    configs = "the cached configs in" if cached else "the --base-config folder"
    with pytest.raises(BaseModelError, match=MISMATCH.format(configs=configs)) as refused:
        load_base(str(wide_single_file), config_dir=config_dir)
    message = str(refused.value)
    assert f"{OTHER_WIDTH}]" in message and "32]" in message  # both shapes: the file's and the configs'
    assert "ignore_mismatched_sizes" not in message  # diffusers' advice would load random weights instead


def test_the_matching_configs_load_the_single_file(wide_single_file, wide_configs):
    pipe = load_base(str(wide_single_file), config_dir=str(wide_configs))
    assert pipe.text_encoder.config.hidden_size == OTHER_WIDTH


@pytest.mark.parametrize("command", ["generate", "train"])
def test_train_and_generate_report_the_mismatch_as_one_user_error(
        command, wide_single_file, tiny_sd_base, stripes_dataset, tmp_path, capsys):
    from stylelora.cli import main

    base = ["--base", str(wide_single_file), "--base-config", str(tiny_sd_base)]
    if command == "generate":
        argv = ["generate", "a red circle", *base, "--out", str(tmp_path / "images")]
    else:
        argv = ["train", str(stripes_dataset), *base, "--steps", "2", "--no-samples", "--output", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "does not match the --base-config folder" in errors[0], err
    assert "Traceback" not in err and "ignore_mismatched_sizes" not in err


# ----------------------------------------------------------------------------- the dry run refuses what loading does


def test_a_dry_run_refuses_a_single_file_without_configs_as_loading_does(
        wide_single_file, stripes_dataset, tmp_path, empty_hf_cache):
    with pytest.raises(BaseModelError) as loading:
        load_base(str(wide_single_file))
    with pytest.raises(BaseModelError) as planned:
        plan(stripes_dataset, tmp_path / "plan", wide_single_file)
    assert "needs the matching diffusers config files" in str(planned.value)
    assert str(planned.value) == str(loading.value)
    assert not (tmp_path / "plan" / "config.toml").exists()


def test_a_dry_run_plans_a_single_file_with_the_configs_loading_finds(
        wide_single_file, wide_configs, stripes_dataset, tmp_path, empty_hf_cache, capsys):
    add_to_hf_cache(empty_hf_cache, SD_CONFIG_REPO, wide_configs, configs_only=True)
    assert plan(stripes_dataset, tmp_path / "plan", wide_single_file).is_file()
    assert "base family: toy" in capsys.readouterr().err  # read from the cached configs: a small SD model


def test_a_dry_run_refuses_an_sdxl_config_folder_for_an_sd_file_as_loading_does(
        wide_single_file, sdxl_base, stripes_dataset, tmp_path):
    with pytest.raises(BaseModelError) as loading:
        load_base(str(wide_single_file), config_dir=str(sdxl_base))
    with pytest.raises(BaseModelError) as planned:
        plan(stripes_dataset, tmp_path / "plan", wide_single_file, **{"train.base_config": str(sdxl_base)})
    assert "describes a StableDiffusionXLPipeline, but the file is an SD 1.x/2.x" in str(planned.value)
    assert str(planned.value) == str(loading.value)


def test_a_dry_run_refuses_a_config_folder_for_a_diffusers_base_as_loading_does(
        tiny_sd_base, stripes_dataset, tmp_path):
    with pytest.raises(BaseModelError) as loading:
        load_base(str(tiny_sd_base), config_dir=str(tiny_sd_base))
    with pytest.raises(BaseModelError) as planned:
        plan(stripes_dataset, tmp_path / "plan", tiny_sd_base, **{"train.base_config": str(tiny_sd_base)})
    assert str(planned.value) == str(loading.value)


@pytest.mark.parametrize("family, base", [("sd1", "sdxl"), ("sdxl", "sd")])
def test_a_dry_run_refuses_a_family_flag_that_is_not_the_bases_as_the_run_does(
        family, base, sdxl_base, tiny_sd_base, stripes_dataset, tmp_path):
    from stylelora.train.loop import check_family

    folder = sdxl_base if base == "sdxl" else tiny_sd_base
    config = load_config(None, overrides(stripes_dataset, tmp_path / "plan", folder, **{"train.family": family}))
    with pytest.raises(ConfigError) as loaded:
        check_family(config, load_base(str(folder)))  # what the run checks once the base has loaded
    with pytest.raises(ConfigError) as planned:
        plan(stripes_dataset, tmp_path / "plan", folder, **{"train.family": family})
    assert f"train.family is {family!r} (" in str(planned.value)
    assert str(planned.value) == str(loaded.value)


def test_a_dry_run_takes_a_family_flag_that_is_the_bases(sdxl_base, stripes_dataset, tmp_path, capsys):
    assert plan(stripes_dataset, tmp_path / "plan", sdxl_base, **{"train.family": "sdxl"}).is_file()
    assert "base family: sdxl (SDXL; flag)" in capsys.readouterr().err


@pytest.mark.parametrize("setting, value, refusal", [
    ("train.quantize_base", "nf4", "--quantize-base nf4 needs bitsandbytes, which could not be imported"),
    ("optim.optimizer", "adamw8bit", "--optimizer adamw8bit needs bitsandbytes, which could not be imported"),
])
def test_a_dry_run_refuses_an_option_whose_package_is_missing_as_the_run_does(
        setting, value, refusal, tiny_sd_base, stripes_dataset, tmp_path, monkeypatch):
    from stylelora.optional import MissingPackage

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it fails
    with pytest.raises(MissingPackage, match=refusal):
        plan(stripes_dataset, tmp_path / "plan", tiny_sd_base, **{setting: value})
    assert not (tmp_path / "plan" / "config.toml").exists()


# ----------------------------------------------------------------------------- the run: the same, before loading


@pytest.mark.parametrize("config_folder", [None, "sdxl"])
def test_the_run_refuses_a_single_files_missing_or_wrong_configs_before_loading_weights(
        config_folder, wide_single_file, sdxl_base, stripes_dataset, tmp_path, empty_hf_cache, monkeypatch):
    from stylelora.models import load
    from stylelora.train.loop import run_training

    def no_loading(*args, **kwargs):
        raise AssertionError("the base was loaded before its configs were checked")

    monkeypatch.setattr(load, "load_base", no_loading)
    extra = {"train.base_config": str(sdxl_base)} if config_folder else {}
    config = load_config(None, overrides(stripes_dataset, tmp_path / "run", wide_single_file, **extra))
    refusal = "describes a StableDiffusionXLPipeline" if config_folder else "needs the matching diffusers config"
    with pytest.raises(BaseModelError, match=refusal):
        run_training(config)


def test_family_detection_reads_the_configs_loading_uses(wide_single_file, wide_configs, sdxl_base,
                                                         empty_hf_cache):
    from stylelora.models.family import detect_family

    assert detect_family(str(wide_single_file), config_dir=str(wide_configs)) == "toy"
    with pytest.raises(BaseModelError, match="describes a StableDiffusionXLPipeline"):
        detect_family(str(wide_single_file), config_dir=str(sdxl_base))
    with pytest.raises(BaseModelError, match="needs the matching diffusers config files"):
        detect_family(str(wide_single_file))


# ----------------------------------------------------------------------------- what a run records of a single file

def test_an_adapter_trained_on_a_single_file_records_kohyas_hashes_of_it(wide_single_file, wide_configs,
                                                                        stripes_dataset, tmp_path):
    """Model sites, A1111's metadata view and `stylelora blend` tell the base by these, as in kohya's files."""
    import hashlib

    from stylelora.train.loop import run_training
    from train_fixtures import adapter_metadata, reset_accelerate

    reset_accelerate()
    config = load_config(None, overrides(stripes_dataset, tmp_path / "run", wide_single_file,
                                         **{"train.base_config": str(wide_configs), "train.steps": 1}))
    try:
        metadata = adapter_metadata(run_training(config))
    finally:
        reset_accelerate()
    data = wide_single_file.read_bytes()
    assert metadata["ss_sd_model_name"] == "tiny-wide.safetensors"
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
