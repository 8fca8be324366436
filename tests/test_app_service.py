"""The app's service layer, called directly: what each tab does, and what it refuses.

Adapters are seeded random LoRAs for the shipped toy base (tests/test_app_fixtures.py); images are 32x32 and
4 steps, so a generation takes a fraction of a second.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy
import pytest
from test_app_fixtures import PROMPT, make_toy_adapter, tiny_dataset, toy_base

from stylelora.app.service import AdapterWeight, AppError, AppService, GenerateSettings
from stylelora.generate.prompt_tags import PromptTagError
from stylelora.lora.adapter_file import AdapterFileError

STEPS = 4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    make_toy_adapter(folder / "styles" / "stripes.safetensors", seed=1, trigger="stripestyle")
    make_toy_adapter(folder / "pastel.safetensors", seed=2, trigger="pastelstyle")
    return folder


@pytest.fixture(scope="module")
def service(adapters) -> AppService:
    app = AppService(adapters)
    app.preload("toy", toy_base())  # the shipped toy base, as load_base("toy") gives it, loaded once per process
    return app


def pixels(saved) -> numpy.ndarray:
    return numpy.asarray(saved.result.image)


def settings(*mix, seed: int = 7, **changes) -> GenerateSettings:
    values = {"prompt": PROMPT, "steps": STEPS, "seed": seed, **changes}
    return GenerateSettings(adapters=tuple(AdapterWeight(*m) for m in mix), **values)


# ----------------------------------------------------------------------------- command line


def test_stylelora_app_defaults_to_localhost_and_the_outputs_folder():
    from stylelora.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.share, args.adapters_dir, args.max_upload_mb) == (
        "127.0.0.1", 7860, False, "outputs", 512)
    args = build_parser().parse_args(["app", "--host", "0.0.0.0", "--port", "9000", "--share", "--adapters-dir",
                                      "loras"])
    assert (args.host, args.port, args.share, args.adapters_dir) == ("0.0.0.0", 9000, True, "loras")


# ----------------------------------------------------------------------------- adapter names and uploads


def test_adapters_are_listed_by_name_and_resolve_only_inside_the_folder(service, adapters, tmp_path):
    outside = make_toy_adapter(tmp_path / "outside.safetensors", seed=3)
    (adapters / "escape.safetensors").symlink_to(outside)
    try:
        assert service.adapter_names() == ["pastel", "styles/stripes"]  # the link out is not offered
        assert service.adapter_path("styles/stripes") == adapters / "styles" / "stripes.safetensors"
        for name in ("../outside", "styles/../../outside", str(outside), "escape", "/etc/passwd", "C:\\x"):
            with pytest.raises(PromptTagError):
                service.adapter_path(name)
        with pytest.raises(PromptTagError, match="not allowed"):  # a prompt tag is held to the same rule
            service.generate(settings(seed=1, prompt="a circle <lora:../outside:1>"))
        with pytest.raises(PromptTagError):  # and a grid's adapter axis
            service.grid(settings(), f"adapter={outside}")
    finally:
        (adapters / "escape.safetensors").unlink()


def test_upload_refuses_what_is_not_a_lora_safetensors_file_with_a_clear_message(service, tmp_path):
    from safetensors.torch import save_file
    import torch

    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a tensor file")
    with pytest.raises(AdapterFileError, match="not a readable .safetensors file"):
        service.import_upload(text)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    with pytest.raises(AppError, match=r"not a \.safetensors file.*pickles"):
        service.import_upload(pickle)
    weights = tmp_path / "checkpoint.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(AdapterFileError, match="not a LoRA adapter"):
        service.import_upload(weights)
    small = AppService(service.adapters_dir, max_upload_bytes=100 * 1024)
    good = service.adapter_path("pastel")
    with pytest.raises(AppError, match=r"is 0\.\d MiB; uploads up to 0\.09\d* MiB"):
        small.import_upload(good, "pastel.safetensors")
    assert not (service.adapters_dir / "uploads").exists()  # nothing refused was copied in


def test_upload_copies_a_valid_adapter_in_under_a_fresh_name(service, tmp_path):
    source = make_toy_adapter(tmp_path / "my style!.safetensors", seed=4, trigger="mine")
    try:
        first = service.import_upload(source)
        second = service.import_upload(source)
        assert (first, second) == ("uploads/my_style", "uploads/my_style-1")  # never overwrites
        assert {first, second} <= set(service.adapter_names())
        assert service.adapter_path(first).read_bytes() == source.read_bytes()
        assert not [p for p in (service.adapters_dir / "uploads").iterdir() if p.name.startswith(".")]
    finally:
        for path in (service.adapters_dir / "uploads").glob("*"):
            path.unlink()
        (service.adapters_dir / "uploads").rmdir()


# ----------------------------------------------------------------------------- generate


def test_generate_with_two_adapters_writes_pngs_that_reproduce_themselves(service):
    from stylelora.generate.generate import generate, request_from_parameters
    from stylelora.generate.pngmeta import read_png_parameters

    mix = settings(("styles/stripes", 0.8, 0.5), ("pastel", 1.0), seed=11, batch_size=2)
    saved = service.generate(mix)
    assert [s.seed for s in saved] == [11, 12]
    for image in saved:
        assert image.path.parent == service.images_dir and image.path.suffix == ".png"
        assert read_png_parameters(image.path) == image.parameters_text
    text = saved[0].parameters_text
    assert "<lora:styles/stripes:te=0.5:unet=0.8> <lora:pastel:1>" in text
    assert 'Lora hashes: "styles/stripes: ' in text and "Seed: 11" in text and "Steps: 4" in text
    # The PNG's parameters are enough to make the same image again.
    again = generate(service.pipeline("toy"), None, request_from_parameters(text, service.adapters_dir))
    assert numpy.array_equal(numpy.asarray(again[0].image), pixels(saved[0]))
    # Both adapters count: dropping either changes the picture.
    alone = [pixels(service.generate(settings(*m, seed=11))[0]) for m in
             [(("styles/stripes", 0.8, 0.5),), (("pastel", 1.0),), ()]]
    assert all(not numpy.array_equal(other, pixels(saved[0])) for other in alone)


def test_progress_is_reported_step_by_step(service):
    reports = []
    service.generate(settings(("pastel", 1.0)), progress=lambda done, total: reports.append((done, total)))
    assert reports == [(step, STEPS) for step in range(1, STEPS + 1)]


def test_trigger_words_of_chosen_adapters_are_added_once(service):
    prompt = service.prompt_with_triggers(PROMPT, ["styles/stripes", "pastel"])
    assert prompt == f"{PROMPT}, stripestyle, pastelstyle"
    assert service.prompt_with_triggers(prompt, ["styles/stripes", "pastel"]) == prompt


def test_refused_settings_say_why(service):
    with pytest.raises(AppError, match="Steps must be between 1 and 150"):
        service.generate(settings(steps=0))
    with pytest.raises(AppError, match="weight of pastel must be between -2 and 2"):
        service.generate(settings(("pastel", 3.0)))
    with pytest.raises(AppError, match="not offered"):
        service.generate(settings(base="/some/other/model"))
    with pytest.raises(ValueError, match="multiples of 8"):
        service.generate(settings(size="30x30"))


def test_concurrent_requests_with_different_blends_each_get_their_own_image(service):
    blends = [
        settings(seed=3),
        settings(("styles/stripes", 1.0), seed=3),
        settings(("pastel", 1.0), seed=3),
        settings(("styles/stripes", 0.5), ("pastel", -1.0), seed=3),
        settings(("styles/stripes", -1.0, 0.0), seed=3),
        settings(("pastel", 0.3, 2.0), seed=4),
        settings(("styles/stripes", 2.0), ("pastel", 2.0), seed=3),
        settings(("pastel", 1.0), ("styles/stripes", 0.25, -0.5), seed=5, sampler="euler"),
    ]
    alone = [pixels(service.generate(blend)[0]) for blend in blends]
    assert len({image.tobytes() for image in alone}) == len(blends)  # eight different pictures

    results: list = [None] * len(blends)
    start = threading.Barrier(len(blends))

    def run(index: int) -> None:
        start.wait()
        results[index] = service.generate(blends[index])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(blends))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, (expected, got) in enumerate(zip(alone, results)):
        assert got is not None, f"request {index} did not finish"
        assert numpy.array_equal(pixels(got), expected), f"request {index} got another blend's image"
    assert len({result.path for result in results}) == len(blends)  # each saved to its own file


# ----------------------------------------------------------------------------- blend, inspect, grid


def test_blend_saves_the_mix_as_an_adapter_that_makes_the_same_image(service):
    mix = (AdapterWeight("styles/stripes", 0.8, 0.5), AdapterWeight("pastel", -0.6))
    result = service.blend(mix, "stripes-pastel")
    assert result.name == "blends/stripes-pastel" and result.name in service.adapter_names()
    assert "exact" in result.summary
    live = pixels(service.generate(settings(*[(m.name, m.unet, m.te) for m in mix]))[0]).astype(int)
    blended = pixels(service.generate(settings((result.name, 1.0)))[0]).astype(int)
    assert numpy.abs(live - blended).max() <= 2  # the same picture, up to float rounding
    with pytest.raises(AppError, match="exists already"):
        service.blend(mix, "stripes-pastel")
    small = service.blend(mix, "stripes-pastel-r2", rank=2, fp16=True)
    assert "svd rank 2" in small.summary and small.path.stat().st_size < result.path.stat().st_size
    with pytest.raises(AppError, match="not a plain name"):
        service.blend(mix, "../escape")
    assert not (service.adapters_dir.parent / "escape.safetensors").exists()


def test_inspect_shows_format_triggers_and_training(service):
    import json

    text = service.inspect("styles/stripes")
    assert "kohya layout" in text and "trigger words  stripestyle" in text and "rank 4, alpha 4" in text
    info = json.loads(service.inspect("pastel", as_json=True))
    assert info["trigger_words"] == ["pastelstyle"]
    with pytest.raises(PromptTagError):
        service.inspect("../../etc/passwd")


def test_grid_of_weights_by_adapters_is_one_png(service):
    from PIL import Image

    from stylelora.generate.pngmeta import read_png_parameters

    path = service.grid(settings(("pastel", 1.0)), "weight=0,1", "adapter=none,styles/stripes")
    assert path.parent == service.grids_dir and path.suffix == ".png"
    assert "X Type: weight" in read_png_parameters(path)
    with Image.open(path) as grid:
        assert grid.width > 2 * 32 * 3 and grid.height > 2 * 32 * 3  # 2x2 cells of 32 px, shown 3x
    with pytest.raises(AppError, match="choose adapters first"):
        service.grid(settings(), "weight=0,1")


def test_training_refuses_bad_settings_before_starting(service, tmp_path):
    from stylelora.app.training import TrainSettings
    from stylelora.config import ConfigError

    with pytest.raises(AppError, match="does not exist"):
        service.start_training(TrainSettings(data_dir=str(tmp_path / "nothing"), name="x"))
    with pytest.raises(AppError, match="not a plain name"):
        service.start_training(TrainSettings(data_dir=str(tmp_path), name="../x"))
    with pytest.raises(ConfigError, match="network.rank must be at least 1"):
        service.start_training(TrainSettings(data_dir=str(tmp_path), name="x", options={"network.rank": 0}))
    assert service.training is None and not (service.adapters_dir / "x").exists()
    assert os.listdir(tmp_path) == []


def test_a_training_run_can_be_stopped_and_only_one_runs_at_a_time(service, tmp_path):
    from stylelora.app.training import TrainSettings

    data = tiny_dataset(tmp_path / "data", count=2)
    # Far more steps than can run before the stop lands: on an idle machine 500 tiny steps finished first.
    run = TrainSettings(data_dir=str(data), name="stopped-run", options={
        "train.steps": 50_000, "train.batch_size": 2, "network.rank": 2, "network.alpha": 2.0})
    # The trainer inherits SIGINT as ignored, as it does when the app runs as a background job (`stylelora app &`):
    # Stop must still work.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        job = service.start_training(run)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        with pytest.raises(AppError, match="in progress"):
            service.start_training(TrainSettings(data_dir=str(data), name="second"))
        for status in job.follow(interval=0.2):
            if status.step >= 2:
                break
        assert status.running and status.loss is not None  # progress and loss while it runs
        job.stop()
        final = job.wait(timeout=60)
    finally:
        if job.running:
            job.process.kill()
    assert final.state == "stopped" and final.adapter is None
    assert 2 <= final.step < 50_000
    assert not (service.adapters_dir / "stopped-run" / "stopped-run.safetensors").exists()
    assert "resume latest" in final.log  # the trainer said how to continue
