"""The app served for real (in this process, on a free port) and driven over HTTP with gradio_client."""
from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import gradio_client
import numpy
import pytest
from test_app_fixtures import PROMPT, broken_adapter, make_toy_adapter, tiny_dataset, toy_base

STEPS = 4
NO_WEIGHTS = [1.0, 1.0] * 2  # the unused adapter rows (4 rows in all)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from stylelora.app.launch import create_app, serve

    folder = tmp_path_factory.mktemp("adapters")
    make_toy_adapter(folder / "styles" / "stripes.safetensors", seed=1, trigger="stripestyle")
    make_toy_adapter(folder / "pastel.safetensors", seed=2, trigger="pastelstyle")
    datasets = tmp_path_factory.mktemp("datasets")
    tiny_dataset(datasets / "tiny", count=4)
    demo, service = create_app(folder, max_upload_bytes=2 * 2**20, datasets_dir=datasets)
    service.preload("toy", toy_base())  # the shipped toy base, loaded once per test process
    serve(demo, service, port=free_port(), prevent_thread_lock=True, quiet=True)
    client = gradio_client.Client(demo.local_url, verbose=False, analytics_enabled=False,
                                  download_files=str(tmp_path_factory.mktemp("downloads")))
    try:
        yield demo, service, client
    finally:
        client.close()
        demo.close()


def choices(update: dict) -> list[str]:
    """The names a dropdown offers after an update the server sent."""
    return [value for _, value in update["choices"]]


def generate_args(chosen, weights, seed, *, batch=1, prompt=PROMPT):
    return ["toy", chosen, *weights, prompt, "", STEPS, 5.0, "base default", seed, "native", batch]


def test_served_on_localhost_only_by_default(app):
    demo, _, _ = app
    assert demo.local_url.startswith("http://127.0.0.1:")
    assert demo.share_url is None


def test_generate_with_two_adapters_returns_pngs_with_their_parameters(app):
    from stylelora.app.service import AdapterWeight, GenerateSettings
    from stylelora.generate.pngmeta import read_png_parameters

    demo, service, client = app
    weights = [0.8, 0.5, 1.0, 1.0, *NO_WEIGHTS]
    gallery, parameters = client.predict(*generate_args(["styles/stripes", "pastel"], weights, 21, batch=2),
                                         api_name="/generate")
    assert len(gallery) == 2
    assert "<lora:stripes:te=0.5:unet=0.8> <lora:pastel:1>" in parameters and "Seed: 21" in parameters
    downloaded = [Path(item["image"]) for item in gallery]
    assert read_png_parameters(downloaded[0]) == parameters  # the metadata survives the trip to the browser
    assert "Seed: 22" in read_png_parameters(downloaded[1])
    saved = sorted(service.images_dir.glob("*-21.png"))[-1]
    assert downloaded[0].read_bytes() == saved.read_bytes()  # served as written, not re-encoded
    # The same picture the service (and so the CLI's generate()) makes for these settings.
    mix = (AdapterWeight("styles/stripes", 0.8, 0.5), AdapterWeight("pastel", 1.0, 1.0))
    # Batch 2 as well: a UNet call differs by about 1e-6 between batch sizes (with one thread, a pixel can move).
    direct = service.generate(GenerateSettings(PROMPT, adapters=mix, steps=STEPS, seed=21, batch_size=2))[0]
    from PIL import Image

    with Image.open(downloaded[0]) as image:
        assert numpy.array_equal(numpy.asarray(image.convert("RGB")), numpy.asarray(direct.result.image))


def test_eight_simultaneous_requests_with_different_blends_get_their_own_images(app):
    from PIL import Image

    from stylelora.app.service import AdapterWeight, GenerateSettings

    _, service, client = app
    blends = [(0, 0, 0), (1, 1, 0), (0, 0, 1), (0.5, 1, -1), (-1, 0, 0.5), (2, 2, 2), (-2, 1, 1), (1, -1, -0.5)]
    jobs = [client.submit(*generate_args(["styles/stripes", "pastel"], [u, t, p, p, *NO_WEIGHTS], 8),
                          api_name="/generate") for u, t, p in blends]
    served = []
    for job in jobs:
        gallery, _ = job.result(timeout=120)
        with Image.open(gallery[0]["image"]) as image:
            served.append(numpy.asarray(image.convert("RGB")))
    for (u, t, p), got in zip(blends, served):
        mix = (AdapterWeight("styles/stripes", u, t), AdapterWeight("pastel", p, p))
        alone = service.generate(GenerateSettings(PROMPT, adapters=mix, steps=STEPS, seed=8))[0]
        assert numpy.array_equal(got, numpy.asarray(alone.result.image)), f"blend {(u, t, p)} got another image"
    assert len({image.tobytes() for image in served}) == len(blends)


