"""stylelora: LoRA trainer and adapter-blending app for Stable Diffusion."""
from stylelora.quiet import hide_noise_notices as _hide_noise_notices

__version__ = "0.1.0"

# Once, for every way in (the CLI, `python -m stylelora.train.command`, app.py, the benchmarks, a library user):
# cheap, as it imports nothing but logging.
_hide_noise_notices()
