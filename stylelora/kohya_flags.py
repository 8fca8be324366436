"""Owns the table of kohya sd-scripts' train_network.py flags and what stylelora takes in their place: the CLI names it
for a kohya flag typed to `stylelora train`, and the config for a kohya key in run.toml."""
from __future__ import annotations

from stylelora.data.scan import CAPTION_EXTENSIONS

CAPTION_FILES = ("no option: an image's caption is the file of its name ending in " + " or ".join(CAPTION_EXTENSIONS)
                 + " (the first found)")

# kohya sd-scripts train_network.py flags (keys with '-' for '_', as either spelling is typed) and what to use here.
# Named in the error, not accepted silently: an alias would take a value in kohya's sense where ours differs (kohya's
# --learning_rate sets both networks' rates, --resolution takes "512,512"), and the user should learn our flag.
KOHYA_FLAGS = {
    "train-data-dir": "DATA_DIR, the first argument (stylelora train DATA_DIR ...)",
    "reg-data-dir": "--reg-dir",
    "pretrained-model-name-or-path": "--base",
    "output-dir": "--output",
    "config-file": "--config run.toml (this tool's own keys; see docs/training.md)",
    "shuffle-caption": "--shuffle-tags",
    "caption-extension": CAPTION_FILES,
    "caption-dropout-rate": "--caption-dropout",
    "caption-tag-dropout-rate": "--tag-dropout",
    "enable-wildcard": "--caption-variants",
    "network-dim": "--rank",
    "network-alpha": "--alpha",
    "network-module": "no option: a LoRA is what trains (--unet-targets locon adds the 3x3 convolutions)",
    "network-train-unet-only": "--no-text-encoder",
    "network-weights": "--network-weights",  # the same flag; listed so that run.toml's network_weights finds it
    "dim-from-weights": "--dim-from-weights",
    "network-dropout": "--network-dropout",
    "network-args": "a flag each: --conv-rank / --conv-alpha (conv_dim, conv_alpha, with --unet-targets locon), "
                    "--loraplus-lr-ratio (loraplus_lr_ratio), --rank-dropout / --module-dropout, --down-lr-weight / "
                    "--mid-lr-weight / --up-lr-weight / --block-lr-zero-threshold, --block-dims / --block-alphas / "
                    "--conv-block-dims / --conv-block-alphas (the same names)",
    "learning-rate": "--unet-lr (and --text-encoder-lr for the text encoder)",
    "lr": "--unet-lr (and --text-encoder-lr for the text encoder)",
    "lr-warmup-steps": "--warmup-steps",
    "optimizer-type": "--optimizer",
    "optimizer-args": "--optimizer-args",  # the same flag; listed so that run.toml's optimizer_args finds it
    "gradient-accumulation-steps": "--grad-accum",
    "max-train-steps": "--steps",
    "max-steps": "--steps",
    "max-train-epochs": "--epochs",
    "train-batch-size": "--batch-size",
    "mixed-precision": "--precision",
    "save-every-n-steps": "--save-every",
    "save-last-n-steps-state": "--keep-checkpoints",
    "sample-every-n-steps": "--sample-every",
    "enable-bucket": "no option: buckets are on unless --no-bucketing",
    "bucket-no-upscale": "--no-upscale",
    "bucket-reso-steps": "--bucket-step",
    "min-bucket-reso": "--min-side",
    "max-bucket-reso": "--max-side",
    "flip-aug": "--flip",
    "cache-latents": "--cache ram (the default)",
    "cache-latents-to-disk": "--cache disk",
    "v2": "no option: the base family is read from the model (--family overrides it)",
    "v-parameterization": "no option: the base family is read from the model (--family overrides it)",
    "training-comment": "--description",
    "caption-prefix": "--trigger (words put in front of every caption)",
    "caption-extention": CAPTION_FILES,  # sd-scripts' old spelling, which it still takes
    "use-8bit-adam": "--optimizer adamw8bit",
    "use-lion-optimizer": "no option: --optimizer adamw, adamw8bit or prodigy",
    "save-last-n-steps": "--keep-checkpoints",
    "save-last-n-epochs": "--keep-checkpoints (with --save-every-n-epochs)",
    "save-last-n-epochs-state": "--keep-checkpoints (with --save-every-n-epochs)",
    "save-state": "no option: every checkpoint (--save-every, --save-every-n-epochs) holds the training state that "
                  "--resume continues from",
    "save-model-as": "no option: adapters are .safetensors files (--format kohya, the default, or diffusers)",
    "use-safetensors": "no option: adapters are .safetensors files",
    "xformers": "no option: diffusers runs PyTorch's scaled-dot-product attention, with its memory-efficient "
                "kernels, by itself",
    "sdpa": "no option: diffusers runs PyTorch's scaled-dot-product attention by itself",
    "mem-eff-attn": "no option: diffusers runs PyTorch's scaled-dot-product attention, with its memory-efficient "
                    "kernels, by itself",
    "full-fp16": "--precision fp16 (the frozen base in fp16; the LoRA trains in fp32, where its small updates last)",
    "full-bf16": "--precision bf16 (the frozen base in bf16; the LoRA trains in fp32, where its small updates last)",
    "fp8-base": "--quantize-base nf4 or int8 (bitsandbytes)",
    "no-half-vae": "no option: an fp16 SDXL VAE whose config says force_upcast encodes in fp32",
    "max-data-loader-n-workers": "no option: latents are cached (--cache ram or disk), so batches come from memory",
    "persistent-data-loader-workers": "no option: latents are cached (--cache ram or disk), so batches come from "
                                      "memory",
    "cache-text-encoder-outputs": "--no-text-encoder (a frozen text encoder's outputs are cached with --cache ram)",
    "log-with": "no option: metrics.csv, loss.png and TensorBoard's logs (when tensorboard is installed) are in "
                "the run folder",
    "logging-dir": "no option: metrics.csv, loss.png and TensorBoard's logs are in the run folder (--output)",
    "dataset-config": "no option: DATA_DIR (kohya <repeats>_<name> folders) and --reg-dir, one run each",
    "validate-every-n-steps": "--validate-every",
    "caption-suffix": "no option: write the words into the caption files (--trigger puts words in front of every "
                      "caption)",
    "weighted-captions": "no option: captions train as written; (word:1.2) emphasis is read when generating",
    "keep-tokens-separator": "--keep-tokens N (the first N comma-separated tags stay in place)",
    "secondary-separator": "no option: tags are separated by commas (--shuffle-tags, --tag-dropout)",
    "caption-dropout-every-n-epochs": "--caption-dropout (a share of the samples in every epoch)",
    "token-warmup-min": "no option: every caption trains whole from the first step",
    "token-warmup-step": "no option: every caption trains whole from the first step",
    "color-aug": "no option: colors are what a style is made of, so they train as they are (--flip mirrors)",
    "face-crop-aug-range": "no option: --random-crop (bucketed center crops by default)",
    "lowram": "no option: the base loads once, in the precision it trains in (--quantize-base nf4 shrinks it)",
    "highvram": "no option: latents are cached (--cache ram or disk) and the VAE freed when nothing decodes again",
    "fused-backward-pass": "no option: --optimizer adamw8bit and --gradient-checkpointing save memory",
    "no-metadata": "no option: every file carries kohya's ss_* and the model spec's metadata, which loaders read",
    "adaptive-noise-scale": "no option: --noise-offset (with --noise-offset-random-strength)",
    "v-pred-like-loss": "no option: the loss is the base's prediction type's (--min-snr-gamma weighs it)",
    "scale-v-pred-loss-like-noise-pred": "no option: --min-snr-gamma weighs a v-prediction base's loss",
    "immiscible-noise": "no option: each sample's noise is drawn on its own (--multires-noise-iterations, "
                        "--ip-noise-gamma)",
    "network-train-text-encoder-only": "no option: the UNet always trains (--no-text-encoder trains it alone)",
    "sample-sampler": "no option: sample grids draw with the base's own scheduler (stylelora grid compares "
                      "samplers on a finished adapter)",
    "metadata-title": "--output-name (the file's name and its model-spec title)",
    "metadata-description": "--description",
    "metadata-license": "--license",
    "metadata-author": "--author",
    "metadata-tags": "--tags",
    "masked-loss": "--alpha-mask (the masks are each image's alpha channel; a folder of mask images is not read)",
}
