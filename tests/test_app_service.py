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
from test_app_fixtures import PROMPT, broken_adapter, make_toy_adapter, sd_sized_base, tiny_dataset, toy_base

from stylelora.app.errors import AppError
from stylelora.app.service import AdapterWeight, AppService, GenerateSettings
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
def datasets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("datasets")
    tiny_dataset(folder / "tiny", count=2)
    return folder


@pytest.fixture(scope="module")
def service(adapters, datasets) -> AppService:
    app = AppService(adapters, datasets_dir=datasets)
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


def test_training_checkpoints_are_not_offered_as_adapters_but_stay_usable_by_name(tmp_path):
    """A run's folder holds its finished adapter and, per checkpoint, a half-trained one: a user picking adapters
    to generate with expects the finished ones (the Adapters tab lists the others, labelled: test_app_layout)."""
    from stylelora.app.ui import inspect_choices

    run = tmp_path / "adapters" / "my-style"
    for relative in ("my-style.safetensors", "checkpoints/step-000250/my-style-step000250.safetensors",
                     "checkpoints/step-000250/lora_weights.safetensors", "loras/checkpoints/old.safetensors"):
        (run / relative).parent.mkdir(parents=True, exist_ok=True)
        (run / relative).write_bytes(b"not read by the listing")
    service = AppService(tmp_path / "adapters", datasets_dir=tmp_path / "datasets")
    checkpoint = "my-style/checkpoints/step-000250/my-style-step000250"
    # A folder a user named "checkpoints" holds finished adapters: only a run's step-N folders are checkpoints.
    assert service.adapter_names() == ["my-style/loras/checkpoints/old", "my-style/my-style"]
    assert service.adapter_names(checkpoints=True) == [checkpoint, "my-style/loras/checkpoints/old",
                                                       "my-style/my-style"]
    assert service.adapter_path(checkpoint).name == "my-style-step000250.safetensors"  # a typed name or tag works
    assert inspect_choices(service.adapter_names(checkpoints=True))[-1] == (
        f"{checkpoint}  (training checkpoint)", checkpoint)


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
        first = service.import_upload(source).name
        second = service.import_upload(source).name
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
    assert "<lora:stripes:te=0.5:unet=0.8> <lora:pastel:1>" in text  # A1111 names a LoRA by its file name
    assert 'Lora hashes: "stripes: ' in text and "Seed: 11" in text and "Steps: 4" in text
    # The PNG's parameters are enough to make the same image again, blend mode included. It is redrawn at batch
    # size 1: a UNet call differs by about 1e-6 between batch sizes, so a pixel may move by one level of 255.
    assert "Blend mode: split" in text
    request = request_from_parameters(text, service.adapters_dir)
    assert request.blend_mode == "split"
    again = generate(service.pipeline("toy"), None, request)
    assert numpy.abs(numpy.asarray(again[0].image).astype(int) - pixels(saved[0]).astype(int)).max() <= 1
    # Both adapters count: dropping either changes the picture.
    alone = [pixels(service.generate(settings(*m, seed=11))[0]) for m in
             [(("styles/stripes", 0.8, 0.5),), (("pastel", 1.0),), ()]]
    assert all(not numpy.array_equal(other, pixels(saved[0])) for other in alone)


def test_an_adapter_chosen_and_tagged_is_noted_before_sampling_and_the_grid_says_it_too(service):
    notes, grid_notes = [], []
    saved = service.generate(settings(("pastel", 1.0), prompt=PROMPT + " <lora:pastel:0.5>"), notify=notes.append)
    assert notes == ["pastel is both chosen (weight 1.0) and tagged in the prompt (0.5): they add up to 1.5, as in "
                     "A1111. Remove one to use the other's weight alone."]
    # The typed tag stays where it was and the chosen adapter's follows; read back, they add up as the note says.
    assert saved[0].parameters_text.startswith(PROMPT + " <lora:pastel:0.5> <lora:pastel:1>\n")
    service.grid(settings(("pastel", 1.0), prompt=PROMPT + " <lora:pastel:0.5>", steps=1), "seed=1,2",
                 notify=grid_notes.append)
    assert grid_notes == notes
    quiet = []
    service.generate(settings(("pastel", 1.0), steps=1), notify=quiet.append)
    assert quiet == []


