"""Owns which third-party notices stylelora hides, and why each is noise for its users.

Two are printed on every command once the test extras are installed, and both ask for an install nothing needs:
- bitsandbytes (for --quantize-base and 8-bit AdamW) looks for an optional `kernels` package for a faster CPU 4-bit
  product and falls back to its own, which is what runs (measured: nf4 forward and backward work on CPU);
- transformers says a CLIP/SigLIP image processor would prefer torchvision; stylelora uses no image processor.
One is printed for every single-file base: diffusers' ModelMixin.to warns on any cast to a dtype that modules
"should be kept in float32", even when the model keeps none (`[]`: SD/SDXL UNets and VAEs), so the warning names no
module and there is nothing to act on. Only that empty-list form is hidden; a list that names modules still shows.
Everything else these libraries log is left as it is.
"""
from __future__ import annotations

import logging

HIDDEN = {  # logger name: text that marks the notice
    "bitsandbytes.backends.cpu.ops": "from kernels-community",
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    "diffusers.models.modeling_utils": "should be kept in float32: [].",
}


class _WithoutNotice(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def hide_noise_notices() -> None:
    """Filter the notices above out of their loggers (cheap: imports nothing; idempotent)."""
    for name, text in HIDDEN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutNotice) and f.text == text for f in logger.filters):
            logger.addFilter(_WithoutNotice(text))
