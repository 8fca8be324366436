"""`blend` writes every module in the shapes kohya writes for its layer in the file's family, whatever shapes the input
had: other trainers store a 1x1 convolution's LoRA Linear-shaped or a Linear's as a 1x1 convolution, LyCORIS stores a
3x3 convolution flat. A1111 and ComfyUI fit such factors to the layer; diffusers refuses them, so a blend keeping them
would not load there. The layers are those of each family's published UNet (SD 2.x: Linear proj_in / proj_out), built
weightless: no base is needed, and the change each module makes is kept exactly."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from stylelora.lora.blend import blend
from stylelora.lora.spec import AdapterSpec

SD_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
XL_TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
LINEAR_768, LINEAR_1024 = ((2, 768), (768, 2)), ((2, 1024), (1024, 2))
CONV_1X1, FLAT_1X1 = ((2, 320, 1, 1), (320, 2, 1, 1)), ((2, 320), (320, 2))
CONV_3X3, FLAT_3X3 = ((2, 320, 3, 3), (320, 2, 1, 1)), ((2, 2880), (320, 2))

CASES = {  # family: {module: (stored (down, up) shapes, written (down, up) shapes)}; the TE's q_proj names the family
    "SD 1.x": {SD_TE: (LINEAR_768, LINEAR_768), PROJ_IN: (FLAT_1X1, CONV_1X1), CONV1: (FLAT_3X3, CONV_3X3),
               TO_Q: (CONV_1X1, FLAT_1X1), FC1: (((2, 768, 1, 1), (3072, 2, 1, 1)), ((2, 768), (3072, 2)))},
    "SD 2.x (Linear proj_in)": {SD_TE: (LINEAR_1024, LINEAR_1024), PROJ_IN: (CONV_1X1, FLAT_1X1),
                                CONV1: (FLAT_3X3, CONV_3X3)},
    "SDXL (SAI names)": {XL_TE: (LINEAR_768, LINEAR_768),
                         "lora_unet_input_blocks_4_1_proj_in": (((2, 640, 1, 1), (640, 2, 1, 1)), ((2, 640), (640, 2))),
                         "lora_unet_input_blocks_1_0_in_layers_2": (FLAT_3X3, CONV_3X3)},
}


def _change(state: dict, name: str) -> torch.Tensor:
    up, down = state[f"{name}.lora_up.weight"].float(), state[f"{name}.lora_down.weight"].float()
    return (up.flatten(1) @ down.flatten(1)) * (float(state[f"{name}.alpha"]) / down.shape[0])


@pytest.mark.parametrize("family", list(CASES))
def test_blend_writes_each_layers_kohya_shapes_and_the_same_change(tmp_path, family):
    torch.manual_seed(0)
    state = {}
    for name, ((down, up), _) in CASES[family].items():
        state.update({f"{name}.lora_down.weight": torch.randn(down), f"{name}.lora_up.weight": torch.randn(up),
                      f"{name}.alpha": torch.tensor(1.0)})
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(state, str(source))
    blend([AdapterSpec(source, 1.0)], out, exact=True)
    written = load_file(str(out))
    for name, (_, (down, up)) in CASES[family].items():
        shapes = tuple(written[f"{name}.lora_down.weight"].shape), tuple(written[f"{name}.lora_up.weight"].shape)
        assert shapes == (down, up), name
        assert torch.allclose(_change(written, name), _change(state, name), atol=1e-6), name


def test_a_lycoris_file_of_sd2_keeps_its_linear_proj_in_linear(tmp_path):
    """LyCORIS stores factors flat; on SD 2.x proj_in is a Linear layer, not SD 1.x's 1x1 convolution."""
    torch.manual_seed(0)
    loha = {"hada_w1_a": torch.randn(320, 2), "hada_w1_b": torch.randn(2, 320), "hada_w2_a": torch.randn(320, 2),
            "hada_w2_b": torch.randn(2, 320), "alpha": torch.tensor(2.0)}
    state = {**{f"{PROJ_IN}.{suffix}": tensor for suffix, tensor in loha.items()},
             f"{SD_TE}.lora_down.weight": torch.randn(2, 1024), f"{SD_TE}.lora_up.weight": torch.randn(1024, 2)}
    source, out = tmp_path / "loha.safetensors", tmp_path / "out.safetensors"
    save_file(state, str(source))
    blend([AdapterSpec(source, 1.0)], out, exact=True)
    written = load_file(str(out))
    assert written[f"{PROJ_IN}.lora_down.weight"].shape == (4, 320)
    assert written[f"{PROJ_IN}.lora_up.weight"].shape == (320, 4)