def test_block_weights_in_a_prompt_tag_reach_the_image_and_its_png(service):
    with_blocks = service.generate(settings(prompt=PROMPT + " <lora:pastel:1:lbw=1,0,0,1,1,1,1,1>"))[0]
    plain = service.generate(settings(prompt=PROMPT + " <lora:pastel:1>"))[0]
    assert "<lora:pastel:1:lbw=1,0,0,1,1,1,1,1>" in with_blocks.parameters_text
    assert not numpy.array_equal(pixels(with_blocks), pixels(plain))  # IN01 and IN03 off: another image
    with pytest.raises(ValueError, match=r"preset OUTALL.*takes 8 \(BASE,IN01,IN03,M00"):
        service.generate(settings(prompt=PROMPT + " <lora:pastel:1:lbw=OUTALL>"))


def test_block_weights_in_an_adapter_row_draw_what_the_prompt_tag_draws(service):
    # The Generate tab's row box and the <lora:...:lbw=> tag are one setting: same image, same PNG text.
    row = service.generate(settings(("pastel", 1.0, 1.0, "1,0,0,1,1,1,1,1")))[0]
    tag = service.generate(settings(prompt=PROMPT + " <lora:pastel:1:lbw=1,0,0,1,1,1,1,1>"))[0]
    assert numpy.array_equal(pixels(row), pixels(tag))
    assert "<lora:pastel:1:lbw=1,0,0,1,1,1,1,1>" in row.parameters_text
    with pytest.raises(AppError, match=r"Block weights of pastel: lbw=1,x.*neither a number nor a preset"):
        service.generate(settings(("pastel", 1.0, 1.0, "1,x")))
    with pytest.raises(ValueError, match=r"Block weights of pastel: lbw=OUTALL gives 17 weights"):
        service.generate(settings(("pastel", 1.0, 1.0, "OUTALL")))
    # Saved as a blend, the row's block weights are baked in: the file draws the live (summed) image.
    saved = service.blend((AdapterWeight("pastel", 1.0, 1.0, "0.5,0,0,1,1,1,1,1"),), "pastel-out", base="toy")
    live = pixels(service.generate(settings(("pastel", 1.0, 1.0, "0.5,0,0,1,1,1,1,1")))[0]).astype(int)
    assert numpy.abs(live - pixels(service.generate(settings((saved.name, 1.0)))[0]).astype(int)).max() <= 2


def test_progress_is_reported_step_by_step(service):
    reports = []
    service.generate(settings(("pastel", 1.0)), progress=lambda done, total: reports.append((done, total)))
    assert reports == [(step, STEPS) for step in range(1, STEPS + 1)]


