"""Tiny random Stable Diffusion bases (saved as diffusers folders) and LoRA adapter files for generation tests.

Everything here is seeded, so the same call gives bit-identical models and adapter files, and small enough that
one image takes a fraction of a second on 2 CPU cores.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from stylelora.lora.inject import add_lora
from stylelora.lora.io import kohya_metadata, save_adapter

NATIVE_SIZE = 16  # sample_size 8 latents * vae scale factor 2


def tiny_pipeline(cross_attention_dim: int = 32):
    """A random StableDiffusionPipeline with the real SD1.x module layout (UNet 32/64, CLIP hidden 32, DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=8, attention_head_dim=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=cross_attention_dim, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_char_tokenizer(CLIPTokenizer),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _char_tokenizer(tokenizer_class):
    """One token per character (no merges): enough for prompts to reach the text encoder distinctly."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return tokenizer_class(vocab=vocab, merges=[], model_max_length=77)


def save_tiny_base(folder: Path, **kwargs) -> Path:
    """The tiny pipeline as a diffusers folder (what `load_base(folder)` reads)."""
    tiny_pipeline(**kwargs).save_pretrained(folder)
    return folder


def adapter_pipeline(seed: int, *, rank: int = 4, alpha: float = 2.0, preset: str = "kohya",
                     text_encoder: bool = True, **lora_args):
    """A tiny pipeline with a random non-zero LoRA (up matrices too): each seed gives a different adapter."""
    pipe = tiny_pipeline(**lora_args.pop("base_args", {}))
    torch.manual_seed(seed)
    add_lora(pipe.unet, pipe.text_encoder, rank=rank, alpha=alpha, unet_targets=preset,
             train_text_encoder=text_encoder, init_lora_weights=False, **lora_args)
    _shrink_lora(pipe, 0.5)
    return pipe


def _shrink_lora(pipe, factor: float) -> None:
    """Random init gives deltas as large as the weights; halve them so images change without saturating."""
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(factor)


def make_adapter(path: Path, seed: int, *, fmt: str = "kohya", trigger: str | None = None,
                 metadata: dict | None = None, **adapter_args) -> Path:
    """Write a random adapter file (kohya by default) with kohya/modelspec training metadata."""
    pipe = adapter_pipeline(seed, **adapter_args)
    meta = kohya_metadata(
        rank=adapter_args.get("rank", 4), alpha=adapter_args.get("alpha", 2.0), output_name=Path(path).stem,
        tag_frequency={"10_" + (trigger or "style"): {trigger or "style": 30, "circle": 12}},
        dataset_dirs={"10_" + (trigger or "style"): {"n_repeats": 10, "img_count": 30}}, num_train_images=300,
        steps=500, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, resolution=NATIVE_SIZE,
        training_started_at=1700000000.0, trigger_phrase=trigger,
    )
    meta.update(metadata or {})
    return save_adapter(path, pipe.unet, pipe.text_encoder, metadata=meta, fmt=fmt)


def make_silent_adapter(path: Path, like: Path) -> Path:
    """An adapter on every module `like` (a rank-4, alpha-2 kohya file) adapts, with every delta zero."""
    from safetensors.torch import load_file, save_file

    state = {k: (torch.zeros_like(v) if "lora_up" in k else v) for k, v in load_file(str(like)).items()}
    save_file(state, str(path), metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0"})
    return Path(path)


def make_peft_adapter(folder: Path, seed: int, component: str = "unet", **adapter_args) -> Path:
    """A plain peft adapter folder (adapter_model.safetensors + adapter_config.json), as PeftModel.save_pretrained writes."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = adapter_pipeline(seed, **adapter_args)
    model = pipe.unet if component == "unet" else pipe.text_encoder
    state = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (folder / "adapter_config.json").write_text(json.dumps(config, default=str), encoding="utf-8")
    return folder / "adapter_model.safetensors"


def load_tiny_base(folder: Path):
    """The saved tiny base through the project's real loader (so Model/Model hash come from the folder)."""
    from stylelora.models.load import load_base

    pipe = load_base(str(folder), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def model_outputs(pipe) -> dict:
    """Text-encoder hidden states for fixed tokens and the UNet prediction for fixed latents/context."""
    generator = torch.Generator().manual_seed(1)
    channels = pipe.unet.config.in_channels
    latents = torch.randn(2, channels, 8, 8, generator=generator)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    tokens = pipe.tokenizer(["a red circle", "zorb 7"], padding="max_length", max_length=77, return_tensors="pt")
    return {"te": pipe.text_encoder(tokens.input_ids)[0], "unet": pipe.unet(latents, torch.tensor([10, 500]), context).sample}


def pixels(result) -> "numpy.ndarray":
    """A GeneratedImage (or PIL image) as a uint8 array, for exact comparisons."""
    import numpy

    return numpy.asarray(getattr(result, "image", result))
