"""The Gradio layout: tabs, widgets, and handlers that turn widget values into AppService calls and back.

No ML here: every action is one service call (stylelora.app.service), the same library functions the CLI uses.
Handlers catch the library's user errors and show their message (gr.Error) instead of a traceback: as plain text
(escaped for the browser, whose toasts render HTML) with the server's folders written relative. Endpoints take
their widgets as named parameters (`prompt`, `seed`, ...), so a gradio_client user sees the same names.
"""
from __future__ import annotations

import html
import logging
import re
import time
from abc import ABCMeta
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import gradio as gr

from stylelora.app.errors import AppError
from stylelora.app.service import CFG_LIMIT, CLIP_SKIP_LIMIT, MAX_ADAPTERS, AdapterWeight, AppService, GenerateSettings
from stylelora.generate.prompt_tags import is_checkpoint
from stylelora.app.training import TrainSettings
from stylelora.generate.reading_dial import DEFAULT_DIAL, DIALS
from stylelora.lora.blend_modes import DEFAULT_FILE_MODE
from stylelora.lora.blend_modes import DEFAULT_MODE as DEFAULT_BLEND_MODE
from stylelora.lora.blend_modes import MODES as BLEND_MODES

MAX_ADAPTER_ROWS = MAX_ADAPTERS
DEFAULT_SAMPLER = "base default"
DEFAULT_DATASET = "toy-stripes"
TRAIN_REFRESH_SECONDS = 1.0
LOG_LINES_SHOWN = 12
STOP_WAIT_SECONDS = 10.0
# Small images (the toy base's 32 px) are scaled up to fill their box: nearest-neighbour keeps them crisp. A grid is
# drawn at the width of its tab (gradio draws an image at most at its own size: a toy grid was a strip of stamps),
# and no taller than the window; its download is the file itself. A slider's label keeps its words on one line
# while it fits its column (gradio shrinks it first, to a word a line beside its number box): the box moves below.
# The Lora cards' box is as high as its rows of cards (gradio gives a gallery a tall empty box by default).
CSS = """
.mono textarea { font-family: ui-monospace, monospace; font-size: 0.85em; }
#gallery img, #grid img, #train-sample img, #lora-cards img { image-rendering: pixelated; }
#grid .image-frame { width: 100%; }
#grid img { width: 100%; height: auto; max-height: 85vh; object-fit: contain; }
#lora-cards .grid-wrap { min-height: 0; height: auto; }
#lora-cards .caption-label { white-space: pre-line; text-align: left; display: -webkit-box;
  -webkit-box-orient: vertical; -webkit-line-clamp: 2; }
#lora-cards .thumbnail-item:hover .caption-label { -webkit-line-clamp: unset; max-width: 100%; opacity: 1; }
.gradio-container .block .head > label { flex: 1 0 auto; max-width: 100%; }
.clamp-note { color: var(--error-text-color, #b91c1c); font-size: var(--text-sm, 0.875em); margin-top: 4px; }
"""
# Scripts that run in the page alone (no server call). FOLLOW_NEWEST_LINE: a log box stays on its newest line as
# its text changes, unless the reader has scrolled up (until they scroll back to the end). PRESSABLE: the update
# that makes a button pressable or not.
FOLLOW_NEWEST_LINE = """() => {
  const box = document.querySelector("#BOX textarea");
  if (!box) return;
  if (!box.dataset.follow) {
    box.dataset.follow = "yes";
    box.addEventListener("scroll", () => {
      box.dataset.follow = box.scrollTop + box.clientHeight >= box.scrollHeight - 4 ? "yes" : "no";
    });
  }
  if (box.dataset.follow === "yes") box.scrollTop = box.scrollHeight;
}"""
PRESSABLE = "() => ({__type__: 'update', interactive: %s})"
# CLAMP_NOTE (once per page): gradio's slider clamps a number typed out of its range when its box loses focus, and
# the clamped value is what a request sends; a note under the slider says so (typed 3: set to 2), until a value in
# range is typed or the slider is dragged. Read in the capture phase, before gradio's own blur handler clamps it.
CLAMP_NOTE = """() => {
  if (window.styleloraClampNote) return;
  window.styleloraClampNote = true;
  document.addEventListener("blur", (event) => {
    const box = event.target;
    if (!(box instanceof HTMLInputElement) || box.type !== "number") return;
    const block = box.closest(".block");
    if (!block || !block.querySelector("input[type=range]")) return;
    const low = parseFloat(box.min), high = parseFloat(box.max), typed = parseFloat(box.value);
    let note = block.querySelector(".clamp-note");
    if (Number.isNaN(typed) || (typed >= low && typed <= high)) { if (note) note.remove(); return; }
    if (!note) {
      note = document.createElement("div");
      note.className = "clamp-note";
      block.appendChild(note);
    }
    const set = Math.min(Math.max(typed, low), high);
    note.textContent = `Typed ${typed}: this slider goes from ${low} to ${high}, so it was set to ${set}.`;
  }, true);
  document.addEventListener("input", (event) => {
    const range = event.target;
    if (range instanceof HTMLInputElement && range.type === "range") {
      range.closest(".block")?.querySelector(".clamp-note")?.remove();
    }
  }, true);
}"""
# OVERLAY_NOTE: gradio marks every output of a refused request with an "Error" badge that covers the widget until
# its × is pressed. Events that refresh the adapter lists (Generate's Adapters, Adapters' Adapter) show their progress
# and errors on their own report widget instead: a blend refused for its name hid the adapters chosen for Generate.
BLOCK_WEIGHTS_INFO = ("empty: every block at 1. Else as A1111's LoRA Block Weight: a preset (OUTALL, INALL, MIDD, "
                      "...) or one weight per UNet block, BASE first: BASE,IN..,M..,OUT.. (17 on SD 1.x)")
# A1111's Lora cards: each card's image is a copy at most this many pixels a side (the adapters folder is not served,
# and a 1024 px preview per card would make the page heavy); an adapter without a preview gets a plain tile.
CARD_SIDE = 256
CARD_PLACEHOLDER_COLOR = "#d4d4d8"
log = logging.getLogger(__name__)


def _user_errors() -> tuple[type[BaseException], ...]:
    from stylelora.user_errors import input_errors

    return (AppError, *input_errors())


def _from_browser() -> bool:
    """Whether the current event came from the app's own page (whose toasts render HTML), not an API client."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    try:
        return request is not None and request.headers.get("x-gradio-user") == "app"
    except AttributeError:
        return False


def _error(service: AppService, message: str) -> gr.Error:
    text = service.shown(message)
    return gr.Error(html.escape(text) if _from_browser() else text, print_exception=False)


def _shown(service: AppService, function: Callable) -> Callable:
    """The handler with errors shown as a plain-text message box: user errors (bad names, files, values) as
    they are, anything else as what it was, with the details in the server log."""
    import functools
    import inspect

    def report(error: BaseException) -> gr.Error:
        if isinstance(error, gr.Error):
            return error
        if isinstance(error, _user_errors()):
            return _error(service, str(error))
        log.exception("unexpected error in %s", function.__name__)
        return _error(service, f"Something went wrong ({type(error).__name__}: {error}). The details are in the "
                               "server's log; please report it.")

    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def wrapped_generator(*args, **kwargs):
            try:
                yield from function(*args, **kwargs)
            except Exception as error:
                raise report(error) from None
        return wrapped_generator

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise report(error) from None
    return wrapped


def _cancel_check() -> Callable[[], bool] | None:
    """For the running gradio event: a callable that turns True once the event stops being wanted: its client
    pressed Stop or called job.cancel() (gradio drops it from the running jobs) or went away (gradio marks it no
    longer alive). None outside a queued event (direct calls)."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return None
    mine = [event for job in queue.active_jobs if job for event in job if event._id == event_id]
    if not mine:
        return None
    event = mine[0]

    def cancelled() -> bool:
        return not event.alive or not any(job and event in job for job in queue.active_jobs)

    return cancelled


