"""Generation: the pipeline, the fused adapter stack, prompts with <lora:...> tags, samplers, PNG metadata, X/Y grids.

Adapter files themselves (reading, naming, inspecting, blending) live in stylelora.lora; this package applies them.
Submodules import torch/diffusers lazily where they can, so `stylelora --help` and the app's startup stay fast.
"""