def test_add_trigger_words_button(app):
    _, _, client = app
    prompt = client.predict(PROMPT, ["styles/stripes", "pastel"], api_name="/add_triggers")
    assert prompt == f"stripestyle, pastelstyle, {PROMPT}"


def test_blend_then_inspect_the_new_adapter(app):
    _, service, client = app
    weights = [0.7, 0.7, -0.5, -0.5, *NO_WEIGHTS]
    report, chosen, inspected = client.predict(["styles/stripes", "pastel"], *weights, "client-mix", "rank", 4,
                                               False, False, api_name="/blend")
    assert report.startswith("saved blends/client-mix") and "svd rank 4" in report
    assert (service.adapters_dir / "blends" / "client-mix.safetensors").is_file()
    assert inspected["value"] == "blends/client-mix"  # the new adapter is offered everywhere at once
    assert "blends/client-mix" in choices(inspected) and "blends/client-mix" in choices(chosen)
    text = client.predict("blends/client-mix", False, api_name="/inspect")
    assert "client-mix" in text and "rank 4" in text and "stripestyle" in text and "pastelstyle" in text
    with pytest.raises(gradio_client.exceptions.AppError, match="exists already"):
        client.predict(["pastel"], *weights, "client-mix", "exact", 4, False, False, api_name="/blend")


def test_bad_requests_come_back_as_messages(app):
    _, _, client = app
    with pytest.raises(gradio_client.exceptions.AppError, match="not allowed"):
        client.predict("../../etc/passwd", False, api_name="/inspect")
    with pytest.raises(gradio_client.exceptions.AppError, match="No adapter named"):
        client.predict(*generate_args(["nope"], [1.0] * 8, 1), api_name="/generate")


def test_upload_accepts_an_adapter_and_refuses_other_files(app, tmp_path):
    from gradio_client import handle_file

    _, service, client = app
    good = make_toy_adapter(tmp_path / "uploaded.safetensors", seed=5, trigger="up")
    chosen, _, cleared = client.predict(handle_file(str(good)), ["pastel"], "toy", api_name="/upload")
    assert chosen["value"] == ["pastel", "uploads/uploaded"] and "uploads/uploaded" in choices(chosen)
    assert cleared is None
    assert service.adapter_path("uploads/uploaded").read_bytes() == good.read_bytes()
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(gradio_client.exceptions.AppError, match="not a readable .safetensors"):
        client.predict(handle_file(str(fake)), [], "toy", api_name="/upload")
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (3 * 2**20))  # over this app's 2 MiB cap: gradio refuses it before the service sees it
    with pytest.raises(ValueError, match="exceeds the maximum file size of 2097152 bytes"):
        client.predict(handle_file(str(big)), [], "toy", api_name="/upload")  # the client reads the server's cap
    import httpx

    with big.open("rb") as handle:  # and the server enforces it for clients that do not
        response = httpx.post(f"{app[0].local_url}gradio_api/upload", files={"files": ("big.safetensors", handle)})
    assert response.status_code == 413, response.text


def test_only_the_app_image_folders_are_served(app):
    from stylelora.app.service import GenerateSettings

    demo, service, client = app
    image = service.generate(GenerateSettings(PROMPT, steps=2))[0].path

    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{demo.local_url}gradio_api/file={path}") as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(image) == 200
    assert status(service.adapter_path("pastel")) == 403  # adapters are not downloadable
    assert status(Path("/etc/passwd")) == 403
    assert status(Path(__file__)) == 403


def train_tab_values(chosen: dict) -> list:
    """The Train tab's option values in its widget order (stylelora.config's), each option's default unless chosen."""
    from stylelora.config import OPTION_SPECS

    return [chosen.get(spec.dotted, spec.default) for spec in OPTION_SPECS if spec.option.widget is not None]


