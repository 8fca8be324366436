"""The "split" blend mode at generation: each adapter reads the prompt with its own text-encoder LoRA and runs
its own cross-attention on that reading, and the changes each adapter makes to a cross-attention output add up.

Why: in a plain sum, two adapters' cross-attention compete for one softmax. A character's key delta pulls the
image's attention onto its trigger and away from a style's trigger, so the style fades; and each text-encoder LoRA
also moves the other adapter's trigger (docs/results.md, "Where the character collides", "The split blend mode").
Here the text encoders return the base encoding and one encoding per adapter side by side on the token axis, and
every UNet cross-attention module returns O_0 + sum_i (O_i - O_0): O_0 the base layer on the base encoding, O_i the
layer with adapter i's projections (its LoRA on q, k, v and out, if any) on adapter i's encoding. With one adapter
that is exactly that adapter (the stack never splits a single adapter). The output projection is affine, so the
combination is exact whichever projections an adapter has. Every other layer is the plain fused sum.

The result depends on the prompt's activations, so it is no static weight delta and cannot be saved as a LoRA file.
Cost: the text encoders run once per adapter more, and every cross-attention layer runs once per adapter more.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # a cross-attention module's layers that run per adapter
POOLED_FIELDS = ("pooler_output", "text_embeds")  # one vector per prompt (SDXL's add-on embedding): composed instead

Variant = Mapping[str, Any]  # {submodule path: the full weight (original + this adapter's delta), layer dtype}


def cross_attention_modules(unet: Any) -> list[str]:
    """The paths of the UNet's cross-attention modules (those that attend to the text encoder's states)."""
    return [name for name, module in unet.named_modules() if getattr(module, "is_cross_attention", False)]


def split_parts(unet: Any, path: str) -> tuple[str, str] | None:
    """(cross-attention module, projection) for a UNet layer path that runs per adapter, else None."""
    for projection in PROJECTIONS:
        if path.endswith("." + projection):
            parent = path[: -len(projection) - 1]
            if getattr(unet.get_submodule(parent), "is_cross_attention", False):
                return parent, projection
    return None


@contextmanager
def _weights(model: Any, variant: Variant):
    """The model's layers computing with the variant's weights for the duration (tensor swaps, no copies)."""
    with ExitStack() as swaps:
        for path, weight in variant.items():
            layer = model.get_submodule(path)
            original = layer.weight.data
            layer.weight.data = weight
            swaps.callback(setattr, layer.weight, "data", original)
        yield


def combine(base: Any, outputs: Sequence[Any]) -> Any:
    """base + sum_i (output_i - base): each adapter's change to the base output, added up."""
    total = base
    for output in outputs:
        total = total + (output - base)
    return total


class SplitCrossAttention:
    """An attention processor for one cross-attention module under the split mode. The text states hold
    len(variants) + 1 encodings side by side on the token axis, the base's first; the module's own processor runs
    once on each, the variant's weights swapped in, and the adapters' changes to the output add up."""

    def __init__(self, inner: Any, variants: Sequence[Variant]) -> None:
        self.inner = inner  # the processor this one replaced; `uninstall` puts it back
        self.variants = list(variants)

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, *args: Any,
                 **kwargs: Any) -> Any:
        contexts = encoder_hidden_states.chunk(len(self.variants) + 1, dim=1)
        base = self.inner(attn, hidden_states, contexts[0], *args, **kwargs)
        outputs = []
        for context, variant in zip(contexts[1:], self.variants):
            with _weights(attn, variant):
                outputs.append(self.inner(attn, hidden_states, context, *args, **kwargs))
        return combine(base, outputs)


def install_attention(unet: Any, parent: str, variants: Sequence[Variant]) -> None:
    """Run the cross-attention module at `parent` split (replacing the variants of an earlier install)."""
    attn = unet.get_submodule(parent)
    inner = attn.processor.inner if isinstance(attn.processor, SplitCrossAttention) else attn.processor
    attn.set_processor(SplitCrossAttention(inner, variants))


def uninstall_attention(unet: Any, parent: str) -> None:
    attn = unet.get_submodule(parent)
    if isinstance(attn.processor, SplitCrossAttention):
        attn.set_processor(attn.processor.inner)


def _token_ids(model: Any, args: tuple, kwargs: dict, copies: int) -> tuple[tuple, dict]:
    """The call's token ids cut back to one prompt's length: diffusers pads a negative prompt to the length of
    the positive encoding, which under the split mode is `copies` encodings long."""
    if "input_ids" in kwargs:
        ids, rest = kwargs.pop("input_ids"), args
    else:
        ids, rest = args[0], args[1:]
    if ids is not None and ids.shape[1] > model.config.max_position_embeddings and ids.shape[1] % copies == 0:
        ids = ids[:, : ids.shape[1] // copies]
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"][:, : ids.shape[1]]
    return (ids,) + tuple(rest), kwargs


def install_text_encoder(model: Any, variants: Sequence[Variant]) -> None:
    """The text encoder returns the base encoding and each variant's side by side on the token axis (every layer's
    hidden states likewise); pooled vectors are composed as p_0 + sum_i (p_i - p_0)."""
    import torch

    original = type(model).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _token_ids(model, args, kwargs, len(variants) + 1)
        base = original(model, *args, **kwargs)
        outputs = []
        for variant in variants:
            if not variant:  # this adapter has no LoRA here: its reading is the base's
                outputs.append(base)
                continue
            with _weights(model, variant):
                outputs.append(original(model, *args, **kwargs))
        fields = {}
        for key, value in base.items():
            values = [value] + [output[key] for output in outputs]
            if key in POOLED_FIELDS:
                fields[key] = combine(value, values[1:])
            elif isinstance(value, tuple):
                fields[key] = tuple(torch.cat(layer, dim=1) for layer in zip(*values))
            elif torch.is_tensor(value):
                fields[key] = torch.cat(values, dim=1)
        return type(base)(**fields)

    model.forward = forward  # an instance attribute: nn.Module.__call__ finds it first


def uninstall_text_encoder(model: Any) -> None:
    model.__dict__.pop("forward", None)
