"""A1111's prompt editing: a prompt whose words change during sampling, `[from:to:when]` and `[a|b]`.

Why: A1111 users stack a character and a style in time as well as in weight: `[zorb:pastelstyle zorb:0.4]` draws the
character's shape first and brings the style in after 40 % of the steps, and a prompt copied from A1111 (or read back
from one of its PNGs) should draw what it drew there. The syntax is A1111's: `[from:to:when]` reads `from` up to
step `when` and `to` after it, `[to:when]` adds `to` after it, `[from::when]` removes `from` after it; `when`
written with a decimal point is a share of the steps (`0.25`; `1.0` is all of them), without one a step (A1111 since
1.6). `[a|b|c]` takes a, b, c, a, ... one step each. They nest, in round brackets too (`([a:b:0.5]:1.3)`), and a
negative prompt is edited as a prompt is. Brackets without `:` or `|` (`[word]`), a `[` never closed and round
brackets are emphasis (stylelora.generate.emphasis), left as they are; `\\[` is a literal bracket.

`schedule(prompt, steps)` gives the prompt's texts with the last step (counted from 1) each is read for; `draw`
encodes each text once and hands the pipeline the next one between steps (for `stylelora generate`, grids, the app
and `stylelora evaluate`).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Edit:
    before: tuple  # nodes read up to step `when`
    after: tuple  # nodes read after it
    when: float  # a step, or a share of the steps
    share: bool = False  # `when` is a share (written with a decimal point)


@dataclass(frozen=True)
class Alternation:
    options: tuple  # one tuple of nodes per option, taken one step each in turn


def parse(prompt: str) -> tuple:
    """The prompt as nodes: text, Edit and Alternation, in order."""
    nodes, _ = _sequence(prompt, 0, "")
    return nodes


def _sequence(text: str, start: int, stops: str) -> tuple[tuple, int]:
    """Nodes from `start` up to the first character of `stops` outside any bracket (or the end). Round brackets are
    emphasis and stay text, but editing inside them is read (`([a:b:0.5]:1.3)`, as A1111's grammar nests them), and
    a `:` or `|` inside them is theirs, not a separator of the edit around them (`[(a:1.2):b:0.5]`)."""
    nodes: list = []
    plain: list[str] = []
    index, depth = start, 0  # depth: round brackets open since `start`
    while index < len(text) and not (text[index] in stops and (depth == 0 or text[index] == "]")):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            plain.append(text[index:index + 2])  # escapes stay for emphasis to read
            index += 2
        elif char == "[":
            node, index = _bracket(text, index)
            if isinstance(node, str):
                plain.append(node)
            else:
                nodes += ["".join(plain)] if plain else []
                plain = []
                nodes.append(node)
        else:
            depth += (char == "(") - (char == ")" and depth > 0)
            plain.append(char)
            index += 1
    if plain:
        nodes.append("".join(plain))
    return tuple(nodes), index


def _closing(text: str, start: int) -> int | None:
    """The index after the `]` that closes the `[` at `start` (escapes and inner brackets skipped); None if none
    does."""
    depth, index = 0, start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        depth += (char == "[") - (char == "]")
        index += 1
        if depth == 0:
            return index
    return None


def _bracket(text: str, start: int) -> tuple:
    """(node, index after it) for the `[` at `start`: an Edit, an Alternation, or the bracket as text."""
    end = _closing(text, start)
    if end is None:
        # Never closed: the `[` alone is text (emphasis' business) and editing after it is still read, as A1111
        # reads `a [open [b:3]`.
        return "[", start + 1
    parts, index = [], start + 1
    while True:
        nodes, index = _sequence(text, index, ":|]")
        parts.append((nodes, text[index] if index < end - 1 else "]"))
        index += 1
        if index >= end:
            break
    separators = {separator for _, separator in parts[:-1]}
    if separators == {"|"}:
        return Alternation(tuple(nodes for nodes, _ in parts)), end
    when = _number(parts[-1][0]) if separators == {":"} else None
    if when is not None and len(parts) == 3:
        return Edit(parts[0][0], parts[1][0], *when), end
    if when is not None and len(parts) == 2:
        return Edit((), parts[0][0], *when), end
    return text[start:end], end  # [word], [a:b]: emphasis' business


# A1111's grammar takes lark's SIGNED_NUMBER (no "nan", "inf" or "1_0", which Python's float would read).
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _number(nodes: tuple) -> tuple[float, bool] | None:
    """(when, whether it is a share of the steps) for the text after an edit's last `:`: a share where the number
    has a decimal point, a step where it has none (A1111 since 1.6: `[a:b:1.0]` never switches, `[a:b:1]` after
    step 1)."""
    if len(nodes) != 1 or not isinstance(nodes[0], str) or not _NUMBER.fullmatch(nodes[0]):
        return None
    return float(nodes[0]), "." in nodes[0]


def text_at(nodes: tuple, step: int, steps: int) -> str:
    """The prompt as read at `step` (counted from 1) of `steps`."""
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Edit):
            last = min(steps, int(node.when * steps if node.share else node.when))
            out.append(text_at(node.before if step <= last else node.after, step, steps))
        else:
            out.append(text_at(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text), ...]: each text the prompt reads, with the last step (from 1) it is read for; one entry,
    the prompt itself, when it has no editing."""
    nodes = parse(prompt)
    if all(isinstance(node, str) for node in nodes):
        return [(steps, prompt)]
    out: list[tuple[int, str]] = []
    for step in range(1, steps + 1):
        text = text_at(nodes, step, steps)
        if out and out[-1][1] == text:
            out[-1] = (step, text)
        else:
            out.append((step, text))
    return out


FIELDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def draw(pipe: Any, prompts: Sequence[str], negative_prompts: Sequence[str] | None, *, steps: int,
         guidance_scale: float, clip_skip: int = 1, then: Callable | None = None, **settings: Any) -> Any:
    """The pipeline's output for these prompts (one image each), read as A1111 reads them: emphasis, long prompts and
    clip skip (stylelora.generate.prompt_reading) and prompt editing, in the negative prompts too. Where no prompt
    changes between steps the pipeline encodes them itself, as always; else each (text, negative text) is encoded
    once and the step callback hands the pipeline the next step's embeddings. `then`: a callback_on_step_end to call
    after each step. negative_prompts None: none (SDXL's pipeline then guides from zeros, not from "")."""
    from stylelora.generate import prompt_reading

    negatives = list(negative_prompts) if negative_prompts is not None else [None] * len(prompts)
    timelines = [_paired(prompt, negative, steps) for prompt, negative in zip(prompts, negatives)]
    texts = dict.fromkeys(text for timeline in timelines for _, pair in timeline for text in pair if text is not None)
    with prompt_reading.applied(pipe, list(texts), clip_skip):
        if all(len(timeline) == 1 for timeline in timelines):
            return pipe(prompt=[timeline[0][1][0] for timeline in timelines],
                        negative_prompt=None if negative_prompts is None else [t[0][1][1] for t in timelines],
                        num_inference_steps=steps, guidance_scale=guidance_scale, callback_on_step_end=then,
                        **settings)
        guided = guidance_scale > 1  # the pipeline's own test for classifier-free guidance
        pairs = dict.fromkeys(pair for timeline in timelines for _, pair in timeline)
        encoded = {pair: pipe.encode_prompt(prompt=pair[0], device=pipe._execution_device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=guided, negative_prompt=pair[1])
                   for pair in pairs}
    embeds = _Embeddings(timelines, encoded)
    first = dict(zip(FIELDS, embeds.at(1)))
    sdxl = first.get("pooled_prompt_embeds") is not None
    return pipe(**first, num_inference_steps=steps, guidance_scale=guidance_scale,
                callback_on_step_end_tensor_inputs=["prompt_embeds", *["add_text_embeds"] * sdxl],
                callback_on_step_end=_switching(embeds, guided, then), **settings)


def _paired(prompt: str, negative: str | None, steps: int) -> list[tuple[int, tuple[str, str | None]]]:
    """[(last step, (text, negative text)), ...]: a prompt's schedule and its negative prompt's together (A1111 edits
    a negative prompt as it edits a prompt: `[blurry:sharp:0.5]` there counts too)."""
    texts, negatives = schedule(prompt, steps), [(steps, None)] if negative is None else schedule(negative, steps)
    lasts = sorted({last for last, _ in texts} | {last for last, _ in negatives})
    return [(last, (_text_for(texts, last), _text_for(negatives, last))) for last in lasts]


def _text_for(timeline: list[tuple[int, Any]], step: int) -> Any:
    return next((text for last, text in timeline if step <= last), timeline[-1][1])


class _Embeddings:
    """The batch's text embeddings at each step: each image's (text, negative text) at that step, encoded together."""

    def __init__(self, timelines: list, encoded: dict) -> None:
        self.timelines, self.encoded = timelines, encoded

    def texts(self, step: int) -> list[tuple[str, str]]:
        return [_text_for(timeline, step) for timeline in self.timelines]

    def at(self, step: int) -> list:
        import torch

        rows = [self.encoded[pair] for pair in self.texts(step)]
        return [None if rows[0][field] is None else torch.cat([row[field] for row in rows])
                for field in range(len(rows[0]))]


def _switching(embeds: _Embeddings, guided: bool, then: Callable | None) -> Callable:
    """A diffusers callback_on_step_end that, where any image's text changes at the coming step, hands the pipeline
    its embeddings (with guidance the negative rows first, as the pipeline lays them), then calls `then`."""
    import torch

    def on_step_end(pipe, index, timestep, callback_kwargs):
        if embeds.texts(index + 2) != embeds.texts(index + 1):  # steps counted from 1
            coming = embeds.at(index + 2)
            callback_kwargs["prompt_embeds"] = torch.cat([coming[1], coming[0]]) if guided else coming[0]
            if "add_text_embeds" in callback_kwargs:  # SDXL's pooled vector
                callback_kwargs["add_text_embeds"] = torch.cat([coming[3], coming[2]]) if guided else coming[2]
        return then(pipe, index, timestep, callback_kwargs) if then else callback_kwargs

    return on_step_end
