"""Generation and blending: the fused adapter stack, prompts with <lora:...> tags, PNG metadata, grids, blend, inspect.

Submodules import torch/diffusers lazily where they can, so `stylelora --help` and the app's startup stay fast.
"""
