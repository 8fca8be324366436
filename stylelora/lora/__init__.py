"""Adapter files and LoRA weights: injection (peft), key formats, reading, writing, inspecting, blending.

Modules:
    layers        which Linear/Conv2d layers a live model has, by exact path (peft wrappers resolved)
    inject        add_lora: presets "attn" / "kohya" / "locon" on the UNet, CLIP projections on the text encoder
    formats       peft state dict <-> kohya `lora_unet_*` / `lora_te_*` keys, name map from named_modules; the one
                  grouping of kohya keys by module (group_kohya_modules) and by model (split_kohya_state)
    io            save_adapter / load_adapter_state / load_adapter_into, kohya_metadata, sshs hashes
    adapter_file  read any layout we accept (kohya, diffusers-peft, plain peft) as kohya keys; header-only checks
    lycoris       LyCORIS LoHa / LoKr / LoCon-Tucker modules rewritten exactly as the plain LoRA of the same change
    spec          AdapterSpec (which adapter file at which weight) and "FILE[:W[:TE_W]]" parsing
    inspect       what an adapter file is: layout, base family, ranks, modules, trigger words, training, hashes
    blend         a weighted mix of adapters written as one kohya file, exact or truncated-SVD at a chosen rank
    command       the `stylelora blend | inspect` CLI
    sd15          SD1.5's published architecture on the meta device, and the kohya key sets of each preset
    sdxl          the same for SDXL (UNet, CLIP-L, OpenCLIP bigG); lora_te1 / lora_te2 prefixes
    sai_names     diffusers <-> SAI/SGM UNet module names (input_blocks / middle_block / output_blocks), from config
    components    which pipeline models carry LoRA and under which prefix and names (SD1.x/2.x vs SDXL), and the
                  one-sentence refusal of an adapter made for the other family
"""
