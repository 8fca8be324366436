"""The "split" blend mode at generation: each adapter reads the prompt with its own text-encoder LoRA and runs
its own cross-attention on that reading, and the adapters' attention outputs are merged per element.

Why: in a plain sum, two adapters' cross-attention compete for one softmax. A character's key delta pulls the
image's attention onto its trigger and away from a style's trigger, so the style fades; and each text-encoder LoRA
also moves the other adapter's trigger (docs/results.md, "Where the character collides", "The split blend mode").
Here the text encoders return the base encoding and one encoding per adapter side by side on the token axis. Every
UNet cross-attention module computes the attention a_0 of the base weights on the base encoding and a_i of adapter
i's LoRA on q, k, v on adapter i's encoding, merges the changes a_i - a_0 per element (`merge`: the largest
increase plus the largest decrease, so what the adapters agree on is not counted twice), applies the output
projection to the merged attention and adds each adapter's LoRA on it. With one adapter that is exactly that
adapter (the stack never splits a single adapter). Every other layer is fused as the ties mode fuses it (per weight
entry, the side that wins the sum keeps its whole push; stack.py). Each adapter reads the prompt with its own
trigger moved after the other adapters' triggers (stylelora.generate.trigger_order), so the blend does not depend on
the order they were typed in.

The result depends on the prompt's activations, so it is no static weight delta and cannot be saved as a LoRA file.
Cost: the text encoders run once more per adapter, and every cross-attention module its attention core once more
per adapter (plus the adapter's LoRA products); docs/results.md, "The split blend mode", has the measurements.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from stylelora.generate import emphasis

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # a cross-attention module's layers that run per adapter
READINGS = ("to_q", "to_k", "to_v")  # of those, the ones that run on every reading (the base's too)
POOLED_FIELDS = emphasis.POOLED_FIELDS  # one vector per prompt (SDXL's add-on embedding): composed instead

Factors = tuple[Any, Any]  # (up (out, r) with weight * alpha/rank folded in, down (r, in)), the layer's dtype
Variant = Mapping[str, Factors]  # one adapter's LoRA on a model: {submodule path: factors}


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


def _low_rank(x: Any, factors: Factors | None) -> Any:
    """x @ (up @ down)^T without forming the full matrix; 0 when the adapter has no LoRA on this projection."""
    if factors is None:
        return 0
    up, down = factors
    return (x @ down.T) @ up.T


@contextmanager
def _lora_added(model: Any, variant: Variant):
    """The model's linear layers computing with the variant's LoRA added (forward hooks, removed afterwards)."""
    with ExitStack() as hooks:
        for path, factors in variant.items():
            hook = model.get_submodule(path).register_forward_hook(
                lambda _module, inputs, output, factors=factors: output + _low_rank(inputs[0], factors))
            hooks.callback(hook.remove)
        yield


def merge(base: Any, outputs: Sequence[Any]) -> Any:
    """base plus the adapters' changes (output_i - base), merged per element: the largest increase any adapter makes
    plus the largest decrease. Where all push the same way that is the largest push (what they agree on is not
    counted twice); where two push opposite ways it is their sum. One adapter: its output exactly."""
    import torch

    if len(outputs) == 1:
        return outputs[0]
    return merge_stacked(torch.stack([base, *outputs]))


def merge_stacked(parts: Any) -> Any:
    """`merge` on one tensor holding the base's output first and each adapter's after it on the first axis (the
    layout the attention core returns, so nothing is copied). With hi and lo the highest and lowest adapter output,
    base + (largest increase) + (largest decrease) is hi + lo - median(hi, lo, base), and that median is the base
    clamped to [lo, hi]: four element-wise passes (one of them finds hi and lo together) instead of ten. On a GPU
    each pass is a kernel launch, and split's launches are what it costs there (docs/results.md, "Cost")."""
    import torch

    base, outputs = parts[0], parts[1:]
    if len(outputs) == 1:
        return outputs[0]
    if len(outputs) == 2 and outputs.device.type == "cpu":
        # The same hi and lo: on a CPU aminmax reduces over a leading axis of two about four times slower than the
        # element-wise max and min do (59 against 14 microseconds on a toy module's attention), and the toy pays it
        # in every cross-attention module at every step. On a GPU one launch beats two (see above).
        highest, lowest = torch.maximum(outputs[0], outputs[1]), torch.minimum(outputs[0], outputs[1])
    else:
        lowest, highest = torch.aminmax(outputs, dim=0)
    # hi - (clamp - lo) rather than hi + lo - clamp: where every adapter raises the element (clamp = lo) it is hi
    # exactly, as the largest increase alone should be.
    return highest.sub_(torch.clamp(base, min=lowest, max=highest).sub_(lowest))


