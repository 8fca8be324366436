"""An A1111 user's PNG Info: the prompt recorded as typed (<lora:...> tags where they were written), `stylelora
generate --from-png` drawing a recorded image again, and grid axes named as A1111's X/Y/Z plot names them."""
from __future__ import annotations

import subprocess
import sys

import numpy
import pytest
from gen_fixtures import load_tiny_base, make_adapter, pixels

from stylelora.cli import main
from stylelora.generate.generate import GenerateRequest, generate, request_from_parameters
from stylelora.generate.pngmeta import parse_parameters, read_png_parameters
from stylelora.generate.stack import AdapterStack
from stylelora.generate.xy_grid import parse_axis
from stylelora.lora.spec import AdapterSpec


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    """The tiny base, and adapters stripes (trigger "stripes style") and styles/pastel in one adapters folder."""
    adapters = tmp_path_factory.mktemp("pnginfo") / "adapters"
    (adapters / "styles").mkdir(parents=True)
    stripes = make_adapter(adapters / "stripes.safetensors", 1, trigger="stripes style")
    pastel = make_adapter(adapters / "styles" / "pastel.safetensors", 2)
    return {"base": tiny_sd_base, "adapters": adapters, "stripes": stripes, "pastel": pastel}


@pytest.fixture
def pipe(world):
    return load_tiny_base(world["base"])


def drawn_again(pipe, text: str, adapters):
    """The image `text` (A1111 parameters) records, drawn again as the app and --from-png draw it."""
    return generate(pipe, None, request_from_parameters(text, adapters, stack=AdapterStack.for_pipe(pipe)))[0]


# ----------------------------------------------------------------------------- tags keep their place


@pytest.mark.parametrize("prompt", [
    "(red:1.2) circle <lora:stripes:0.8>, on blue",  # emphasis, a tag in the middle
    "a red circle BREAK <lora:stripes:0.5> on blue",
    "[red:blue:0.5] circle <lora:pastel:0.7> with <lora:stripes:te=0.4:unet=1> stripes",  # a schedule, two tags
    "<lora:stripes:0.6> stripes style, a red circle",  # a tag first
])
def test_the_prompt_is_recorded_as_typed_and_reads_back_to_the_same_image(world, pipe, prompt):
    original = generate(pipe, None, GenerateRequest(prompt, steps=2, seed=5, adapters_dir=world["adapters"]))[0]
    assert original.parameters_text.splitlines()[0] == prompt
    again = drawn_again(pipe, original.parameters_text, world["adapters"])
    assert again.parameters_text == original.parameters_text
    assert numpy.array_equal(pixels(again), pixels(original))


def test_a_chosen_adapters_tag_follows_the_typed_prompt_and_the_weights_still_add(world, pipe):
    request = GenerateRequest("a <lora:stripes:0.5> red circle", steps=2, seed=3, adapters_dir=world["adapters"],
                              loras=(AdapterSpec(world["stripes"], 1.0),))
    original = generate(pipe, None, request)[0]
    text = original.parameters_text
    assert text.splitlines()[0] == "a <lora:stripes:0.5> red circle <lora:stripes:1>"
    assert text.count("stripes: ") == 1  # one file: its hash once in Lora hashes
    both = pixels(drawn_again(pipe, text, world["adapters"]))
    assert numpy.array_equal(both, pixels(original))
    # Tag and chosen adapter add up, as docs/blending.md says: the image of the one adapter at 1.5.
    summed = generate(pipe, None, GenerateRequest("a red circle <lora:stripes:1.5>", steps=2, seed=3,
                                                  adapters_dir=world["adapters"]))[0]
    assert numpy.array_equal(both, pixels(summed))


def test_a_png_written_with_the_tags_at_the_end_reads_back_the_same(world, pipe):
    request = GenerateRequest("a <lora:stripes:0.5> red circle", steps=2, seed=3, adapters_dir=world["adapters"],
                              loras=(AdapterSpec(world["stripes"], 1.0),))
    now = generate(pipe, None, request)[0]
    # What the code before wrote for the same request: the prompt without tags, one tag with the weights added.
    before = "\n".join(["a red circle <lora:stripes:1.5>", *now.parameters_text.splitlines()[1:]])
    assert parse_parameters(before).to_text() == before
    assert request_from_parameters(before, world["adapters"]).prompt == "a red circle <lora:stripes:1.5>"
    assert numpy.array_equal(pixels(drawn_again(pipe, before, world["adapters"])), pixels(now))