def test_short_training_run_reports_progress_and_its_adapter_appears(app):
    import time

    _, service, client = app
    options = train_tab_values({"train.steps": 3, "train.batch_size": 2, "network.rank": 2, "network.alpha": 2.0,
                                "train.save_every": 0, "train.sample_every": 0})
    with pytest.raises(gradio_client.exceptions.AppError, match="No training data folder named '../tiny'"):
        client.predict("../tiny", "tiny-run", "toy", False, *options, api_name="/train")
    with pytest.raises(gradio_client.exceptions.AppError, match="--noise_offset: --noise-offset"):
        client.predict("tiny", "tiny-run", "toy", False, *options, "", "--noise_offset 0.05", api_name="/train")
    # More options: any other `stylelora train` flags, as on the command line
    started = client.predict("tiny", "tiny-run", "toy", False, *options, "", "--noise-offset 0.05 --lr-scheduler "
                             "cosine --validation-split 0.25 --validate-every 2", api_name="/train")
    assert "tiny-run" in started and "starting" in started
    deadline, seen = time.time() + 240, []
    while time.time() < deadline:
        status = client.predict(api_name="/training_status")
        seen.append(status)
        if status["state"] != "running":
            break
        time.sleep(0.5)
    assert status["state"] == "done", status
    assert status["step"] == status["total"] == 3 and status["loss"] is not None
    # the held-out images' loss, at steps 2 and 3 (the last), in the status and on the tab's plot
    assert status["val_loss"] > 0 and [step for step, _ in service.training.status().validation] == [2, 3]
    assert "adapter written: tiny-run/tiny-run.safetensors" in status["message"]  # relative to the adapters folder
    assert "%|" not in status["log"]  # the trainer's lines, without its progress bars
    adapter = service.adapters_dir / "tiny-run" / "tiny-run.safetensors"
    assert adapter.is_file() and (adapter.parent / "app-settings.toml").is_file()
    assert "tiny-run/tiny-run" in service.adapter_names()
    text = client.predict("tiny-run/tiny-run", False, api_name="/inspect")
    assert "stripestyle" in text and "rank 2" in text
    from stylelora.lora.adapter_file import read_header

    _, metadata = read_header(adapter)
    assert (metadata["ss_noise_offset"], metadata["ss_lr_scheduler"]) == ("0.05", "cosine")


def test_compare_tab_makes_a_grid(app):
    from PIL import Image

    from stylelora.generate.pngmeta import parse_parameters, read_png_parameters

    _, service, client = app
    path = client.predict("weight=0,1", "adapter=none,pastel", "", *generate_args(["styles/stripes"], [1.0] * 8, 3),
                          api_name="/grid")
    assert "X Type: weight" in read_png_parameters(path) and "Y Type: adapter" in read_png_parameters(path)
    with Image.open(path) as grid:
        assert grid.width > 2 * 96 and grid.height > 2 * 96  # 2x2 cells of 32 px shown at 3x, with labels
    assert list(service.grids_dir.glob("*-grid.png"))
    words = client.predict('prompt=red,"blue, striped"', "clip_skip=1,2", "", *generate_args([], [1.0] * 8, 3),
                           api_name="/grid")  # A1111's Prompt S/R and Clip skip axes
    extra = parse_parameters(read_png_parameters(words)).extra
    assert (extra["X Type"], extra["X Values"], extra["Y Type"]) == ("Prompt S/R", 'red,"blue, striped"', "Clip skip")


