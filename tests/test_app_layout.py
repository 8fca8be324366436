"""The app's page as built (no server, no browser): what each widget and its events tell the page. What a person
then sees in a real browser is in test_app_browser."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(Blocks, AppService) of an empty adapters and datasets folder."""
    from stylelora.app.service import AppService
    from stylelora.app.ui import build_ui

    folder = tmp_path_factory.mktemp("app")
    (folder / "adapters").mkdir()
    (folder / "datasets").mkdir()
    service = AppService(folder / "adapters", datasets_dir=folder / "datasets")
    return build_ui(service), service


@pytest.fixture(scope="module")
def page_config(app) -> dict:
    return app[0].config


def component(config: dict, elem_id: str) -> dict:
    return next(c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def listeners(config: dict, elem_id: str, event: str) -> list[dict]:
    """The dependencies `event` of the widget triggers, in the order the page runs them."""
    found = component(config, elem_id)["id"]
    return [d for d in config["dependencies"] if [found, event] in [list(t) for t in d["targets"]]]


def test_the_trainer_log_box_follows_its_newest_line(page_config):
    """Gradio 6's page ignores the Textbox's own autoscroll: a script in the page scrolls the box on each change."""
    scripts = [d["js"] for d in listeners(page_config, "train-log", "change") if d["js"] and not d["backend_fn"]]
    assert len(scripts) == 1 and '"#train-log textarea"' in scripts[0] and "scrollTop = box.scrollHeight" in scripts[0]


@pytest.mark.parametrize("button, stop", [("generate", "stop-generate"), ("make-grid", "stop-grid")])
def test_a_stop_button_is_pressable_only_while_its_request_runs(page_config, button, stop):
    assert component(page_config, stop)["props"]["interactive"] is False
    clicked = listeners(page_config, button, "click")
    stop_id = component(page_config, stop)["id"]
    assert not clicked[0]["backend_fn"] and clicked[0]["outputs"] == [stop_id] and "true" in clicked[0]["js"]
    request = clicked[1]
    ended = [d for d in page_config["dependencies"] if d["trigger_after"] == request["id"]]
    assert {(d["trigger_only_on_failure"], d["outputs"] == [stop_id], "false" in d["js"]) for d in ended} == {
        (False, True, True), (True, True, True)}  # after it ends, and after it fails (gradio 6's .then does not)


class RunningJob:
    def status(self):
        from stylelora.app.training import TrainingStatus

        return TrainingStatus("run", "running", 1, 10, ((1, 0.5),), "training…", None, "step 1/10")


def test_the_training_stop_button_is_pressable_only_while_a_run_goes(app, page_config, monkeypatch):
    """The page's tick (on load, then every second while a run goes) says whether there is a run to stop."""
    demo, service = app
    assert component(page_config, "stop-training")["props"]["interactive"] is False
    stop_id = component(page_config, "stop-training")["id"]
    ticks = [d for d in page_config["dependencies"] if any(t[1] == "tick" for t in d["targets"])]
    assert len(ticks) == 1 and ticks[0]["outputs"][-1] == stop_id
    on_tick = demo.fns[ticks[0]["id"]].fn
    assert on_tick(None, [], None)[-1]["interactive"] is False  # no run
    monkeypatch.setattr(service, "_training", RunningJob())
    assert on_tick(None, [], None)[-1]["interactive"] is True


def _parents(layout: dict, parent: int | None = None) -> dict[int, int]:
    """{component id: the id of the layout block holding it} from the page's layout tree."""
    found = {}
    for child in layout.get("children", []):
        found[child["id"]] = parent if parent is not None else layout.get("id")
        found.update(_parents(child, child["id"]))
    return found


def test_the_train_tabs_checkboxes_have_a_row_of_their_own(page_config):
    """Squeezed between the number boxes a checkbox's help text ran one word a line, down the page."""
    parents = _parents(page_config["layout"])
    types = {c["id"]: c["type"] for c in page_config["components"]}
    boxes = [component(page_config, name)["id"] for name in ("data-caption-variants", "network-train-text-encoder")]
    numbers = [component(page_config, name)["id"] for name in ("train-steps", "train-epochs", "network-rank")]
    assert len({parents[box] for box in boxes}) == 1 and {parents[n] for n in numbers} != {parents[boxes[0]]}
    row = parents[boxes[0]]
    assert {types[i] for i, parent in parents.items() if parent == row} == {"checkbox"}


def test_the_size_box_offers_the_bases_own_sizes_and_follows_the_base(app, page_config, tmp_path):
    """The toy base (32 px native) was offered SD's 512-1024 px sizes, which its server limit let through."""
    from test_app_fixtures import sd_sized_base

    from stylelora.app.service import AppService
    from stylelora.app.ui import size_box

    size = component(page_config, "size")
    assert [value for _, value in size["props"]["choices"]] == ["native", "32x32", "24x40", "40x24"]
    assert size["props"]["label"] == "Size (WxH, up to 64 a side)"
    changed = listeners(page_config, "base", "change")  # the Generate tab's base box (the first with this id)
    assert [d["outputs"] for d in changed] == [[size["id"]]]
    sd = str(sd_sized_base(tmp_path / "sd"))
    both = AppService(app[1].adapters_dir, datasets_dir=app[1].datasets_dir, bases=("toy", sd))
    assert size_box(both, sd, "32x32") == {"choices": ["native", "512x512", "448x576", "576x448", "384x640",
                                                       "640x384"], "label": "Size (WxH, up to 1024 a side)",
                                           "value": "native"}  # a size the new base does not offer goes back
    assert size_box(both, "toy", "24x40")["value"] == "24x40"


def test_renaming_a_chosen_adapter_keeps_it_chosen_with_its_weights(tmp_path):
    """Generate tab: stripes and pastel chosen, pastel's row at UNet 0.4 / TE 0.7 / lbw OUTALL. Renaming pastel in
    the Adapters tab leaves it chosen, under its new name, in the same row with the same values."""
    from stylelora.app.service import AppService
    from stylelora.app.ui import _show_rows, build_ui

    for name in ("styles/stripes", "pastel"):
        (tmp_path / "adapters" / f"{name}.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "adapters" / f"{name}.safetensors").write_bytes(b"renaming does not read it")
    demo = build_ui(AppService(tmp_path / "adapters", datasets_dir=tmp_path / "datasets"))
    config = demo.config
    confirm = listeners(config, "confirm", "click")[0]
    chosen = ["styles/stripes", "pastel"]
    answer = demo.fns[confirm["id"]].fn(("rename", "pastel", "kept/pastel-v2"), chosen, "pastel", chosen)
    outputs = dict(zip(confirm["outputs"], answer))
    chosen_now = outputs[component(config, "adapters")["id"]]["value"]
    assert chosen_now == ["styles/stripes", "kept/pastel-v2"]
    assert outputs[component(config, "adapter-name")["id"]]["value"] == "kept/pastel-v2"  # inspected under it too
    previous_now = answer[-1]  # the Generate tab's memory of each row's adapter, renamed with it
    weights, blocks = [1.0, 1.0, 0.4, 0.7, 1.0, 1.0, 1.0, 1.0], ["", "OUTALL", "", ""]
    update = _show_rows(chosen_now, previous_now, *weights, *blocks)
    unet, te, lbw = update[1 + 4 + 2], update[1 + 4 + 3], update[1 + 4 + 8 + 1]
    assert "value" not in unet and "value" not in te and "value" not in lbw  # the row keeps 0.4 / 0.7 / OUTALL
    assert unet["label"] == "kept/pastel-v2 · UNet weight" and te["label"] == "kept/pastel-v2 · text-encoder weight"


def test_the_adapters_tab_lists_training_checkpoints_labelled_and_generate_does_not(tmp_path):
    from stylelora.app.service import AppService
    from stylelora.app.ui import build_ui

    for relative in ("run/run.safetensors", "run/checkpoints/step-000002/run-step000002.safetensors"):
        (tmp_path / "adapters" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "adapters" / relative).write_bytes(b"x")
    config = build_ui(AppService(tmp_path / "adapters", datasets_dir=tmp_path / "datasets")).config
    assert [tuple(c) for c in component(config, "adapters")["props"]["choices"]] == [("run/run", "run/run")]
    assert [tuple(c) for c in component(config, "adapter-name")["props"]["choices"]] == [
        ("run/run", "run/run"), ("run/checkpoints/step-000002/run-step000002  (training checkpoint)",
                                 "run/checkpoints/step-000002/run-step000002")]


def test_the_block_weights_box_shows_its_whole_placeholder_and_explains_itself_in_its_info(page_config):
    """Its placeholder ran past the box ('empty: all 1; a preset (OUTALL) or BASE,IN..,M..,OUT.. numbers')."""
    props = component(page_config, "blocks-0")["props"]
    assert len(props["placeholder"]) <= 12
    assert all(word in props["info"] for word in ("every block at 1", "OUTALL", "BASE first"))


def test_stop_says_what_it_stopped_even_when_the_cancel_reached_the_request_first(app):
    """What the Generate tab's status line says after Stop (the browser test presses it on a running request)."""
    from stylelora.app.jobs import Cancelled
    from stylelora.app.ui import Run

    service = app[1]
    assert "before it started (it was waiting in the queue)" in Run("generation").stop_report(service)
    run = Run("generation")
    with pytest.raises(Cancelled), run.running_request():
        raise Cancelled("The generation was stopped after 3 of 20 sampling steps; nothing was saved.")
    assert run.stop_report(service) == "The generation was stopped after 3 of 20 sampling steps; nothing was saved."
    with run.running_request():
        pass
    assert run.stop_report(service) == "The generation had finished before Stop reached it."