def test_a_tag_is_written_anew_in_its_place_where_its_name_is_not_one_a1111_finds(world, pipe):
    # A1111 finds a LoRA by its file name: the subfolder goes, the tag stays where it was typed.
    result = generate(pipe, None, GenerateRequest("a <lora:styles/pastel:0.7> red circle", steps=1, seed=2,
                                                  adapters_dir=world["adapters"]))[0]
    assert result.parameters_text.splitlines()[0] == "a <lora:pastel:0.7> red circle"


def test_trigger_words_added_go_in_front_of_the_typed_prompt_and_read_back(world, pipe):
    original = generate(pipe, None, GenerateRequest("a <lora:stripes:0.8> red circle", steps=2, seed=4,
                                                    adapters_dir=world["adapters"], add_triggers=True))[0]
    assert original.parameters_text.splitlines()[0] == "stripes style, a <lora:stripes:0.8> red circle"
    assert numpy.array_equal(pixels(drawn_again(pipe, original.parameters_text, world["adapters"])),
                             pixels(original))


# ----------------------------------------------------------------------------- generate --from-png


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    from test_app_fixtures import make_toy_adapter

    root = tmp_path_factory.mktemp("from-png")
    ink = make_toy_adapter(root / "adapters" / "ink.safetensors", 11, trigger="ink")
    return {"root": root, "adapters": root / "adapters", "ink": ink}


