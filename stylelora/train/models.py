"""Owns the bundle of models one training step uses, and the two encoders (images → latents, captions → embeddings).

The UNet and text encoder held here may be accelerate/DDP wrappers: this module only *calls* them, never reads
their attributes, so the same code runs in one process or many.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stylelora.data.latent_cache import TextEmbeddingCache

TOKEN_CACHE_LIMIT = 100_000  # distinct captions kept tokenized (~60 MB of ids)


@dataclass
class TrainModels:
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    vae: nn.Module | None  # only needed when latents are not cached
    device: torch.device
    dtype: torch.dtype  # dtype of the frozen base weights (fp32, fp16 or bf16)
    text_cache: TextEmbeddingCache | None = None  # set when the text encoder is frozen and captions static
    triggers: tuple[str, ...] = ()  # the dataset's trigger phrases (base preservation strips them from captions)
    decoys: tuple[str, ...] = ()  # words base preservation may put where a trigger was (train/preservation.py)
    # The same UNet and text encoder without accelerate/DDP wrappers, for gradient-free base predictions: a DDP
    # module must see exactly one forward per backward. None: unet / text_encoder are not wrapped.
    unwrapped: tuple[nn.Module, nn.Module] | None = None
    _token_ids: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def batch_latents(self, batch: dict) -> torch.Tensor:
        """Scaled latents of a batch: from the cache when the batch carries them, else VAE-encoded now."""
        if "latents" in batch:
            return batch["latents"].to(self.device, dtype=torch.float32, non_blocking=True)
        if self.vae is None:
            raise RuntimeError("batch has pixels but no VAE was kept for encoding them (latent cache expected)")
        return encode_pixels(self.vae, batch["pixels"].to(self.device, non_blocking=True))

    def encode_captions(self, captions: list[str], text_encoder: nn.Module | None = None) -> torch.Tensor:
        """Text-encoder hidden states (B, tokens, width); with gradients unless they come from the cache.
        text_encoder: another handle on the same encoder (the unwrapped one for base predictions)."""
        if self.text_cache is not None:
            return self.text_cache.get_or_encode(captions).to(self.device, non_blocking=True)
        return (text_encoder or self.text_encoder)(self.token_ids(captions))[0]

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """(B, max_length) token ids; each distinct caption is tokenized once per run (captions repeat a lot)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._token_ids]
        if len(self._token_ids) + len(missing) > TOKEN_CACHE_LIMIT:
            self._token_ids.clear()  # shuffled tags can make endless distinct captions: keep memory bounded
        if missing:
            ids = tokenize(self.tokenizer, missing)
            self._token_ids.update(zip(missing, ids.to(self.device)))
        return torch.stack([self._token_ids[c] for c in captions])


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Pad/truncate to the tokenizer's full length (77 for CLIP), as Stable Diffusion was trained."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_pixels(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of (B,3,H,W) pixels in [-1, 1]: the posterior mean, so cached and live latents agree."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents.float() - shift) * vae.config.scaling_factor)


def text_encode_fn(text_encoder: nn.Module, tokenizer, device: torch.device):
    """captions → hidden states, no gradients: the encode function of a TextEmbeddingCache."""
    @torch.no_grad()
    def encode(captions: list[str]) -> torch.Tensor:
        return text_encoder(tokenize(tokenizer, captions).to(device))[0].float()

    return encode
