"""LoRA injection (peft), kohya/diffusers key formats, adapter file io and metadata.

Modules:
    layers   which Linear/Conv2d layers a live model has, by exact path (peft wrappers resolved)
    inject   add_lora: presets "attn" / "kohya" / "locon" on the UNet, CLIP projections on the text encoder
    formats  peft state dict <-> kohya `lora_unet_*` / `lora_te_*` keys, name map from named_modules
    io       save_adapter / load_adapter_state / load_adapter_into, kohya_metadata, sshs hashes
    sd15     SD1.5's published architecture on the meta device, and the kohya key sets of each preset
"""
