"""`stylelora train` QA on a kohya user's messy inputs: a metadata.jsonl with its captions under another name, written
on Windows or pointing outside the folder, caption files beside it; images that differ only in extension; a
caption in another encoding named with its folder; --reg-dir given the data itself or reg images with the trigger;
a typo'd or kohya-named key in run.toml or flag on the command line; --resume of a missing folder or of a run that
finished without a checkpoint. No model is loaded: each case takes milliseconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from stylelora.config import ConfigError, load_config
from stylelora.data.checks import check_items
from stylelora.data.errors import DataError
from stylelora.data.scan import scan_folder
from stylelora.train.checkpoint import ResumeError, resolve_resume
from stylelora.train.loop import prepare_reg_data, reg_conflicts_note

RED, BLUE = (200, 30, 30), (30, 30, 200)


def _image(path: Path, color=RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def _metadata(root: Path, *records: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return root


# ----------------------------------------------------------------------------- 1. metadata.jsonl


def _caption_column_elsewhere(root: Path):
    _image(root / "a.png")
    _metadata(root, {"file_name": "a.png", "prompt": "zorb, a red zorb", "score": 5})
    with pytest.raises(DataError, match=r'has no "text" column.*file_name, prompt\. Name the caption column "text"'):
        scan_folder(root)


def _windows_paths(root: Path):
    _image(root / "train" / "a.png")
    _metadata(root, {"file_name": "train\\a.png", "text": "zorb"})
    [item], report = scan_folder(root)
    assert item.path == (root / "train" / "a.png").resolve() and item.folder == "train" and not report.ignored


def _paths_outside_the_folder(root: Path):
    elsewhere = _image(root.parent / "elsewhere" / "b.png")
    _image(root / "a.png")
    _metadata(root, {"file_name": str(elsewhere), "text": "zorb"}, {"file_name": "../elsewhere/b.png", "text": "x"},
              {"file_name": "a.png", "text": "zorb"})
    items, report = scan_folder(root)
    assert [item.folder for item in items] == ["elsewhere", root.name]  # no local path in ss_dataset_dirs
    assert "listed twice" in report.summary()


def _caption_files_beside_it(root: Path):
    _image(root / "a.png")
    (root / "a.txt").write_text("zorb, the caption the user meant", encoding="utf-8")
    _metadata(root, {"file_name": "a.png"})
    [item], report = scan_folder(root)
    assert item.caption == ""
    assert [(i.path.name, i.reason.split(":")[0]) for i in report.ignored] == [("a.txt", "caption file not read")]
    summary = report.summary()
    assert 'Give each a "text" in metadata.jsonl' in summary and "Write NAME.txt" not in summary


@pytest.mark.parametrize("case", [_caption_column_elsewhere, _windows_paths, _paths_outside_the_folder,
                                  _caption_files_beside_it], ids=lambda case: case.__name__.strip("_"))
def test_a_metadata_jsonl_reads_as_a_diffusers_user_means_it(tmp_path, case):
    case(tmp_path / "data")


# ----------------------------------------------------------------------------- 2. kohya folders


@pytest.mark.parametrize("files, warned", [
    ({"a.png": RED, "a.jpg": RED, "a.txt": "zorb, a"}, "a.jpg and a.png (captioned by a.txt)"),
    ({"b.png": RED, "B.webp": BLUE}, "B.webp and b.png."),
    ({"a.png": RED, "b.jpg": RED, "a.txt": "zorb"}, None),
])
def test_images_that_differ_only_in_extension_are_named(tmp_path, files, warned):
    folder = tmp_path / "10_zorb"
    for name, content in files.items():
        _image(folder / name, content) if isinstance(content, tuple) else (folder / name).write_text(content)
    items, report = scan_folder(tmp_path)
    assert len(items) == sum(isinstance(content, tuple) for content in files.values())  # all still train
    shared = [line for line in report.warnings if "differ only in their extension" in line]
    assert len(shared) == (warned is not None)
    if warned:
        assert warned in shared[0] and "in 10_zorb" in shared[0]


def test_a_caption_in_another_encoding_is_named_with_its_folder(tmp_path):
    for folder in ("10_a", "5_b"):
        _image(tmp_path / folder / "0001.png")
    (tmp_path / "10_a" / "0001.txt").write_text("a, café", encoding="utf-8")
    (tmp_path / "5_b" / "0001.txt").write_bytes("b, café".encode("latin-1"))
    assert "5_b/0001.txt is not UTF-8 text" in scan_folder(tmp_path)[1].summary()


# ----------------------------------------------------------------------------- 3. --reg-dir


def _reg_case(tmp_path: Path, make_reg) -> tuple:
    data = tmp_path / "data"
    for i, color in enumerate((RED, BLUE)):
        _image(data / "10_zorb" / f"{i}.png", color)
    reg = make_reg(tmp_path, data)
    config = load_config(None, {"data.dir": str(data), "data.reg_dir": str(reg)})
    train = check_items(scan_folder(data)[0])
    return config, train, check_items(scan_folder(reg, role="regularization")[0], role="regularization")


def _class_images(tmp_path, data):
    _image(tmp_path / "reg" / "1_creature" / "r.png", (30, 200, 30))
    return tmp_path / "reg"


def _reg_inside_data(tmp_path, data):  # a reg folder kept in the data folder, which the training scan leaves out
    _image(data / "reg" / "1_creature" / "r.png", (30, 200, 30))
    return data / "reg"


def _named_after_the_trigger(tmp_path, data):
    _image(tmp_path / "reg" / "1_zorb" / "r.png", (30, 200, 30))
    return tmp_path / "reg"


def _a_copy_of_a_training_image(tmp_path, data):
    _image(tmp_path / "reg" / "1_creature" / "r.png", RED)
    _image(tmp_path / "reg" / "1_creature" / "s.png", (30, 200, 30))
    return tmp_path / "reg"


@pytest.mark.parametrize("make_reg, warning", [
    (_class_images, None),
    (_reg_inside_data, None),
    (_named_after_the_trigger, "captions with the trigger words 'zorb' (1): 1_zorb/r.png"),
    (_a_copy_of_a_training_image, "copies of training images (1): 1_creature/r.png"),
], ids=lambda value: getattr(value, "__name__", "").strip("_"))
def test_reg_images_that_work_against_the_training_are_named(tmp_path, make_reg, warning):
    config, train, reg = _reg_case(tmp_path, make_reg)
    note = reg_conflicts_note(config, train, reg, ("zorb",))
    assert (note is None) if warning is None else (warning in note and "1_woman, not 1_<trigger>" in note)


@pytest.mark.parametrize("reg", ["data", "data/10_zorb"])
def test_the_training_folder_as_reg_dir_is_refused(tmp_path, reg):
    config, train, checked = _reg_case(tmp_path, lambda tmp, data: tmp / reg)
    with pytest.raises(DataError, match=r"--reg-dir .* are the training images of .*point --reg-dir at such a folder"):
        reg_conflicts_note(config, train, checked, ("zorb",))


def test_every_line_about_the_reg_images_says_so(tmp_path):
    _image(tmp_path / "reg" / "1_creature" / "uncaptioned.png")
    (tmp_path / "reg" / "1_creature" / "orphan.txt").write_text("creature", encoding="utf-8")
    said = []
    prepare_reg_data(load_config(None, {"data.dir": "data", "data.reg_dir": str(tmp_path / "reg")}), None, said.append)
    lines = [line for message in said if message for line in message.splitlines()]
    assert len(lines) >= 3 and all(line.startswith("regularization: ") for line in lines)  # found, uncaptioned, ignored


# ----------------------------------------------------------------------------- 4. run.toml and flags


@pytest.mark.parametrize("toml, hint", [
    ("[train]\nbatch_sise = 2\n", "unknown key 'batch_sise' in [train] (did you mean 'batch_size'?)"),
    ("[train]\nrank = 8\n", "unknown key 'rank' in [train] (it belongs under [network])"),
    ("[train]\nnetwork_dim = 8\n", "(kohya sd-scripts' name; here: rank under [network])"),
    ("steps = 2\n", "'steps' at the top level (it belongs under [train])"),
    ("max_train_steps = 2\n", "'max_train_steps' at the top level (kohya sd-scripts' name; here: steps under [train])"),
    ("[trian]\nsteps = 2\n", "'trian' at the top level (did you mean [train]?)"),
    ("[model_arguments]\npretrained_model_name_or_path = 'x'\n",
     "(its keys: pretrained_model_name_or_path (kohya sd-scripts' name; here: base under [train]))"),
    ("[data]\nresolutoin = 512\n", "(did you mean 'resolution'?)"),
    ("[data]\nzzz = 1\n", "unknown key 'zzz' in [data]; valid keys"),  # nothing close: no guess
])
def test_an_unknown_key_in_run_toml_says_what_it_likely_is(tmp_path, toml, hint):
    (tmp_path / "run.toml").write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "run.toml", {"data.dir": "data"})
    assert hint in str(raised.value)


@pytest.mark.parametrize("flag, hint", [("--stesp", "  --stesp: --steps"),
                                        ("--batchsize", "  --batchsize: --batch-size"),
                                        ("--resolutoin", "  --resolutoin: --resolution")])
def test_a_mistyped_flag_is_answered_with_the_nearest_one(capsys, flag, hint):
    from stylelora.cli import main

    with pytest.raises(SystemExit):
        main(["train", "data", flag, "3"])
    assert hint in capsys.readouterr().err


@pytest.mark.parametrize("value, hint", [("512,512", "'512,512' is kohya's width,height; here it is one side, "
                                                    "--resolution 512 for the same area"),
                                         ("640x512", "--resolution 572 for the same area"),
                                         ("1e3", "'1e3' is not a whole number, e.g. --resolution 512")])
def test_a_resolution_typed_as_kohya_types_it_says_what_to_type(capsys, value, hint):
    from stylelora.cli import main

    with pytest.raises(SystemExit):
        main(["train", "data", "--resolution", value])
    assert hint in capsys.readouterr().err


@pytest.mark.parametrize("folder, kohya_root", [("-1_ink", False), ("0.5_ink", False), ("-1_ink", True)])
def test_a_folder_whose_repeat_count_is_not_a_whole_number_says_so(tmp_path, folder, kohya_root):
    data = tmp_path / "data"
    _image(data / folder / "a.png")
    if kohya_root:  # beside a folder that trains: listed as ignored
        _image(data / "10_ok" / "b.png")
        _, report = scan_folder(data)
        text = "; ".join(entry.reason for entry in report.ignored)
    else:  # nothing else to train: the refusal names it
        with pytest.raises(DataError) as raised:
            scan_folder(data)
        text = str(raised.value)
    assert f"its repeat count {folder.split('_')[0]} is not a whole number of at least 1" in text
    assert "rename it to e.g. 1_ink or 10_ink" in text and "10_-1_ink" not in text


# ----------------------------------------------------------------------------- 5. --resume


@pytest.mark.parametrize("spec, make, message", [
    ("nothere", lambda run: None, r"--resume nothere: no such folder\. Pass a run's checkpoint folder"),
    ("latest", lambda run: (run / "run.safetensors").write_bytes(b"x"),
     r"no complete checkpoint in .* finished without one: .* it ran with --save-every 0"),
    ("latest", lambda run: None, r"no complete checkpoint in .*Check --output"),
])
def test_a_resume_without_a_checkpoint_says_why(tmp_path, monkeypatch, spec, make, message):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    make(run)
    with pytest.raises(ResumeError, match=message):
        resolve_resume(spec, run)


# ----------------------------------------------------------------------------- 6. caption files kohya users leave


def _empty_txt_beside_a_caption(root: Path):
    _image(root / "10_zorb" / "a.png")
    (root / "10_zorb" / "a.txt").write_text("\n", encoding="utf-8")  # a tagger's empty output
    (root / "10_zorb" / "a.caption").write_text("zorb, a red zorb", encoding="utf-8")
    [item], report = scan_folder(root)
    assert item.caption == "zorb, a red zorb" and "using a.caption (a.txt is empty)" in report.summary()


def _caption_named_after_the_whole_image_name(root: Path):
    _image(root / "10_zorb" / "a.png")
    (root / "10_zorb" / "a.png.txt").write_text("zorb, a red zorb", encoding="utf-8")
    _, report = scan_folder(root)
    assert [ignored.reason for ignored in report.ignored] == [
        "caption without an image of the same name: for a.png, name it a.txt"]


def _caption_loose_in_the_kohya_root(root: Path):
    _image(root / "10_zorb" / "a.png")
    (root / "notes.txt").write_text("zorb", encoding="utf-8")
    _, report = scan_folder(root)
    assert [(ignored.path.name, ignored.reason.split(":")[0]) for ignored in report.ignored] == [
        ("notes.txt", "caption directly in the data folder")]


@pytest.mark.parametrize("case", [_empty_txt_beside_a_caption, _caption_named_after_the_whole_image_name,
                                  _caption_loose_in_the_kohya_root], ids=lambda case: case.__name__.strip("_"))
def test_caption_files_a_kohya_user_leaves_are_read_or_named(tmp_path, case):
    case(tmp_path / "data")
