"""Mistakes users make on the command line (found by trying the CLI as an A1111 / kohya user would): each is refused
in one `error: ...` line that says what to write instead, before a base model loads, and nothing is left behind."""
from __future__ import annotations


import pytest
from gen_fixtures import make_adapter
from test_generate_cli import common, run, world  # noqa: F401 - world is a fixture: the CLI tests' tiny base


@pytest.fixture
def no_base(monkeypatch):
    """Fail the test if a base model is loaded: bad input must be refused before that (minutes on a real base)."""
    import stylelora.generate.command as command
    import stylelora.models.load as load

    monkeypatch.setattr(command, "_load_pipe", lambda args: pytest.fail("the base was loaded"))
    monkeypatch.setattr(load, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "steps must be >= 1 (got 0)"),
    (["--batch", "0"], "batch size must be >= 1 (got 0)"),
    (["--seed", "-5"], "seed must be -1 (random) or 0..4294967295 (got -5)"),
    (["--size", "30"], "size 30x30 must be positive multiples of 8 for this base (e.g. 32x32)"),
])
def test_generate_refuses_bad_numbers_before_the_base_loads(world, tmp_path, capsys, no_base, flags, message):
    code, out, err = run(["generate", "x", "--out", str(tmp_path), *common(world), *flags], capsys)
    assert code == 2 and out == [] and err.strip() == f"error: Cannot generate: {message}."
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("axes, message", [
    (["--x", "adapter=pastel,MISSING/nope.safetensors"], "error: Adapter file not found: MISSING/nope.safetensors"),
    (["--x", "adapter=pastel,nope"], "error: No adapter named 'nope'"),
    (["--x", "weight=0,1"], "error: A weight axis needs an adapter to act on"),
    (["--x", "seed=1,2", "--y", "seed=3"], "error: Both grid axes are seed"),
    (["--x", "steps=0,2"], "error: Cannot generate: steps must be >= 1 (got 0)"),
    (["--x", "weight=0,a", "--lora", "STRIPES"],
     "error: Grid axis 'weight=0,a': 'a' is not a number: weight values are numbers, e.g. weight=0,0.5,1 or weight=0-1 [3]."),
    (["--x", "seed=1,x"],
     "error: Grid axis 'seed=1,x': 'x' is not a number: seed values are whole numbers, e.g. seed=1,2,3 or seed=1-5."),
])
def test_grid_checks_every_cell_before_the_base_loads(world, tmp_path, capsys, no_base, axes, message):
    """A missing file in the third column used to fail only after the first two columns were drawn (a path typed
    as a name was reported "No adapter named 'dir/x.safetensors' in outputs"), and a bad number was Python's
    "could not convert string to float"."""
    axes = [str(world["a"]) if value == "STRIPES" else value.replace("MISSING", str(tmp_path / "gone"))
            for value in axes]
    message = message.replace("MISSING", str(tmp_path / "gone"))
    code, out, err = run(["grid", "x", *axes, "--out", str(tmp_path / "g.png"), *common(world)], capsys)
    assert code == 2 and out == [] and err.startswith(message) and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_a1111_emphasis_is_applied_so_no_note_says_otherwise(world, no_base):
    """`(word:1.2)` is weighted as A1111 weighs it (tests/test_emphasis.py), and BREAK starts a window
    (tests/test_prompt_reading.py): no note warns of either."""
    from stylelora.generate.generate import GenerateRequest, precheck_request

    assert precheck_request(GenerateRequest("(stripes:1.2), a red circle", adapters_dir=world["adapters"])) == []
    assert precheck_request(GenerateRequest("stripes BREAK a red circle", negative_prompt="[blur]")) == []


@pytest.mark.parametrize("out, message", [
    ("folder/", "is a folder: give the new file's name in it, e.g. {tmp}/folder/my-blend.safetensors."),
    ("noext", "give a name ending in .safetensors, e.g. {tmp}/noext.safetensors."),
    ("afile/x.safetensors", "{tmp}/afile is a file, so nothing can be written inside it; choose another"),
])
def test_blend_out_mistakes_are_one_line_errors(world, tmp_path, capsys, out, message):
    """--out under a file was a FileExistsError traceback; a folder was "written as .safetensors; got folder"."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    target = str(tmp_path / out) + ("/" if out.endswith("/") else "")
    code, out_lines, err = run(["blend", str(world["a"]), str(world["b"]), "--out", target], capsys)
    assert code == 2 and out_lines == [] and message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"] and not any((tmp_path / "folder").iterdir())


def test_a_run_folder_or_a_file_beside_the_adapter_points_at_the_adapter(world, tmp_path, capsys):
    """`inspect outputs/my-run` (a run folder) and `inspect my-run/NAME.json` (A1111's sidecar) name the
    .safetensors to give, instead of "convert it to .safetensors"."""
    run_dir = tmp_path / "my-run"
    adapter = make_adapter(run_dir / "my-run.safetensors", 3)
    (run_dir / "my-run.json").write_text("{}")
    (run_dir / "preview.png").write_bytes(b"\x89PNG")
    code, _, err = run(["inspect", str(run_dir)], capsys)
    assert code == 2 and err.strip().endswith(f"such as {adapter}.")
    code, _, err = run(["inspect", str(run_dir / "my-run.json")], capsys)
    assert code == 2 and "my-run.json is not an adapter (a JSON file, such as A1111's sidecar)" in err
    assert err.strip().endswith(f"e.g. {adapter}.") and "Convert it" not in err
    code, _, err = run(["generate", "x", "--lora", str(run_dir / "preview.png"), *common(world)], capsys)
    assert code == 2 and "preview.png is not an adapter (an image)" in err


def test_a_weight_after_an_equals_sign_is_shown_with_a_colon(world, capsys, no_base):
    code, _, err = run(["generate", "x", "--lora", f"{world['a']}=0.8", *common(world)], capsys)
    assert code == 2 and err.strip().endswith(f"a weight follows a colon: {world['a']}:0.8")


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "error: --steps 0: give at least 1 sampling step"),
    (["--save-grid", "AFILE/grid.png"], "AFILE is a file, so nothing can be written inside it"),
    (["--save-grid", "DIR"], "error: --save-grid DIR is a folder: give the new file's name in it, e.g. DIR/eval.png"),
    (["--save-grid", "DIR/grid.jpg"], "written as a PNG; give a name ending in .png, e.g. DIR/grid.png."),
    (["--save-grid", "DIR/old.png"], "--save-grid DIR/old.png exists already: give another name, or add --overwrite"),
])
def test_evaluate_refuses_what_it_could_only_fail_on_at_the_end(tmp_path, capsys, no_base, flags, message):
    """--steps 0 was a ZeroDivisionError traceback, and a --save-grid under a file a FileExistsError after every
    image had been drawn."""
    from stylelora.cli import main

    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "old.png").write_bytes(b"an earlier grid")
    flags = [flag.replace("AFILE", str(tmp_path / "afile")).replace("DIR", str(tmp_path)) for flag in flags]
    message = message.replace("AFILE", str(tmp_path / "afile")).replace("DIR", str(tmp_path))
    code = main(["evaluate", "--samples", "1", "--prompt-set", "plain", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_a_lora_tag_in_the_negative_prompt_is_refused_before_the_base_loads(no_base):
    """It loaded no adapter and reached the text encoder as words, without a word said."""
    from stylelora.generate.generate import GenerateRequest, precheck_request

    with pytest.raises(ValueError, match=r"the negative prompt holds <lora:stripes:1>: adapters load from the prompt"):
        precheck_request(GenerateRequest("a red circle", negative_prompt="<lora:stripes:1> blurry"))