def test_trigger_words_of_chosen_adapters_are_added_once(service):
    prompt = service.prompt_with_triggers(PROMPT, ["styles/stripes", "pastel"])
    assert prompt == f"stripestyle, pastelstyle, {PROMPT}"  # in front, where the training captions hold them
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
    card = result.path.with_suffix(".md")  # the card of a blend alone in blends/ is NAME.md too, never README.md
    assert "<lora:stripes-pastel:1>" in card.read_text(encoding="utf-8") and result.path.with_suffix(".json").is_file()
    assert not (result.path.parent / "README.md").exists()
    live = pixels(service.generate(settings(*[(m.name, m.unet, m.te) for m in mix], blend_mode="sum"))[0]).astype(int)
    blended = pixels(service.generate(settings((result.name, 1.0)))[0]).astype(int)
    assert numpy.abs(live - blended).max() <= 2  # the same picture, up to float rounding
    with pytest.raises(AppError, match="exists already"):
        service.blend(mix, "stripes-pastel")
    small = service.blend(mix, "stripes-pastel-r2", rank=2, fp16=True)
    assert "svd rank 2" in small.summary and small.path.stat().st_size < result.path.stat().st_size
    with pytest.raises(AppError, match="not a plain name"):
        service.blend(mix, "../escape")
    assert not (service.adapters_dir.parent / "escape.safetensors").exists()
    # Under the reading dial a text-encoder weight of 0.5 moves the reading, which no file holds: refused, nothing
    # written; weights of 0 and 1 draw the same either way and save.
    from stylelora.generate.reading_dial import DialError

    refusal = r"prompt \(stripes.safetensors, pastel.safetensors\), which no LoRA file can hold"
    with pytest.raises(DialError, match=refusal):
        service.blend(mix, "read-mix", dial="reading")
    assert not (service.adapters_dir / "blends" / "read-mix.safetensors").exists()
    assert service.blend((AdapterWeight("styles/stripes", 0.8, 1.0),), "read-mix", dial="reading").path.is_file()


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
    blocks = service.grid(settings(("pastel", 1.0)), "blocks=none;1,0,0,0,1,1,1,1")
    assert 'X Type: blocks, X Values: "none;1,0,0,0,1,1,1,1"' in read_png_parameters(blocks)  # as typed
    with pytest.raises(AppError, match="choose adapters first"):
        service.grid(settings(), "blocks=none;OUTALL")
    two = settings(("pastel", 1.0), ("styles/stripes", 1.0))
    modes = service.grid(two, "blend_mode=sum,split", "dial=weights,reading")  # the axes the CLI's grid takes
    assert "X Type: blend_mode, X Values: \"sum,split\"" in read_png_parameters(modes)
    assert "Y Type: dial" in read_png_parameters(modes)
    with pytest.raises(ValueError, match="blend mode"):
        service.grid(two, "blend_mode=sum,average")


# ----------------------------------------------------------------------------- limits, checks, stopping


def test_requests_over_a_limit_are_refused_with_the_limit_named(service):
    from stylelora.app.service import Limits

    with pytest.raises(AppError, match=r"Steps must be between 1 and 150 \(got 151\); 150 is this server's limit "
                                       r"\(--max-steps"):
        service.generate(settings(steps=151))
    with pytest.raises(AppError, match=r"Batch size .* \(--max-batch"):
        service.generate(settings(batch_size=9))
    with pytest.raises(AppError, match=r"Image size 2048x2048: each side .* 64 is this server's limit for toy.*"
                                       r"--max-side"):
        service.generate(settings(size="2048x2048"))
    with pytest.raises(AppError, match="CFG scale must be a number"):
        service.generate(settings(cfg=float("nan")))
    with pytest.raises(AppError, match="At most 4 adapters"):
        service.generate(settings(*[("pastel", 0.1)] * 5))
    small = AppService(service.adapters_dir, datasets_dir=service.datasets_dir,
                       limits=Limits(max_side=32, max_steps=10))
    with pytest.raises(AppError, match=r"10 is this server's limit \(--max-steps"):
        small.request(settings(steps=11))
    with pytest.raises(AppError, match="--max-side"):
        small.request(settings(size="64x64"))
    assert "images up to 32 px a side, 10 steps" in small.limits.summary()