class SplitCrossAttention:
    """An attention processor for one cross-attention module under the split mode. The text states hold
    len(variants) + 1 encodings side by side on the token axis, the base's first; each variant's attention runs on
    its own encoding with its adapter's LoRA on q, k and v, the changes are merged (`merge`) before the output
    projection, and each adapter's LoRA on that projection is added.

    A plain softmax attention module takes the low-rank path: one query and one output projection with the base
    weights, the adapters' LoRA applied as low-rank products, and one attention call over all variants at once, so
    an extra adapter costs its attention core and its LoRA products, not another pass through the module. Any other
    module (custom processors, masks, norms) runs its own processor once per variant, the variant's LoRA added by
    forward hooks."""

    def __init__(self, inner: Any, variants: Sequence[Variant]) -> None:
        self.inner = inner  # the processor this one replaced; `uninstall` puts it back
        self.variants = list(variants)  # per adapter: {projection: low-rank factors}
        self._keys_values: tuple | None = None  # (weakref to the text states, their version, (keys, values))
        self._stacked: dict[str, tuple | None] = {}  # per projection: every adapter's factors, batched (_stack)
        self._is_plain: bool | None = None  # the module's structure does not change: checked on the first call

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 *args: Any, **kwargs: Any) -> Any:
        copies = len(self.variants) + 1
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] % copies:
            raise ValueError("The split blend mode needs the text states its text encoders make (one reading per "
                             "adapter side by side); encode the prompt with the pipeline while the blend is applied, "
                             "or apply the blend with another mode.")
        if self._is_plain is None:
            self._is_plain = self._plain(attn)
        if attention_mask is None and not args and kwargs.get("temb") is None and set(kwargs) <= {"temb"} \
                and self._is_plain and hidden_states.ndim == 3:
            return self._low_rank_path(attn, hidden_states, encoder_hidden_states)
        kwargs["attention_mask"] = attention_mask
        contexts = encoder_hidden_states.chunk(copies, dim=1)
        return self._generic_path(attn, hidden_states, contexts, args, kwargs)

    def _generic_path(self, attn: Any, hidden_states: Any, contexts: Sequence[Any], args: tuple, kwargs: dict) -> Any:
        """The module's own processor once per reading, the variant's LoRA on q, k, v added by hooks, its output
        projection's input captured; then once more with the merged input (and the out LoRA) put in its place."""
        captured: list[Any] = []
        grab = attn.to_out[0].register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
        try:
            self.inner(attn, hidden_states, contexts[0], *args, **kwargs)
            for context, variant in zip(contexts[1:], self.variants):
                with _lora_added(attn, {k: v for k, v in variant.items() if k != "to_out.0"}):
                    self.inner(attn, hidden_states, context, *args, **kwargs)
        finally:
            grab.remove()
        merged = merge(captured[0], captured[1:])
        out_lora = sum(_low_rank(part, v.get("to_out.0")) for part, v in zip(captured[1:], self.variants))
        with ExitStack() as hooks:
            hooks.callback(attn.to_out[0].register_forward_pre_hook(lambda _module, _inputs: (merged,)).remove)
            hooks.callback(attn.to_out[0].register_forward_hook(lambda _m, _i, output: output + out_lora).remove)
            return self.inner(attn, hidden_states, contexts[0], *args, **kwargs)

    def _plain(self, attn: Any) -> bool:
        """Whether the module is plain softmax attention, which the low-rank path computes exactly."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        head_dim = attn.to_q.out_features // attn.heads
        return (isinstance(self.inner, (AttnProcessor2_0, AttnProcessor))
                and attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
                and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
                and attn.rescale_output_factor == 1.0 and abs(attn.scale - head_dim ** -0.5) < 1e-12)

    def _low_rank_path(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any) -> Any:
        """The base query and output projections once; every adapter's LoRA on them as batched products (one
        launch for all adapters, not two per adapter); one attention call over all readings. Few launches matter:
        on a GPU this path is bound by them, not by its arithmetic (docs/results.md, "Cost")."""
        import torch
        import torch.nn.functional as F

        adapters, shape = len(self.variants), hidden_states.shape
        query = attn.to_q(hidden_states).unsqueeze(0)  # (1, batch, tokens, channels)
        q_lora = self._stack("to_q")
        if q_lora is None:
            queries = query.expand(adapters + 1, -1, -1, -1)
        else:  # the base's entry is zero, so one product added to the broadcast query gives every reading's queries
            ups, downs = q_lora
            rows = hidden_states.reshape(-1, shape[-1])
            low = (rows @ downs.flatten(0, 1).T).view(rows.shape[0], adapters + 1, -1).transpose(0, 1)
            queries = torch.baddbmm(query.flatten(1, 2), low, ups.transpose(1, 2)).view(adapters + 1, *query.shape[1:])
        keys, values = self._cached_keys_values(attn, encoder_hidden_states)
        attended = F.scaled_dot_product_attention(_heads(attn, queries.flatten(0, 1)), keys, values)
        parts = attended.transpose(1, 2).reshape(adapters + 1, *query.shape[1:3], -1).to(query.dtype)
        out = attn.to_out[0](merge_stacked(parts))  # the base projection once, on the merged attention
        out_lora = self._stack("to_out.0")
        if out_lora is not None:  # sum_i part_i D_i^T U_i^T = [part_1 D_1^T | part_2 D_2^T | ...] [U_1 | U_2 | ...]^T
            ups_side_by_side, downs = out_lora
            low = torch.bmm(parts[1:].flatten(1, 2), downs.transpose(1, 2))  # (adapters, rows, rank)
            out.view(-1, out.shape[-1]).addmm_(low.transpose(0, 1).reshape(low.shape[1], -1), ups_side_by_side.T)
        return attn.to_out[1](out)

    def _stack(self, projection: str) -> tuple | None:
        """Every adapter's factors on `projection`, stacked once per blend (`_stack_factors`), or None where none
        has any. The projections that run on every reading get a zero entry first, for the base's reading; the
        output projection's ups are laid side by side, (out, adapters * rank), so one product sums what they add."""
        if projection not in self._stacked:
            factors = [variant.get(projection) for variant in self.variants]
            present = [f for f in factors if f is not None]
            stacked = None
            if present:
                rank = max(f[1].shape[0] for f in present)
                if projection in READINGS:
                    stacked = _stack_factors([None, *factors], rank)
                else:
                    ups, downs = _stack_factors(factors, rank)
                    stacked = (ups.transpose(0, 1).flatten(1), downs)
            self._stacked[projection] = stacked
        return self._stacked[projection]

    def _on_readings(self, attn: Any, projection: str, readings: Any) -> Any:
        """The projection of every reading (stacked on the batch axis, the base's first) with each adapter's LoRA
        on its own reading: the base weights in one product, the LoRAs in two more for all adapters."""
        import torch

        projected = attn.get_submodule(projection)(readings)
        stacked = self._stack(projection)
        if stacked is None:
            return projected
        ups, downs = stacked
        by_reading = readings.view(len(downs), -1, readings.shape[-1])
        low = torch.bmm(by_reading, downs.transpose(1, 2))
        projected.view(len(ups), -1, projected.shape[-1]).baddbmm_(low, ups.transpose(1, 2))
        return projected

    def _cached_keys_values(self, attn: Any, encoder_hidden_states: Any) -> tuple[Any, Any]:
        """Every variant's keys and values by head. A pipeline passes the same text states to every sampling step,
        so they are computed once per image: they depend on nothing else, and they are a third of the extra
        matmuls this mode makes. Dropped when the text states are freed (a weak reference), so nothing is kept
        between images."""
        import weakref

        import torch

        cached = self._keys_values
        if cached is not None and cached[0]() is encoder_hidden_states and cached[1] == encoder_hidden_states._version:
            return cached[2]
        readings = torch.cat(encoder_hidden_states.chunk(len(self.variants) + 1, dim=1))  # (readings * batch, ...)
        result = tuple(_heads(attn, self._on_readings(attn, projection, readings)) for projection in ("to_k", "to_v"))
        # A replaced entry's weak reference dies with it, and a dead reference calls nobody: an older image's text
        # states, freed later, cannot drop a newer image's keys.
        forget = weakref.ref(encoder_hidden_states, lambda _gone: setattr(self, "_keys_values", None))
        self._keys_values = (forget, encoder_hidden_states._version, result)
        return result


