"""stylelora: LoRA trainer and adapter-blending app for Stable Diffusion."""
__version__ = "0.1.0"