def test_sizes_offered_and_allowed_are_relative_to_the_bases_native_size(service, tmp_path):
    """A 1024 px image on the 32 px toy base ran for minutes: by default a side may be twice the base's native size,
    and the sizes offered are the base's own training buckets (about its native area) at the common aspect ratios."""
    from stylelora.app.service import Limits

    assert service.size_choices("toy") == ["native", "32x32", "24x40", "40x24"]
    assert service.max_side("toy") == 64
    # The header names the side in pixels for each base, as the Generate tab's size box does.
    assert "images up to 64 px a side on toy (2× the native size), " in service.limits_summary()
    with pytest.raises(AppError, match=r"Image size 1024x1024: each side must be between 8 and 64 \(got 1024\); 64 is "
                                       r"this server's limit for toy, 2× its native size of 32 px \(start the app "
                                       r"with --max-side N to allow up to N px on every base\)\."):
        service.request(settings(size="1024x1024"))
    assert (service.request(settings(size="64x48")).width, service.request(settings(size="48")).height) == (64, 48)
    sd = str(sd_sized_base(tmp_path / "sd"))
    both = AppService(service.adapters_dir, datasets_dir=service.datasets_dir, bases=("toy", sd))
    assert both.size_choices(sd) == ["native", "512x512", "448x576", "576x448", "384x640", "640x384"]
    assert both.request(settings(base=sd, size="1024x768")).width == 1024  # config files only: nothing loads
    with pytest.raises(AppError, match=r"1024 is this server's limit for .*, 2× its native size of 512 px"):
        both.request(settings(base=sd, size="1088x1024"))
    with pytest.raises(AppError, match="is not offered by this app"):  # a base name is never resolved unless offered
        both.size_choices(str(tmp_path))
    fixed = AppService(service.adapters_dir, datasets_dir=service.datasets_dir, limits=Limits(max_side=1024))
    assert fixed.request(settings(size="1024x1024")).width == 1024  # --max-side: the operator's limit, on every base
    with pytest.raises(AppError, match=r"1024 is this server's limit \(--max-side"):
        fixed.request(settings(size="2048"))
    small = AppService(service.adapters_dir, datasets_dir=service.datasets_dir, limits=Limits(max_side=24))
    assert small.size_choices("toy") == ["24x24"]  # no size over the limit is offered, the native 32 px neither


def test_grid_axes_are_held_to_the_limits_of_generate(service):
    refused = {
        "steps=4,1000": r"Grid axis steps: a value must be between 1 and 150 \(got 1000\).*--max-steps",
        "steps=4,2.5": "steps values are whole numbers",  # the CLI's words: the app reads the axis as it does
        "steps=1-3 (+0.5)": "steps values are whole numbers, so a steps range is too",
        "weight=0,3": r"Grid axis weight: a weight must be between -2 and 2",
        "cfg=5,nan": "must be a number",
        "seed=1,-5": "must be between 0 and",
        "colour=1,2": "Unknown grid axis 'colour'; choose one of",
        "steps=": "write KIND=V1,V2",
        "adapter=none,../escape": "not allowed",
        "Steps=4,1000": r"Grid axis steps: a value must be between 1 and 150",  # A1111's label, the same limit
    }
    grids_before = sorted(service.grids_dir.glob("*"))
    for axis, message in refused.items():
        with pytest.raises((AppError, PromptTagError), match=message):
            service.grid(settings(("pastel", 1.0)), axis)
    with pytest.raises(AppError, match=r"6x5 = 30 cells is over this server's limit of 25 cells \(--max-grid-cells"):
        service.grid(settings(), "seed=1,2,3,4,5,6", "cfg=1,2,3,4,5")
    with pytest.raises(AppError, match="Both grid axes are seed"):
        service.grid(settings(), "seed=1,2", "seed=3,4")
    assert sorted(service.grids_dir.glob("*")) == grids_before  # a refused grid leaves no file behind
    reports = []
    service.grid(settings(), "steps=2,3", progress=lambda done, total: reports.append((done, total)))
    assert reports[-1] == (5, 5) and len(reports) >= 5  # sampling steps over the cells, not cells


def test_grid_axes_in_the_app_read_any_case_and_a1111s_labels_as_the_cli_does(service):
    axis = service.grid_axis("CFG Scale=3,5", settings())
    assert (axis.kind, axis.values) == ("cfg", (3.0, 5.0))
    assert service.grid_axis("SEED=1-3", settings()).values == (1, 2, 3)
    with pytest.raises(AppError, match="any case"):
        service.grid_axis("colour=1,2", settings())