def _named(widgets: Sequence, names: dict | None = None) -> dict:
    """{parameter name: widget}: the names API clients use (`names` by widget id, else elem_id, else label)."""
    named: dict = {}
    for widget in widgets:
        given = (names or {}).get(id(widget)) or widget.elem_id or widget.label or "value"
        name = re.sub(r"\W+", "_", str(given)).strip("_").lower()
        base, number = name, 2
        while name in named:
            name, number = f"{base}_{number}", number + 1
        named[name] = widget
    return named


def _number(value, what: str, *, whole: bool = False) -> float | int:
    """A number the user sent (API clients can send text), or an AppError that names the field."""
    try:
        number = float(value)
        if whole and number != int(number):
            raise ValueError
        return int(number) if whole else number
    except (TypeError, ValueError, OverflowError):
        kind = "a whole number" if whole else "a number"
        raise AppError(f"{what} must be {kind} (got {value!r}).") from None


def mix_from_values(chosen: Sequence[str] | None, weights: Sequence[float],
                    blocks: Sequence[str | None] = ()) -> tuple[AdapterWeight, ...]:
    """The chosen adapters with the weights of their rows ([unet0, te0, unet1, te1, ...]) and the rows' block
    weights (an empty box: none); more adapters than rows are refused, not dropped."""
    chosen = list(chosen or [])
    if len(chosen) > MAX_ADAPTER_ROWS:
        raise AppError(f"At most {MAX_ADAPTER_ROWS} adapters can be blended at once (got {len(chosen)}): remove "
                       f"{len(chosen) - MAX_ADAPTER_ROWS}, or save a blend of some of them first (Blend tab).")
    blocks = [(text or "").strip() or None for text in blocks] + [None] * len(chosen)
    return tuple(AdapterWeight(name, _number(weights[2 * i], f"The UNet weight of {name}"),
                               _number(weights[2 * i + 1], f"The text-encoder weight of {name}"), blocks[i])
                 for i, name in enumerate(chosen))


class GenerateInputs:
    """The Generate tab's widgets whose values make a GenerateSettings (shared by Generate, Compare and Blend)."""

    def __init__(self, service: AppService) -> None:
        from stylelora.generate.samplers import available_samplers

        names = service.adapter_names()
        with gr.Row():
            self.base = gr.Dropdown(list(service.bases), value=service.bases[0], label="Base model", scale=1,
                                    elem_id="base")
            # Custom values are safe: every name is resolved inside the adapters folder, or refused.
            self.chosen = gr.Dropdown(names, value=[], multiselect=True, max_choices=MAX_ADAPTER_ROWS, scale=4,
                                      allow_custom_value=True,
                                      label=f"Adapters (from {service.adapters_dir.name}/, up to {MAX_ADAPTER_ROWS})",
                                      elem_id="adapters")
            self.refresh = gr.Button("↻ Rescan", scale=0, min_width=90)
        with gr.Accordion("Add an adapter: upload a .safetensors file", open=False):
            self.upload = gr.File(label="Adapter file (.safetensors)", file_types=[".safetensors"],
                                  type="filepath", elem_id="upload")
        self.rows, self.weights, self.blocks = [], [], []
        for i in range(MAX_ADAPTER_ROWS):
            with gr.Row(visible=False, elem_id=f"adapter-row-{i}") as row:
                unet = LenientSlider(-2, 2, value=1, step=0.05, label="UNet weight", elem_id=f"unet-weight-{i}")
                te = LenientSlider(-2, 2, value=1, step=0.05, label="Text-encoder weight", elem_id=f"te-weight-{i}")
                # The placeholder fits the box's width; what to write is in the info line.
                blocks = gr.Textbox("", label="Block weights (lbw=)", elem_id=f"blocks-{i}", max_lines=1,
                                    placeholder="all 1", info=BLOCK_WEIGHTS_INFO)
            self.rows.append(row)
            self.weights += [unet, te]
            self.blocks.append(blocks)
        self.prompt = gr.Textbox(label="Prompt", lines=2, value="a red circle on a white background",
                                 placeholder="may carry <lora:name:weight> tags (:lbw= for block weights)",
                                 elem_id="prompt")
        with gr.Row():
            self.triggers = gr.Button("Add trigger words", size="sm", scale=0, min_width=160)
        with gr.Accordion("Lora cards", open=False):
            self.cards = gr.Gallery(**card_gallery(service), columns=4, fit_columns=False, height="auto",
                                    object_fit="contain", allow_preview=False, interactive=False, format="png",
                                    elem_id="lora-cards")
        self.negative = gr.Textbox("", label="Negative prompt", lines=1, elem_id="negative-prompt")
        with gr.Row():
            limits, (steps, cfg) = service.limits, service.sampling_defaults()
            self.steps = LenientSlider(1, limits.max_steps, value=min(steps, limits.max_steps), step=1,
                                       label=f"Steps (up to {limits.max_steps})", elem_id="steps")
            # Up to the CFG the service and a grid's cfg axis accept (A1111's slider goes to 30 too): a CFG of 20
            # typed here was clamped to 15.
            self.cfg = LenientSlider(1, CFG_LIMIT, value=cfg, step=0.5, label="CFG scale", elem_id="cfg")
            self.sampler = gr.Dropdown([DEFAULT_SAMPLER, *available_samplers()], value=DEFAULT_SAMPLER,
                                       label="Sampler", elem_id="sampler")
        with gr.Row():
            self.seed = NamedNumber(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1, elem_id="seed")
            self.random_seed = gr.Button("Random seed", size="sm", scale=0, min_width=90)
            self.reuse_seed = gr.Button("Last seed", size="sm", scale=0, min_width=90)
            self.size = gr.Dropdown(**size_box(service, service.bases[0]), allow_custom_value=True, elem_id="size")
            self.batch = LenientSlider(1, limits.max_batch, value=1, step=1, elem_id="batch-size",
                                       label=f"Batch (up to {limits.max_batch})")
            self.blend_mode = gr.Dropdown(list(BLEND_MODES), value=DEFAULT_BLEND_MODE, label="Blend mode",
                                          elem_id="blend-mode",
                                          info="how 2+ adapters combine; split (default): each adapter's "
                                               "cross-attention apart; sum = A1111/ComfyUI")
            self.dial = gr.Dropdown(list(DIALS), value=DEFAULT_DIAL, label="Weight dial", elem_id="dial",
                                    info="weights (default): A1111's; reading: the text-encoder weight moves the "
                                         "prompt's reading (the UNet weight applies as set): a texture or character "
                                         "comes in gradually")
            self.clip_skip = NamedNumber(value=1, precision=0, minimum=1, maximum=CLIP_SKIP_LIMIT, label="Clip skip",
                                         elem_id="clip-skip", info="A1111's; 2 for bases and LoRAs trained at clip "
                                                                   "skip 2 (SD 1.x/2.x; SDXL ignores it)")

    @property
    def settings_inputs(self) -> list:
        """Widgets in the order `settings()` reads them (the later ones last: positional API calls keep their order)."""
        return [self.base, self.chosen, *self.weights, self.prompt, self.negative, self.steps, self.cfg,
                self.sampler, self.seed, self.size, self.batch, self.blend_mode, self.dial, *self.blocks,
                self.clip_skip]

    @staticmethod
    def settings(values: Sequence) -> GenerateSettings:
        base, chosen = values[0], values[1]
        weights = values[2:2 + 2 * MAX_ADAPTER_ROWS]
        prompt, negative, steps, cfg, sampler, seed, size, batch, *choices = values[2 + 2 * MAX_ADAPTER_ROWS:]
        mode, dial = (list(choices) + [None, None])[:2]  # older API clients send neither
        blocks = choices[2:2 + MAX_ADAPTER_ROWS]
        clip_skip = (list(choices[2 + MAX_ADAPTER_ROWS:]) + [None])[0]  # nor this
        return GenerateSettings(
            prompt=prompt or "", negative_prompt=negative or "", adapters=mix_from_values(chosen, weights, blocks),
            base=base, steps=_number(steps, "Steps", whole=True), cfg=_number(cfg, "CFG scale"),
            sampler=None if sampler == DEFAULT_SAMPLER else sampler,
            seed=-1 if seed is None else _number(seed, "Seed", whole=True), size=size or "native",
            batch_size=_number(batch, "Batch size", whole=True),
            blend_mode=mode or None, dial=dial or None,
            clip_skip=1 if clip_skip is None else _number(clip_skip, "Clip skip", whole=True),
        )


