"""How a pipeline's text encoders read a prompt for one draw, as A1111 reads it: emphasis weights
(stylelora.generate.emphasis), prompts longer than one 77-token window, and clip skip (the layer read).

Why: diffusers cuts a prompt at 75 tokens, and A1111 and ComfyUI do not: they read it in windows of 75 tokens (each
with its own start and end token) and lay the windows' readings side by side, so every word reaches the UNet.
`BREAK` starts a new window, and a full window ends after its last comma when that comma is among its last 20
tokens (A1111's default), so a phrase is not cut in two. The pooled vector (SDXL) is the first window's, as both
tools take it. The prompt and its negative are padded to the same number of windows with empty ones.

For one draw `applied` puts a tokenizer in the pipeline that returns these windows' token ids for the draw's prompts
(every other call goes to the real one), and a text-encoder forward that encodes the windows one at a time. A prompt
with no emphasis syntax that fits one window changes nothing: the pipeline draws it exactly as before. Clip skip N
runs the text encoder without its last N - 1 layers, so its final layer norm reads the N-th from the end, as A1111
and kohya's --clip_skip read it (`skip_last_layers`, which training uses for a whole run).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

from stylelora.generate import emphasis

COMMA_BACKTRACK = 20  # A1111's "comma padding backtrack": how near a window's end its last comma may end it
ENCODER_PAIRS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))  # SDXL has the second pair


class Row(NamedTuple):
    """One window as the pipeline's tokenizer gives it (start, tokens, end, padding), with each token's weight."""

    ids: list[int]
    weights: list[float]
    mask: list[int]  # 1 on the start, the tokens and the end; 0 on padding, as the tokenizer's attention mask


def windows(tokenizer: Any, prompt: str) -> list[tuple[list[int], list[float]]]:
    """The prompt's tokens in windows of (model_max_length - 2), each as (ids, weights) without start and end."""
    size = tokenizer.model_max_length - 2
    comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
    out: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in emphasis.parse(prompt):
        if (text, weight) == emphasis.BREAK:
            out.append((ids, weights))
            ids, weights = [], []
            continue
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if len(ids) == size:
                # A comma arriving at a full window starts the next one; A1111 backtracks only for other tokens.
                commas = [i for i, known in enumerate(ids) if known == comma] if token != comma else []
                cut = commas[-1] + 1 if commas and size - commas[-1] <= COMMA_BACKTRACK else size
                out.append((ids[:cut], weights[:cut]))
                ids, weights = ids[cut:], weights[cut:]
            ids.append(token)
            weights.append(weight)
    if ids or not out:
        out.append((ids, weights))
    return out


def rows(tokenizer: Any, prompt: str, count: int) -> list[Row]:
    """The prompt's windows as the rows a pipeline's tokenizer makes (start, tokens, end, padding to
    model_max_length), padded with empty windows to `count`."""
    return _padded_rows(tokenizer, windows(tokenizer, prompt), count)


