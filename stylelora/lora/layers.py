"""Finds the layers a LoRA can adapt (Linear/Conv2d, peft wrappers resolved) in live models, by exact path."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn


def _is_peft_wrapper(module: nn.Module) -> bool:
    # Imported here so that a model without adapters never needs peft to be walked.
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def adaptable_layers(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield (path, layer) for every Linear/Conv2d under `root`, paths relative to the model.

    A peft-wrapped layer is reported once, under the path the base model had before injection
    (`...to_q`, not `...to_q.base_layer` nor `...to_q.lora_A.default`), so that names stay the same
    whether or not an adapter is already attached.
    """
    for child_name, child in root.named_children():
        path = f"{prefix}.{child_name}" if prefix else child_name
        if _is_peft_wrapper(child):
            yield path, child.get_base_layer()
        elif isinstance(child, (nn.Linear, nn.Conv2d)):
            yield path, child
        else:
            yield from adaptable_layers(child, path)


def is_wide_conv(layer: nn.Module) -> bool:
    """True for a Conv2d with a kernel larger than 1x1: kohya trains those only with a separate conv rank."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def layers_inside_blocks(model: nn.Module, block_class_names: Iterable[str]) -> dict[str, nn.Module]:
    """Adaptable layers living inside modules whose class name is one of `block_class_names`.

    Matching on class names (not isinstance) is what kohya sd-scripts does, so our presets pick the same
    layers it does for the same diffusers UNet.
    """
    wanted = set(block_class_names)
    found: dict[str, nn.Module] = {}
    for block_path, block in model.named_modules():
        if type(block).__name__ in wanted:
            found.update(adaptable_layers(block, block_path))
    return found
