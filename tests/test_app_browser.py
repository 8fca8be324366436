"""The app in a real headless Chromium: what a person sees. Pick two adapters, set their weights, generate, see the
image (crisp); an error message quoting a <lora:...> tag shows the tag; Stop ends a generation, and can be pressed
only while something runs; a reload (or a second browser) finds the running training again; a log box follows its
newest line."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from test_app_client import free_port
from test_app_fixtures import make_toy_adapter, tiny_dataset, toy_base

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not CHROMIUM.is_file() and shutil.which("chromium") is None:
    pytest.skip("no Chromium at /usr/bin/chromium", allow_module_level=True)


PASTEL_DESCRIPTION = "Soft pastel palette with feathered edges; " + "works best at 0.8 beside a character. " * 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app served on a free port: (url, service)."""
    from stylelora.app.launch import create_app, serve

    folder = tmp_path_factory.mktemp("adapters")
    make_toy_adapter(folder / "styles" / "stripes.safetensors", seed=1, trigger="stripestyle")
    make_toy_adapter(folder / "pastel.safetensors", seed=2, trigger="pastelstyle")
    (folder / "pastel.json").write_text(json.dumps({"description": PASTEL_DESCRIPTION}))  # A1111's sidecar
    datasets = tmp_path_factory.mktemp("datasets")
    tiny_dataset(datasets / "tiny", count=2)
    demo, service = create_app(folder, datasets_dir=datasets)
    service.preload("toy", toy_base())
    serve(demo, service, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, service
    finally:
        job = service.training
        if job is not None and job.running:
            job.process.kill()
        demo.close()


@pytest.fixture(scope="module")
def app_url(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (a launch takes seconds on a busy machine); each test gets its own
    context in it, as fresh as a new browser: no cookies, storage or cache shared between tests."""
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM if CHROMIUM.is_file() else
                                                                  shutil.which("chromium")), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


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
    page.locator("#blocks-1 textarea, #blocks-1 input").first.fill("1,0,0,1,1,1,1,1")  # A1111's lbw= for that row
    set_number(page, "#steps", "100")
    seed = page.locator("#seed input")
    seed.fill("5")
    seed.press("Enter")
    size = page.locator("#size input")
    size.fill("40x24")  # not square: shown whole, as it is
    size.press("Enter")

    page.locator("#generate").click()
    expect(page.get_by_text(re.compile(r"\d+/100 steps")).first).to_be_visible(timeout=30_000)  # live progress
    image = page.locator("#gallery img").first
    expect(image).to_be_visible(timeout=60_000)
    parameters = page.locator("#parameters textarea")
    expect(parameters).to_have_value(re.compile(
        r"<lora:stripes:te=0\.3:unet=0\.6> <lora:pastel:te=1:unet=-0\.5:lbw=1,0,0,1,1,1,1,1>"))
    assert "Steps: 100" in parameters.input_value() and "Seed: 5" in parameters.input_value()
    assert image.evaluate("img => img.complete && [img.naturalWidth, img.naturalHeight]") == [40, 24]
    # Shown larger than its 40 px, scaled nearest-neighbour: crisp pixels, not a blur.
    assert image.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    assert image.evaluate("img => img.getBoundingClientRect().width") > 80
    # Whole: inside the gallery's box (a single image was drawn square, taller than the box, and cut), and fitted
    # (object-fit contain), not cropped to its square.
    assert image.evaluate("""img => { const shown = img.getBoundingClientRect();
        const box = img.closest("#gallery").getBoundingClientRect();
        return shown.top >= box.top && shown.bottom <= box.bottom && shown.left >= box.left
            && shown.right <= box.right && getComputedStyle(img).objectFit === "contain"; }""")

    # What the browser was served is the PNG with its A1111 parameters, as written.
    served = page.request.get(image.get_attribute("src"))
    assert served.ok
    with Image.open(io.BytesIO(served.body())) as png:
        assert png.format == "PNG" and png.info["parameters"] == parameters.input_value()

    screenshot = tmp_path / "generate-tab.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_a_lora_card_shows_the_first_line_of_its_description_and_the_rest_under_the_pointer(app_url, page):
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    page.get_by_text("Lora cards").click()
    card = page.locator("#lora-cards .thumbnail-item").filter(has_text="pastel")
    caption = card.locator(".caption-label")
    sync_api.expect(caption).to_be_visible(timeout=30_000)
    assert caption.inner_text().split("\n") == ["pastel", PASTEL_DESCRIPTION.strip()]
    lines = caption.evaluate("""label => { const style = getComputedStyle(label);
        return (label.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom))
            / parseFloat(style.lineHeight); }""")
    page.locator("#prompt").hover()
    shut = caption.evaluate("label => label.getBoundingClientRect().height")
    card.hover()
    opened = caption.evaluate("label => label.getBoundingClientRect().height")
    assert round(lines) == 2 and opened > 2 * shut  # name and one line; the whole description under the pointer


def test_an_error_quoting_a_lora_tag_shows_the_tag_as_typed(app_url, page):
    expect = sync_api.expect
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    prompt = page.locator("#prompt textarea")
    prompt.fill("a red circle <lora:pastel:abc>")
    page.locator("#generate").click()
    # The toast's text, as text: the tags in it are not swallowed as HTML elements.
    expect(page.get_by_text("<lora:pastel:abc>: weight 'abc' is not a number (write e.g. <lora:name:0.8>)")
           ).to_be_visible(timeout=30_000)
    assert page.locator("lora\\:pastel\\:abc").count() == 0
    expect(page.locator("#stop-generate")).to_be_disabled()  # the refused request ended: nothing to stop


def test_a_number_typed_past_a_sliders_end_is_set_to_the_end_with_a_note_saying_so(app_url, page):
    """Gradio's slider clamps a typed 3 to its maximum 2 when the box loses focus, and that is what Generate sends:
    the image was drawn at weight 2 without a word (beside a toast "Value 3 is greater than maximum value 2." that
    named no field). A note under the slider says so now; a value in range takes it away."""
    expect = sync_api.expect
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    page.locator("#adapters input").click()
    page.locator('#adapters li[aria-label="pastel"]').click()  # its row's labels change: gradio rebuilds them
    page.keyboard.press("Escape")
    expect(page.locator("#unet-weight-0")).to_contain_text("pastel")
    box = page.locator("#unet-weight-0 input[type=number]")
    box.fill("3")
    box.press("Tab")
    note = page.locator("#unet-weight-0 .clamp-note")
    expect(note).to_have_text("Typed 3: this slider goes from -2 to 2, so it was set to 2.")
    expect(box).to_have_value("2")
    box.fill("0.5")
    box.press("Tab")
    expect(note).to_have_count(0)
    cfg = page.locator("#cfg input[type=number]")  # as high as the service and a grid's cfg axis take (30)
    cfg.fill("20")
    cfg.press("Tab")
    expect(cfg).to_have_value("20")
    assert page.locator("#cfg .clamp-note").count() == 0
    page.wait_for_timeout(500)  # the change events the typing sent have answered
    assert page.get_by_text(re.compile("greater than maximum value")).count() == 0


def test_a_refused_blend_or_trigger_request_leaves_the_adapter_lists_and_prompt_usable(served, page):
    """A blend refused for its name (exists already) covered the Generate tab's Adapters picker and the Adapters
    tab's box with gradio's "Error" badge, hiding the adapters chosen; Add trigger words with none chosen covered
    the prompt. The refusal is a toast; the widgets stay as they were."""
    from stylelora.app.service import AdapterWeight

    expect = sync_api.expect
    app_url, service = served
    if not (service.adapters_dir / "blends" / "taken.safetensors").exists():
        service.blend((AdapterWeight("pastel"),), "taken")
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    page.get_by_role("button", name="Add trigger words").click()
    expect(page.get_by_text("Choose adapters first")).to_be_visible(timeout=30_000)
    assert page.locator("#prompt .error").count() == 0
    expect(page.locator("#prompt textarea")).to_be_editable()
    page.locator("#adapters input").click()
    page.locator('#adapters li[aria-label="pastel"]').click()
    page.keyboard.press("Escape")
    page.get_by_role("tab", name="Blend").click()
    page.get_by_label("New adapter name").fill("taken")
    page.get_by_role("button", name="Save blend").click()
    expect(page.get_by_text("blends/taken.safetensors exists already")).to_be_visible(timeout=30_000)
    page.get_by_role("tab", name="Generate").click()
    assert page.locator("#adapters .error").count() == 0
    expect(page.locator("#adapters")).to_contain_text("pastel")  # still chosen, and shown
    page.locator("#adapters input").click()  # and still a picker: nothing lies over it
    expect(page.locator('#adapters li[aria-label="styles/stripes"]')).to_be_visible()
    page.keyboard.press("Escape")
    page.get_by_role("tab", name="Adapters").click()
    assert page.locator("#adapter-name .error").count() == 0


def test_stop_ends_a_running_generation_and_saves_nothing(served, page):
    expect = sync_api.expect
    app_url, service = served
    before = set(service.images_dir.glob("*.png"))
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    set_number(page, "#steps", "150")
    page.locator("#seed input").fill("77")
    page.locator("#seed input").press("Enter")
    stop = page.locator("#stop-generate")
    expect(stop).to_be_disabled()  # nothing runs yet
    page.locator("#generate").click()
    expect(page.get_by_text(re.compile(r"\d+/150 steps")).first).to_be_visible(timeout=30_000)
    expect(stop).to_be_enabled()
    stop.click()
    expect(page.get_by_text(re.compile(r"\d+/150 steps"))).to_have_count(0, timeout=10_000)
    expect(stop).to_be_disabled()
    # The page says so (gradio drops a stopped request's own answer: it said nothing).
    # The report waits up to STOP_WAIT_SECONDS for the request to end: on a loaded machine (the suite runs in parallel)
    # that and the server's answer take longer than an idle machine's second.
    expect(page.locator("#generate-status")).to_contain_text(re.compile(
        r"The generation was stopped after \d+ of 150 sampling steps; nothing was saved\."), timeout=40_000)
    from stylelora.app.service import GenerateSettings

    # A request that needs the shared base waits for the stopped one to let go of it: had it kept sampling, its
    # image would be saved by then.
    service.generate(GenerateSettings("a circle", steps=1, seed=1))
    assert not [p for p in set(service.images_dir.glob("*.png")) - before if p.name.endswith("-77.png")]
    assert page.locator("#gallery img").count() == 0


def test_stop_ends_a_running_grid_and_says_so(served, page):
    """The Compare tab's Stop: its status line says what was stopped, as the Generate tab's does."""
    expect = sync_api.expect
    app_url, service = served
    before = set(service.grids_dir.glob("*.png")) if service.grids_dir.exists() else set()
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    set_number(page, "#steps", "150")  # the grid draws with the Generate tab's settings
    page.get_by_role("tab", name="Compare").click()
    page.locator("#x-axis textarea").fill("seed=1,2")
    page.locator("#y-axis textarea").fill("")
    stop = page.locator("#stop-grid")
    expect(stop).to_be_disabled()
    page.locator("#make-grid").click()
    expect(page.get_by_text(re.compile(r"\d+/300 steps")).first).to_be_visible(timeout=30_000)
    stop.click()
    expect(page.locator("#grid-status")).to_contain_text(re.compile(
        r"The grid was stopped after \d+ of 300 sampling steps; nothing was saved\."), timeout=40_000)
    expect(stop).to_be_disabled()
    after = set(service.grids_dir.glob("*.png")) if service.grids_dir.exists() else set()
    assert after == before


def test_a_grid_is_shown_across_its_tab_and_downloads_at_its_own_size(served, page):
    """A grid of 32 px cells was shown at its own few hundred pixels, small in a wide tab."""
    from PIL import Image

    expect = sync_api.expect
    app_url, service = served
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    set_number(page, "#steps", "2")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#x-axis textarea, #x-axis input").first.fill("seed=1,2")
    page.locator("#y-axis textarea, #y-axis input").first.fill("")
    page.locator("#make-grid").click()
    image = page.locator("#grid img").first
    expect(image).to_be_visible(timeout=60_000)
    page.wait_for_function("() => document.querySelector('#grid img').complete", timeout=10_000)
    natural, shown = image.evaluate("img => [img.naturalWidth, img.getBoundingClientRect().width]")
    width = page.locator("#grid").evaluate("box => box.getBoundingClientRect().width")
    assert shown > 0.9 * width and shown > 1.5 * natural, (natural, shown, width)
    assert image.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    served_file = page.request.get(image.get_attribute("src"))  # what the download button gives
    newest = max(service.grids_dir.glob("*-grid.png"), key=lambda path: path.stat().st_mtime)
    with Image.open(io.BytesIO(served_file.body())) as grid, Image.open(newest) as saved:
        assert grid.size == saved.size and grid.width == natural
    # A tall grid (one column, nine rows, 898 px) is shown whole: its height capped at 85 % of the window's.
    page.locator("#x-axis textarea, #x-axis input").first.fill("seed=1")
    page.locator("#y-axis textarea, #y-axis input").first.fill("cfg=1,2,3,4,5,6,7,8,9")
    wide_src = image.get_attribute("src")
    page.locator("#make-grid").click()
    expect(page.locator("#grid img").first).not_to_have_attribute("src", wide_src, timeout=60_000)
    page.wait_for_function("() => document.querySelector('#grid img').complete", timeout=10_000)
    (natural_w, natural_h), (_, shown_h) = page.locator("#grid img").first.evaluate(
        "img => [[img.naturalWidth, img.naturalHeight], [img.getBoundingClientRect().width, "
        "img.getBoundingClientRect().height]]")
    window = page.evaluate("() => window.innerHeight")
    assert natural_h > natural_w and 0.85 * window - 2 <= shown_h <= 0.85 * window + 1, (natural_h, shown_h, window)


def test_at_a_narrow_width_labels_keep_their_words_together_and_placeholders_fit(app_url, page):
    """At 800 px the sliders' labels ran a word a line beside their number boxes, and the block-weights box's
    placeholder ran past its end."""
    expect = sync_api.expect
    page.set_viewport_size({"width": 800, "height": 1000})
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=60_000)
    page.locator("#adapters input").click()
    page.locator('#adapters li[aria-label="pastel"]').click()
    page.keyboard.press("Escape")
    expect(page.locator("#adapter-row-0")).to_be_visible()
    lines = """box => { const label = box.querySelector("label");
        return Math.round(label.getBoundingClientRect().height / parseFloat(getComputedStyle(label).lineHeight)); }"""
    for slider in ("#steps", "#cfg", "#batch-size", "#unet-weight-0"):
        assert page.locator(slider).evaluate(lines) == 1, slider
    placeholder = page.locator("#blocks-0 input, #blocks-0 textarea").first
    assert placeholder.evaluate("""box => { const style = getComputedStyle(box);
        const context = document.createElement("canvas").getContext("2d");
        context.font = `${style.fontSize} ${style.fontFamily}`;
        const room = box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
        return context.measureText(box.placeholder).width <= room; }""")


def test_start_training_with_the_tabs_defaults_runs_to_its_adapter(served, page):
    """The boxes whose default is the base family's start empty, and Start works without touching them."""
    expect = sync_api.expect
    url, service = served
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    for box in ("#data-resolution", "#optim-unet-lr", "#optim-text-encoder-lr", "#train-batch-size"):
        expect(page.locator(f"{box} input, {box} textarea").first).to_have_value("")
    page.locator("#data input").fill("tiny")
    page.locator("#data input").press("Enter")
    page.locator("#name textarea, #name input").first.fill("browser-run")
    for box, value in (("#train-steps", "2"), ("#train-save-every", "0"), ("#train-sample-every", "0")):
        set_number(page, box, value)
    expect(page.locator("#stop-training")).to_be_disabled()  # no run yet
    page.locator("#train").click()
    expect(page.locator("#train-status")).to_contain_text(re.compile(r"browser-run.*: done"), timeout=180_000)
    expect(page.locator("#stop-training")).to_be_disabled()
    assert (service.adapters_dir / "browser-run" / "browser-run.safetensors").is_file()


def test_a_reload_or_second_browser_finds_the_running_training(served, page):
    from stylelora.app.training import TrainSettings

    expect = sync_api.expect
    app_url, service = served
    job = service.start_training(TrainSettings(data_dir="tiny", name="watched", options={
        "train.steps": 50_000, "train.batch_size": 2, "network.rank": 2, "network.alpha": 2.0,
        "train.save_every": 0, "train.sample_every": 3, "train.sample_steps": 2}))
    try:
        page.goto(app_url)
        page.get_by_role("tab", name="Train").click()
        status = page.locator("#train-status")
        expect(status).to_contain_text(re.compile(r"watched: training, step \d+/50000, loss"), timeout=90_000)
        expect(page.locator("#train-sample img")).to_be_visible(timeout=60_000)  # the newest sample grid
        assert page.locator("#train-log textarea").input_value().strip()  # the trainer's newest lines
        page.reload()  # a reload (as a second browser would) follows the same run
        page.get_by_role("tab", name="Train").click()
        expect(status).to_contain_text(re.compile(r"watched: training, step \d+/50000"), timeout=30_000)
        first = int(re.search(r"step (\d+)/", status.inner_text()).group(1))
        expect(status).not_to_contain_text(f"step {first}/", timeout=30_000)  # live
        expect(page.locator("#stop-training")).to_be_enabled()
        page.locator("#stop-training").click()
        expect(status).to_contain_text("watched: stopped", timeout=60_000)
        expect(page.locator("#stop-training")).to_be_disabled()
    finally:
        if job.running:
            job.process.kill()


def test_a_log_box_follows_its_newest_line_unless_the_reader_scrolls_up(page):
    """As the Train tab's log box: new text every tick, more lines than the box shows."""
    import gradio as gr

    from stylelora.app.ui import _follow_newest_line

    def newest_lines(count):
        return count + 1, "\n".join(f"line {i}" for i in range(count, count + 12))

    with gr.Blocks() as demo:
        log = gr.Textbox(lines=4, max_lines=4, elem_id="log")
        count = gr.State(0)
        gr.Timer(0.3).tick(newest_lines, count, [count, log], queue=False)
        _follow_newest_line(log)
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        page.goto(demo.local_url)
        box = page.locator("#log textarea")
        page.wait_for_function("""() => { const box = document.querySelector("#log textarea");
            return box && box.scrollHeight > box.clientHeight
                && box.scrollTop + box.clientHeight >= box.scrollHeight - 4; }""", timeout=30_000)
        box.evaluate("box => { box.scrollTop = 0; }")  # the reader scrolls up to read: the box stays there
        shown = box.input_value()
        sync_api.expect(box).not_to_have_value(shown, timeout=10_000)
        assert box.evaluate("box => box.scrollTop") == 0
    finally:
        demo.close()
