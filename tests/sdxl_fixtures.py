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


def tiny_sdxl_pipeline(seed: int = 0, *, scheduler: str = "euler"):
    """A random StableDiffusionXLPipeline with SDXL's module layout at a tiny width."""
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
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TE_WIDTH, cross_attention_dim=2 * TE_WIDTH,
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
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
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