def _padded_rows(tokenizer: Any, found: list[tuple[list[int], list[float]]], count: int) -> list[Row]:
    out = []
    for ids, weights in found + [([], [])] * (count - len(found)):
        padding = tokenizer.model_max_length - 2 - len(ids)
        out.append(Row(ids=[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding,
                       weights=[1.0, *weights, 1.0] + [1.0] * padding, mask=[1] * (len(ids) + 2) + [0] * padding))
    return out


def _changes_nothing(pairs: Sequence[tuple[Any, Any]], prompts: Sequence[str]) -> bool:
    return all(emphasis.plain_text(prompt) == prompt for prompt in prompts) and all(
        len(tokenizer(prompt, add_special_tokens=False).input_ids) <= tokenizer.model_max_length - 2
        for _, tokenizer in pairs for prompt in prompts)


@contextmanager
def applied(pipe: Any, prompts: Sequence[str], clip_skip: int = 1) -> Iterator[None]:
    """While drawing `prompts` (pass them to the pipeline as typed, negative prompts too), the pipeline's text
    encoders read them as A1111 does, from the `clip_skip`-th layer from the end (A1111's Clip skip; SD 1.x/2.x:
    SDXL reads its encoders' layer before the last already, and A1111 ignores the setting there). Nothing changes
    for prompts without emphasis that fit one window, at clip skip 1."""
    pairs = [(tokenizer_name, getattr(pipe, encoder_name, None), getattr(pipe, tokenizer_name, None))
             for encoder_name, tokenizer_name in ENCODER_PAIRS]
    pairs = [(name, encoder, tokenizer) for name, encoder, tokenizer in pairs
             if encoder is not None and tokenizer is not None]
    prompts = list(dict.fromkeys(prompts))
    with ExitStack() as undo:
        if clip_skip > 1 and getattr(pipe, "text_encoder_2", None) is None:
            undo.enter_context(_last_layers_skipped(pipe.text_encoder, clip_skip - 1))
        if not _changes_nothing([(encoder, tokenizer) for _, encoder, tokenizer in pairs], prompts):
            _read_in_windows(undo, pipe, pairs, prompts)
        yield


def _read_in_windows(undo: ExitStack, pipe: Any, pairs: list[tuple[str, Any, Any]], prompts: list[str]) -> None:
    """Install, until `undo` closes, each tokenizer's stand-in and each encoder's weighing and window forwards."""
    # "": the negative prompt diffusers reads where none is given (training samples), read as empty windows too
    prompts = list(dict.fromkeys([*prompts, ""]))
    found = {(name, prompt): windows(tokenizer, prompt) for name, _, tokenizer in pairs for prompt in prompts}
    count = max(len(windowed) for windowed in found.values())
    for name, encoder, tokenizer in pairs:
        by_prompt = {prompt: _padded_rows(tokenizer, found[name, prompt], count) for prompt in prompts}
        every_row = [row for windowed in by_prompt.values() for row in windowed]
        weights = None
        if any(weight != 1.0 for row in every_row for weight in row.weights):
            # every row, weighted or not: a plain row is read plain, not as the weighted row it resembles
            weights = undo.enter_context(emphasis.weighing(encoder, {tuple(row.ids): row.weights for row in every_row}))
            if not getattr(encoder.__dict__.get("forward"), emphasis.WEIGHS_EMPHASIS, False):
                undo.enter_context(_forward(encoder, lambda inner, model=encoder: _weighing(model, inner)))
        undo.enter_context(_attribute(pipe, name, _WindowTokenizer(tokenizer, by_prompt, weights)))
        if count > 1:
            undo.enter_context(_forward(encoder, lambda inner, model=encoder: _by_window(model, inner)))


@contextmanager
def _last_layers_skipped(encoder: Any, count: int) -> Iterator[None]:
    restore = skip_last_layers(encoder, count)
    try:
        yield
    finally:
        restore()


def skip_last_layers(encoder: Any, count: int) -> Callable[[], None]:
    """The encoder runs without its last `count` layers from now on, so its final layer norm reads the layer before
    them, as A1111's Clip skip and kohya's --clip_skip do; returns the function that puts them back. The layers stay
    in the module tree (the split mode hooks modules by path), and a LoRA added now leaves them out
    (stylelora.lora.inject.text_encoder_lora_targets)."""
    from stylelora.lora.inject import encoder_layer_list

    _, owner = encoder_layer_list(encoder)
    layers = owner.layers
    if count >= len(layers):
        raise ValueError(f"Clip skip {count + 1} leaves none of the text encoder's {len(layers)} layers: use "
                         f"{len(layers)} at most (2 is the usual value).")
    owner.layers = _FirstLayers(layers, len(layers) - count)

    def restore() -> None:
        owner.layers = layers

    return restore


def _FirstLayers(layers: Any, count: int) -> Any:  # noqa: N802 (reads as the class it makes)
    """A ModuleList holding every layer of `layers` (so their paths resolve) that runs only the first `count`."""
    import torch

    class FirstLayers(torch.nn.ModuleList):
        def __iter__(self):  # what the encoder's forward loops over
            return iter(list(self._modules.values())[:count])

    return FirstLayers(list(layers))


@contextmanager
def _attribute(pipe: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(pipe, name)
    object.__setattr__(pipe, name, value)  # not the pipeline's __setattr__, which would register a new component
    try:
        yield
    finally:
        object.__setattr__(pipe, name, original)


@contextmanager
def _forward(model: Any, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """`model`'s forward wrapped for the duration (around the instance forward another wrapper put there, if any)."""
    previous = model.__dict__.get("forward")
    model.forward = wrap(model.forward)
    try:
        yield
    finally:
        if previous is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = previous


def _ids(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("input_ids", args[0] if args else None)


def _weighing(model: Any, inner: Callable) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return emphasis.weigh(model, _ids(args, kwargs), inner(*args, **kwargs))

    return forward


def _by_window(model: Any, inner: Callable) -> Callable:
    """A forward that encodes ids several windows long one window at a time and lays the readings side by side
    (under the split blend mode each window's reading holds one reading per adapter: each stays whole)."""
    size = model.config.max_position_embeddings

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = _ids(args, kwargs)
        if ids is None or ids.shape[1] <= size or ids.shape[1] % size:
            return inner(*args, **kwargs)
        kwargs = {key: value for key, value in kwargs.items() if key != "input_ids"}
        mask = kwargs.pop("attention_mask", None)
        outputs = [inner(ids[:, start:start + size], *args[1:], **kwargs,
                         **({} if mask is None else {"attention_mask": mask[:, start:start + size]}))
                   for start in range(0, ids.shape[1], size)]
        return _side_by_side(outputs, size)

    return forward


def _side_by_side(outputs: list[Any], size: int) -> Any:
    import torch

    def joined(parts: list[Any]) -> Any:
        if not torch.is_tensor(parts[0]) or parts[0].ndim != 3:
            return parts[0]
        readings = parts[0].shape[1] // size
        return torch.cat([part[:, r * size:(r + 1) * size] for r in range(readings) for part in parts], dim=1)

    fields = {}
    for key, value in outputs[0].items():
        if key in emphasis.POOLED_FIELDS:
            fields[key] = value  # the first window's, as A1111 and ComfyUI pool
        elif isinstance(value, tuple):
            fields[key] = tuple(joined([output[key][n] for output in outputs]) for n in range(len(value)))
        else:
            fields[key] = joined([output[key] for output in outputs])
    return type(outputs[0])(**fields)


class _WindowTokenizer:
    """The pipeline's tokenizer for one draw: the draw's prompts become their windows' rows, side by side (and the
    encoder's weighing learns which prompts' rows it gave, for the reading that follows)."""

    def __init__(self, inner: Any, rows_by_prompt: dict[str, list[Row]], weights: Any = None) -> None:
        self.inner, self.rows, self.weights = inner, rows_by_prompt, weights

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        import torch
        from transformers import BatchEncoding

        texts = [text] if isinstance(text, str) else list(text)
        if kwargs.get("add_special_tokens") is False or not all(t in self.rows for t in texts):
            return self.inner(text, *args, **kwargs)
        if self.weights is not None:
            windowed = [self.rows[t] for t in texts]
            self.weights.tokenized({tuple(tuple(rows[n].ids) for rows in windowed):
                                    [rows[n].weights for rows in windowed] for n in range(len(windowed[0]))})
        ids = [[token for row in self.rows[t] for token in row.ids] for t in texts]
        masks = [[bit for row in self.rows[t] for bit in row.mask] for t in texts]
        if kwargs.get("return_tensors") == "pt":
            return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(masks)})
        if isinstance(text, str):
            ids, masks = ids[0], masks[0]
        return BatchEncoding({"input_ids": ids, "attention_mask": masks})
