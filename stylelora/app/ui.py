"""The Gradio layout: tabs, widgets, and handlers that turn widget values into AppService calls and back.

No ML here: every action is one service call (stylelora.app.service), the same library functions the CLI uses.
Handlers catch the library's user errors and show their message (gr.Error) instead of a traceback.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import gradio as gr

from stylelora.app.service import AdapterWeight, AppError, AppService, GenerateSettings
from stylelora.app.training import TrainSettings

MAX_ADAPTER_ROWS = 4
SIZES = ["native", "32x32", "48x48", "64x64", "32x48", "48x32", "512x512", "512x768", "768x512"]
DEFAULT_SAMPLER = "base default"
DEFAULT_DATA_DIR = "datasets/toy-stripes"
CSS = ".mono textarea { font-family: ui-monospace, monospace; font-size: 0.85em; }"


def _user_errors() -> tuple[type[BaseException], ...]:
    from stylelora.generate.command import user_errors as library_user_errors

    return (AppError, *library_user_errors())


def _shown(function: Callable) -> Callable:
    """The handler with user errors (bad names, files, values) shown as a message box instead of a traceback."""
    import functools
    import inspect

    def report(error: BaseException):
        return gr.Error(str(error), print_exception=False)

    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def wrapped_generator(*args, **kwargs):
            try:
                yield from function(*args, **kwargs)
            except _user_errors() as error:
                raise report(error) from None
        return wrapped_generator

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except _user_errors() as error:
            raise report(error) from None
    return wrapped


def mix_from_values(chosen: Sequence[str] | None, weights: Sequence[float]) -> tuple[AdapterWeight, ...]:
    """The chosen adapters with the weights of their rows ([unet0, te0, unet1, te1, ...])."""
    chosen = list(chosen or [])[:MAX_ADAPTER_ROWS]
    return tuple(AdapterWeight(name, float(weights[2 * i]), float(weights[2 * i + 1])) for i, name in enumerate(chosen))


class GenerateInputs:
    """The Generate tab's widgets whose values make a GenerateSettings (shared by Generate, Compare and Blend)."""

    def __init__(self, service: AppService) -> None:
        from stylelora.generate.samplers import available_samplers

        names = service.adapter_names()
        with gr.Row():
            self.base = gr.Dropdown(list(service.bases), value=service.bases[0], label="Base model", scale=1)
            # Custom values are safe: every name is resolved inside the adapters folder, or refused.
            self.chosen = gr.Dropdown(names, value=[], multiselect=True, max_choices=MAX_ADAPTER_ROWS, scale=4,
                                      allow_custom_value=True,
                                      label=f"Adapters (from {service.adapters_dir.name}/, up to {MAX_ADAPTER_ROWS})",
                                      elem_id="adapters")
            self.refresh = gr.Button("↻ Rescan", scale=0, min_width=90)
        with gr.Accordion("Add an adapter: upload a .safetensors file", open=False):
            self.upload = gr.File(label="Adapter file (.safetensors)", file_types=[".safetensors"],
                                  type="filepath", elem_id="upload")
        self.rows, self.weights = [], []
        for i in range(MAX_ADAPTER_ROWS):
            with gr.Row(visible=False, elem_id=f"adapter-row-{i}") as row:
                unet = gr.Slider(-2, 2, value=1, step=0.05, label="UNet weight", elem_id=f"unet-weight-{i}")
                te = gr.Slider(-2, 2, value=1, step=0.05, label="Text-encoder weight", elem_id=f"te-weight-{i}")
            self.rows.append(row)
            self.weights += [unet, te]
        self.prompt = gr.Textbox(label="Prompt", lines=2, value="a red circle on a white background",
                                 placeholder="may carry <lora:name:weight> tags", elem_id="prompt")
        with gr.Row():
            self.triggers = gr.Button("Add trigger words", size="sm", scale=0, min_width=160)
        self.negative = gr.Textbox(label="Negative prompt", lines=1)
        with gr.Row():
            self.steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
            self.cfg = gr.Slider(1, 15, value=5, step=0.5, label="CFG scale")
            self.sampler = gr.Dropdown([DEFAULT_SAMPLER, *available_samplers()], value=DEFAULT_SAMPLER,
                                       label="Sampler")
        with gr.Row():
            self.seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1, elem_id="seed")
            self.random_seed = gr.Button("Random seed", size="sm", scale=0, min_width=90)
            self.reuse_seed = gr.Button("Last seed", size="sm", scale=0, min_width=90)
            self.size = gr.Dropdown(SIZES, value="native", allow_custom_value=True, label="Size (WxH)")
            self.batch = gr.Slider(1, 8, value=1, step=1, label="Batch")

    @property
    def settings_inputs(self) -> list:
        """Widgets in the order `settings()` reads them."""
        return [self.base, self.chosen, *self.weights, self.prompt, self.negative, self.steps, self.cfg,
                self.sampler, self.seed, self.size, self.batch]

    @staticmethod
    def settings(values: Sequence) -> GenerateSettings:
        base, chosen = values[0], values[1]
        weights = values[2:2 + 2 * MAX_ADAPTER_ROWS]
        prompt, negative, steps, cfg, sampler, seed, size, batch = values[2 + 2 * MAX_ADAPTER_ROWS:]
        return GenerateSettings(
            prompt=prompt or "", negative_prompt=negative or "", adapters=mix_from_values(chosen, weights),
            base=base, steps=int(steps), cfg=float(cfg), sampler=None if sampler == DEFAULT_SAMPLER else sampler,
            seed=-1 if seed is None else int(seed), size=size or "native", batch_size=int(batch),
        )