def test_endpoints_take_named_parameters(app):
    _, _, client = app
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]

    def names(endpoint: str) -> list[str]:
        return [parameter["parameter_name"] for parameter in endpoints[endpoint]["parameters"]]

    generate = names("/generate")
    assert generate[:2] == ["base", "adapters"] and "unet_weight_0" in generate and "te_weight_3" in generate
    assert {"prompt", "negative_prompt", "steps", "cfg", "sampler", "seed", "size", "batch_size"} <= set(generate)
    assert names("/grid")[:3] == ["x_axis", "y_axis", "z_axis"] and "prompt" in names("/grid")
    assert {"name", "mode", "rank", "fp16", "overwrite"} <= set(names("/blend"))
    # Start from, then More options: last, so positional calls written before them keep their places; empty is a
    # new LoRA with no other flags.
    assert names("/train")[:4] == ["dataset", "name", "base", "overwrite"]
    assert names("/train")[-2:] == ["start_from", "more_options"]
    assert [p["parameter_default"] for p in endpoints["/train"]["parameters"][-2:]] == ["", ""]
    # Generation blends 2+ adapters in split by default; a saved blend is a sum unless asked (split cannot be a file).
    defaults = {endpoint: {p["parameter_name"]: p.get("parameter_default") for p in endpoints[endpoint]["parameters"]}
                for endpoint in ("/generate", "/blend")}
    assert (defaults["/generate"]["blend_mode"], defaults["/blend"]["blend_mode"]) == ("split", "sum")
    assert names("/train")[:4] == ["dataset", "name", "base", "overwrite"] and "train_steps" in names("/train")
    assert names("/delete_adapter") == ["name", "confirm"]
    assert names("/rename_adapter") == ["name", "new_name", "confirm"]
    assert not [name for endpoint in endpoints for name in names(endpoint) if name.startswith("param_")]
    # What each endpoint returns is named too (an unlabeled component shows up in view_api as value_<id>).
    assert [r["label"] for r in endpoints["/train"]["returns"]] == ["Training status"]
    assert not [(endpoint, r["label"]) for endpoint in endpoints for r in endpoints[endpoint]["returns"]
                if r["label"].startswith("value_")]
    # Called by name, as a script would.
    gallery, parameters = client.predict(prompt=PROMPT, seed=12, steps=2, adapters=["pastel"], api_name="/generate")
    assert "Seed: 12" in parameters and "Steps: 2" in parameters and "<lora:pastel:1>" in parameters
    assert defaults["/generate"]["dial"] == "weights" and "Weight dial" not in parameters
    _, parameters = client.predict(prompt=PROMPT, seed=12, steps=2, adapters=["pastel"], te_weight_0=0.5,
                                   dial="reading", api_name="/generate")
    assert "Weight dial: reading" in parameters and "<lora:pastel:te=0.5:unet=1>" in parameters
    # Each adapter row's block weights (A1111's lbw=), by name.
    assert {"blocks_0", "blocks_3"} <= set(generate) and {"blocks_0", "dial"} <= set(names("/blend"))
    _, parameters = client.predict(prompt=PROMPT, seed=12, steps=2, adapters=["pastel"], blocks_0="1,0,0,1,1,1,1,1",
                                   api_name="/generate")
    assert "<lora:pastel:1:lbw=1,0,0,1,1,1,1,1>" in parameters


def test_limits_and_grid_axes_are_refused_with_the_limit_named(app):
    _, _, client = app
    refused = [
        (generate_args([], NO_WEIGHTS * 2, 1)[:12] + [1000] + generate_args([], [], 1)[11:], "/generate",
         r"Steps must be between 1 and 150 \(got 1000\); 150 is this server's limit \(--max-steps"),
    ]
    for args, endpoint, message in refused:
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(*args, api_name=endpoint)
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=r"each side must be between 8 and 64 .*native size of 32 px.*--max-side"):
        client.predict(prompt=PROMPT, size="2048x2048", api_name="/generate")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"Batch size .*--max-batch"):
        client.predict(prompt=PROMPT, batch_size=64, api_name="/generate")
    with pytest.raises(gradio_client.exceptions.AppError, match="At most 4 adapters"):
        client.predict(prompt=PROMPT, adapters=["pastel", "styles/stripes", "a", "b", "c"], api_name="/generate")
    axes = {"steps=4,1000": r"Grid axis steps: a value must be between 1 and 150.*--max-steps",
            "weight=0,5": "Grid axis weight: a weight must be between -2 and 2",
            "seed=1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26": "--max-grid-cells"}
    for axis, message in axes.items():
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(x_axis=axis, y_axis="", adapters=["pastel"], prompt=PROMPT, api_name="/grid")
    # Values an API client sends as text, and an empty Rank box (reachable in the browser), name their field.
    not_a_number = r"The UNet weight of pastel must be a number \(got 'abc'\)"
    with pytest.raises(gradio_client.exceptions.AppError, match=not_a_number):
        client.predict(prompt=PROMPT, adapters=["pastel"], unet_weight_0="abc", api_name="/generate")
    no_rank = r"Rank \(mode rank\) must be a whole number \(got None\)"
    with pytest.raises(gradio_client.exceptions.AppError, match=no_rank):
        client.predict(adapters=["pastel"], name="no-rank", mode="rank", rank=None, api_name="/blend")
    # The message is plain text for an API client: a tag in it reads as typed.
    with pytest.raises(gradio_client.exceptions.AppError, match=r"<lora:nope:1>|No adapter named 'nope'"):
        client.predict(prompt=f"{PROMPT} <lora:nope:1>", api_name="/generate")


