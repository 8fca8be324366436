"""A tiny random SDXL-architecture pipeline (two CLIP text encoders, `text_time` added conditioning) for the tests.

Its layout follows diffusers' own tiny SDXL test pipeline: a two-level UNet (DownBlock2D, then cross-attention with
two transformer layers), layers_per_block 2 so SAI/SGM names apply as on SDXL, CLIPTextModel +
CLIPTextModelWithProjection whose hidden sizes add up to the UNet's cross-attention width. Seeded: the same call
gives bit-identical weights. 16 px native (8×8 latents, f=2 VAE), so a step takes milliseconds on one CPU core.
"""
from __future__ import annotations

from pathlib import Path

import torch

SDXL_NATIVE_SIZE = 16
TE_WIDTH = 16  # each encoder's hidden size; the UNet attends to both, concatenated
TIME_EMBED = 8


def tiny_sdxl_pipeline(seed: int = 0, *, scheduler: str = "euler", text_encoder_2_width: int = TE_WIDTH,
                       text_encoder_2_layers: int = 3):
    """A random StableDiffusionXLPipeline with SDXL's module layout at a tiny width. (The second encoder's width and
    depth: sdxl_single_file needs it wider than the first and 10 layers deep, as SDXL's is, for diffusers to read
    a single file as SDXL.)"""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from gen_fixtures import _char_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=2, sample_size=SDXL_NATIVE_SIZE // 2, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED + text_encoder_2_width,
        cross_attention_dim=TE_WIDTH + text_encoder_2_width,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=SDXL_NATIVE_SIZE,
    )
    config = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=TE_WIDTH, intermediate_size=24,
                  num_attention_heads=2, num_hidden_layers=3, vocab_size=1000, max_position_embeddings=77,
                  hidden_act="gelu", projection_dim=TE_WIDTH)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{
        **config, "hidden_size": text_encoder_2_width, "projection_dim": text_encoder_2_width,
        "num_hidden_layers": text_encoder_2_layers}))
    scheduler_args = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if scheduler == "euler":
        noise_scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **scheduler_args)
    else:
        noise_scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **scheduler_args)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_char_tokenizer(CLIPTokenizer),
        tokenizer_2=_char_tokenizer(CLIPTokenizer), unet=unet, scheduler=noise_scheduler, add_watermarker=False,
    )


def save_tiny_sdxl_base(folder: Path, **kwargs) -> Path:
    """The tiny SDXL pipeline as a diffusers folder (what `load_base(folder)` reads)."""
    tiny_sdxl_pipeline(**kwargs).save_pretrained(folder)
    return folder


SDXL_ADAPTER_METADATA = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                         "ss_base_model_version": "sdxl_base_v1-0"}


def make_sdxl_adapter(path: Path, seed: int = 5, *, scale: float = 1.0) -> Path:
    """A random rank-2 kohya adapter for the tiny SDXL pipeline on its UNet and both text encoders (lora_up times
    `scale`: 0 gives an adapter that changes nothing)."""
    from stylelora.lora.inject import add_lora
    from stylelora.lora.io import save_adapter

    source = tiny_sdxl_pipeline()
    torch.manual_seed(seed)
    add_lora(source.unet, source.text_encoder, text_encoder_2=source.text_encoder_2, rank=2, alpha=1.0,
             init_lora_weights=False)
    with torch.no_grad():
        for model in (source.unet, source.text_encoder, source.text_encoder_2):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    return save_adapter(path, source.unet, source.text_encoder, text_encoder_2=source.text_encoder_2,
                        metadata=SDXL_ADAPTER_METADATA)


# --- SDXL as one original-layout (SAI/SGM) .safetensors file, as sd_xl_base_1.0.safetensors is laid out: the UNet
# --- under model.diffusion_model., the first encoder as transformers' CLIP, the second in OpenCLIP's layout.
SDXL_SINGLE_FILE_ENCODER_2 = {"text_encoder_2_width": 24, "text_encoder_2_layers": 10}


def save_sdxl_single_file(path: Path, pipe) -> Path:
    """`pipe` (tiny_sdxl_pipeline(**SDXL_SINGLE_FILE_ENCODER_2)) as one file from_single_file reads as "xl_base"."""
    from safetensors.torch import save_file

    from test_load import _renamed, _unet_prefixes, _vae_prefixes

    unet_prefixes = {**_unet_prefixes(pipe.unet),
                     **{f"add_embedding.linear_{a}.": (f"label_emb.0.{b}.", {}) for a, b in ((1, 0), (2, 2))}}
    state = {"model.diffusion_model." + k: v for k, v in _renamed(pipe.unet.state_dict(), unet_prefixes)}
    for key, value in _renamed(pipe.vae.state_dict(), _vae_prefixes(pipe.vae)):
        if ".mid.attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        state["first_stage_model." + key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        state["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    state.update(_open_clip_layout(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


OPEN_CLIP_NAMES = (("self_attn.", "attn."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"))


def _open_clip_layout(state: dict, prefix: str) -> dict:
    """transformers' CLIPTextModelWithProjection state as OpenCLIP names it (q, k, v joined in one in_proj)."""
    out, qkv = {}, {}
    text = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        if key in text:
            out[prefix + text[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif key.startswith("text_model.encoder.layers."):
            number, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
            block = f"{prefix}transformer.resblocks.{number}."
            part = rest.split(".")
            if part[0] == "self_attn" and part[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(block + "attn.in_proj_" + part[2], {})[part[1]] = value
                continue
            for old, new in OPEN_CLIP_NAMES:
                rest = rest.replace(old, new)
            out[block + rest] = value
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out