def _progress_callback(progress: gr.Progress, label: str):
    def report(done: int, total: int) -> None:
        progress((done, total), desc=label, unit="steps")

    return report


def _loss_table(losses):
    import pandas

    return pandas.DataFrame({"step": [s for s, _ in losses], "loss": [v for _, v in losses]})


def build_ui(service: AppService) -> gr.Blocks:
    """The app's Blocks: Generate, Compare, Blend, Adapters and Train tabs around one AppService.

    Each tab is laid out by its own function; the events are wired once every tab exists, because several of them
    read the Generate tab's settings or refresh the adapter lists of other tabs.
    """
    with gr.Blocks(title="stylelora") as demo:
        gr.Markdown("## stylelora: generate with LoRA blends, compare, blend, inspect, train")
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
        lists = AdapterLists(service, generate.inputs.chosen, adapters.name)
        _wire_generate(service, generate, lists)
        _wire_compare(service, generate.inputs, compare)
        _wire_blend(service, generate.inputs, blend, lists)
        _wire_adapters(service, adapters)
        _wire_train(service, train, lists)
        demo.load(lists.refreshed, lists.widgets, lists.widgets, api_visibility="private")
    return demo


class AdapterLists:
    """The dropdowns that list the adapters folder (Generate's choice, Adapters' inspect); refreshed together."""

    def __init__(self, service: AppService, chosen, inspected) -> None:
        self.service, self.widgets = service, [chosen, inspected]

    def refreshed(self, chosen: Sequence[str] | None = None, inspected: str | None = None):
        names = self.service.adapter_names()
        keep = [name for name in (chosen or []) if name in names]
        return (gr.update(choices=names, value=keep),
                gr.update(choices=names, value=inspected if inspected in names else None))


# ----------------------------------------------------------------------------- layouts


def _generate_tab(service: AppService) -> SimpleNamespace:
    with gr.Row():
        with gr.Column(scale=3):
            inputs = GenerateInputs(service)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Images (PNG with A1111 parameters)", format="png", columns=4,
                                 height=360, object_fit="contain", elem_id="gallery")
            parameters = gr.Textbox(label="Parameters of the first image", lines=4, elem_classes="mono",
                                    elem_id="parameters")
    return SimpleNamespace(inputs=inputs, button=button, gallery=gallery, parameters=parameters,
                           last_seed=gr.State(-1), previous_chosen=gr.State([]))


def _compare_tab() -> SimpleNamespace:
    gr.Markdown("An X/Y grid of the Generate tab's settings. Axes: `KIND=V1,V2,...` with KIND one of "
                "adapter (names, or `none`), weight, unet_weight, te_weight, seed, cfg, steps.")
    with gr.Row():
        x_axis = gr.Textbox(value="weight=0,0.5,1", label="X axis (columns)")
        y_axis = gr.Textbox(value="seed=1,2", label="Y axis (rows, optional)")
    button = gr.Button("Make grid", variant="primary")
    image = gr.Image(label="Grid", type="filepath", format="png", elem_id="grid")
    return SimpleNamespace(x_axis=x_axis, y_axis=y_axis, button=button, image=image)


def _blend_tab() -> SimpleNamespace:
    gr.Markdown("Save the Generate tab's current mix (adapters and weights) as one new adapter.")
    mix_view = gr.Markdown("No adapters chosen.")
    with gr.Row():
        name = gr.Textbox(label="New adapter name", value="my-blend")
        mode = gr.Radio(["exact", "rank"], value="exact", label="Mode",
                        info="exact keeps every rank; rank R re-factorises by SVD")
        rank = gr.Number(value=8, precision=0, minimum=1, label="Rank (mode rank)")
    with gr.Row():
        fp16 = gr.Checkbox(label="float16 (half the size)")
        overwrite = gr.Checkbox(label="overwrite")
    button = gr.Button("Save blend", variant="primary")
    report = gr.Textbox(label="Result", lines=4, elem_classes="mono")
    return SimpleNamespace(mix_view=mix_view, options=[name, mode, rank, fp16, overwrite], button=button,
                           report=report)