def stylelora(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err


def recorded(path: str) -> list[str]:
    return read_png_parameters(path).splitlines()


def test_generate_from_png_draws_the_recorded_image_bit_for_bit_and_flags_replace_values(toy_world, capsys):
    root, adapters = toy_world["root"], str(toy_world["adapters"])
    where = ["--adapters-dir", adapters, "--device", "cpu", "--overwrite"]  # --base toy, the default
    code, first, _ = stylelora(["generate", "(red:1.1) <lora:ink:0.8> a circle BREAK on white", "--negative",
                                "blurry", "--seed", "7", "--steps", "3", "--out", str(root / "first.png"), *where],
                               capsys)
    assert code == 0
    code, again, _ = stylelora(["generate", "--from-png", first, "--out", str(root / "again.png"), *where], capsys)
    assert code == 0 and read_png_parameters(again) == read_png_parameters(first)
    assert numpy.array_equal(numpy.asarray(_image(again)), numpy.asarray(_image(first)))

    # Flags given replace the recorded values; an empty --negative takes the recorded one out.
    code, other, _ = stylelora(["generate", "--from-png", first, "--seed", "8", "--steps", "2", "--negative", "",
                                "--out", str(root / "other.png"), *where], capsys)
    lines = recorded(other)
    assert code == 0 and lines[0] == "(red:1.1) <lora:ink:0.8> a circle BREAK on white" and len(lines) == 2
    assert "Steps: 2," in lines[1] and "Seed: 8," in lines[1]
    # A prompt replaces the recorded one (its tags with it); --lora replaces the recorded adapters.
    code, prompt, _ = stylelora(["generate", "a blue square", "--from-png", first, "--out", str(root / "p.png"),
                                 *where], capsys)
    assert code == 0 and recorded(prompt)[:2] == ["a blue square", "Negative prompt: blurry"]
    assert "Seed: 7," in recorded(prompt)[2] and "Lora hashes" not in recorded(prompt)[2]
    code, lora, _ = stylelora(["generate", "--from-png", first, "--lora", f"{toy_world['ink']}:0.5", "--out",
                               str(root / "l.png"), *where], capsys)
    assert code == 0 and recorded(lora)[0] == "(red:1.1) a circle BREAK on white <lora:ink:0.5>"


def test_generate_from_png_refuses_a_changed_adapter_before_the_base_loads(toy_world, tmp_path, capsys):
    from test_app_fixtures import make_toy_adapter

    adapters = tmp_path / "adapters"
    make_toy_adapter(adapters / "ink.safetensors", 11, trigger="ink")
    where = ["--adapters-dir", str(adapters), "--device", "cpu"]
    code, first, _ = stylelora(["generate", "<lora:ink:1> a circle", "--steps", "1", "--seed", "1", "--out",
                                str(tmp_path / "first.png"), *where], capsys)
    assert code == 0
    make_toy_adapter(adapters / "ink.safetensors", 12, trigger="ink")  # retrained since
    # A base that cannot load: the refusal must come first (a real base takes minutes to load).
    code, _, err = stylelora(["generate", "--from-png", first, "--base", str(tmp_path / "no-base"), *where], capsys)
    assert code == 2 and "not the files the image was made with" in err and "Put those files back" in err, err


def test_generate_from_png_warns_where_the_image_was_drawn_on_another_base(toy_world, tmp_path, capsys):
    from stylelora.generate.pngmeta import save_png

    where = ["--device", "cpu", "--steps", "1"]  # --base toy, the default
    code, first, _ = stylelora(["generate", "a red circle", "--seed", "2", "--out", str(tmp_path / "first.png"),
                                *where], capsys)
    text = read_png_parameters(first)
    assert code == 0 and "Model hash: " in text and "Model: toy" in text
    code, _, err = stylelora(["generate", "--from-png", first, "--out", str(tmp_path / "same.png"), *where], capsys)
    assert code == 0 and "warning" not in err, err  # the same base: nothing to say

    # The same parameters as an image drawn on SD 1.5 would carry them: the redraw says it will not match.
    hash_field = next(field for field in text.split(", ") if field.startswith("Model hash: "))
    other = text.replace(hash_field, "Model hash: 6ce0161689").replace("Model: toy", "Model: v1-5-pruned-emaonly")
    save_png(_image(first), other, tmp_path / "other.png")
    code, _, err = stylelora(["generate", "--from-png", str(tmp_path / "other.png"), "--out",
                              str(tmp_path / "again.png"), *where], capsys)
    assert code == 0
    assert "was drawn on v1-5-pruned-emaonly (Model hash 6ce0161689), not on --base toy" in err, err
    assert "give --base that model to draw it again" in err


def _image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_generate_from_png_refuses_what_it_cannot_read_and_says_what_to_give(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")  # no parameters: re-saved by an editor
    (tmp_path / "notes.png").write_text("not a picture")
    cases = {
        tmp_path / "missing.png": "does not exist: give the path of a PNG that stylelora or A1111 saved",
        tmp_path / "notes.png": "is not an image that can be read: give a PNG that stylelora or A1111 saved",
        tmp_path / "plain.png": "carries no A1111 parameters",
        tmp_path: "is a folder: give the path of a PNG",
    }
    for path, message in cases.items():
        code, out, err = stylelora(["generate", "--from-png", str(path)], capsys)
        assert code == 2 and out == "" and err.startswith(f"error: --from-png {path} {message}"), err
    code, _, err = stylelora(["generate", "--seed", "3"], capsys)
    assert code == 2 and "Give a prompt" in err and "--from-png IMAGE.png" in err


def test_the_cli_parser_imports_no_heavy_library():
    code = ("import sys; from stylelora.cli import build_parser; build_parser().parse_args(['generate', "
            "'--from-png', 'x.png']); print(sorted(m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- grid axis names


@pytest.mark.parametrize("text, kind, values", [
    ("CFG Scale=3,5,7", "cfg", (3.0, 5.0, 7.0)),
    ("Seed=1-4", "seed", (1, 2, 3, 4)),
    ("STEPS=10-30 (+10)", "steps", (10, 20, 30)),
    ("Prompt S/R=red,blue", "prompt", ("red", "blue")),
    ("Clip skip=1,2", "clip_skip", (1, 2)),
    ("Blend_Mode=sum,split", "blend_mode", ("sum", "split")),
    ("Sampler=euler,ddim", "sampler", ("euler", "ddim")),
])
def test_grid_axis_kinds_are_read_in_any_case_and_by_a1111s_labels(text, kind, values):
    axis = parse_axis(text)
    assert (axis.kind, axis.values) == (kind, values)


def test_an_unknown_axis_kind_is_refused_with_the_names_accepted():
    with pytest.raises(ValueError, match="Unknown grid axis 'Hires steps'") as refused:
        parse_axis("Hires steps=1,2")
    assert "blend_mode" in str(refused.value) and "CFG Scale" in str(refused.value)


def test_the_grid_png_records_a1111s_axis_labels_and_ours_where_a1111_has_none(world, tmp_path, capsys):
    code, out, _ = stylelora(["grid", "a red circle", "--lora", str(world["stripes"]), "--x", "CFG Scale=3,5",
                              "--y", "Weight=0,1", "--base", str(world["base"]), "--adapters-dir",
                              str(world["adapters"]), "--device", "cpu", "--steps", "1", "--seed", "1", "--out",
                              str(tmp_path / "grid.png")], capsys)
    assert code == 0
    extra = parse_parameters(read_png_parameters(out)).extra
    assert (extra["Script"], extra["X Type"], extra["Y Type"]) == ("X/Y/Z plot", "CFG Scale", "weight")  # A1111 1.x