def test_an_adapter_with_nan_values_is_refused_before_it_is_used(service, tmp_path):
    bad = broken_adapter(service.adapter_path("pastel"), service.adapters_dir / "broken" / "nan.safetensors", "nan")
    try:
        with pytest.raises(ValueError, match="NaN or infinite values in 2 of"):
            service.generate(settings(("broken/nan", 1.0)))
        with pytest.raises(ValueError, match="NaN or infinite"):
            service.generate(settings(prompt=f"{PROMPT} <lora:broken/nan:0.5>"))
        before = sorted(service.adapters_dir.rglob("*"))
        with pytest.raises(ValueError, match="NaN or infinite"):
            service.import_upload(bad)
        assert sorted(service.adapters_dir.rglob("*")) == before  # nothing copied in
    finally:
        bad.unlink()
        bad.parent.rmdir()
    # The base weights are untouched: the next image is the plain one.
    assert numpy.array_equal(pixels(service.generate(settings(seed=2))[0]),
                             pixels(service.generate(settings(seed=2))[0]))


def test_an_upload_made_for_another_base_is_refused_and_leaves_nothing(service, tmp_path):
    bad = broken_adapter(service.adapter_path("pastel"), tmp_path / "other-base.safetensors", "other-base")
    before = sorted(service.adapters_dir.rglob("*"))
    with pytest.raises(ValueError, match="made for a different base architecture"):
        service.import_upload(bad)
    assert sorted(service.adapters_dir.rglob("*")) == before


def test_the_png_names_the_bytes_that_were_fused_even_if_the_file_changes_meanwhile(service, tmp_path):
    import shutil

    from stylelora.generate.pngmeta import parse_parameters, read_png_parameters
    from stylelora.lora.io import file_model_hash

    path = service.adapters_dir / "changing.safetensors"
    shutil.copy(service.adapter_path("pastel"), path)
    original = file_model_hash(path)
    other = make_toy_adapter(tmp_path / "other.safetensors", seed=9)
    try:
        expected = pixels(service.generate(settings(("changing", 1.0), seed=4))[0])

        def overwrite_midway(done: int, total: int) -> None:
            if done == 2:  # the file is replaced while the image is sampled, as a blend with overwrite would
                shutil.copy(other, path)

        saved = service.generate(settings(("changing", 1.0), seed=4), progress=overwrite_midway)[0]
        lora = parse_parameters(read_png_parameters(saved.path)).loras[0]
        assert lora.name == "changing" and original.startswith(lora.hash)
        assert numpy.array_equal(pixels(saved), expected)  # and the image is the original adapter's
        again = service.generate(settings(("changing", 1.0), seed=4))[0]  # the next request reads the new file
        assert file_model_hash(other).startswith(parse_parameters(again.parameters_text).loras[0].hash)
    finally:
        path.unlink()


def test_stop_cancels_a_generation_or_grid_between_sampling_steps(service):
    from stylelora.app.jobs import Cancelled

    def stop_after(steps: int):
        """(progress, cancelled): Stop is pressed once `steps` sampling steps are reported done."""
        done = [0]
        return (lambda step, total: done.__setitem__(0, step)), (lambda: done[0] >= steps)

    images, grids = set(service.images_dir.glob("*.png")), set(service.grids_dir.glob("*.png"))
    progress, cancelled = stop_after(2)
    with pytest.raises(Cancelled, match="stopped after 2 of 40 sampling steps"):
        service.generate(settings(("pastel", 1.0), steps=40), progress=progress, cancelled=cancelled)
    progress, cancelled = stop_after(5)
    with pytest.raises(Cancelled, match=r"grid was stopped after [56] of 16 sampling steps"):
        service.grid(settings(("pastel", 1.0)), "weight=0,0.5,1,2", progress=progress, cancelled=cancelled)
    assert set(service.images_dir.glob("*.png")) == images and set(service.grids_dir.glob("*.png")) == grids
    # The shared pipeline is fine afterwards: the same request gives the same image as before.
    first = pixels(service.generate(settings(("pastel", 1.0), seed=9))[0])
    assert numpy.array_equal(first, pixels(service.generate(settings(("pastel", 1.0), seed=9))[0]))


