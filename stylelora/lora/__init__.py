"""LoRA injection (peft), kohya/diffusers key formats, adapter file io and metadata."""
