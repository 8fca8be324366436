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
