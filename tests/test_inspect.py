"""inspect_adapter(): layout, architecture, rank/alpha, module counts, triggers, training settings, tags, hashes."""
from __future__ import annotations

import json

import pytest
import torch
from gen_fixtures import make_adapter, make_peft_adapter
from safetensors.torch import save_file

from stylelora.lora.inspect import format_inspect, inspect_adapter, trigger_words
from stylelora.lora.io import file_model_hash

TE_MODULES = 2 * 6  # 2 CLIP layers x q/k/v/out/fc1/fc2


@pytest.mark.parametrize("layout, writer, unet, te", [
    ("kohya", lambda tmp: make_adapter(tmp / "ink.safetensors", 1, trigger="ink style, ink"), True, True),
    ("diffusers", lambda tmp: make_adapter(tmp / "ink.safetensors", 1, fmt="diffusers"), True, True),
    ("peft", lambda tmp: make_peft_adapter(tmp / "ink", 1, "unet"), True, False),
])
def test_inspect_table(tmp_path, layout, writer, unet, te):
    path = writer(tmp_path)
    info = inspect_adapter(path)
    assert info["format"] == layout
    assert (info["rank"], info["alpha"], info["mixed"]) == (4, 2.0, False)
    assert (info["modules"]["unet"] > 0) == unet
    assert info["modules"]["text_encoder"] == (TE_MODULES if te else 0)
    assert info["file_size"] == path.stat().st_size
    assert info["hash"]["computed"] == file_model_hash(path) and info["hash"]["a1111_short"] == info["hash"]["computed"][:12]
    assert info["architecture"].startswith("custom SD-architecture") if te else info["architecture"]
    json.dumps(info)  # JSON-ready for --json
    assert info["title"] in format_inspect(info)


def test_inspect_reads_our_training_metadata(tmp_path):
    path = make_adapter(tmp_path / "ink.safetensors", 1, trigger="ink style, ink")
    info = inspect_adapter(path)
    assert info["trigger_words"] == ["ink style", "ink"]
    assert info["training"]["ss_steps"] == 500 and info["training"]["ss_network_dim"] == 4
    assert info["tag_frequency"] == {"ink style, ink": 30, "circle": 12}
    assert info["hash"]["matches_metadata"] is True
    assert info["base_model"]["ss_base_model_version"] == "sd_v1"
    assert info["modelspec"]["architecture"] == "stable-diffusion-v1/lora"
    text = format_inspect(info)
    for expected in ("kohya layout", "rank 4, alpha 2", f"text encoder {TE_MODULES}", "trigger words  ink style, ink",
                     "matches metadata", "steps", "circle (12)",
                     "training_started_at      2023-11-14 22:13:20 UTC"):  # kohya's seconds since 1970, as a date
        assert expected in text


def test_mixed_ranks_are_listed_per_kind(tmp_path):
    info = inspect_adapter(make_adapter(tmp_path / "locon.safetensors", 1, preset="locon", conv_rank=2, conv_alpha=1.0))
    assert info["mixed"] and info["conv_modules"] > 0
    assert set(info["rank_alpha_counts"]) == {"4/2", "2/1"}
    assert "per module" in format_inspect(info)


@pytest.mark.parametrize("keys, family", [
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (4, 768)}, "stable-diffusion-v1"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (4, 1024)}, "stable-diffusion-v2"),
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (4, 768)}, "stable-diffusion-xl-v1-base"),
    ({"lora_unet_input_blocks_4_1_proj_in": (4, 640)}, "stable-diffusion-xl-v1-base"),
    ({"lora_unet_middle_block_1_transformer_blocks_5_attn1_to_q": (4, 1280)}, "stable-diffusion-xl-v1-base"),
    # SAI names that only SD 1.x/2.x UNets have (attention in input block 1, output blocks 6 to 11)
    ({"lora_unet_input_blocks_1_1_proj_in": (4, 320)}, "stable-diffusion-v1 or v2 (UNet-only file: the version "
                                                        "is not in it)"),
    ({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (4, 768)}, "stable-diffusion-v1"),
    ({"lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_k": (4, 1024)}, "stable-diffusion-v2"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (4, 768),
      "lora_unet_input_blocks_4_1_proj_in": (4, 640)}, "stable-diffusion-v1"),  # SD's one text encoder
])
def test_architecture_from_keys_and_shapes(tmp_path, keys, family):
    state = {}
    for name, (rank, width) in keys.items():
        state[f"{name}.lora_down.weight"] = torch.zeros(rank, width)
        state[f"{name}.lora_up.weight"] = torch.zeros(width, rank)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(state, str(tmp_path / "x.safetensors"))
    info = inspect_adapter(tmp_path / "x.safetensors")
    assert info["architecture"] == family
    assert info["hash"]["matches_metadata"] is None and "no sshs_model_hash" in format_inspect(info)