SD_SAI_TO_Q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # = TO_Q in SAI/LDM names
XL_SAI_TO_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
XL_DIFFUSERS_TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
NAMES = {  # family: (text-encoder module naming it, (name in the file, width), name the blend writes)
    "SD 1.x file in SAI names": (SD_TE, (SD_SAI_TO_Q, 320), TO_Q),
    "SDXL file in diffusers names": (XL_TE, (XL_DIFFUSERS_TO_Q, 640), XL_SAI_TO_Q),
    "SDXL file in SAI names": (XL_TE, (XL_SAI_TO_Q, 640), XL_SAI_TO_Q),
}


@pytest.mark.parametrize("case", list(NAMES))
def test_blend_writes_the_unet_names_kohya_writes_for_the_family(tmp_path, case):
    """Other tools name UNet modules either way and A1111 / ComfyUI read both; diffusers reads kohya's (diffusers
    names for SD 1.x/2.x, SAI for SDXL), so the blend writes those."""
    text_encoder, (name, width), written_name = NAMES[case]
    torch.manual_seed(0)
    state = {}
    for module, size in ((text_encoder, 768), (name, width)):
        state.update({f"{module}.lora_down.weight": torch.randn(2, size),
                      f"{module}.lora_up.weight": torch.randn(size, 2), f"{module}.alpha": torch.tensor(1.0)})
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(state, str(source))
    blend([AdapterSpec(source, 1.0)], out, exact=True)
    written = load_file(str(out))
    assert {key.partition(".")[0] for key in written} == {text_encoder, written_name}
    assert torch.allclose(_change(written, written_name), _change(state, name), atol=1e-6)


def test_a_file_holding_one_layer_under_both_names_is_refused_naming_them(tmp_path):
    state = {}
    for name in (XL_SAI_TO_Q, XL_DIFFUSERS_TO_Q, XL_TE):
        width = 768 if name == XL_TE else 640
        state.update({f"{name}.lora_down.weight": torch.randn(2, width),
                      f"{name}.lora_up.weight": torch.randn(width, 2)})
    save_file(state, str(tmp_path / "twice.safetensors"))
    with pytest.raises(ValueError, match=f"holds one layer twice, as {XL_DIFFUSERS_TO_Q} and as {XL_SAI_TO_Q}"):
        blend([AdapterSpec(tmp_path / "twice.safetensors", 1.0)], tmp_path / "out.safetensors", exact=True)


def test_two_inputs_spelling_a_layer_apart_add_up_in_one_module(tmp_path):
    torch.manual_seed(0)
    sources, changes = [], []
    for index, name in enumerate((XL_DIFFUSERS_TO_Q, XL_SAI_TO_Q)):
        state = {}
        for module, size in ((XL_TE, 768), (name, 640)):
            state.update({f"{module}.lora_down.weight": torch.randn(2, size),
                          f"{module}.lora_up.weight": torch.randn(size, 2), f"{module}.alpha": torch.tensor(1.0)})
        sources.append(tmp_path / f"in{index}.safetensors")
        save_file(state, str(sources[-1]))
        changes.append(_change(state, name))
    blend([AdapterSpec(source, 1.0) for source in sources], tmp_path / "out.safetensors", exact=True)
    written = load_file(str(tmp_path / "out.safetensors"))
    assert {key.partition(".")[0] for key in written} == {XL_TE, XL_SAI_TO_Q}
    assert torch.allclose(_change(written, XL_SAI_TO_Q), changes[0] + changes[1], atol=1e-5)
