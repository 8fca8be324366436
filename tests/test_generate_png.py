"""generate(): resolved parameters, A1111 `parameters` PNG text round trip, regenerating an image from its PNG,
<lora:...> tags resolved safely, samplers by name."""
from __future__ import annotations

import os

import numpy
import pytest
from gen_fixtures import NATIVE_SIZE, load_tiny_base, make_adapter, pixels

from stylelora.generate.generate import GenerateRequest, generate, request_from_parameters
from stylelora.generate.pngmeta import GenerationParams, LoraUse, parse_parameters, read_png_parameters, save_png
from stylelora.generate.prompt_tags import (
    LoraTag,
    PromptTagError,
    list_adapters,
    parse_prompt,
    resolve_adapter_name,
    resolve_tags,
)
from stylelora.generate.samplers import available_samplers, make_scheduler, resolve_sampler
from stylelora.generate.stack import AdapterStack
from stylelora.lora.spec import AdapterSpec


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    root = tmp_path_factory.mktemp("gen")
    adapters = root / "adapters"
    (adapters / "styles").mkdir(parents=True)
    return {
        "base": tiny_sd_base,
        "adapters": adapters,
        "stripes": make_adapter(adapters / "stripes.safetensors", 1, trigger="stripes style"),
        "pastel": make_adapter(adapters / "styles" / "pastel.safetensors", 2),
    }


@pytest.fixture
def pipe(world):
    return load_tiny_base(world["base"])


# ----------------------------------------------------------------------------- parameters text


def test_parameters_text_round_trips():
    params = GenerationParams(
        prompt="a red circle, on blue", negative_prompt="blurry,\nlow quality", steps=20, cfg_scale=6.5,
        sampler="DPM++ 2M Karras", seed=4294967295, width=32, height=48, model="toy", model_hash="0123456789",
        loras=(LoraUse("stripes", 0.8, 0.8, "aaaaaaaaaaaa"), LoraUse("styles/pastel", 1.0, -0.35, "bbbbbbbbbbbb")),
    )
    text = params.to_text()
    assert text.splitlines()[0] == "a red circle, on blue <lora:stripes:0.8> <lora:styles/pastel:te=-0.35:unet=1>"
    assert 'Lora hashes: "stripes: aaaaaaaaaaaa, styles/pastel: bbbbbbbbbbbb"' in text
    assert "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 4294967295, Size: 32x48" in text
    assert parse_parameters(text) == params


@pytest.mark.parametrize("sampler, written", [
    ("DPM++ 2M", "Sampler: DPM++ 2M, Schedule type: Uniform, CFG"),  # A1111 1.9+ would read "Automatic": Karras
    ("DPM++ 2M SDE", "Sampler: DPM++ 2M SDE, Schedule type: Uniform, CFG"),  # ... and Exponential for this one
    ("DPM++ 2M Karras", "Sampler: DPM++ 2M Karras, CFG"),  # every A1111 reads the Karras name
    ("Euler a", "Sampler: Euler a, CFG"),  # its Automatic is the uniform schedule already
])
def test_the_schedule_a1111_would_otherwise_change_is_written(sampler, written):
    params = GenerationParams(prompt="a cat", negative_prompt="", steps=4, cfg_scale=5.0, sampler=sampler, seed=1,
                              width=32, height=32)
    assert written in params.to_text()
    assert parse_parameters(params.to_text()) == params


def test_quotes_and_backslashes_in_values_read_back_as_a1111_writes_them():
    """A1111 quotes a value as a JSON string; a name holding '"' must not split the line into junk fields."""
    params = GenerationParams(
        prompt="a cat", negative_prompt="", steps=4, cfg_scale=5.0, sampler="Euler", seed=1, width=32, height=32,
        loras=(LoraUse('it"s', 1.0, 1.0, "aaaaaaaaaaaa"), LoraUse("b", 0.5, 0.5, "bbbbbbbbbbbb")),
        extra={"Note": 'say "hi", C:\\x'},
    )
    text = params.to_text()
    assert 'Lora hashes: "it\\"s: aaaaaaaaaaaa, b: bbbbbbbbbbbb"' in text and 'Note: "say \\"hi\\", C:\\\\x"' in text
    back = parse_parameters(text)
    assert back.extra == {"Note": 'say "hi", C:\\x'}
    assert [(lora.name, lora.hash) for lora in back.loras] == [('it"s', "aaaaaaaaaaaa"), ("b", "bbbbbbbbbbbb")]


