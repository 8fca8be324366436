"""Owns the bundle of models one training step uses, the encoders (images → latents, captions → embeddings) and
the UNet call with the conditioning its family needs.

SD 1.x/2.x condition the UNet on the text encoder's last hidden states. SDXL, as it was trained (and as diffusers'
pipeline and kohya's sdxl_train_network encode prompts): the penultimate hidden states of both text encoders side
by side, the pooled projection of encoder 2, and `add_time_ids` = each image's original size (h, w), its crop's
top-left offset and the bucket's target size (h, w), which the dataset records per sample. A caption longer than one
window (kohya's --max_token_length 150 or 225) is read in windows of 75 tokens, each with its start and end token,
encoded one at a time and laid side by side (the pooled vector the first window's), as stylelora generate, A1111 and
ComfyUI read a long prompt.

The UNet and text encoders held here may be accelerate/DDP wrappers: this module only *calls* them, never reads
their attributes, so the same code runs in one process or many.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stylelora.data.latent_cache import TextEmbeddingCache

TOKEN_CACHE_LIMIT = 100_000  # distinct captions kept tokenized (~60 MB of ids)
SDXL_SIZE_KEYS = ("original_size", "crops_coords_top_left", "target_size")  # the order of SDXL's add_time_ids


@dataclass(frozen=True)
class SdxlText:
    """SDXL's text conditioning of a batch: both encoders' penultimate hidden states concatenated (B, 77, w1 + w2)
    and encoder 2's pooled projection (B, projection width)."""

    hidden: torch.Tensor
    pooled: torch.Tensor


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
    company: tuple[str, ...] = ()  # words `decoy_company` puts beside a trigger: the decoys the base reacts to least
    # The same UNet and text encoder(s) without accelerate/DDP wrappers, for gradient-free base predictions: a DDP
    # module must see exactly one forward per backward. None: unet / text_encoder are not wrapped.
    unwrapped: tuple[nn.Module, ...] | None = None
    sdxl: bool = False  # two text encoders, pooled embeddings and add_time_ids (see the module docstring)
    text_encoder_2: nn.Module | None = None
    tokenizer_2: object = None
    max_tokens: int | None = None  # caption tokens read (data.max_token_length); None: one window
    _token_ids: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def batch_latents(self, batch: dict) -> torch.Tensor:
        """Scaled latents of a batch: from the cache when the batch carries them, else VAE-encoded now."""
        if "latents" in batch:
            return batch["latents"].to(self.device, dtype=torch.float32, non_blocking=True)
        if self.vae is None:
            raise RuntimeError("batch has pixels but no VAE was kept for encoding them (latent cache expected)")
        return encode_pixels(self.vae, batch["pixels"].to(self.device, non_blocking=True), upcast=self.sdxl)

    def encode_captions(self, captions: list[str],
                        text_encoders: tuple[nn.Module, ...] | None = None) -> torch.Tensor | SdxlText:
        """Text-encoder hidden states (B, tokens, width), or SdxlText for SDXL; with gradients unless they come from
        the cache. text_encoders: other handles on the same encoders (the unwrapped ones for base predictions)."""
        if self.text_cache is not None:
            cached = self.text_cache.get_or_encode(captions)
            if isinstance(cached, tuple):
                return SdxlText(*(part.to(self.device, non_blocking=True) for part in cached))
            return cached.to(self.device, non_blocking=True)
        encoders = text_encoders or (self.text_encoder, self.text_encoder_2)
        if self.sdxl:
            return sdxl_text(encoders[0], encoders[1], self.token_ids(captions), self.token_ids(captions, second=True))
        return by_window(lambda ids: encoders[0](ids)[0], self.token_ids(captions))

    def token_ids(self, captions: list[str], *, second: bool = False) -> torch.Tensor:
        """(B, max_length) token ids (of SDXL's second tokenizer with `second`); each distinct caption is tokenized
        once per run (captions repeat a lot)."""
        known = self._token_ids.setdefault(int(second), {})
        missing = [c for c in dict.fromkeys(captions) if c not in known]
        if len(known) + len(missing) > TOKEN_CACHE_LIMIT:
            known.clear()  # shuffled tags can make endless distinct captions: keep memory bounded
        if missing:
            ids = tokenize(self.tokenizer_2 if second else self.tokenizer, missing, self.max_tokens)
            known.update(zip(missing, ids.to(self.device)))
        return torch.stack([known[c] for c in captions])

    def time_ids(self, batch: dict) -> torch.Tensor | None:
        """SDXL's add_time_ids (B, 6) of a batch; None for the other families."""
        if not self.sdxl:
            return None
        rows = [[*map(int, original), *map(int, crop), *map(int, target)]
                for original, crop, target in zip(*(batch[key] for key in SDXL_SIZE_KEYS))]
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def denoise(self, unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor | SdxlText,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction (fp32) in the base's dtype, with SDXL's added conditioning when `text` is SdxlText."""
        if isinstance(text, SdxlText):
            added = {"text_embeds": text.pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
            return unet(noisy.to(self.dtype), timesteps, text.hidden.to(self.dtype),
                        added_cond_kwargs=added).sample.float()
        return unet(noisy.to(self.dtype), timesteps, text.to(self.dtype)).sample.float()


def tokenize(tokenizer, captions: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Pad/truncate to the tokenizer's full length (77 for CLIP), as Stable Diffusion was trained; with `max_tokens`
    past one window, the caption's first max_tokens tokens in windows of 75, each with its start and end token and
    padded, side by side (B, windows * 77)."""
    window = tokenizer.model_max_length - 2
    if not max_tokens or max_tokens <= window:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    rows = []
    for ids in tokenizer(captions, add_special_tokens=False, verbose=False).input_ids:
        ids, row = ids[:max_tokens], []
        for start in range(0, max_tokens, window):
            part = ids[start:start + window]
            padding = [tokenizer.pad_token_id] * (window - len(part))
            row += [tokenizer.bos_token_id, *part, tokenizer.eos_token_id, *padding]
        rows.append(row)
    return torch.tensor(rows)


def by_window(encode, ids: torch.Tensor, *more: torch.Tensor, size: int = 77):
    """encode(window's ids, ...) for each window of `ids` (and of `more`, SDXL's second tokenizer's), laid side by side
    on the token axis; of SdxlText, the hidden states so, and the first window's pooled vector."""
    if ids.shape[1] <= size:
        return encode(ids, *more)
    parts = [encode(*(t[:, start:start + size] for t in (ids, *more))) for start in range(0, ids.shape[1], size)]
    if isinstance(parts[0], SdxlText):
        return SdxlText(hidden=torch.cat([part.hidden for part in parts], dim=1), pooled=parts[0].pooled)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def encode_pixels(vae: nn.Module, pixels: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """Scaled latents of (B,3,H,W) pixels in [-1, 1]: the posterior mean, so cached and live latents agree.

    upcast (SDXL): an fp16 VAE whose config says force_upcast encodes in fp32, as diffusers' SDXL pipeline decodes:
    SDXL's VAE overflows to NaN in fp16 (kohya's --no_half_vae)."""
    if upcast and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
        try:
            return encode_pixels(vae, pixels)
        finally:
            vae.to(torch.float16)
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents.float() - shift) * vae.config.scaling_factor)