def test_trigger_words_fall_back_to_kohya_folder_names():
    metadata = {"ss_dataset_dirs": json.dumps({"10_zorb": {}, "img/5_toy pastel": {}, "reg": {}})}
    assert trigger_words(metadata) == ["zorb", "toy pastel"]
    assert trigger_words({}) == []


def test_inspect_refuses_pickles(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        inspect_adapter(path)


def test_upload_check_reads_only_the_header(tmp_path):
    from stylelora.lora.adapter_file import AdapterFileError, check_adapter_file
    from stylelora.lora.inspect import adapter_trigger_words

    path = make_adapter(tmp_path / "ink.safetensors", 1, trigger="ink")
    assert check_adapter_file(path, max_bytes=10 * 2**20) == "kohya"
    assert check_adapter_file(make_adapter(tmp_path / "d.safetensors", 1, fmt="diffusers")) == "diffusers"
    assert adapter_trigger_words(path) == ["ink"]
    with pytest.raises(AdapterFileError, match="MiB"):
        check_adapter_file(path, max_bytes=1000)
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(AdapterFileError, match="not a LoRA"):
        check_adapter_file(tmp_path / "base.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterFileError, match="not a readable"):
        check_adapter_file(tmp_path / "junk.safetensors")


def test_inspect_piped_into_head_stops_quietly(tmp_path):
    """`stylelora inspect FILE | head -1` ends without a BrokenPipeError traceback, with the status `ls | head` gets.
    The reader here is `true`, which has closed the pipe long before the command writes, so every run hits it."""
    import subprocess
    import sys

    path = make_adapter(tmp_path / "ink.safetensors", 1, trigger="ink style, ink")
    script = (f"{sys.executable} -c 'import sys; from stylelora.cli import main; sys.exit(main())' "
              f"inspect {path} --json | true")
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {script}"], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 141


@pytest.mark.parametrize("prompt, words, expected", [
    ("a red circle", ["stripestyle"], "stripestyle, a red circle"),
    ("a red zorb on a beige background", ["pastelstyle", "zorb"], "pastelstyle, zorb, a red zorb on a beige background"),
    ("zorb, a red zorb", ["zorb"], "zorb, a red zorb"),  # already a tag: kept where it is, not added twice
    ("sks dog running, park", ["sks dog"], "sks dog running, park"),  # a tag that starts with it
    ("Stripestyle, a red circle", ["stripestyle", "stripestyle"], "Stripestyle, a red circle"),
    ("", ["a", "b"], "a, b"),
    ("a red circle", [], "a red circle"),
])
def test_trigger_words_go_in_front_of_the_prompt_once(prompt, words, expected):
    from stylelora.lora.inspect import with_trigger_words

    assert with_trigger_words(prompt, words) == expected


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_sai_name_of_a_real_unet_tells_its_family(family):
    """A file naming the published UNets' modules the SAI/LDM way, whole or one module at a time (as block-limited
    files do), is of that family: A1111 and ComfyUI read SD 1.x files in these names too."""
    from stylelora.lora.components import SD_UNKNOWN_VERSION, SDXL_ARCHITECTURE, adapter_architecture
    from stylelora.lora.sai_names import sai_kohya_names
    from stylelora.lora.sd15 import build_sd15_meta_models
    from stylelora.lora.sdxl import build_sdxl_meta_models

    unet = (build_sd15_meta_models if family == "sd15" else build_sdxl_meta_models)()[0]
    names = sai_kohya_names(unet)
    def state(chosen):
        return {f"{name}.lora_down.weight": torch.zeros(1, *names.layers[path].weight.shape[1:2])
                for path, name in names.by_path.items() if name in chosen}
    everything = set(names.by_name)
    want = SDXL_ARCHITECTURE if family == "sdxl" else "stable-diffusion-v1"
    assert adapter_architecture(state(everything), {}) == want
    attention = [name for name in everything if "_1_transformer_blocks_0_attn1_to_q" in name]
    for name in attention:  # one attention module alone: SD's without its context width
        assert adapter_architecture(state({name}), {}) in (
            {SDXL_ARCHITECTURE} if family == "sdxl" else {SD_UNKNOWN_VERSION, SDXL_ARCHITECTURE})
    if family == "sd15":  # input block 1, 2 and output blocks 6 to 11: only SD has attention there
        sd_only = [name for name in attention if adapter_architecture(state({name}), {}) == SD_UNKNOWN_VERSION]
        assert len(sd_only) == 2 + 6