def test_parses_a1111_text_with_fields_we_do_not_use():
    text = ("masterpiece, <lora:detail:0.6>, a cat <lora:ink:1:0.5>\nNegative prompt: lowres\n"
            "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 12, Size: 512x768, "
            'Model hash: 529c72f6c3, Model: v1-5, Lora hashes: "detail: 0123456789ab, ink: ba9876543210", Version: v1.9.4')
    params = parse_parameters(text)
    assert params.prompt == "masterpiece, <lora:detail:0.6>, a cat"  # tags in place; the last one's is after it
    assert params.sampler == "DPM++ 2M Karras" and resolve_sampler(params.sampler).key == "dpm++_2m_karras"
    # A1111 order: <lora:name:TE:UNET>
    assert params.loras == (LoraUse("detail", 0.6, 0.6, "0123456789ab"), LoraUse("ink", 0.5, 1.0, "ba9876543210"))
    assert (params.width, params.height, params.cfg_scale, params.model_hash) == (512, 768, 7.0, "529c72f6c3")
    assert params.extra == {"Version": "v1.9.4"}


def test_png_carries_parameters_and_writes_atomically(tmp_path):
    from PIL import Image

    params = GenerationParams("x", "", 2, 5.0, "DDIM", 3, 16, 16)
    path = save_png(Image.new("RGB", (16, 16)), params, tmp_path / "out" / "a.png")
    assert read_png_parameters(path) == params.to_text()
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]


# ----------------------------------------------------------------------------- generate + reproduce


def test_generate_records_what_it_resolved(world, pipe):
    results = generate(pipe, None, GenerateRequest(
        "a red circle <lora:stripes:0.8>", steps=2, adapters_dir=world["adapters"], add_triggers=True, batch_size=2))
    first, second = (r.params for r in results)
    assert first.seed != -1 and second.seed == first.seed + 1
    assert (first.width, first.height) == (NATIVE_SIZE, NATIVE_SIZE)
    assert first.sampler == "DDIM"  # the base's own scheduler, by its A1111 name
    assert first.prompt == "stripes style, a red circle <lora:stripes:0.8>"  # --add-triggers puts them in front
    assert first.model == "base" and len(first.model_hash) == 10
    stack = AdapterStack.for_pipe(pipe)
    assert first.loras == (LoraUse("stripes", 0.8, 0.8, stack.load(world["stripes"]).short_hash),)
    assert results[0].image.size == (NATIVE_SIZE, NATIVE_SIZE)


DOUBLED = ("stripes is both chosen (weight 1.0) and tagged in the prompt (0.5): they add up to 1.5, as in A1111. "
           "Remove one to use the other's weight alone.")


def test_an_adapter_both_chosen_and_tagged_adds_up_with_a_notice(world, pipe):
    from stylelora.generate.generate import precheck_request

    # The app's adapter list reaches generate as `loras`, as --lora does: the notice comes from the precheck both run.
    request = GenerateRequest("a red circle <lora:stripes:0.5>", steps=1, adapters_dir=world["adapters"],
                              loras=(AdapterSpec(world["stripes"], 1.0),))
    assert precheck_request(request) == [DOUBLED]
    result = generate(pipe, None, request)[0]
    # Recorded as given, the tag in the prompt and the chosen one after it: read back, they add up again.
    assert [(lora.name, lora.unet_weight, lora.te_weight) for lora in result.params.loras] == [
        ("stripes", 0.5, 0.5), ("stripes", 1.0, 1.0)]


def test_the_doubled_notice_gives_both_weights_where_they_differ_and_is_silent_otherwise(world):
    from stylelora.generate.generate import precheck_request

    split = GenerateRequest("x <lora:stripes:0.5>", adapters_dir=world["adapters"],
                            loras=(AdapterSpec(world["stripes"], 1.0, 0.25),))
    assert precheck_request(split) == [
        "stripes is both chosen (weights UNet 1.0, text encoder 0.25) and tagged in the prompt (0.5): they add up to "
        "UNet 1.5, text encoder 0.75, as in A1111. Remove one to use the other's weight alone."]
    others = GenerateRequest("x <lora:styles/pastel:0.5>", adapters_dir=world["adapters"],
                             loras=(AdapterSpec(world["stripes"], 1.0),))
    assert precheck_request(others) == []
    twice = GenerateRequest("x <lora:stripes:1> <lora:stripes:0.5>", adapters_dir=world["adapters"])
    assert precheck_request(twice) == ["stripes is tagged 2 times in the prompt (1.0 and 0.5): they add up to 1.5, "
                                       "as in A1111. Tag it once."]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_generating_again_from_the_png_reproduces_the_pixels(tmp_path, world, pipe, batch_size):
    request = GenerateRequest("a blue square <lora:styles/pastel:te=0.5:unet=-0.7>", negative_prompt="stripes",
                              steps=3, cfg=6.0, sampler="euler_a", batch_size=batch_size, adapters_dir=world["adapters"],
                              loras=(AdapterSpec(world["stripes"], 0.9),))
    original = generate(pipe, None, request)[-1]
    saved = original.save(tmp_path / "last.png")
    generate(pipe, None, GenerateRequest("something else", steps=2))  # the pipe moves on to another blend
    again = generate(pipe, None, request_from_parameters(read_png_parameters(saved), world["adapters"],
                                                          stack=AdapterStack.for_pipe(pipe)))
    assert len(again) == 1 and again[0].parameters_text == original.parameters_text
    difference = numpy.abs(pixels(again[0]).astype(int) - pixels(original))
    if batch_size == 1:
        assert difference.max() == 0
    else:
        # Image i of a batch has its own generator (seed + i), so only batched kernels' rounding can differ.
        assert difference.max() <= 1


