"""LoRA training: the loss step, the loop on accelerate, checkpoints and resume, and the `stylelora train` command.

Modules:
    step        loss_step: one pure function from a batch to the diffusion loss (min-SNR, noise offset, v-pred)
    models      the trainable bundle (UNet, text encoder, tokenizer, VAE, caches) and the text/latent encoders
    optim       optimizer (AdamW, 8-bit AdamW, Prodigy) and LR scheduler from the config
    checkpoint  atomic checkpoints (adapter, optimizer, scheduler, RNG, sampler position), keep-last-K, resume
    logs        progress bar, metrics CSV, loss curve PNG, TensorBoard when installed
    samples     sample grids from fixed prompts and seeds
    loop        run_training(config) -> adapter path: reads top to bottom
    command     `stylelora train` argument parsing (cheap imports) and the handler
"""