def _adapters_tab(service: AppService) -> SimpleNamespace:
    with gr.Row():
        name = gr.Dropdown(service.adapter_names(), value=None, label="Adapter", scale=4, allow_custom_value=True)
        as_json = gr.Checkbox(label="JSON", scale=0)
        button = gr.Button("Inspect", scale=0)
    text = gr.Textbox(label="inspect", lines=18, elem_classes="mono")
    return SimpleNamespace(name=name, as_json=as_json, button=button, text=text)


def _option_widget(spec):
    """The Train tab's widget for a config option, with the option's own default (stylelora.config declares both)."""
    widget = spec.option.widget
    if spec.type is bool:
        return gr.Checkbox(value=spec.default, label=widget.label, info=spec.option.help)
    if spec.option.choices:
        return gr.Dropdown(list(spec.option.choices), value=spec.default, label=widget.label, info=spec.option.help)
    if spec.type in (int, float):
        return gr.Number(value=spec.default, precision=0 if spec.type is int else None, minimum=widget.minimum,
                         maximum=widget.maximum, label=widget.label, info=spec.option.help)
    return gr.Textbox(value=spec.default or "", label=widget.label, info=spec.option.help)


def _train_tab(service: AppService) -> SimpleNamespace:
    from stylelora.config import OPTION_SPECS

    specs = [spec for spec in OPTION_SPECS if spec.option.widget is not None]
    with gr.Row():
        data = gr.Textbox(value=DEFAULT_DATA_DIR, label="Training data folder (on the server)")
        name = gr.Textbox(value="my-style", label="Adapter name")
        base = gr.Dropdown(list(service.bases), value=service.bases[0], label="Base model")
        overwrite = gr.Checkbox(label="overwrite a run of that name")
    with gr.Row(equal_height=True):
        options = [_option_widget(spec) for spec in specs]
    with gr.Row():
        button = gr.Button("Start training", variant="primary")
        stop = gr.Button("Stop", variant="stop")
    status = gr.Markdown("No training run yet.")
    loss_plot = gr.LinePlot(x="step", y="loss", title="loss (smoothed)", height=240)
    log = gr.Textbox(label="Trainer output", lines=8, max_lines=8, elem_classes="mono")
    # In the order on_train reads them.
    settings = [data, name, base, overwrite, *options]
    return SimpleNamespace(settings=settings, option_keys=[spec.dotted for spec in specs], button=button, stop=stop,
                           status=status, loss_plot=loss_plot, log=log)


def train_settings(data, name, base, overwrite, option_keys: Sequence[str], option_values: Sequence) -> TrainSettings:
    """TrainSettings from the Train tab's values; text is stripped and an empty box means the option's default."""
    values = {key: value.strip() if isinstance(value, str) else value for key, value in zip(option_keys, option_values)}
    return TrainSettings(data_dir=data, name=name, base=base, overwrite=bool(overwrite), options=values)


# ----------------------------------------------------------------------------- events


def _show_rows(chosen, previous, *weights):
    """One weight row per chosen adapter; an adapter that stays chosen keeps its weights."""
    chosen = list(chosen or [])[:MAX_ADAPTER_ROWS]
    old = {name: weights[2 * i:2 * i + 2] for i, name in enumerate(previous or [])}
    rows, sliders = [], []
    for i in range(MAX_ADAPTER_ROWS):
        name = chosen[i] if i < len(chosen) else None
        unet, te = old.get(name, (1.0, 1.0))
        rows.append(gr.update(visible=name is not None))
        sliders += [gr.update(value=unet, label=f"{name} · UNet weight" if name else "UNet weight"),
                    gr.update(value=te, label=f"{name} · text-encoder weight" if name else "TE weight")]
    return [chosen, *rows, *sliders]