def card_gallery(service: AppService) -> dict:
    """The Lora cards gallery's value (each adapter's preview, or a plain tile, captioned with its name) and its
    label, which says what a click does, or how to get a first adapter where there is none."""
    cards = service.adapter_cards()
    if not cards:
        label = (f"No adapters in {service.adapters_dir.name}/ yet: train one (Train tab), or upload a .safetensors "
                 "file above; its card appears here.")
    else:
        label = "Click a card to add its <lora:NAME:W> tag and trigger words to the prompt; again to remove the tag."
    return {"value": [(_card_image(card.preview), card_caption(card)) for card in cards], "label": label}


# As much of a sidecar's description as a card holds: the card shows its first line (CSS line clamp) and the rest
# while the pointer is over it; longer text would cover the card.
CARD_DESCRIPTION_CHARS = 300


def card_caption(card) -> str:
    """A card's caption: its adapter's name, then its description (as A1111's cards show it), cut to one line on the
    page until the pointer is over the card. The name comes first and alone on its line: a click reads it back
    (card_name)."""
    description = " ".join(card.description.split())
    if len(description) > CARD_DESCRIPTION_CHARS:
        description = description[:CARD_DESCRIPTION_CHARS - 1].rstrip() + "…"
    return f"{card.name}\n{description}" if description else card.name


def card_name(caption: str | None) -> str:
    """The adapter name a card's caption (card_caption) starts with: adapter names hold no line breaks."""
    return (caption or "").split("\n", 1)[0]


