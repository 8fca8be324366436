"""What a user with a real base goes through, on tiny models of the real architectures: an SDXL base given as one
original-layout .safetensors file loads as its diffusers folder does and trains the same adapter; blend's block
weights read a single-file base's configs as loading does; a second text encoder's rate is refused on a base that has
one encoder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gen_fixtures import make_adapter, tiny_pipeline
from sdxl_fixtures import SDXL_NATIVE_SIZE, SDXL_SINGLE_FILE_ENCODER_2, save_sdxl_single_file, tiny_sdxl_pipeline
from stylelora.config import ConfigError, load_config
from stylelora.models.load import load_base
from test_load import add_to_hf_cache, empty_hf_cache, original_sd_layout  # noqa: F401 - a fixture among them

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SD_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # where loading looks for a v1 file's configs first
TOY_BLOCKS = "1,0,0,0,1,1,1,1"  # BASE and the tiny UNet's 7 blocks: the output blocks only


@pytest.fixture(scope="module")
def sdxl_folder_and_file(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny SDXL base twice: as a diffusers folder and as the single file sd-scripts and A1111 users have."""
    root = tmp_path_factory.mktemp("sdxl_single")
    pipe = tiny_sdxl_pipeline(**SDXL_SINGLE_FILE_ENCODER_2)
    pipe.save_pretrained(root / "base")
    return root / "base", save_sdxl_single_file(root / "tiny-sdxl.safetensors", pipe)


@pytest.fixture(scope="module")
def sd_single_file(tmp_path_factory) -> Path:
    """tiny_sd_base's pipeline as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("sd_single") / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in original_sd_layout(tiny_pipeline()).items()}, str(path))
    return path


def test_an_sdxl_single_file_loads_the_weights_of_its_folder(sdxl_folder_and_file):
    folder, single = sdxl_folder_and_file
    ours, theirs = load_base(str(single), config_dir=str(folder), device="cpu"), load_base(str(folder), device="cpu")
    assert type(ours).__name__ == "StableDiffusionXLPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, reference = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert mine.keys() == reference.keys(), name
        assert all(torch.equal(mine[key], reference[key]) for key in mine), name


def test_an_sdxl_single_file_trains_the_folders_adapter_and_is_named_by_its_file(sdxl_folder_and_file, stripes_dataset,
                                                                                 tmp_path):
    from safetensors import safe_open

    from stylelora.cli import main

    folder, single = sdxl_folder_and_file
    common = ["--resolution", str(SDXL_NATIVE_SIZE), "--steps", "1", "--rank", "2", "--no-samples", "--save-every", "0"]
    assert main(["train", str(stripes_dataset), "--base", str(single), "--base-config", str(folder), *common,
                 "--output", str(tmp_path / "file")]) == 0
    assert main(["train", str(stripes_dataset), "--base", str(folder), *common,
                 "--output", str(tmp_path / "folder")]) == 0
    adapters = [safe_open(str(next((tmp_path / run).glob("*.safetensors"))), "pt") for run in ("file", "folder")]
    assert set(adapters[0].keys()) == set(adapters[1].keys())
    assert {key.split("_")[1] for key in adapters[0].keys()} == {"unet", "te1", "te2"}
    metadata = adapters[0].metadata()
    assert (metadata["ss_base_model_version"], metadata["ss_sd_model_name"]) == ("sdxl_base_v1-0", single.name)


# ----------------------------------------------------------------------------- blend --base with a single file


def test_blend_block_weights_read_a_single_file_bases_configs(sd_single_file, tiny_sd_base, empty_hf_cache, tmp_path,
                                                              capsys):
    from stylelora.cli import main

    adapter = make_adapter(tmp_path / "style.safetensors", 3)
    blend = ["blend", f"{adapter}:1:lbw={TOY_BLOCKS}", "--base", str(sd_single_file)]
    assert main([*blend, "--base-config", str(tiny_sd_base), "--out", str(tmp_path / "given.safetensors")]) == 0
    capsys.readouterr()
    assert main([*blend, "--out", str(tmp_path / "none.safetensors")]) == 2
    assert "--base-config DIR" in capsys.readouterr().err  # no configs anywhere: it says what to pass
    add_to_hf_cache(empty_hf_cache, SD_CONFIG_REPO, tiny_sd_base, configs_only=True)
    assert main([*blend, "--out", str(tmp_path / "cached.safetensors")]) == 0  # the configs loading would find


def test_blend_with_a_base_that_is_not_there_is_one_error_line(tmp_path, capsys):
    from stylelora.cli import main

    adapter = make_adapter(tmp_path / "style.safetensors", 3)
    capsys.readouterr()
    assert main(["blend", f"{adapter}:1:lbw={TOY_BLOCKS}", "--base", str(tmp_path / "nowhere.safetensors"),
                 "--out", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: Base model not found")


# ----------------------------------------------------------------------------- a second text encoder's rate


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v"])
def test_a_second_text_encoders_rate_is_refused_on_a_base_with_one(family):
    from stylelora.presets import apply_preset

    config = load_config(None, {"data.dir": "d", "train.base": "model.safetensors", "optim.text_encoder_2_lr": 1e-4})
    with pytest.raises(ConfigError, match="--text-encoder-2-lr sets SDXL's second text encoder, but the base "
                                          "model.safetensors is SD .*--text-encoder-lr"):
        apply_preset(config, family, cuda=False)
    assert apply_preset(config, "sdxl", cuda=False).optim.text_encoder_2_lr == 1e-4


def test_a_saved_sd1_config_with_the_presets_second_rate_loads_back(tmp_path):
    from stylelora.config import save_config
    from stylelora.presets import apply_preset

    run = apply_preset(load_config(None, {"data.dir": "d"}), "sd1", cuda=False)
    save_config(run, tmp_path / "config.toml")  # holds text_encoder_2_lr, from the preset
    again = apply_preset(load_config(tmp_path / "config.toml", {"data.dir": "d"}), "sd1", cuda=False)
    assert again.optim.text_encoder_2_lr == run.optim.text_encoder_2_lr
