"""`stylelora generate | grid | blend | inspect` through their argparse parsers, on a tiny base in tmp_path."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from gen_fixtures import make_adapter

from stylelora.generate.command import add_generate_parsers, output_paths, parse_size
from stylelora.generate.pngmeta import parse_parameters, read_png_parameters
from stylelora.lora.command import add_lora_parsers


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    root = tmp_path_factory.mktemp("cli")
    adapters = root / "adapters"
    return {
        "root": root,
        "base": tiny_sd_base,
        "adapters": adapters,
        "a": make_adapter(adapters / "stripes.safetensors", 1, trigger="stripes"),
        "b": make_adapter(adapters / "pastel.safetensors", 2),
    }


def run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    parser = argparse.ArgumentParser(prog="stylelora")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parsers(subparsers)
    add_lora_parsers(subparsers)
    args = parser.parse_args(argv)
    code = args.handler(args)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def common(world) -> list[str]:
    return ["--base", str(world["base"]), "--device", "cpu", "--adapters-dir", str(world["adapters"]), "--steps", "2"]


def test_generate_writes_numbered_pngs_with_parameters(world, tmp_path, capsys):
    argv = ["generate", "a red circle <lora:pastel:0.5>", "--lora", f"{world['a']}:0.8:0.2", "--seed", "7",
            "--batch", "2", "--add-triggers", "--out", str(tmp_path), "--sampler", "euler", *common(world)]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert out == [str(tmp_path / "00000-7.png"), str(tmp_path / "00001-8.png")]
    params = parse_parameters(read_png_parameters(out[1]))
    assert (params.seed, params.steps, params.sampler, params.prompt) == (8, 2, "Euler", "style, stripes, a red circle")
    assert [(l.name, l.unet_weight, l.te_weight) for l in params.loras] == [("pastel", 0.5, 0.5), ("stripes", 0.8, 0.2)]
    code, out, _ = run(argv, capsys)  # numbering continues after the files already there
    assert out[0] == str(tmp_path / "00002-7.png")


def test_an_adapter_both_chosen_and_tagged_is_noted_in_one_line(world, tmp_path, capsys):
    argv = ["generate", "a red circle <lora:stripes:0.5>", "--lora", f"{world['a']}:1", "--seed", "3",
            "--out", str(tmp_path / "x.png"), *common(world)]
    code, out, err = run(argv, capsys)
    assert code == 0 and out == [str(tmp_path / "x.png")]
    assert [line for line in err.splitlines() if "stripes" in line and "A1111" in line] == [
        "warning: stripes is both chosen (weight 1.0) and tagged in the prompt (0.5): they add up to 1.5, as in "
        "A1111. Remove one to use the other's weight alone."]
    assert sum(lora.unet_weight for lora in parse_parameters(read_png_parameters(out[0])).loras) == 1.5


def test_generate_reports_bad_input_in_one_line(world, tmp_path, capsys):
    code, out, err = run(["generate", "x <lora:nope:1>", "--out", str(tmp_path), *common(world)], capsys)
    assert code == 2 and out == [] and "error: No adapter named 'nope'" in err
    code, _, err = run(["generate", "x", "--size", "big", *common(world)], capsys)
    assert code == 2 and "WIDTHxHEIGHT" in err
    code, _, err = run(["generate", "x", "--size", "0", "--out", str(tmp_path), *common(world)], capsys)
    assert code == 2 and "size 0x0 must be positive" in err  # not the native size in silence
    code, _, err = run(["generate", "x", "--cfg", "nan", "--out", str(tmp_path), *common(world)], capsys)
    assert code == 2 and "CFG scale must be 0 or more (got nan" in err
    code, _, err = run(["generate", "x", "--cfg", "-1", "--out", str(tmp_path), *common(world)], capsys)
    assert code == 2 and "CFG scale must be 0 or more (got -1.0; 5-7 is usual" in err
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("out, message", [("x.jpg", "written as a PNG, which carries the generation parameters"),
                                          ("afile", "give a name ending in .png or a folder, e.g."),
                                          ("afile/x.png", "is a file, so nothing can be written inside it")])
def test_an_out_that_cannot_be_written_fails_before_anything_is_drawn(world, tmp_path, capsys, monkeypatch, out,
                                                                      message):
    import stylelora.generate.command as command

    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setattr(command, "_load_pipe", lambda args: pytest.fail("the base was loaded"))
    for subcommand in (["generate", "x"], ["grid", "x", "--x", "seed=1,2"]):
        code, _, err = run([*subcommand, "--out", str(tmp_path / out), *common(world)], capsys)
        assert code == 2 and message in err
    assert not (tmp_path / "x.jpg").exists()  # no folder named like an image


@pytest.mark.parametrize("subcommand, existing, refused", [
    (["generate", "x"], ["x.png"], "--out {tmp}/x.png exists already: give another name, or a folder"),
    (["generate", "x", "--batch", "2"], ["x-1.png"], "--out {tmp}/x.png: {tmp}/x-1.png exists already"),
    (["generate", "x", "--batch", "2"], ["x.png"], None),  # x.png is not what a batch of two writes
    (["grid", "x", "--x", "seed=1,2"], ["x.png"], "--out {tmp}/x.png exists already"),
])
def test_an_existing_image_is_replaced_only_with_overwrite(world, tmp_path, capsys, monkeypatch, subcommand,
                                                           existing, refused):
    """`generate --out x.png` replaced an earlier image in silence, while blend and train refuse to without
    --overwrite; it is refused before the base loads, and --overwrite lets it through."""
    import stylelora.generate.command as command

    class Loaded(Exception):
        pass

    def load(args):
        raise Loaded

    for name in existing:
        (tmp_path / name).write_bytes(b"an earlier image")
    monkeypatch.setattr(command, "_load_pipe", load)
    target = ["--out", str(tmp_path / "x.png"), *common(world)]
    if refused is None:
        with pytest.raises(Loaded):
            run([*subcommand, *target], capsys)
        return
    code, _, err = run([*subcommand, *target], capsys)
    assert code == 2 and refused.format(tmp=tmp_path) in err and "add --overwrite to replace it" in err
    with pytest.raises(Loaded):
        run([*subcommand, *target, "--overwrite"], capsys)
    assert all((tmp_path / name).read_bytes() == b"an earlier image" for name in existing)


def test_block_weights_the_base_does_not_take_fail_before_it_loads(world, tmp_path, capsys, monkeypatch):
    import stylelora.generate.command as command

    monkeypatch.setattr(command, "_load_pipe", lambda args: pytest.fail("the base was loaded"))
    code, _, err = run(["generate", "x", "--lora", f"{world['a']}:1:lbw=OUTALL", *common(world)], capsys)
    assert code == 2 and "preset OUTALL, which is for SD 1.x/2.x" in err and "takes 8 (BASE,IN01,IN03,M00" in err
    code, _, err = run(["grid", "x <lora:pastel:1:lbw=1,0>", "--x", "seed=1,2", *common(world)], capsys)
    assert code == 2 and "lbw=1,0 gives 2 weights" in err
    code, _, err = run(["grid", "x", "--lora", str(world["a"]), "--x", "blocks=none;1,0,1", *common(world)], capsys)
    assert code == 2 and "lbw=1,0,1 gives 3 weights" in err


def test_grid_command_writes_one_labelled_png(world, tmp_path, capsys):
    out_file = tmp_path / "grid.png"
    argv = ["grid", "a cat", "--x", "weight=0,0.5,1", "--y", f"adapter={world['a']},pastel,none", "--seed", "3",
            "--out", str(out_file), *common(world)]
    code, out, _ = run(argv, capsys)
    assert code == 0 and out == [str(out_file)]
    from PIL import Image

    with Image.open(out_file) as grid:
        assert grid.width > 3 * 16 * 3 and grid.height > 3 * 16 * 3  # 3x3 tiles, upscaled x3, plus labels
        assert "X Type: weight" in grid.info["parameters"] and "Y Type: adapter" in grid.info["parameters"]


def test_blend_and_inspect_commands(world, tmp_path, capsys):
    out_file = tmp_path / "mix.safetensors"
    code, out, _ = run(["blend", f"{world['a']}:0.7", f"{world['b']}:0.5:-0.5", "--out", str(out_file), "--rank", "2"],
                       capsys)
    assert code == 0 and out[-1] == str(out_file) and "relative error max" in out[0]
    code, out, _ = run(["blend", f"{world['a']}:1", "--out", str(tmp_path / "x.safetensors"), "--json"], capsys)
    assert code == 0 and json.loads(out[0])["mode"] == "exact"
    code, out, _ = run(["inspect", str(out_file), "--json"], capsys)
    info = json.loads("\n".join(out))
    assert code == 0 and info["rank"] == 2 and info["modelspec"]["merged_from"] == "stripes, pastel"
    code, out, _ = run(["inspect", str(out_file)], capsys)
    assert code == 0 and "merged from    stripes (unet 0.7, te 0.7), pastel (unet 0.5, te -0.5); rank 2 SVD" in "\n".join(out)
    code, _, err = run(["inspect", str(tmp_path / "missing.safetensors")], capsys)
    assert code == 2 and "not found" in err


def test_blend_rank_and_exact_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        run(["blend", "a.safetensors:1", "--out", "b.safetensors", "--rank", "2", "--exact"], capsys)


@pytest.mark.parametrize("text, size", [(None, (None, None)), ("32", (32, 32)), ("32x48", (32, 48)), (" 64 X 16 ", (64, 16))])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_output_paths(tmp_path):
    assert output_paths(str(tmp_path / "a.png"), [5], "unused") == [tmp_path / "a.png"]
    assert output_paths(str(tmp_path / "a.png"), [5, 6], "unused") == [tmp_path / "a-0.png", tmp_path / "a-1.png"]
    assert output_paths(None, [9], str(tmp_path / "imgs")) == [tmp_path / "imgs" / "00000-9.png"]


def test_importing_the_command_module_stays_light():
    code = "import sys, stylelora.generate.command; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"
