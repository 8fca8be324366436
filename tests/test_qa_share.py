"""What a user posting an adapter to CivitAI and using it in A1111 / ComfyUI sees of the files stylelora writes:
`stylelora share` of a run or a blend file, the model card's prompt, the kohya/modelspec metadata model sites read,
and the hashes `stylelora inspect` shows beside the ones CivitAI lists."""
from __future__ import annotations

import hashlib
import json
import time
import zipfile

import pytest
from gen_fixtures import make_adapter

from stylelora.share import model_card, write_bundle


@pytest.fixture(scope="module")
def blend_folder(tmp_path_factory):
    """An outputs-like folder of two adapters with their sidecars and cards (each gets NAME.md: they share it)."""
    folder = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("ab", "other")):
        write_bundle(make_adapter(folder / f"{name}.safetensors", seed, trigger=name), preview=None)
    return folder


def share(capsys, *args: str) -> tuple[int, str]:
    """`stylelora share ARGS` through the CLI entry point: (exit status, stderr)."""
    from stylelora.cli import main

    status = main(["share", *map(str, args)])
    return status, capsys.readouterr().err


def test_share_packs_a_blend_file_that_lies_beside_other_adapters(blend_folder, tmp_path, capsys):
    """A blend is saved among other adapters (outputs/, the app's blends/): sharing its file packs its bundle alone,
    under the names A1111 reads once unzipped into models/Lora. Before, only a folder of one adapter was accepted."""
    status, err = share(capsys, blend_folder / "ab.safetensors", "--out", tmp_path / "ab.zip")
    assert status == 0, err
    archive = zipfile.ZipFile(tmp_path / "ab.zip")
    # ab was written alone, so its card is README.md; `other` came later and got other.md. The card packed is the
    # one on disk, not the NAME.md that card_path would pick for a card written now (which was left out).
    assert sorted(archive.namelist()) == ["ab/README.md", "ab/ab.json", "ab/ab.safetensors"]
    assert 'weight_name="ab.safetensors"' in archive.read("ab/README.md").decode()


@pytest.mark.parametrize("given, out, said", [
    ("missing", "x.zip", "missing does not exist; pass a run folder"),
    ("ab.json", "x.zip", "ab.json is not an adapter; pass its run folder or the adapter's NAME.safetensors file, e.g."),
    (".", "x.zip", "(found 2: ab.safetensors, other.safetensors; pass the one to share as FILE.safetensors)"),
    ("ab.safetensors", "x.tar", "the bundle is a zip archive; name it NAME.zip"),
])
def test_share_refuses_what_it_cannot_pack_saying_what_to_pass(blend_folder, tmp_path, capsys, given, out, said):
    status, err = share(capsys, blend_folder / given, "--out", tmp_path / out)
    assert status == 2 and said in err and err.count("\n") == 1, err
    assert not (tmp_path / out).exists()


def test_share_replaces_an_existing_zip_only_with_overwrite(blend_folder, tmp_path, capsys):
    """A second share to the same --out used to replace the posted bundle silently."""
    out = tmp_path / "ab.zip"
    out.write_bytes(b"an earlier upload")
    status, err = share(capsys, blend_folder / "ab.safetensors", "--out", out)
    assert status == 2 and "already exists; pass --overwrite to replace it, or another --out" in err
    assert out.read_bytes() == b"an earlier upload"
    status, _ = share(capsys, blend_folder / "ab.safetensors", "--out", out, "--overwrite")
    assert status == 0 and "ab/ab.safetensors" in zipfile.ZipFile(out).namelist()


def test_a_blend_file_shares_to_its_name_zip_beside_it(blend_folder, capsys):
    status, _ = share(capsys, blend_folder / "ab.safetensors")
    assert status == 0 and (blend_folder / "ab.zip").is_file() and not (blend_folder / "ab.safetensors.zip").exists()