def test_delete_and_rename_stay_inside_the_adapters_folder_and_need_confirming(service, tmp_path):
    outside = make_toy_adapter(tmp_path / "outside.safetensors", seed=3)
    make_toy_adapter(service.adapters_dir / "old.safetensors", seed=6)
    (service.adapters_dir / "old.json").write_text("{}")
    for name in ("../outside", str(outside), "/etc/passwd", "styles/../../x", "images/none"):
        with pytest.raises((AppError, PromptTagError)):
            service.delete_adapter(name, confirm=True)
    for new in ("../escaped", "/tmp/escaped", "a/../../b", "images/x", ".hidden", ""):
        with pytest.raises(AppError):
            service.rename_adapter("old", new, confirm=True)
    with pytest.raises(AppError, match="confirm it first"):
        service.rename_adapter("old", "kept/new")
    with pytest.raises(AppError, match="exists already"):
        service.rename_adapter("old", "pastel", confirm=True)
    assert service.rename_adapter("old", "kept/new", confirm=True) == "Renamed old to kept/new."
    assert (service.adapters_dir / "kept" / "new.json").is_file() and "kept/new" in service.adapter_names()
    with pytest.raises(AppError, match="cannot be undone: confirm it first"):
        service.delete_adapter("kept/new")
    assert service.delete_adapter("kept/new", confirm=True) == "Deleted kept/new."
    assert "kept/new" not in service.adapter_names() and not (service.adapters_dir / "kept" / "new.json").exists()
    assert outside.is_file() and not (tmp_path.parent / "escaped.safetensors").exists()


def test_a_refused_new_name_is_quoted_as_typed(service):
    """The check goes part by part: its message once quoted the part ('..'), not what the user typed."""
    make_toy_adapter(service.adapters_dir / "toy-stripes.safetensors", seed=8)
    try:
        for new in ("../../x", "styles/../x", "/tmp/x", "a/.hidden"):
            with pytest.raises(AppError) as refused:
                service.rename_adapter("toy-stripes", new, confirm=True)
            assert str(refused.value).startswith(f"New name {new!r} is not a plain name: use NAME or FOLDER/NAME")
    finally:
        service.delete_adapter("toy-stripes", confirm=True)


def test_the_train_tab_shows_the_base_familys_preset_for_empty_boxes():
    from stylelora.app.ui import _family_text
    from stylelora.presets import preset_value

    text = _family_text("toy")
    assert text.startswith("**Base family: toy base** (toy)")
    assert f"UNet LR {preset_value('toy', 'optim.unet_lr'):g}" in text and "Batch size 16" in text
    assert "native size" in text  # the toy preset's resolution: the base's own


def test_messages_name_folders_relative_to_the_adapters_and_datasets_folders(service):
    text = f"No file {service.adapters_dir}/styles/x.safetensors or {service.datasets_dir / 'tiny'}"
    assert service.shown(text) == (f"No file {service.adapters_dir.name}/styles/x.safetensors or "
                                   f"{service.datasets_dir.name}/tiny")


