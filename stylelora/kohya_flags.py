"""Owns the table of kohya sd-scripts' train_network.py flags and what stylelora takes in their place: the CLI names it
for a kohya flag typed to `stylelora train`, and the config for a kohya key in run.toml."""
from __future__ import annotations

from stylelora.data.scan import CAPTION_EXTENSIONS

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
    "caption-extension": "no option: an image's caption is the file of its name ending in "
                         + " or ".join(CAPTION_EXTENSIONS) + " (the first found)",
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
                    "--loraplus-lr-ratio (loraplus_lr_ratio), --rank-dropout / --module-dropout, --down-lr-weight / --mid-lr-weight / --up-lr-weight / "
                    "--block-lr-zero-threshold, --block-dims / --block-alphas / --conv-block-dims / "
                    "--conv-block-alphas (the same names)",
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
}