def _card_image(preview):
    """A card's image: its preview, shrunk to CARD_SIDE; a plain tile where there is none or it cannot be read."""
    from PIL import Image

    if preview is not None:
        try:
            image = _read_image(str(preview))
            image.thumbnail((CARD_SIDE, CARD_SIDE))
            return image
        except (OSError, ValueError):
            log.warning("The preview %s cannot be read; its card shows a plain tile.", preview)
    return Image.new("RGB", (CARD_SIDE // 4, CARD_SIDE // 4), CARD_PLACEHOLDER_COLOR)


def size_box(service: AppService, base: str, current: str | None = "native") -> dict:
    """The size box's choices, label and value for a base: its own sizes (AppService.size_choices) and largest side;
    the size chosen stays if the base offers it too, else its first ("native", unless that is over --max-side)."""
    try:
        choices, high = service.size_choices(base), service.max_side(base)
    except _user_errors():  # a base whose files cannot be read: only its native size; Generate says what is wrong
        return {"choices": ["native"], "label": "Size (WxH)", "value": "native"}
    return {"choices": choices, "label": f"Size (WxH, up to {high} a side)",
            "value": current if current in choices else choices[0]}  # "native", unless over --max-side


def _page_widget(base: type, name: str, doc: str, preprocess: Callable) -> type:
    """`base`, a gradio component, with its own preprocess; the page draws it with base's own component.

    A class, not a patched instance: gradio rebuilds a widget's per-page copy from its class once an event updates it
    (a weight row's label, when an adapter is chosen), and the patched check was lost there. Made by ABCMeta.__new__,
    not a class statement: gradio's ComponentMeta.__new__ writes a .pyi stub of the defining module beside it
    (stylelora/app/ui.pyi, which type checkers then read instead of ui.py), and for a subclass that adds no __init__
    or EVENTS that stub is all it adds."""
    return ABCMeta.__new__(type(base), name, (base,), {
        "__module__": __name__, "__qualname__": name, "__doc__": doc, "is_template": True, "preprocess": preprocess})


def _lenient_preprocess(self, payload):
    return payload if payload is None else gr.Number.round_to_precision(payload, self.precision)


def _named_preprocess(self, payload):
    name, low, high = str(self.label or "This value").split(" (")[0], self.minimum, self.maximum
    if isinstance(payload, (int, float)) and not isinstance(payload, bool):
        if (low is not None and payload < low) or (high is not None and payload > high):
            bounds = (f"between {low:g} and {high:g}" if low is not None and high is not None else
                      f"at least {low:g}" if low is not None else f"at most {high:g}")
            raise gr.Error(f"{name} must be {bounds} (got {payload:g}).", print_exception=False)
        if self.precision == 0 and payload != int(payload):
            raise gr.Error(f"{name} must be a whole number (got {payload:g}).", print_exception=False)
    return gr.Number.preprocess(self, payload)


LenientSlider = _page_widget(gr.Slider, "LenientSlider", """A slider without gradio's own range check, so an API value
    out of range reaches the service, which refuses it with the field and the server's limit named (gradio's message
    names neither). In the page, a number typed out of range is clamped by gradio's slider: CLAMP_NOTE says so.""",
                             _lenient_preprocess)
NamedNumber = _page_widget(gr.Number, "NamedNumber", """A number box whose range (and, with precision 0, wholeness) is
    checked in a message that names the box: gradio's own ("Value -7 is less than minimum value -1.") names no field,
    in a page of many, and gradio rounded a typed 1.5 to 2 without a word.""", _named_preprocess)


def _warn(note: str) -> None:
    gr.Warning(_plain(note))  # a toast while the request goes on; the note's wording is the CLI's warning line


def _progress_callback(progress: gr.Progress, label: str, run: Run | None = None):
    def report(done: int, total: int) -> None:
        if run is not None:
            run.done, run.total = done, total
        progress((done, total), desc=label, unit="steps")

    return report


class Run:
    """A page's latest request of one kind (a Generate, a grid), as its Stop button reports it: gradio drops a
    stopped request's own answer, so without this the page said nothing. One per page (a gr.State: plain values,
    copied for each page, then shared by that page's events)."""

    def __init__(self, what: str) -> None:
        self.what, self.running, self.done, self.total = what, False, 0, 0
        self.stopped: str | None = None  # the message the request was stopped with
        self.ended: float | None = None  # when it ended (time.monotonic)

    @contextmanager
    def running_request(self) -> Iterator[None]:
        """Around the service call: whether it runs, how far it got, and the message it was stopped with."""
        from stylelora.app.jobs import Cancelled

        self.running, self.done, self.total, self.stopped = True, 0, 0, None
        try:
            yield
        except Cancelled as stopped:
            self.stopped = str(stopped)
            raise
        finally:
            self.running, self.ended = False, time.monotonic()

    def stop_report(self, service: AppService) -> str:
        """What Stop tells: the request's own message once it has stopped (before its next sampling step: waited
        for up to STOP_WAIT_SECONDS), else where it is. The cancel may reach it before this report runs, so a
        request that ended just now is the one Stop meant; none: it was still waiting in the queue."""
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.running:
            return (f"Stopping the {self.what} after its current sampling step ({self.done} of {self.total} done); "
                    "nothing will be saved.")
        if self.ended is None or time.monotonic() - self.ended > STOP_WAIT_SECONDS:
            return f"Stopped the {self.what} before it started (it was waiting in the queue); nothing was generated."
        if self.stopped:
            return html.escape(service.shown(self.stopped))
        return f"The {self.what} had finished before Stop reached it."


def _loss_table(losses, validation=()):
    """The Train tab's plot: the smoothed training loss, and the held-out images' loss where it was measured."""
    import pandas

    series = [("training (smoothed)", losses), ("validation (held out)", validation)]
    return pandas.DataFrame({"step": [s for _, points in series for s, _ in points],
                             "loss": [v for _, points in series for _, v in points],
                             "series": [name for name, points in series for _ in points]})


def build_ui(service: AppService, *, cache_seconds: int | None = 3600) -> gr.Blocks:
    """The app's Blocks: Generate, Compare, Blend, Adapters and Train tabs around one AppService.

    Each tab is laid out by its own function; the events are wired once every tab exists, because several of them
    read the Generate tab's settings or refresh the adapter lists of other tabs. Gradio's copies of served and
    uploaded files are deleted once `cache_seconds` old (and all of them when the server stops).
    """
    cache = (max(60, cache_seconds // 4), cache_seconds) if cache_seconds else None
    with gr.Blocks(title="stylelora", delete_cache=cache) as demo:
        gr.Markdown("## stylelora: generate with LoRA blends, compare, blend, inspect, train")
        gr.Markdown(service.limits_summary(), elem_id="limits")
        with gr.Tab("Generate"):
            generate = _generate_tab(service)
        with gr.Tab("Compare"):
            compare = _compare_tab()
        with gr.Tab("Blend"):
            blend = _blend_tab()
        with gr.Tab("Adapters"):
            adapters = _adapters_tab(service)
        with gr.Tab("Train"):
            train = _train_tab(service)
        lists = AdapterLists(service, generate.inputs.chosen, adapters.name, generate.inputs.cards)
        _wire_generate(service, generate, lists)
        _wire_compare(service, generate.inputs, compare)
        _wire_blend(service, generate.inputs, blend, lists)
        _wire_adapters(service, adapters, lists, generate.previous_chosen)
        _wire_train(service, train, lists, demo)
        # The Lora cards are refreshed on load by the training tick (_wire_train), which refreshes the lists too.
        demo.load(lists.refreshed, lists.widgets, lists.widgets, api_visibility="private")
        demo.load(None, None, None, js=CLAMP_NOTE, api_visibility="private")
    return demo


class AdapterLists:
    """The widgets that list the adapters folder, refreshed together: Generate's choice offers the finished
    adapters, Adapters' inspect box the training checkpoints too, labelled (inspect_choices); Generate's Lora cards
    show the finished adapters as cards (card_gallery)."""

    def __init__(self, service: AppService, chosen, inspected, cards) -> None:
        self.service, self.widgets, self.cards = service, [chosen, inspected], cards

    def cards_now(self):
        return gr.update(**card_gallery(self.service))

    def follow(self, event) -> None:
        """The Lora cards refreshed after `event` has refreshed the lists: a step of its own, not one more output of
        the event, so that an API client of /upload or /blend does not receive every adapter's preview."""
        event.success(self.cards_now, None, self.cards, api_visibility="private", show_progress="hidden")

    def refreshed(self, chosen: Sequence[str] | None = None, inspected: str | None = None,
                  renamed: dict[str, str] | None = None):
        """The lists as the folder is now; the names chosen stay chosen while their files are there (a renamed one
        under its new name, `renamed`: {old: new}), a checkpoint typed in too."""
        every = self.service.adapter_names(checkpoints=True)
        renamed = renamed or {}
        keep = [renamed.get(name, name) for name in (chosen or []) if renamed.get(name, name) in every]
        inspected = renamed.get(inspected, inspected)
        return (gr.update(choices=self.service.adapter_names(), value=keep),
                gr.update(choices=inspect_choices(every), value=inspected if inspected in every else None))


def inspect_choices(names: Sequence[str]) -> list[tuple[str, str]]:
    """(label, name) for the Adapters tab: the finished adapters, then the training checkpoints, labelled as such."""
    return [(f"{name}  (training checkpoint)" if is_checkpoint(name) else name, name)
            for name in sorted(names, key=is_checkpoint)]


# ----------------------------------------------------------------------------- layouts


def _generate_tab(service: AppService) -> SimpleNamespace:
    with gr.Row():
        with gr.Column(scale=3):
            inputs = GenerateInputs(service)
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                stop = gr.Button("Stop", variant="stop", elem_id="stop-generate", scale=1, interactive=False)
            status = gr.Markdown(elem_id="generate-status", label="Status")
        with gr.Column(scale=2):
            # No fixed height: gradio draws one image square across the whole column, and a box lower than that
            # scrolled it, cut at the bottom (a non-square image keeps its shape: object_fit contain).
            gallery = gr.Gallery(label="Images (PNG with A1111 parameters)", format="png", columns=4,
                                 height="auto", object_fit="contain", elem_id="gallery")
            parameters = gr.Textbox(label="Parameters of the first image", lines=4, elem_classes="mono",
                                    elem_id="parameters")
            # A1111's PNG Info + "Send to txt2img": an image's settings back into the boxes, to draw it again.
            with gr.Accordion("Draw an image again: read its PNG's parameters", open=False):
                png = gr.File(label="PNG made by stylelora or A1111", file_types=[".png"], type="filepath",
                              elem_id="png-info")
                png_note = gr.Markdown(elem_id="png-info-note", label="PNG note")
    return SimpleNamespace(inputs=inputs, button=button, stop=stop, status=status, gallery=gallery,
                           parameters=parameters, last_seed=gr.State(-1), previous_chosen=gr.State([]),
                           run=gr.State(Run("generation")), png=png, png_note=png_note)


def _compare_tab() -> SimpleNamespace:
    gr.Markdown("An X/Y grid of the Generate tab's settings; with a Z axis, one X/Y grid per Z value, side by side "
                "(A1111's X/Y/Z plot). Axes: `KIND=V1,V2,...` with KIND one of "
                "adapter (names, or `none`), weight, unet_weight, te_weight, seed, cfg, steps, sampler, clip_skip, "
                "blend_mode (sum, ties, split), dial (weights, reading); `blocks=V1;V2` takes lbw= block weights, "
                "separated by `;`; `prompt=FIND,REPLACE,...` is A1111's Prompt S/R (quote a value that holds a "
                "comma).")
    with gr.Row():
        x_axis = gr.Textbox(value="weight=0,0.5,1", label="X axis (columns)", elem_id="x-axis")
        y_axis = gr.Textbox(value="seed=1,2", label="Y axis (rows, optional)", elem_id="y-axis")
        z_axis = gr.Textbox(value="", label="Z axis (one X/Y grid each, optional)", elem_id="z-axis",
                            placeholder="e.g. blend_mode=sum,split")
    with gr.Row():
        button = gr.Button("Make grid", variant="primary", elem_id="make-grid", scale=3)
        stop = gr.Button("Stop", variant="stop", elem_id="stop-grid", scale=1, interactive=False)
    status = gr.Markdown(elem_id="grid-status", label="Status")
    image = gr.Image(label="Grid", type="filepath", format="png", elem_id="grid")
    return SimpleNamespace(x_axis=x_axis, y_axis=y_axis, z_axis=z_axis, button=button, stop=stop, status=status,
                           image=image, run=gr.State(Run("grid")))


def _blend_tab() -> SimpleNamespace:
    gr.Markdown("Save the Generate tab's current mix (adapters and weights) as one new adapter.")
    mix_view = gr.Markdown("No adapters chosen.")
    with gr.Row():
        name = gr.Textbox(label="New adapter name", value="my-blend")
        mode = gr.Radio(["compact", "exact", "rank"], value="compact", label="Mode",
                        info="compact: the inputs' size (a sum is exact; ties is re-factorised by SVD, error shown); "
                             "exact keeps every rank; rank R re-factorises by SVD")
        rank = NamedNumber(value=8, precision=0, minimum=1, label="Rank (mode rank)")
    with gr.Row():
        fp16 = gr.Checkbox(label="float16 (half the size)")
        overwrite = gr.Checkbox(label="overwrite")
        blend_mode = gr.Dropdown(list(BLEND_MODES), value=DEFAULT_FILE_MODE, label="Blend mode",
                                 info="sum and ties save as a plain kohya LoRA; split runs only at generation")
    button = gr.Button("Save blend", variant="primary")
    report = gr.Textbox(label="Result", lines=4, elem_classes="mono")
    return SimpleNamespace(mix_view=mix_view, options=[name, mode, rank, fp16, overwrite, blend_mode], button=button,
                           report=report)


def _adapters_tab(service: AppService) -> SimpleNamespace:
    with gr.Row():
        name = gr.Dropdown(inspect_choices(service.adapter_names(checkpoints=True)), value=None, label="Adapter",
                           scale=4, allow_custom_value=True, elem_id="adapter-name")
        as_json = gr.Checkbox(label="JSON", scale=0)
        button = gr.Button("Inspect", scale=0)
    with gr.Row():
        new_name = gr.Textbox(label="New name (NAME or FOLDER/NAME, inside the adapters folder)", scale=4,
                              elem_id="new-name")
        rename = gr.Button("Rename…", scale=0, min_width=110, elem_id="rename")
        delete = gr.Button("Delete…", variant="stop", scale=0, min_width=110, elem_id="delete")
    with gr.Row(visible=False, elem_id="confirm-row") as confirm_row:
        question = gr.Markdown(elem_id="confirm-question")
        confirm = gr.Button("Confirm", variant="stop", scale=0, min_width=110, elem_id="confirm")
        cancel = gr.Button("Cancel", scale=0, min_width=110, elem_id="cancel")
    done = gr.Markdown(elem_id="adapter-change")
    text = gr.Textbox(label="inspect", lines=18, elem_classes="mono")
    return SimpleNamespace(name=name, as_json=as_json, button=button, text=text, new_name=new_name, rename=rename,
                           delete=delete, confirm_row=confirm_row, question=question, confirm=confirm, cancel=cancel,
                           done=done, pending=gr.State(None))


def _option_widget(spec):
    """The Train tab's widget for a config option, with the option's own default (stylelora.config declares both);
    its element id is the option's name (train.batch_size: #train-batch-size)."""
    widget = spec.option.widget
    common = dict(label=widget.label, info=spec.option.help, elem_id=spec.dotted.replace(".", "-").replace("_", "-"))
    if spec.type is bool:
        return gr.Checkbox(value=spec.default, **common)
    if spec.option.choices:
        return gr.Dropdown(list(spec.option.choices), value=spec.default, **common)
    if spec.type in (int, float) and spec.default is None:
        # A box that can stay empty (the base family's value): gradio's Number shows and sends 0 for no value.
        return gr.Textbox(value="", placeholder=f"empty: {widget.empty}", **common)
    if spec.type in (int, float):
        return NamedNumber(value=spec.default, precision=0 if spec.type is int else None,
                           minimum=widget.minimum, maximum=widget.maximum, **common)
    return gr.Textbox(value=spec.default or "", **common)


def _train_tab(service: AppService) -> SimpleNamespace:
    from stylelora.config import OPTION_SPECS

    specs = [spec for spec in OPTION_SPECS if spec.option.widget is not None]
    datasets = service.dataset_names()
    gr.Markdown(f"Training data: a folder in the server's `{service.datasets_dir.name}/` folder (kohya layout "
                "`REPEATS_TRIGGER/` of images + .txt captions), or upload one below. Runs are saved in the adapters "
                "folder as NAME/, with checkpoints: Stop ends the run after its current step, saved, and Resume "
                "continues from it.")
    with gr.Row():
        # Custom values are safe: a name is resolved inside the datasets folder, or refused.
        data = gr.Dropdown(datasets, value=DEFAULT_DATASET if DEFAULT_DATASET in datasets else None,
                           allow_custom_value=True,
                           label=f"Training data folder (in {service.datasets_dir.name}/)", elem_id="data", scale=3)
        rescan = gr.Button("↻ Rescan", scale=0, min_width=90)
        name = gr.Textbox(value="my-style", label="Adapter name", elem_id="name", scale=2)
        base = gr.Dropdown(list(service.bases), value=service.bases[0], label="Base model", elem_id="base", scale=1)
        overwrite = gr.Checkbox(label="overwrite a run of that name", elem_id="overwrite", scale=1)
    # kohya's --network_weights: continue a finished adapter (same rank and layers) on this data.
    start_from = gr.Dropdown(start_choices(service), value="", label="Start from an adapter (optional: continue "
                             "its training at its own rank)", elem_id="start-from")
    with gr.Accordion("Upload a training folder: images + .txt captions", open=False):
        files = gr.File(file_count="directory", type="filepath", label="Folder of images and captions",
                        elem_id="dataset-files")
        with gr.Row():
            dataset_name = gr.Textbox(label="Dataset name", elem_id="dataset-name")
            trigger = gr.Textbox(label="Trigger word (optional)", elem_id="trigger")
            repeats = NamedNumber(value=10, precision=0, minimum=1, maximum=100, label="Repeats", elem_id="repeats")
            add = gr.Button("Add to datasets", scale=0, min_width=150)
        added = gr.Markdown(label="Upload result")
    # Checkboxes get a row of their own: squeezed between number boxes their help text ran one word a line.
    with gr.Row(equal_height=True):
        widgets = {spec.dotted: _option_widget(spec) for spec in specs if spec.type is not bool}
    with gr.Row():
        widgets.update({spec.dotted: _option_widget(spec) for spec in specs if spec.type is bool})
    options = [widgets[spec.dotted] for spec in specs]  # in the order train_settings reads them
    # Every other option of `stylelora train`, typed as its flags: the app reaches what the CLI does.
    more = gr.Textbox(value="", label="More options (stylelora train flags)", elem_id="more-options",
                      placeholder="e.g. --noise-offset 0.05 --lr-scheduler cosine --network-dropout 0.1",
                      info="Any flag of `stylelora train` (docs/training.md lists them), read as the command line "
                           "reads it; the boxes above set their own options.")
    family = gr.Markdown(_family_text(service.bases[0]), elem_id="family-defaults")
    with gr.Row():
        button = gr.Button("Start training", variant="primary", elem_id="train")
        stop = gr.Button("Stop", variant="stop", elem_id="stop-training", interactive=False)
        resume = gr.Button("Resume", elem_id="resume-training")
    status = gr.Markdown("No training run yet.", elem_id="train-status", label="Training status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="loss", height=240, scale=2)
        sample = gr.Image(label="Latest sample grid", type="filepath", format="png", height=240, scale=1,
                          elem_id="train-sample", interactive=False)
    log_box = gr.Textbox(label=f"Trainer output (newest {LOG_LINES_SHOWN} lines)", lines=LOG_LINES_SHOWN,
                         max_lines=LOG_LINES_SHOWN, elem_classes="mono", elem_id="train-log")
    # In the order train_settings reads them.
    # start_from, then more: added last, so API calls written before them keep their positions.
    settings = [data, name, base, overwrite, *options, start_from, more]
    return SimpleNamespace(settings=settings, start_from=start_from, more=more,
                           option_keys=[spec.dotted for spec in specs], specs=specs, button=button, stop=stop,
                           resume=resume, status=status, loss_plot=loss_plot, log=log_box, sample=sample,
                           family=family, data=data, rescan=rescan, name=name, base=base,
                           files=files, dataset_name=dataset_name, trigger=trigger, repeats=repeats, add=add,
                           added=added, timer=gr.Timer(TRAIN_REFRESH_SECONDS, active=False),
                           shown_sample=gr.State(None))


def start_choices(service: AppService) -> list[tuple[str, str]]:
    """The Train tab's "Start from" choices: a new LoRA (""), then each finished adapter of the folder."""
    return [("none: a new LoRA", ""), *((name, name) for name in service.adapter_names())]


def _family_text(base: str) -> str:
    """What an empty option box means for this base: its family's preset values (stylelora.presets)."""
    from stylelora.config import OPTION_SPECS
    from stylelora.models.family import detect_family
    from stylelora.presets import FAMILY_NAMES, PRESET_KEYS, preset_value

    try:
        family = detect_family(base)
    except Exception as error:  # a base that cannot be read yet: say so instead of guessing
        return f"Base family of {base}: not detected ({type(error).__name__}); empty boxes take its preset."
    labels = {spec.dotted: spec.option.widget.label.split(" (")[0] for spec in OPTION_SPECS
              if spec.option.widget is not None}
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    shown = []
    for dotted in PRESET_KEYS:
        if dotted in labels:
            value = preset_value(family, dotted, cuda=cuda)
            text = "native size" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
            shown.append(f"{labels[dotted]} {text}")
    return (f"**Base family: {FAMILY_NAMES.get(family, family)}** ({family}). Empty boxes take its preset: "
            + ", ".join(shown) + ". Other options: the CLI's defaults (the same as `stylelora train`), or as set in "
            "More options.")


def train_settings(data, name, base, overwrite, option_keys: Sequence[str], option_values: Sequence,
                   start_from: str | None = None, more_options: str | None = None) -> TrainSettings:
    """TrainSettings from the Train tab's values; text is stripped, an empty box means the option's default, and a
    number typed in a text box (the options whose default is the base family's) is read as one, or refused by name.
    start_from: the adapter chosen to continue, if any; more_options: other `stylelora train` flags."""
    from stylelora.config import OPTIONS_BY_NAME as specs

    values = {}
    for key, value in zip(option_keys, option_values):
        value = value.strip() if isinstance(value, str) else value
        spec = specs.get(key)
        if isinstance(value, str) and value and spec is not None and spec.type in (int, float):
            value = _number(value, spec.option.widget.label.split(" (")[0], whole=spec.type is int)
        values[key] = value
    return TrainSettings(data_dir=data, name=name, base=base, overwrite=bool(overwrite), options=values,
                         start_from=(start_from or "").strip(), more_options=(more_options or "").strip())


# ----------------------------------------------------------------------------- events


def _show_rows(chosen, previous, *values):
    """One row per chosen adapter (values: its weights [unet0, te0, unet1, te1, ...], then each row's block
    weights); an adapter that stays chosen keeps its row's values. A row whose adapter did not change gets no new
    value at all: this answer can arrive after the user has moved that row's sliders (a busy server), and sending
    back the values read when the choice changed would undo the move."""
    chosen = list(chosen or [])[:MAX_ADAPTER_ROWS]
    previous = list(previous or [])
    weights, blocks = values[:2 * MAX_ADAPTER_ROWS], list(values[2 * MAX_ADAPTER_ROWS:]) + [""] * MAX_ADAPTER_ROWS
    old = {name: (*weights[2 * i:2 * i + 2], blocks[i]) for i, name in enumerate(previous)}
    rows, sliders, boxes = [], [], []
    for i in range(MAX_ADAPTER_ROWS):
        name = chosen[i] if i < len(chosen) else None
        rows.append(gr.update(visible=name is not None))
        labels = (f"{name} · UNet weight", f"{name} · text-encoder weight") if name else ("UNet weight", "TE weight")
        if name is not None and i < len(previous) and previous[i] == name:
            # Its name only: a renamed adapter keeps its row (see _wire_adapters) under its new name.
            sliders += [gr.update(label=labels[0]), gr.update(label=labels[1])]
            boxes.append(gr.update())
            continue
        unet, te, lbw = old.get(name, (1.0, 1.0, ""))
        sliders += [gr.update(value=unet, label=labels[0]), gr.update(value=te, label=labels[1])]
        boxes.append(gr.update(value=lbw or ""))
    return [chosen, *rows, *sliders, *boxes]


def _wire_generate(service: AppService, tab: SimpleNamespace, lists: AdapterLists) -> None:
    inputs = tab.inputs
    # Sizes are the base's own (the toy base's 32 px is not SD's 512): a new base brings its choices.
    inputs.base.change(lambda base, size: gr.update(**size_box(service, base, size)), [inputs.base, inputs.size],
                       inputs.size, api_visibility="private")
    inputs.chosen.change(_show_rows, [inputs.chosen, tab.previous_chosen, *inputs.weights, *inputs.blocks],
                         [tab.previous_chosen, *inputs.rows, *inputs.weights, *inputs.blocks],
                         api_visibility="private")

    def on_generate(run: Run, progress=gr.Progress(), **values):
        with run.running_request():
            saved = service.generate(GenerateInputs.settings(list(values.values())),
                                     _progress_callback(progress, "sampling", run), cancelled=_cancel_check(),
                                     notify=_warn)
        return [str(image.path) for image in saved], saved[0].parameters_text, saved[0].seed

    _stoppable(service, tab, lambda: tab.button.click(
        _shown(service, on_generate), inputs_kwargs={"run": tab.run, **_named(inputs.settings_inputs)},
        outputs=[tab.gallery, tab.parameters, tab.last_seed], api_name="generate",
        concurrency_limit=service.limits.concurrency))

    def on_triggers(prompt, adapters):
        if not adapters:
            raise AppError("Choose adapters first: their trigger words are added to the prompt.")
        return service.prompt_with_triggers(prompt, adapters)

    # A refusal is a toast; gradio's "Error" badge would cover the prompt itself (show_progress_on: OVERLAY_NOTE).
    inputs.triggers.click(_shown(service, on_triggers), [inputs.prompt, inputs.chosen], inputs.prompt,
                          api_name="add_triggers", show_progress_on=inputs.triggers)

    def on_card(prompt, event: gr.SelectData):
        # The card's caption starts with its adapter's name: the index would name another adapter once the folder
        # changed.
        caption = event.value.get("caption") if isinstance(event.value, dict) else None
        return service.with_card(prompt, card_name(caption))

    inputs.cards.select(_shown(service, on_card), inputs.prompt, inputs.prompt, api_visibility="private",
                        show_progress_on=inputs.cards)  # OVERLAY_NOTE
    _wire_png_info(service, tab)
    inputs.random_seed.click(lambda: -1, None, inputs.seed, api_visibility="private")
    inputs.reuse_seed.click(lambda seed: seed, tab.last_seed, inputs.seed, api_visibility="private")

    def on_upload(file, adapters, base):
        if not file:
            return gr.update(), gr.update(), gr.update()
        from pathlib import Path

        try:
            upload = service.import_upload(file, base=base)
        finally:
            Path(file).unlink(missing_ok=True)  # gradio's copy: a rejected (or accepted) upload leaves nothing
        chosen = [*(adapters or []), upload.name][:MAX_ADAPTER_ROWS]
        notes = " ".join(service.shown(note) for note in upload.notes)
        (gr.Warning if notes else gr.Info)(_plain(f"Added {upload.name}. {notes}".strip()))
        return *lists.refreshed(chosen), None

    uploaded = inputs.upload.upload(_shown(service, on_upload), inputs_kwargs={
        "file": inputs.upload, "adapters": inputs.chosen, "base": inputs.base}, outputs=[*lists.widgets, inputs.upload],
        api_name="upload", show_progress_on=inputs.upload)  # not on the adapter lists: OVERLAY_NOTE
    uploaded.failure(lambda: None, None, inputs.upload, api_visibility="private")  # the refused file leaves the box
    lists.follow(uploaded)
    lists.follow(inputs.refresh.click(lists.refreshed, lists.widgets, lists.widgets, api_name="adapters"))


def _wire_png_info(service: AppService, tab: SimpleNamespace) -> None:
    """A PNG dropped in the Generate tab's "Draw an image again" box fills in the settings it was drawn with. Its
    adapters come back as the prompt's <lora:...> tags, so the adapters chosen above are cleared (with both, the
    weights would add up)."""
    inputs = tab.inputs
    outputs = [inputs.chosen, inputs.prompt, inputs.negative, inputs.steps, inputs.cfg, inputs.sampler, inputs.seed,
               inputs.size, inputs.batch, inputs.blend_mode, inputs.dial, inputs.clip_skip, tab.png_note, tab.png]

    def on_png(file):
        from pathlib import Path

        from stylelora.generate.prompt_tags import parse_prompt
        from stylelora.generate.samplers import resolve_sampler

        if not file:
            return (gr.update(),) * len(outputs)
        try:
            request = service.read_parameters(file)
        finally:
            Path(file).unlink(missing_ok=True)  # gradio's copy
        try:
            sampler, unknown = resolve_sampler(request.sampler).key, ""
        except ValueError:  # e.g. a scheduler class the base has and no sampler names: the base's own
            sampler, unknown = DEFAULT_SAMPLER, f" Its sampler {request.sampler} is not one offered here: the base's."
        # An image of fewer than two adapters records no blend mode (all are the same then): the box stays.
        blended = len(parse_prompt(request.prompt)[1]) >= 2
        note = (f"Read {Path(file).name}: its prompt (adapters as <lora:...> tags), negative prompt, steps, CFG, "
                f"sampler, seed {request.seed}, clip skip, size{' and blend mode' if blended else ''} are set; the "
                f"adapters chosen above were cleared, as the tags carry them.{unknown} Generate draws it again.")
        return ([], request.prompt, request.negative_prompt, request.steps, request.cfg, sampler, request.seed,
                f"{request.width}x{request.height}", 1, request.blend_mode if blended else gr.update(),
                request.dial or DEFAULT_DIAL, request.clip_skip, _plain(service.shown(note)), None)

    read = tab.png.upload(_shown(service, on_png), tab.png, outputs, api_name="read_png",
                          show_progress_on=tab.png_note)
    read.failure(lambda: None, None, tab.png, api_visibility="private")  # the refused file leaves the box


def _stoppable(service: AppService, tab: SimpleNamespace, request: Callable[[], Any]) -> None:
    """Wire the listener `request()` adds to `tab.button`: `tab.stop` cancels it, and can be pressed only while it
    runs; `tab.status` says it was stopped (tab.run's report), and is emptied by the next press of the button.
    The listener that enables `stop` is added first, as a page runs a click's listeners one after the other; `stop`
    is disabled when the request ends: done or cancelled (.then) or failed (.failure: gradio 6 runs no .then then)."""
    button, stop = tab.button, tab.stop
    button.click(None, None, stop, js=PRESSABLE % "true", api_visibility="private")
    event = request()
    button.click(None, None, tab.status, js="() => ''", api_visibility="private")
    for ended in (event.then, event.failure):
        ended(None, None, stop, js=PRESSABLE % "false", api_visibility="private")
    stop.click(None, None, None, cancels=[event], api_visibility="private")
    # The report is a listener of its own, after the cancel's: on the cancel's listener, the page sent the cancel
    # only once the report had answered, and the report waited for a request that ran on. Outside the queue, so it
    # answers while every place in the queue is busy.
    stop.click(lambda run: run.stop_report(service), tab.run, tab.status, queue=False, api_visibility="private")


def _follow_newest_line(box: gr.Textbox) -> None:
    """Keep `box` on its newest line as its text changes. Gradio 6's Textbox takes `autoscroll` but its page
    reads the app-wide setting instead (off outside an embedding page), so the box would stay on its first line."""
    box.change(None, None, None, js=FOLLOW_NEWEST_LINE.replace("#BOX", f"#{box.elem_id}"), api_visibility="private")


def _plain(text: str) -> str:
    """Text for an info toast (which renders HTML in the browser), shown as written."""
    return html.escape(text) if _from_browser() else text


def _wire_compare(service: AppService, inputs: GenerateInputs, tab: SimpleNamespace) -> None:
    def on_grid(x_axis, y_axis, z_axis, run: Run, progress=gr.Progress(), **values):
        with run.running_request():
            path = service.grid(GenerateInputs.settings(list(values.values())), x_axis, y_axis or None, z_axis or None,
                                progress=_progress_callback(progress, "sampling (grid)", run),
                                cancelled=_cancel_check(), notify=_warn)
        return str(path)

    _stoppable(service, tab, lambda: tab.button.click(_shown(service, on_grid), inputs_kwargs={
        "x_axis": tab.x_axis, "y_axis": tab.y_axis, "z_axis": tab.z_axis, "run": tab.run,
        **_named(inputs.settings_inputs)},
        outputs=tab.image, api_name="grid", concurrency_limit=service.limits.concurrency))


def _describe_mix(chosen, *values):
    """The Blend tab's view of the mix (values: the rows' weights, their block weights, then the blend modes of the
    Generate tab and of the Blend tab): with a note where the file will mix it otherwise than Generate drew it."""
    rows = 2 * MAX_ADAPTER_ROWS
    try:
        mix = mix_from_values(chosen, values[:rows], values[rows:rows + MAX_ADAPTER_ROWS])
    except AppError as error:
        return html.escape(str(error))
    if not mix:
        return "No adapters chosen: pick some in the Generate tab."
    def blocks(m: AdapterWeight) -> str:
        return f", lbw={html.escape(m.blocks)}" if m.blocks else ""

    drawn, saved = (list(values[rows + MAX_ADAPTER_ROWS:]) + [None, None])[:2]
    return "Current mix: " + ", ".join(f"**{html.escape(m.name)}** (UNet {m.unet:g}, TE {m.te:g}{blocks(m)})"
                                       for m in mix) + _mode_note(len(mix), drawn, saved)


def _mode_note(count: int, drawn: str | None, saved: str | None) -> str:
    """Two adapters or more drawn in one blend mode and saved in another: the file's images differ from Generate's
    (the Generate tab's default, split, is one no file can hold; the Blend tab's is sum)."""
    drawn, saved = drawn or DEFAULT_BLEND_MODE, saved or DEFAULT_FILE_MODE
    if count < 2 or drawn == saved:
        return ""
    held = " (which no file can hold)" if drawn == "split" else ""
    return (f"\n\nGenerate draws this mix in blend mode **{drawn}**{held}; the file will mix it by **{saved}** "
            f"(Blend mode below), so its images can differ: compare both with a Compare grid, "
            f"`blend_mode={drawn},{saved}`.")


def _wire_blend(service: AppService, inputs: GenerateInputs, tab: SimpleNamespace, lists: AdapterLists) -> None:
    mix_widgets = [inputs.chosen, *inputs.weights, *inputs.blocks]
    shown = [*mix_widgets, inputs.blend_mode, tab.options[5]]  # and the two blend modes: Generate's, the file's
    for widget in shown:
        widget.change(_describe_mix, shown, tab.mix_view, api_visibility="private")
    count, rows = len(tab.options), 2 * MAX_ADAPTER_ROWS

    def on_blend(**values):
        # The dial, the block weights and the base last: positional API calls keep their order.
        chosen, *values = list(values.values())
        weights, options, (dial, *rest) = values[:rows], values[rows:rows + count], values[rows + count:]
        name, mode, rank, fp16, overwrite, blend_mode = options[:6]
        blocks, base = rest[:MAX_ADAPTER_ROWS], (rest[MAX_ADAPTER_ROWS:] or [None])[0]
        result = service.blend(mix_from_values(chosen, weights, blocks), name,
                               rank=_number(rank, "Rank (mode rank)", whole=True) if mode == "rank" else None,
                               exact=mode == "exact", fp16=bool(fp16), overwrite=bool(overwrite),
                               blend_mode=blend_mode or None, dial=dial or None, base=base or None)
        return f"saved {result.name}\n{result.summary}", *lists.refreshed(chosen, result.name)

    names = {id(widget): key for widget, key in zip(tab.options,
                                                    ["name", "mode", "rank", "fp16", "overwrite", "blend_mode"])}
    lists.follow(tab.button.click(_shown(service, on_blend), inputs_kwargs=_named(
        [inputs.chosen, *inputs.weights, *tab.options, inputs.dial, *inputs.blocks, inputs.base], names),
        outputs=[tab.report, *lists.widgets], api_name="blend", show_progress_on=tab.report))  # OVERLAY_NOTE


def _wire_adapters(service: AppService, tab: SimpleNamespace, lists: AdapterLists, previous_chosen) -> None:
    """The Adapters tab's events (previous_chosen: the Generate tab's memory of which adapter each row holds)."""
    def on_inspect(name, as_json):
        return service.inspect(name, as_json=bool(as_json)) if name else ""

    tab.button.click(_shown(service, on_inspect), [tab.name, tab.as_json], tab.text, api_name="inspect")
    tab.name.change(_shown(service, on_inspect), [tab.name, tab.as_json], tab.text, api_visibility="private")

    # API: each change needs confirm=True; the page asks with a Confirm button instead.
    def delete_adapter(name: str, confirm: bool = False) -> str:
        """Delete an adapter of the adapters folder (confirm=True: it cannot be undone)."""
        return service.delete_adapter(name, confirm=confirm)

    def rename_adapter(name: str, new_name: str, confirm: bool = False) -> str:
        """Rename an adapter inside the adapters folder (confirm=True); never over another file."""
        return service.rename_adapter(name, new_name, confirm=confirm)

    gr.api(_shown(service, delete_adapter), api_name="delete_adapter")
    gr.api(_shown(service, rename_adapter), api_name="rename_adapter")

    def ask(action: str):
        def on_ask(name, new_name):
            if action == "delete":
                service.own_adapter(name)
                question = f"Delete **{html.escape(name)}**? This cannot be undone."
            else:
                relative = service.plan_rename(name, new_name)[1]
                question = f"Rename **{html.escape(name)}** to **{html.escape(relative)}**?"
            return gr.update(visible=True), question, (action, name, new_name), ""
        return on_ask

    ask_outputs = [tab.confirm_row, tab.question, tab.pending, tab.done]
    tab.delete.click(_shown(service, ask("delete")), [tab.name, tab.new_name], ask_outputs, api_visibility="private")
    tab.rename.click(_shown(service, ask("rename")), [tab.name, tab.new_name], ask_outputs, api_visibility="private")

    def on_confirm(pending, chosen, inspected, previous):
        """Delete or rename; a renamed adapter chosen in the Generate tab stays chosen there, in its row (its weights
        and block weights), under its new name: `previous` (the rows' names) is renamed with it, so the rows see the
        same adapter in the same place (_show_rows)."""
        if not pending:
            return gr.update(visible=False), None, "", gr.update(), gr.update(), gr.update()
        action, name, new_name = pending
        if action == "delete":
            message, renamed = service.delete_adapter(name, confirm=True), {}
        else:
            renamed = {name: service.plan_rename(name, new_name)[1]}
            message = service.rename_adapter(name, new_name, confirm=True)
        previous = [renamed.get(old, old) for old in previous or []]
        return (gr.update(visible=False), None, html.escape(message), *lists.refreshed(chosen, inspected, renamed),
                previous)

    lists.follow(tab.confirm.click(_shown(service, on_confirm), [tab.pending, *lists.widgets, previous_chosen],
                                   [tab.confirm_row, tab.pending, tab.done, *lists.widgets, previous_chosen],
                                   api_visibility="private", show_progress_on=tab.done))  # OVERLAY_NOTE
    tab.cancel.click(lambda: (gr.update(visible=False), None), None, [tab.confirm_row, tab.pending],
                     api_visibility="private")


def _training_view(service: AppService, status, shown_sample: str | None = None) -> tuple:
    """(status text, loss table, log tail, sample grid, its path) of a run's status, or of no run. The grid is sent
    only when it is another file than the one shown (each one sent is a file in gradio's cache)."""
    if status is None:
        return "No training run yet.", _loss_table(()), "", None, None
    loss = f", loss {status.loss:.4f}" if status.loss is not None else ""
    if status.running:
        text = f"**{html.escape(status.name)}**: training, step {status.step}/{status.total}{loss}"
    else:
        text = f"**{html.escape(status.name)}**: {status.state}{loss}. {html.escape(service.shown(status.message))}"
    tail = "\n".join(service.shown(status.log).splitlines()[-LOG_LINES_SHOWN:])
    sample, path = gr.update(), str(status.sample) if status.sample else None
    if path != shown_sample:
        # The run folder is not served (adapters are not downloadable): the grid goes out as an image.
        sample = _read_image(path) if path else None
    return text, _loss_table(status.losses, status.validation), tail, sample, path


def _read_image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.copy()


def _wire_train(service: AppService, tab: SimpleNamespace, lists: AdapterLists, demo: gr.Blocks) -> None:
    count = len(tab.settings)
    view = [tab.status, tab.loss_plot, tab.log, tab.sample]

    def on_train(**values):
        data, name, base, overwrite, *option_values, start_from, more = list(values.values())[:count]
        job = service.start_training(train_settings(data, name, base, overwrite, tab.option_keys, option_values,
                                                    start_from, more))
        return f"**{html.escape(job.name)}**: starting…"

    def on_resume(name):
        return f"**{html.escape(service.resume_training(name).name)}**: resuming from its last checkpoint…"

    def on_stop():
        job = service.training
        if job is None or not job.running:
            return "No training run in progress."
        job.stop()
        return f"Stopping {job.name} after its current step, with a checkpoint there…"

    follow = dict(fn=lambda: gr.Timer(active=True), inputs=None, outputs=tab.timer, api_visibility="private")
    names = {id(tab.data): "dataset", id(tab.name): "name", id(tab.base): "base", id(tab.settings[3]): "overwrite",
             id(tab.start_from): "start_from", id(tab.more): "more_options"}
    names.update({id(widget): spec.dotted for widget, spec in zip(tab.settings[4:-2], tab.specs)})
    tab.button.click(_shown(service, on_train), inputs_kwargs=_named(tab.settings, names), outputs=tab.status,
                     api_name="train").success(**follow)
    tab.resume.click(_shown(service, on_resume), inputs_kwargs={"name": tab.name}, outputs=tab.status,
                     api_name="resume_training").success(**follow)
    tab.stop.click(on_stop, None, tab.status, api_name="stop_training")

    def on_tick(shown_sample, chosen, inspected):
        job = service.training
        status = job.status() if job is not None else None
        shown = _training_view(service, status, shown_sample)
        if status is not None and status.running:  # the lists, cards and start choices stay as they are
            return *shown, *[gr.update()] * 4, gr.Timer(active=True), gr.update(interactive=True)
        # The run ended: the last view, the new adapter in the lists and cards (and offered to start from), no more
        # ticks, and nothing to stop.
        return (*shown, *lists.refreshed(chosen, inspected), lists.cards_now(),
                gr.update(choices=start_choices(service)), gr.Timer(active=False), gr.update(interactive=False))

    # Every page (a reload, a second browser) follows the current run from its start or its first load.
    tick = dict(fn=on_tick, inputs=[tab.shown_sample, *lists.widgets],
                outputs=[*view, tab.shown_sample, *lists.widgets, lists.cards, tab.start_from, tab.timer, tab.stop],
                show_progress="hidden",
                api_visibility="private", queue=False)
    tab.timer.tick(**tick)
    demo.load(**tick)
    _follow_newest_line(tab.log)

    def training_status() -> dict:
        """The current (or last) training run: state, step, total, loss, message, the log's newest lines."""
        job = service.training
        if job is None:
            return {"state": "none"}
        status = job.status()
        return {"name": status.name, "state": status.state, "step": status.step, "total": status.total,
                "loss": status.loss, "val_loss": status.validation[-1][1] if status.validation else None,
                "checkpoint": status.checkpoint, "message": service.shown(status.message),
                "log": "\n".join(service.shown(status.log).splitlines()[-LOG_LINES_SHOWN:]),
                "sample": bool(status.sample)}

    gr.api(training_status, api_name="training_status")

    tab.base.change(_family_text, tab.base, tab.family, api_visibility="private")
    _wire_datasets(service, tab)


def _wire_datasets(service: AppService, tab: SimpleNamespace) -> None:
    """The Train tab's folder lists (Rescan: the datasets, and the adapters to start from) and dataset upload."""
    tab.rescan.click(lambda value: gr.update(choices=service.dataset_names(), value=value), tab.data, tab.data,
                     api_visibility="private")
    tab.rescan.click(lambda value: gr.update(choices=start_choices(service), value=value), tab.start_from,
                     tab.start_from, api_visibility="private")

    def add_dataset(files, dataset_name, trigger, repeats):
        from pathlib import Path

        try:
            report = service.import_dataset(files or [], dataset_name, trigger, repeats)
        finally:
            for file in files or []:
                Path(file).unlink(missing_ok=True)  # gradio's copies
        return html.escape(report) if _from_browser() else report, gr.update(
            choices=service.dataset_names(), value=dataset_name.strip()), None

    tab.add.click(_shown(service, add_dataset), inputs_kwargs={
        "files": tab.files, "dataset_name": tab.dataset_name, "trigger": tab.trigger, "repeats": tab.repeats},
        outputs=[tab.added, tab.data, tab.files], api_name="upload_dataset")
