"""The app in a real headless Chromium: pick two adapters, set their weights, generate, see the image."""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from test_app_client import free_port
from test_app_fixtures import make_toy_adapter, toy_base

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not CHROMIUM.is_file() and shutil.which("chromium") is None:
    pytest.skip("no Chromium at /usr/bin/chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from stylelora.app.launch import create_app, serve

    folder = tmp_path_factory.mktemp("adapters")
    make_toy_adapter(folder / "styles" / "stripes.safetensors", seed=1, trigger="stripestyle")
    make_toy_adapter(folder / "pastel.safetensors", seed=2, trigger="pastelstyle")
    demo, service = create_app(folder)
    service.preload("toy", toy_base())
    serve(demo, service, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM if CHROMIUM.is_file() else
                                                                 shutil.which("chromium")), headless=True)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def set_number(page, selector: str, value: str) -> None:
    box = page.locator(f"{selector} input[type=number]")
    box.fill(value)
    box.press("Enter")


def test_pick_two_adapters_set_weights_generate_and_see_the_image(app_url, page, tmp_path):
    from PIL import Image

    expect = sync_api.expect
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    for row, name in enumerate(["styles/stripes", "pastel"]):
        page.locator("#adapters input").click()
        page.locator(f'#adapters li[aria-label="{name}"]').click()
        expect(page.locator(f"#unet-weight-{row}")).to_contain_text(name)  # its row of sliders appears
    page.keyboard.press("Escape")
    expect(page.locator("#adapter-row-2")).to_be_hidden()
    set_number(page, "#unet-weight-0", "0.6")
    set_number(page, "#te-weight-0", "0.3")
    set_number(page, "#unet-weight-1", "-0.5")
    set_number(page, "#steps", "100")
    seed = page.locator("#seed input")
    seed.fill("5")
    seed.press("Enter")

    page.locator("#generate").click()
    expect(page.get_by_text(re.compile(r"\d+/100 steps")).first).to_be_visible(timeout=30_000)  # live progress
    image = page.locator("#gallery img").first
    expect(image).to_be_visible(timeout=60_000)
    parameters = page.locator("#parameters textarea")
    expect(parameters).to_have_value(re.compile(r"<lora:styles/stripes:te=0\.3:unet=0\.6> <lora:pastel:te=1:unet=-0\.5>"))
    assert "Steps: 100" in parameters.input_value() and "Seed: 5" in parameters.input_value()
    assert image.evaluate("img => img.complete && img.naturalWidth") == 32  # the toy base's 32 px image loaded

    # What the browser was served is the PNG with its A1111 parameters, as written.
    served = page.request.get(image.get_attribute("src"))
    assert served.ok
    with Image.open(io.BytesIO(served.body())) as png:
        assert png.format == "PNG" and png.info["parameters"] == parameters.input_value()

    screenshot = tmp_path / "generate-tab.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
