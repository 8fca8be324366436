"""A1111's Lora cards in the Generate tab: a card per adapter (its preview, its sidecar's preferred weight and
activation text, else weight 1 and its trigger words); a click puts its <lora:NAME:W> tag at the end of the prompt
and its trigger words in front, a second click takes the tag out. Driven through the service, the page as built,
and a headless Chromium (as test_app_browser)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_app_client import free_port
from test_app_fixtures import PROMPT, make_toy_adapter, toy_base

from stylelora.app.service import AdapterCard, AppService, GenerateSettings

CHROMIUM = Path("/usr/bin/chromium")
STRIPES_TAG = "<lora:styles/stripes:0.8>"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """styles/stripes with a preview and an A1111 sidecar (weight 0.8, two activation words); pastel with neither."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("adapters")
    stripes = make_toy_adapter(folder / "styles" / "stripes.safetensors", seed=1, trigger="stripestyle")
    make_toy_adapter(folder / "pastel.safetensors", seed=2, trigger="pastelstyle")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(stripes.with_name("stripes.preview.png"))
    stripes.with_suffix(".json").write_text(json.dumps({
        "description": "Bold stripes", "sd version": "Unknown", "activation text": "stripestyle, bold lines",
        "preferred weight": 0.8, "negative text": "", "notes": ""}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def service(adapters, tmp_path_factory) -> AppService:
    service = AppService(adapters, datasets_dir=tmp_path_factory.mktemp("datasets"))
    service.preload("toy", toy_base())
    return service


def test_the_cards_carry_the_sidecars_weight_and_activation_text_else_weight_1_and_the_trigger_words(service,
                                                                                                      adapters):
    assert service.adapter_cards() == [
        AdapterCard("pastel", None, 1.0, "pastelstyle", ""),
        AdapterCard("styles/stripes", adapters / "styles" / "stripes.preview.png", 0.8, "stripestyle, bold lines",
                    "Bold stripes")]


def test_a_card_shows_its_name_and_the_start_of_its_description_and_a_click_reads_the_name_back(service):
    from stylelora.app.ui import card_caption, card_gallery, card_name

    assert [caption for _, caption in card_gallery(service)["value"]] == ["pastel", "styles/stripes\nBold stripes"]
    long = AdapterCard("ink", None, 1.0, "ink", "A wash of ink,\n  with dry-brush edges " + "and more " * 40)
    caption = card_caption(long)
    assert caption.startswith("ink\nA wash of ink, with dry-brush edges and more") and caption.endswith("…")
    assert len(caption.split("\n")[1]) <= 300 and card_name(caption) == "ink" and card_name(None) == ""


def test_a_click_appends_the_tag_with_the_preferred_weight_and_puts_the_activation_text_in_front(service):
    once = service.with_card(PROMPT, "styles/stripes")
    assert once == f"stripestyle, bold lines, {PROMPT} {STRIPES_TAG}"
    assert service.with_card(once, "styles/stripes") == f"stripestyle, bold lines, {PROMPT}"  # toggled off
    # The tag goes whatever weight it was given since; another adapter's tag stays where it is.
    assert service.with_card(f"{PROMPT} <lora:styles/stripes:0.3> <lora:pastel:1>", "styles/stripes") == \
        f"{PROMPT} <lora:pastel:1>"
    # No sidecar: weight 1 and the adapter's own trigger word.
    assert service.with_card(PROMPT, "pastel") == f"pastelstyle, {PROMPT} <lora:pastel:1>"


def test_a_trigger_already_in_the_prompt_is_left_alone(service):
    assert service.with_card(f"stripestyle, {PROMPT}", "styles/stripes") == \
        f"bold lines, stripestyle, {PROMPT} {STRIPES_TAG}"
    assert service.with_card(f"pastelstyle, {PROMPT}", "pastel") == f"pastelstyle, {PROMPT} <lora:pastel:1>"


def test_the_prompt_a_card_writes_draws_with_the_adapter_at_its_preferred_weight(service):
    saved = service.generate(GenerateSettings(prompt=service.with_card(PROMPT, "styles/stripes"), steps=2, seed=3))
    assert re.search(r"<lora:(styles/)?stripes:0\.8>", saved[0].parameters_text)


def test_a_card_of_an_adapter_not_in_the_folder_is_refused_with_a_message(service):
    from stylelora.app.errors import AppError
    from stylelora.generate.prompt_tags import PromptTagError

    with pytest.raises((AppError, PromptTagError), match="nope"):
        service.with_card(PROMPT, "nope")


def test_an_unreadable_adapter_file_gets_a_card_and_the_page_still_builds(tmp_path):
    from stylelora.app.ui import build_ui

    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "truncated.safetensors").write_bytes(b"cut off")
    service = AppService(tmp_path / "adapters", datasets_dir=tmp_path / "datasets")
    assert service.adapter_cards() == [AdapterCard("truncated", None, 1.0, "")]
    assert service.with_card(PROMPT, "truncated") == f"{PROMPT} <lora:truncated:1>"
    gallery = _cards_gallery(build_ui(service).config)
    assert [item["caption"] for item in gallery["props"]["value"]] == ["truncated"]


def _cards_gallery(config: dict) -> dict:
    return next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "lora-cards")


def test_an_empty_adapters_folder_shows_an_empty_gallery_with_a_hint_and_rescan_brings_a_new_card(tmp_path):
    from stylelora.app.ui import build_ui

    demo = build_ui(AppService(tmp_path / "adapters", datasets_dir=tmp_path / "datasets"))
    gallery = _cards_gallery(demo.config)
    assert not gallery["props"]["value"] and "No adapters in adapters/ yet" in gallery["props"]["label"]
    make_toy_adapter(tmp_path / "adapters" / "fresh.safetensors", seed=3, trigger="freshstyle")
    # The Rescan button's request, then the step after it that fills the gallery.
    rescan = next(d for d in demo.config["dependencies"] if d.get("api_name") == "adapters")
    after = next(d for d in demo.config["dependencies"] if d["trigger_after"] == rescan["id"])
    assert after["outputs"] == [gallery["id"]]
    update = demo.fns[after["id"]].fn()
    assert [caption for _, caption in update["value"]] == ["fresh"] and "Click a card" in update["label"]


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no Chromium at /usr/bin/chromium")
def test_clicking_a_card_in_the_browser_puts_its_tag_into_the_prompt_and_a_second_click_takes_it_out(adapters,
                                                                                                     tmp_path):
    from playwright import sync_api

    from stylelora.app.launch import create_app, serve

    demo, service = create_app(adapters, datasets_dir=tmp_path / "datasets")
    service.preload("toy", toy_base())
    serve(demo, service, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            try:
                page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                page.goto(demo.local_url)
                page.wait_for_selector("#generate", timeout=60_000)
                page.get_by_role("button", name="Lora cards").click()
                card = page.locator("#lora-cards .thumbnail-item", has_text="styles/stripes")
                sync_api.expect(card).to_contain_text("Bold stripes")  # the sidecar's description
                prompt = page.locator("#prompt textarea")
                card.click()
                sync_api.expect(prompt).to_have_value(f"stripestyle, bold lines, {PROMPT} {STRIPES_TAG}",
                                                      timeout=20_000)
                card.click()
                sync_api.expect(prompt).to_have_value(f"stripestyle, bold lines, {PROMPT}", timeout=20_000)
            finally:
                browser.close()
    finally:
        demo.close()