def test_regenerating_with_a_changed_adapter_is_refused(tmp_path, world, pipe):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    path = make_adapter(adapters / "ink.safetensors", 5)
    result = generate(pipe, None, GenerateRequest("x <lora:ink:1>", steps=1, adapters_dir=adapters))[0]
    make_adapter(adapters / "other.safetensors", 6).replace(path)
    with pytest.raises(ValueError, match="not the files the image was made with"):
        request_from_parameters(result.parameters_text, adapters, stack=AdapterStack.for_pipe(pipe))


def test_a_tag_names_its_adapter_as_a1111_does_unless_another_file_shares_the_name(tmp_path, pipe):
    adapters = tmp_path / "adapters"
    make_adapter(adapters / "runs" / "ink" / "ink.safetensors", 6)
    first = make_adapter(adapters / "style.safetensors", 7)
    second = make_adapter(adapters / "v2" / "style.safetensors", 8)
    unique = generate(pipe, None, GenerateRequest("x <lora:ink:0.7>", steps=1, seed=3, adapters_dir=adapters))[0]
    assert unique.parameters_text.startswith("x <lora:ink:0.7>")  # the file name, as A1111 names a LoRA
    shared = generate(pipe, None, GenerateRequest("x <lora:v2/style:0.7>", steps=2, seed=3, adapters_dir=adapters))[0]
    assert shared.parameters_text.startswith("x <lora:v2/style:0.7>")  # pasted back, it loads this file, not first
    # An image from A1111 names the file only: its Lora hash tells the two files apart when it is drawn again.
    stack = AdapterStack.for_pipe(pipe)
    from_a1111 = shared.parameters_text.replace("<lora:v2/style:", "<lora:style:").replace('"v2/style: ', '"style: ')
    again = request_from_parameters(from_a1111, adapters, stack=stack)
    assert "<lora:v2/style:0.7>" in again.prompt and first != second
    assert (pixels(generate(pipe, None, again)[0]) == pixels(shared)).all()


@pytest.mark.parametrize("changes, message", [
    ({"width": 20, "height": 16}, "multiples of 8"),
    ({"steps": 0}, "steps must be"),
    ({"seed": -2}, "seed must be"),
    ({"batch_size": 0}, "batch size"),
    ({"sampler": "warp"}, "Unknown sampler"),
    ({"prompt": "x <lora:stripes:1>"}, "no adapters folder"),
])
def test_bad_requests_are_refused_with_reasons(pipe, changes, message):
    request = GenerateRequest(**{"prompt": "x", "steps": 1, **changes})
    with pytest.raises(ValueError, match=message):
        generate(pipe, None, request)


# ----------------------------------------------------------------------------- <lora:...> tags


@pytest.mark.parametrize("prompt, clean, tags", [
    ("a cat <lora:ink:0.5>", "a cat", [LoraTag("ink", 0.5, 0.5)]),
    ("<lora:ink>, a cat", "a cat", [LoraTag("ink", 1.0, 1.0)]),
    ("a cat, <lora:ink:1:0.25>, red", "a cat, red", [LoraTag("ink", 0.25, 1.0)]),  # A1111: TE first, then UNet
    ("a <lora:ink:unet=0.3> cat", "a cat", [LoraTag("ink", 0.3, 1.0)]),
    ("<lora:sub/ink:te=-1:unet=2>", "", [LoraTag("sub/ink", 2.0, -1.0)]),
    ("no tags,  here ", "no tags, here", []),
    ("a <lyco:ink:0.7> cat", "a cat", [LoraTag("ink", 0.7, 0.7)]),  # A1111 reads LyCORIS' tag as a LoRA tag
])
def test_parse_prompt(prompt, clean, tags):
    assert parse_prompt(prompt) == (clean, tags)