def test_a_number_out_of_its_boxs_range_is_refused_with_the_box_named(app):
    """gradio's own range check said "Value -7 is less than minimum value -1.": which of the page's boxes?"""
    _, service, client = app
    refused = [({"prompt": PROMPT, "seed": -7}, "/generate", r"Seed must be at least -1 \(got -7\)\."),
               ({"adapters": ["pastel"], "name": "r0", "mode": "rank", "rank": 0}, "/blend",
                r"Rank must be at least 1 \(got 0\)\."),
               ({"dataset": "tiny", "name": "no-steps", "train_steps": 0}, "/train",
                r"Steps must be at least 1 \(got 0\)\."),
               ({"files": [], "dataset_name": "r", "trigger": "", "repeats": 101}, "/upload_dataset",
                r"Repeats must be between 1 and 100 \(got 101\)\.")]
    for values, endpoint, message in refused:
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(**values, api_name=endpoint)
    assert not (service.adapters_dir / "no-steps").exists()


def test_a_whole_number_box_refuses_a_fraction_instead_of_rounding_it(app):
    """gradio rounded a rank of 1.5 to 2 (and a seed of 1.5 to 2) and saved or drew that without a word."""
    _, service, client = app
    for values, endpoint, message in (
            ({"adapters": ["pastel"], "name": "r-half", "mode": "rank", "rank": 1.5}, "/blend",
             r"Rank must be a whole number \(got 1\.5\)\."),
            ({"prompt": PROMPT, "seed": 1.5, "steps": 1}, "/generate", r"Seed must be a whole number \(got 1\.5\)\.")):
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(**values, api_name=endpoint)
    assert not (service.adapters_dir / "blends" / "r-half.safetensors").exists()


def test_a_png_dropped_in_generate_fills_in_its_settings_and_draws_again(app, tmp_path):
    """A1111's PNG Info + "Send to txt2img": the app wrote A1111 parameters into every PNG but could not read them
    back; its settings had to be copied box by box. Read, they draw the same image again."""
    from gradio_client import handle_file
    from PIL import Image

    _, _, client = app
    weights = [0.8, 0.5, 1.0, 1.0, *NO_WEIGHTS]
    gallery, parameters = client.predict(*generate_args(["styles/stripes", "pastel"], weights, 31), "ties",
                                         api_name="/generate")
    (chosen, prompt, negative, steps, cfg, sampler, seed, size, batch, mode, dial, clip_skip, note, box) = \
        client.predict(file=handle_file(gallery[0]["image"]), api_name="/read_png")
    assert (chosen, steps, seed, size, batch, mode, dial, clip_skip, box) == (
        [], STEPS, 31, "32x32", 1, "ties", "weights", 1, None)
    assert prompt == f"{PROMPT} <lora:stripes:te=0.5:unet=0.8> <lora:pastel:1>" and sampler == "ddim"
    assert note.startswith("Read ") and "the adapters chosen above were cleared, as the tags carry them" in note
    again, parameters_again = client.predict(
        "toy", chosen, *NO_WEIGHTS * 2, prompt, negative, steps, cfg, sampler, seed, size, batch, mode, dial,
        *[""] * 4, clip_skip, api_name="/generate")
    assert parameters_again == parameters
    with Image.open(gallery[0]["image"]) as first, Image.open(again[0]["image"]) as second:
        assert numpy.array_equal(numpy.asarray(first), numpy.asarray(second))
    skipped, parameters = client.predict(prompt=PROMPT, seed=3, steps=1, clip_skip=2, api_name="/generate")
    assert "Clip skip: 2" in parameters  # A1111's setting, drawn, written and read back
    assert client.predict(file=handle_file(skipped[0]["image"]), api_name="/read_png")[11] == 2
    with pytest.raises(gradio_client.exceptions.AppError, match=r"Clip skip must be a whole number \(got 1\.5\)"):
        client.predict(prompt=PROMPT, steps=1, clip_skip=1.5, api_name="/generate")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(gradio_client.exceptions.AppError, match=r"plain\.png has no A1111 'parameters' text"):
        client.predict(file=handle_file(str(plain)), api_name="/read_png")