def sdxl_text(text_encoder: nn.Module, text_encoder_2: nn.Module, ids: torch.Tensor, ids_2: torch.Tensor) -> SdxlText:
    """SDXL's conditioning from both encoders' token ids (see the module docstring), window by window."""
    def one_window(ids: torch.Tensor, ids_2: torch.Tensor) -> SdxlText:
        out = text_encoder(ids, output_hidden_states=True)
        out_2 = text_encoder_2(ids_2, output_hidden_states=True)
        return SdxlText(hidden=torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), pooled=out_2[0])

    return by_window(one_window, ids, ids_2)


def text_encode_fn(text_encoder: nn.Module, tokenizer, device: torch.device, text_encoder_2: nn.Module | None = None,
                   tokenizer_2=None, max_tokens: int | None = None):
    """captions → hidden states (SDXL: (hidden, pooled)), no gradients: the encode function of a TextEmbeddingCache."""
    @torch.no_grad()
    def encode(captions: list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ids = tokenize(tokenizer, captions, max_tokens).to(device)
        if text_encoder_2 is None:
            return by_window(lambda window: text_encoder(window)[0], ids).float()
        text = sdxl_text(text_encoder, text_encoder_2, ids, tokenize(tokenizer_2, captions, max_tokens).to(device))
        return text.hidden.float(), text.pooled.float()

    return encode