def test_a_training_folder_upload_lands_whole_in_the_datasets_folder(service, tmp_path):
    import shutil

    from PIL import Image

    uploads = tmp_path / "up"
    uploads.mkdir()
    for index in range(3):
        Image.new("RGB", (32, 32), (index * 80, 0, 0)).save(uploads / f"img{index}.png")
        (uploads / f"img{index}.txt").write_text(f"a red square number {index}")
    (uploads / "notes.md").write_text("not data")
    (uploads / "broken.png").write_bytes(b"not a png")
    files = sorted(uploads.iterdir())
    report = service.import_dataset(files, "squares", "sqstyle", 5)
    folder = service.datasets_dir / "squares" / "5_sqstyle"
    assert sorted(p.name for p in folder.iterdir()) == [f"img{i}.{e}" for i in range(3) for e in ("png", "txt")]
    assert "3 images, 3 captions" in report and "broken.png (not a readable image)" in report
    assert "squares" in service.dataset_names() and service.dataset_path("squares") == folder.parent
    with pytest.raises(AppError, match="exists already"):
        service.import_dataset(files, "squares", "sqstyle", 5)
    for name in ("../evil", "a/b", ".hidden"):
        with pytest.raises(AppError, match="not a plain name"):
            service.import_dataset(files, name)
    with pytest.raises(AppError, match="None of the uploaded files is an image"):
        service.import_dataset([uploads / "notes.md"], "notes")
    assert sorted(os.listdir(service.datasets_dir)) == ["squares", "tiny"]  # nothing half-written left
    shutil.rmtree(folder.parent)


def test_training_refuses_bad_settings_before_starting(service, datasets):
    from stylelora.app.training import TrainSettings
    from stylelora.config import ConfigError

    for outside in ("nothing", "../" + datasets.name, str(datasets / "tiny"), "/etc", "tiny/.."):
        with pytest.raises(AppError, match="No training data folder named"):
            service.start_training(TrainSettings(data_dir=outside, name="x"))
    with pytest.raises(AppError, match="not a plain name"):
        service.start_training(TrainSettings(data_dir="tiny", name="../x"))
    with pytest.raises(ConfigError, match="network.rank must be at least 1"):
        service.start_training(TrainSettings(data_dir="tiny", name="x", options={"network.rank": 0}))
    assert service.training is None and not (service.adapters_dir / "x").exists()
    assert not [p for p in datasets.rglob("*") if p.suffix in (".toml", ".log")]  # nothing written into the data


def test_a_training_run_stops_keeping_its_checkpoint_and_resumes_from_it(service):
    from stylelora.app.training import SETTINGS_FILE, TrainSettings

    # Far more steps than can run before the stop lands: on an idle machine 500 tiny steps finished first.
    run = TrainSettings(data_dir="tiny", name="stopped-run", options={
        "train.steps": 50_000, "train.batch_size": 2, "network.rank": 2, "network.alpha": 2.0,
        "train.save_every": 3, "train.sample_every": 0})
    # The trainer inherits SIGINT as ignored, as it does when the app runs as a background job (`stylelora app &`):
    # Stop must still work.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        job = service.start_training(run)
    finally:
        signal.signal(signal.SIGINT, previous)
    run_dir = service.adapters_dir / "stopped-run"
    try:
        with pytest.raises(AppError, match="in progress"):
            service.start_training(TrainSettings(data_dir="tiny", name="second"))
        for status in job.follow(interval=0.2):
            if status.checkpoint:
                break
        assert status.running and status.loss is not None and status.step >= 1  # from metrics.csv, live
        job.stop()
        final = job.wait(timeout=60)
    finally:
        if job.running:
            job.process.kill()
    assert final.state == "stopped" and final.adapter is None
    # Stop finishes the step in progress and saves it, whatever --save-every says: no step is lost.
    assert final.checkpoint and final.checkpoint == final.step and "Resume continues from it" in final.message
    # The log is the trainer's own, without its CLI advice (`--resume latest`): in the app, Resume does that.
    assert "stopping after this step" in final.log and "--resume" not in final.log
    assert not (run_dir / "stopped-run.safetensors").exists()
    assert (run_dir / SETTINGS_FILE).is_file() and not list(service.datasets_dir.rglob("*.toml"))
    with pytest.raises(AppError, match="stopped run with checkpoints"):
        service.start_training(run)  # a new start would throw the checkpoints away: Resume, or overwrite

    resumed = service.resume_training("stopped-run")
    try:
        for status in resumed.follow(interval=0.2):
            if f"resuming at step {final.checkpoint}" in status.log and status.step > final.checkpoint:
                break
        assert status.running, status.message
        resumed.stop()
        again = resumed.wait(timeout=60)
    finally:
        if resumed.running:
            resumed.process.kill()
    assert again.state == "stopped" and again.step > final.checkpoint
    with pytest.raises(AppError, match="not a run started from this app"):
        service.resume_training("styles")
    with pytest.raises(AppError, match="There is no run named no-such-run: Resume continues the run named in"):
        service.resume_training("no-such-run")