def test_a_nan_adapter_and_one_for_another_base_are_refused_on_upload_leaving_nothing(app, tmp_path):
    from gradio_client import handle_file

    _, service, client = app
    before = sorted(service.adapters_dir.rglob("*"))
    nan = broken_adapter(service.adapter_path("pastel"), tmp_path / "nan.safetensors", "nan")
    with pytest.raises(gradio_client.exceptions.AppError, match="NaN or infinite values"):
        client.predict(handle_file(str(nan)), [], "toy", api_name="/upload")
    other = broken_adapter(service.adapter_path("pastel"), tmp_path / "other.safetensors", "other-base")
    with pytest.raises(gradio_client.exceptions.AppError, match="made for a different base architecture"):
        client.predict(handle_file(str(other)), [], "toy", api_name="/upload")
    assert sorted(service.adapters_dir.rglob("*")) == before  # nothing copied in
    cached = [p for p in Path(app[0].GRADIO_CACHE).rglob("*.safetensors") if p.name in ("nan.safetensors",
                                                                                          "other.safetensors")]
    assert cached == []  # and gradio's copies of the refused uploads are gone


def test_rename_and_delete_stay_inside_the_adapters_folder(app, tmp_path):
    _, service, client = app
    outside = make_toy_adapter(tmp_path / "outside.safetensors", seed=3)
    make_toy_adapter(service.adapters_dir / "to-rename.safetensors", seed=7)
    for name in ("../" + outside.stem, str(outside), "/etc/passwd", "styles/../../x"):
        with pytest.raises(gradio_client.exceptions.AppError):
            client.predict(name, True, api_name="/delete_adapter")
    for new_name in ("../escaped", "/tmp/escaped", "a/../../b", "images/x"):
        with pytest.raises(gradio_client.exceptions.AppError):
            client.predict("to-rename", new_name, True, api_name="/rename_adapter")
    with pytest.raises(gradio_client.exceptions.AppError, match="confirm it first"):
        client.predict("to-rename", "moved/renamed", False, api_name="/rename_adapter")
    assert client.predict("to-rename", "moved/renamed", True, api_name="/rename_adapter") == \
        "Renamed to-rename to moved/renamed."
    with pytest.raises(gradio_client.exceptions.AppError, match="cannot be undone: confirm it first"):
        client.predict("moved/renamed", False, api_name="/delete_adapter")
    assert client.predict(name="moved/renamed", confirm=True, api_name="/delete_adapter") == "Deleted moved/renamed."
    assert "moved/renamed" not in service.adapter_names() and outside.is_file()
    assert not (tmp_path.parent / "escaped.safetensors").exists()


def test_a_client_that_cancels_stops_its_generation(app):
    import time

    _, service, client = app
    images = set(service.images_dir.glob("*.png"))
    job = client.submit(prompt=PROMPT, steps=150, seed=31, api_name="/generate")
    deadline = time.time() + 30
    while time.time() < deadline and not (job.status().progress_data or []):
        time.sleep(0.05)  # until it samples
    job.cancel()
    # The next request samples once the first lets go of the shared base: at once, as it stopped between steps.
    _, parameters = client.predict(prompt=PROMPT, steps=2, seed=32, api_name="/generate")
    assert "Seed: 32" in parameters
    new = set(service.images_dir.glob("*.png")) - images
    assert [path.name.endswith("-32.png") for path in new] == [True]  # the cancelled one saved nothing