def _stack_factors(factors: Sequence[Factors | None], rank: int) -> tuple[Any, Any]:
    """(ups (adapters, out, rank), downs (adapters, rank, in)): each adapter's factors, zero-padded to `rank`; zeros
    for an adapter without them."""
    up, down = next(f for f in factors if f is not None)
    ups = up.new_zeros(len(factors), up.shape[0], rank)
    downs = down.new_zeros(len(factors), rank, down.shape[1])
    for index, pair in enumerate(factors):
        if pair is not None:
            ups[index, :, : pair[0].shape[1]] = pair[0]
            downs[index, : pair[1].shape[0]] = pair[1]
    return ups, downs


def _heads(attn: Any, stacked: Any) -> Any:
    """Projections stacked on the batch axis, split into heads: (rows, heads, tokens, head_dim), a view."""
    return stacked.view(stacked.shape[0], stacked.shape[1], attn.heads, -1).transpose(1, 2)


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


def install_text_encoder(model: Any, variants: Sequence[Variant],
                         reorders: Sequence[Callable[[Any], Any] | None] | None = None,
                         shares: Sequence[float] | None = None, side_by_side: bool = True) -> None:
    """The text encoder returns the base encoding and each variant's side by side on the token axis (every layer's
    hidden states likewise); pooled vectors are merged as the attention is (`merge`). reorders[i], where given,
    rearranges the token ids variant i reads (stylelora.generate.trigger_order: its trigger after the others').
    shares[i], where given, moves variant i's reading that share of the way from the base's: base + share * (own -
    base) (the reading dial, stylelora.generate.reading_dial). side_by_side=False returns one reading instead, the
    base's plus every variant's moved change, in every field (no reorders: the changes must line up token by token)."""
    import torch

    original = type(model).forward
    reorders = list(reorders or [None] * len(variants))
    if not side_by_side and any(reorder is not None for reorder in reorders):
        raise ValueError("One summed reading needs every variant to read the prompt as typed (no reorders).")
    shares = list(shares) if shares is not None else None

    def moved(base: Any, own: Any, index: int) -> Any:
        return own if shares is None or shares[index] == 1 else base + shares[index] * (own - base)

    def forward(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _token_ids(model, args, kwargs, len(variants) + 1 if side_by_side else 1)
        base = emphasis.weigh(model, args[0], original(model, *args, **kwargs))
        outputs = []
        for variant, reorder in zip(variants, reorders):
            own_args = args if reorder is None or args[0] is None else (reorder(args[0]),) + tuple(args[1:])
            if not variant and own_args is args:  # no LoRA here and the prompt as typed: the base's reading
                outputs.append(base)
                continue
            with _lora_added(model, variant):  # each reading weighs the prompt's emphasis on its own token order
                outputs.append(emphasis.weigh(model, own_args[0], original(model, *own_args, **kwargs)))
        fields = {}
        for key, value in base.items():
            if isinstance(value, tuple):  # one tensor per layer
                layers = [[moved(b, o[key][n], i) for i, o in enumerate(outputs)] for n, b in enumerate(value)]
                fields[key] = tuple(_combined(b, own, key, side_by_side) for b, own in zip(value, layers))
            elif torch.is_tensor(value):
                fields[key] = _combined(value, [moved(value, o[key], i) for i, o in enumerate(outputs)], key,
                                        side_by_side)
        return type(base)(**fields)

    setattr(forward, emphasis.WEIGHS_EMPHASIS, True)  # each reading above weighs the prompt's (word:1.2) itself
    model.forward = forward  # an instance attribute: nn.Module.__call__ finds it first


def _combined(base: Any, readings: list[Any], key: str, side_by_side: bool) -> Any:
    """The variants' readings of one output field with the base's: side by side on the token axis (pooled vectors
    merged), or one reading, the base's plus each variant's change."""
    import torch

    if not side_by_side:
        return base + sum(reading - base for reading in readings) if readings else base
    if key in POOLED_FIELDS:
        return merge(base, readings)
    return torch.cat([base, *readings], dim=1)


def uninstall_text_encoder(model: Any) -> None:
    model.__dict__.pop("forward", None)