def test_resume_of_a_finished_run_says_it_is_finished_instead_of_training_again(service):
    from stylelora.app.training import TrainSettings

    job = service.start_training(TrainSettings(data_dir="tiny", name="finished-run", options={
        "train.steps": 2, "train.batch_size": 2, "network.rank": 2, "network.alpha": 2.0, "train.save_every": 1,
        "train.sample_every": 0}))
    try:
        final = job.wait(timeout=180)
    finally:
        if job.running:
            job.process.kill()
    assert final.state == "done", final.message
    adapter = service.adapters_dir / "finished-run" / "finished-run.safetensors"
    written = adapter.stat().st_mtime_ns
    with pytest.raises(AppError, match="finished-run has finished its 2 steps: its adapter is finished-run/"):
        service.resume_training("finished-run")
    assert adapter.stat().st_mtime_ns == written and not service.training.running


def test_a_run_continues_a_finished_adapter_chosen_in_start_from(service):
    """The Train tab's "Start from" (kohya's --network_weights): a finished adapter of the folder, by its name."""
    import json

    from stylelora.app.training import TrainSettings
    from stylelora.app.ui import start_choices
    from stylelora.generate.prompt_tags import PromptTagError
    from train_fixtures import adapter_metadata

    options = {"train.steps": 1, "train.batch_size": 2, "network.rank": 2, "network.alpha": 2.0,
               "train.save_every": 0, "train.sample_every": 0}
    first = service.start_training(TrainSettings(data_dir="tiny", name="to-continue", options=options)).wait(180)
    assert first.state == "done", first.message
    name = next(name for label, name in start_choices(service) if name.endswith("to-continue"))
    with pytest.raises((AppError, PromptTagError)):
        service.start_training(TrainSettings(data_dir="tiny", name="x", options=options, start_from="../to-continue"))
    # The tab's Rank box does not apply: the run takes the adapter's own rank (--dim-from-weights).
    final = service.start_training(TrainSettings(data_dir="tiny", name="continued", options={
        **options, "network.rank": 8}, start_from=name)).wait(180)
    assert final.state == "done", final.message
    assert "starting from to-continue.safetensors" in final.log
    args = json.loads(adapter_metadata(final.adapter)["ss_training_args"])
    assert args["network"]["weights"] == "to-continue.safetensors"
    assert adapter_metadata(final.adapter)["ss_network_dim"] == "2"
    assert start_choices(service)[0] == ("none: a new LoRA", "")


def test_the_train_tab_trains_epochs_and_reads_caption_lines_as_alternatives(service):
    """Epochs and caption variants are Train-tab options: one epoch is as many steps as batches an epoch holds."""
    from stylelora.app.training import TrainSettings
    from stylelora.app.ui import _option_widget
    from stylelora.config import OPTIONS_BY_NAME
    from train_fixtures import adapter_metadata

    assert _option_widget(OPTIONS_BY_NAME["train.epochs"]).placeholder == "empty: train the steps above"
    job = service.start_training(TrainSettings(data_dir="tiny", name="one-epoch", options={
        "train.epochs": 1, "data.caption_variants": True, "train.batch_size": 2, "network.rank": 2,
        "network.alpha": 2.0, "train.save_every": 0, "train.samples": False}))
    final = job.wait(timeout=300)
    assert final.state == "done", final.message
    metadata = adapter_metadata(final.adapter)
    assert metadata["ss_steps"] == metadata["ss_num_batches_per_epoch"] != "1000"
    assert final.total == int(metadata["ss_steps"]) and final.step == final.total  # not "step 16/1000"
    assert "data.caption_variants = True" in final.log