@pytest.mark.parametrize("phrase, prompt", [
    ("stripestyle, zorb", "prompt `stripestyle, zorb, ... <lora:ab:1>`"),  # a blend: both triggers, not the first
    ("stripestyle", "prompt `stripestyle, ... <lora:ab:1>`"),
    ("", "prompt `... <lora:ab:1>`"),
])
def test_the_cards_prompt_names_every_trigger(phrase, prompt):
    card = model_card("ab", {"modelspec.trigger_phrase": phrase}, grid=None)
    assert prompt in card


def metadata_for(family: str, **overrides) -> dict[str, str]:
    """adapter_metadata of a run on `family` with `overrides`, without training (as test_lora_format does)."""
    from stylelora.config import load_config, with_values
    from stylelora.presets import apply_preset
    from stylelora.train.metadata import RunFacts, adapter_metadata

    config = with_values(apply_preset(load_config(None, {"data.dir": "d", "train.samples": False, **overrides}),
                                      family, cuda=False), {"data.resolution": 32})
    facts = RunFacts(items=(), num_train_images=10, num_reg_images=0, trigger="x", prediction_type="epsilon",
                     started_at=time.time(), world_size=1, batches_per_epoch=10)
    return adapter_metadata(config, facts, 10)


@pytest.mark.parametrize("family, version, implementation", [
    ("sd1", "sd_v1", "diffusers"),
    ("sd2", "sd_v2", "diffusers"),
    ("sd2-v", "sd_v2_v", "diffusers"),  # sd-scripts' name for a 768-v base; was sd_v2, as for a 512 one
    ("sdxl", "sdxl_base_v1-0", "https://github.com/Stability-AI/generative-models"),  # was diffusers
])
def test_the_base_is_named_as_sd_scripts_names_it(family, version, implementation):
    metadata = metadata_for(family)
    assert (metadata["ss_base_model_version"], metadata["modelspec.implementation"]) == (version, implementation)


@pytest.mark.parametrize("overrides, model_name", [
    ({"train.resume": "/home/alice/runs/ink/checkpoints/step-000500"}, "toy"),  # deleted by rotation before saving
    ({"data.dir": "/home/alice/art/10_ink"}, "toy"),  # a data folder moved since
    ({"train.base": "~/models/alice-sd15.safetensors"}, "alice-sd15.safetensors"),  # expanded by the loader
    ({"train.base": "C:\\Users\\alice\\sd15.safetensors"}, "sd15.safetensors"),  # a Windows config read elsewhere
    ({"train.base": "/home/alice/gone/sd15"}, "sd15"),
    ({"train.base": "runwayml/stable-diffusion-v1-5"}, "runwayml/stable-diffusion-v1-5"),  # a hub id is kept
])
def test_a_shared_file_names_no_local_path(overrides, model_name):
    """A path that does not exist when the file is written (any more) was kept whole in ss_training_args and
    ss_sd_model_name, which A1111's metadata view and model sites show to everyone who downloads the file."""
    metadata = metadata_for("sd1", **overrides)
    assert metadata["ss_sd_model_name"] == model_name
    assert not [key for key, value in metadata.items() if "/home/alice" in value or "Users\\" in value
                or "~/" in value or "\\\\Users" in value]


def test_inspect_shows_the_file_hashes_civitai_lists(tmp_path):
    """CivitAI lists the whole file's SHA256 and AutoV2 beside AutoV3 (A1111's tensor hash); inspect printed the
    tensor hash alone, labelled "sha256", which never matched the SHA256 on the model's page."""
    from stylelora.lora.inspect import format_inspect, inspect_adapter

    path = make_adapter(tmp_path / "ink.safetensors", 1, trigger="ink")
    info = inspect_adapter(path)
    whole = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (info["hash"]["file_sha256"], info["hash"]["civitai_autov2"]) == (whole, whole[:10].upper())
    text = format_inspect(info)
    assert f"file sha256    {whole} (CivitAI SHA256; AutoV2 {whole[:10].upper()})" in text
    assert f"{info['hash']['a1111_short']} (A1111's Lora hash, CivitAI AutoV3" in text
    json.dumps(info)