def _wire_generate(service: AppService, tab: SimpleNamespace, lists: AdapterLists) -> None:
    inputs = tab.inputs
    inputs.chosen.change(_show_rows, [inputs.chosen, tab.previous_chosen, *inputs.weights],
                         [tab.previous_chosen, *inputs.rows, *inputs.weights], api_visibility="private")

    @_shown
    def on_generate(progress=gr.Progress(), *values):
        saved = service.generate(GenerateInputs.settings(values), _progress_callback(progress, "sampling"))
        return [str(image.path) for image in saved], saved[0].parameters_text, saved[0].seed

    tab.button.click(on_generate, inputs.settings_inputs, [tab.gallery, tab.parameters, tab.last_seed],
                     api_name="generate", concurrency_limit=4)

    @_shown
    def on_triggers(prompt, chosen):
        if not chosen:
            raise AppError("Choose adapters first: their trigger words are added to the prompt.")
        return service.prompt_with_triggers(prompt, chosen)

    inputs.triggers.click(on_triggers, [inputs.prompt, inputs.chosen], inputs.prompt, api_name="add_triggers")
    inputs.random_seed.click(lambda: -1, None, inputs.seed, api_visibility="private")
    inputs.reuse_seed.click(lambda seed: seed, tab.last_seed, inputs.seed, api_visibility="private")

    @_shown
    def on_upload(path, chosen):
        if not path:
            return gr.update(), gr.update(), gr.update()
        name = service.import_upload(path)
        chosen = [*(chosen or []), name][:MAX_ADAPTER_ROWS]
        gr.Info(f"Added {name}")
        return *lists.refreshed(chosen), None

    inputs.upload.upload(on_upload, [inputs.upload, inputs.chosen], [*lists.widgets, inputs.upload],
                         api_name="upload")
    inputs.refresh.click(lists.refreshed, lists.widgets, lists.widgets, api_name="adapters")


def _wire_compare(service: AppService, inputs: GenerateInputs, tab: SimpleNamespace) -> None:
    @_shown
    def on_grid(x, y, progress=gr.Progress(), *values):
        path = service.grid(GenerateInputs.settings(values), x, y or None, _progress_callback(progress, "grid cells"))
        return str(path)

    tab.button.click(on_grid, [tab.x_axis, tab.y_axis, *inputs.settings_inputs], tab.image, api_name="grid",
                     concurrency_limit=2)


def _describe_mix(chosen, *weights):
    mix = mix_from_values(chosen, weights)
    if not mix:
        return "No adapters chosen: pick some in the Generate tab."
    return "Current mix: " + ", ".join(f"**{m.name}** (UNet {m.unet:g}, TE {m.te:g})" for m in mix)


def _wire_blend(service: AppService, inputs: GenerateInputs, tab: SimpleNamespace, lists: AdapterLists) -> None:
    for widget in [inputs.chosen, *inputs.weights]:
        widget.change(_describe_mix, [inputs.chosen, *inputs.weights], tab.mix_view, api_visibility="private")

    @_shown
    def on_blend(chosen, *values):
        weights, (name, mode, rank, fp16, overwrite) = values[:-5], values[-5:]
        result = service.blend(mix_from_values(chosen, weights), name, rank=int(rank) if mode == "rank" else None,
                               fp16=bool(fp16), overwrite=bool(overwrite))
        return f"saved {result.name}\n{result.summary}", *lists.refreshed(chosen, result.name)

    tab.button.click(on_blend, [inputs.chosen, *inputs.weights, *tab.options], [tab.report, *lists.widgets],
                     api_name="blend")


def _wire_adapters(service: AppService, tab: SimpleNamespace) -> None:
    @_shown
    def on_inspect(name, as_json):
        return service.inspect(name, as_json=bool(as_json)) if name else ""

    tab.button.click(on_inspect, [tab.name, tab.as_json], tab.text, api_name="inspect")
    tab.name.change(on_inspect, [tab.name, tab.as_json], tab.text, api_visibility="private")


def _wire_train(service: AppService, tab: SimpleNamespace, lists: AdapterLists) -> None:
    count = len(tab.settings)

    @_shown
    def on_train(progress=gr.Progress(), *values):
        data, name, base, overwrite, *option_values = values[:count]
        chosen, inspected = values[count:]
        settings = train_settings(data, name, base, overwrite, tab.option_keys, option_values)
        job = service.start_training(settings)
        for status in job.follow():
            if status.running:
                progress((status.step, status.total), desc="training", unit="steps")
                loss = f", loss {status.loss:.4f}" if status.loss is not None else ""
                text = f"**{status.name}**: training, step {status.step}/{status.total}{loss}"
                yield text, _loss_table(status.losses), status.log, gr.update(), gr.update()
        if status.state == "failed":
            raise AppError(f"Training {status.name} failed: {status.message}")
        loss = f"; final loss {status.loss:.4f}" if status.loss is not None else ""
        yield (f"**{status.name}**: {status.state}{loss}. {status.message}", _loss_table(status.losses),
               status.log, *lists.refreshed(chosen, inspected))

    tab.button.click(on_train, [*tab.settings, *lists.widgets], [tab.status, tab.loss_plot, tab.log, *lists.widgets],
                     api_name="train", show_progress_on=[tab.status])  # the loss curve and the log stay visible

    def on_stop():
        job = service.training
        if job is None or not job.running:
            return "No training run in progress."
        job.stop()
        return f"Stopping {job.name}…"

    tab.stop.click(on_stop, None, tab.status, api_name="stop_training")