def test_python_app_py_serves_on_localhost_by_default(tmp_path):
    import subprocess
    import sys
    import time

    from test_app_fixtures import REPO

    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--adapters-dir",
                                str(tmp_path / "adapters")], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.time() + 90, None
        while time.time() < deadline and page is None and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    page = response.read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None, f"app.py did not serve on 127.0.0.1:{port}"
        assert "stylelora" in page
        listening = [line for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]
        assert listening and all(line.split()[1].startswith("0100007F:") for line in listening)  # 127.0.0.1 only
        assert (tmp_path / "adapters").is_dir()
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("previous, chosen, weights, blocks, expected, expected_blocks", [
    # a second adapter chosen: the first row keeps whatever it shows now (no value sent back), the new row 1 and no
    # block weights
    (["a"], ["a", "b"], [0.6, 0.3], ["OUTALL"], [None, None, 1.0, 1.0], [None, ""]),
    # the first adapter dropped: b moves up a row and takes its own weights and block weights with it
    (["a", "b"], ["b"], [0.6, 0.3, -0.5, 1.0], ["OUTALL", "INS"], [-0.5, 1.0, 1.0, 1.0], ["INS", ""]),
    # nothing chosen any more: every row back to 1, no block weights
    (["a"], [], [0.6, 0.3], ["OUTALL"], [1.0, 1.0, 1.0, 1.0], ["", ""]),
])
def test_adapter_rows_follow_the_chosen_adapters_and_never_undo_a_move(previous, chosen, weights, blocks, expected,
                                                                       expected_blocks):
    from stylelora.app.ui import MAX_ADAPTER_ROWS, _show_rows

    sliders = (weights + [1.0] * 2 * MAX_ADAPTER_ROWS)[: 2 * MAX_ADAPTER_ROWS]
    boxes = (blocks + [""] * MAX_ADAPTER_ROWS)[:MAX_ADAPTER_ROWS]
    answer = _show_rows(chosen, previous, *sliders, *boxes)
    assert answer[0] == chosen
    rows, values = answer[1:1 + MAX_ADAPTER_ROWS], answer[1 + MAX_ADAPTER_ROWS:1 + 3 * MAX_ADAPTER_ROWS]
    assert [row["visible"] for row in rows] == [i < len(chosen) for i in range(MAX_ADAPTER_ROWS)]
    assert [update.get("value") for update in values[:4]] == expected
    assert [update.get("value") for update in answer[1 + 3 * MAX_ADAPTER_ROWS:][:2]] == expected_blocks


def test_the_train_tabs_text_boxes_read_numbers_and_name_a_bad_one():
    from stylelora.app.errors import AppError
    from stylelora.app.ui import train_settings

    keys = ["optim.unet_lr", "train.batch_size", "data.resolution"]
    settings = train_settings("tiny", "run", "toy", False, keys, ["1e-4", " 2 ", ""])
    assert settings.options == {"optim.unet_lr": 1e-4, "train.batch_size": 2, "data.resolution": ""}
    with pytest.raises(AppError, match=r"UNet LR must be a number \(got 'fast'\)"):
        train_settings("tiny", "run", "toy", False, keys, ["fast", "", ""])
    with pytest.raises(AppError, match=r"Batch size must be a whole number \(got '2.5'\)"):
        train_settings("tiny", "run", "toy", False, keys, ["", "2.5", ""])


def test_sigterm_stops_the_app_as_ctrl_c_does_emptying_gradios_file_cache(tmp_path):
    """`kill`, systemd and `docker stop` send SIGTERM, whose default ended the app at once, leaving gradio's copies of
    uploaded and served files in its temp folder; Ctrl+C's way out deletes them (--cache-minutes says so)."""
    import json
    import os
    import subprocess
    import sys
    import time

    from test_app_fixtures import REPO

    port, cache = free_port(), tmp_path / "gradio"
    process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--adapters-dir",
                                str(tmp_path / "adapters"), "--datasets-dir", str(tmp_path / "datasets")],
                               cwd=tmp_path, env={**os.environ, "GRADIO_TEMP_DIR": str(cache)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, copies = time.time() + 90, None
        while time.time() < deadline and copies is None and process.poll() is None:
            body = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="note.txt"\r\n'
                    b"Content-Type: text/plain\r\n\r\nhello\r\n--b--\r\n")
            upload = urllib.request.Request(f"http://127.0.0.1:{port}/gradio_api/upload", data=body,
                                            headers={"Content-Type": "multipart/form-data; boundary=b"})
            try:
                with urllib.request.urlopen(upload, timeout=5) as response:
                    copies = [Path(path) for path in json.loads(response.read())]
            except OSError:
                time.sleep(0.5)
        assert copies and all(copy.is_file() and copy.is_relative_to(cache) for copy in copies)
        process.terminate()  # SIGTERM
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output
        assert not any(copy.exists() for copy in copies), output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_sigterm_raises_keyboard_interrupt_only_while_the_app_serves():
    import os
    import signal
    import time

    from stylelora.app.launch import sigterm_as_ctrl_c

    def ignored(signum, frame):  # stands in for the default, which would end the test run
        pass

    original = signal.signal(signal.SIGTERM, ignored)
    try:
        with sigterm_as_ctrl_c():
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) is ignored
    finally:
        signal.signal(signal.SIGTERM, original)