@pytest.mark.parametrize("prompt", ["<lora:ink:abc>", "<lora::1>", "<lora:ink:1:2:3>", "<lora:ink:dyn=4>",
                                    "<lora:ink:lbw=1,x>", "a <hypernet:ink:1>", "<lora:ink:0.8 a red circle",
                                    "a <LORA:ink:1> cat", "<Lora:ink:1", "<lyco:ink:1"])
def test_bad_tags_are_refused(prompt):
    with pytest.raises(PromptTagError):
        parse_prompt(prompt)


def test_tag_names_resolve_inside_the_adapters_folder(world):
    folder = world["adapters"]
    assert resolve_adapter_name("stripes", folder) == world["stripes"]
    assert resolve_adapter_name("styles/pastel", folder) == world["pastel"]
    assert resolve_adapter_name("pastel", folder) == world["pastel"]  # unique stem anywhere below, as A1111 does
    assert set(list_adapters(folder)) == {"stripes", "styles/pastel"}
    specs = resolve_tags([LoraTag("stripes", 0.5, 0.25)], folder)
    assert specs == [AdapterSpec(world["stripes"], 0.5, 0.25)]


def test_a_training_checkpoints_resume_state_is_not_listed_as_an_adapter(tmp_path, world):
    from stylelora.generate.prompt_tags import CHECKPOINT_FOLDER, CHECKPOINT_STATE
    from stylelora.train.checkpoint import CHECKPOINTS_DIR, WEIGHTS_FILE, checkpoint_dir

    assert (CHECKPOINT_FOLDER, CHECKPOINT_STATE) == (CHECKPOINTS_DIR, WEIGHTS_FILE)
    step = checkpoint_dir(tmp_path / "run", 4)
    step.mkdir(parents=True)
    (step / WEIGHTS_FILE).write_bytes(world["stripes"].read_bytes())  # what --resume reads
    (step / "run-step4.safetensors").write_bytes(world["stripes"].read_bytes())  # the step's adapter
    (tmp_path / "run" / "run.safetensors").write_bytes(world["stripes"].read_bytes())
    cache_entry = tmp_path / "run" / "cache" / "ab" / f"{'ab' * 32}.safetensors"  # --cache disk's latents
    cache_entry.parent.mkdir(parents=True)
    cache_entry.write_bytes(world["stripes"].read_bytes())
    assert set(list_adapters(tmp_path)) == {"run/run", "run/checkpoints/step-000004/run-step4"}
    # A mistyped name gets the finished adapter it is closest to, not the run's checkpoints.
    with pytest.raises(PromptTagError, match=r"No adapter named 'rnu' in .* \(did you mean run/run\?\)"):
        resolve_adapter_name("rnu", tmp_path)
    with pytest.raises(PromptTagError, match=r"\(found: run/run\)"):
        resolve_adapter_name("zzz", tmp_path)


@pytest.mark.parametrize("name", ["../base/unet/diffusion_pytorch_model", "/etc/passwd", "styles/../../base",
                                  "..\\stripes", "C:/loras/x", "styles//pastel", "./stripes"])
def test_path_traversal_is_refused(world, name):
    with pytest.raises(PromptTagError, match="not allowed"):
        resolve_adapter_name(name, world["adapters"])


def test_symlink_leading_out_of_the_folder_is_refused(tmp_path, world):
    folder = tmp_path / "adapters"
    folder.mkdir()
    outside = make_adapter(tmp_path / "secret.safetensors", 3)
    os.symlink(outside, folder / "escape.safetensors")
    with pytest.raises(PromptTagError, match="outside"):
        resolve_adapter_name("escape", folder)
    assert "escape" not in list_adapters(folder)


def test_unknown_and_ambiguous_names_say_what_exists(tmp_path):
    for sub in ("a", "b"):
        make_adapter(tmp_path / sub / "ink.safetensors", 1)
    with pytest.raises(PromptTagError, match="ambiguous.*a/ink, b/ink"):
        resolve_adapter_name("ink", tmp_path)
    with pytest.raises(PromptTagError, match="found: a/ink, b/ink"):
        resolve_adapter_name("nope", tmp_path)


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("key", available_samplers())
def test_every_available_sampler_builds_from_the_base_config_and_runs(pipe, key):
    sampler = resolve_sampler(key)
    assert resolve_sampler(sampler.display).key == key  # A1111 display names read back
    scheduler, display = make_scheduler(pipe.scheduler, key)
    assert display == sampler.display
    assert type(scheduler).__name__ == sampler.scheduler_class
    assert scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps
    result = generate(pipe, None, GenerateRequest("x", steps=2, seed=1, sampler=key))[0]
    assert result.params.sampler == sampler.display
    assert pixels(result).std() > 0
