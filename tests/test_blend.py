"""blend(): --exact reproduces the live blend, --rank R reports the true SVD error (falling with R), metadata."""
from __future__ import annotations

import json

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, model_outputs, tiny_pipeline
from safetensors.torch import load_file

from stylelora.generate.stack import AdapterStack
from stylelora.lora.blend import BLEND_METADATA_KEY, blend
from stylelora.lora.io import file_model_hash, load_adapter_state
from stylelora.lora.spec import AdapterSpec

LIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    root = tmp_path_factory.mktemp("blend")
    return {
        "root": root,
        "base": tiny_sd_base,
        "a": make_adapter(root / "stripes.safetensors", 1, trigger="stripes"),
        "b": make_adapter(root / "pastel.safetensors", 2, trigger="pastel", preset="locon", conv_rank=2, conv_alpha=1.0),
    }


def specs(world):
    return [AdapterSpec(world["a"], 0.7, -0.4), AdapterSpec(world["b"], -0.5, 1.2)]


def test_exact_blend_file_equals_the_live_blend(world, tmp_path):
    live = load_tiny_base(world["base"])
    AdapterStack.for_pipe(live).apply(specs(world), "sum")  # a file's default mode (split is live only)
    report = blend(specs(world), tmp_path / "mix.safetensors", exact=True)
    assert report.mode == "exact" and report.max_error == 0.0
    from_file = load_tiny_base(world["base"])
    AdapterStack.for_pipe(from_file).apply([AdapterSpec(report.path, 1.0)])
    ours, expected = model_outputs(from_file), model_outputs(live)
    assert (ours["unet"] - expected["unet"]).abs().max() <= LIVE_TOLERANCE
    assert (ours["te"] - expected["te"]).abs().max() <= LIVE_TOLERANCE
    # Ranks concatenate: a module in both inputs has rank 4 + 4; LoCon convs only in b keep b's conv rank 2.
    state, _ = load_adapter_state(report.path)
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 8
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].item() == 8.0


def test_exact_blend_loads_in_diffusers_like_in_ours(world, tmp_path):
    path = blend(specs(world), tmp_path / "mix.safetensors").path
    ours = load_tiny_base(world["base"])
    AdapterStack.for_pipe(ours).apply([path])
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(path), adapter_name="mix")
    assert (model_outputs(ours)["unet"] - model_outputs(theirs)["unet"]).abs().max() <= 1e-4


def _relative_error(inputs, path, module) -> float:
    """||delta - approx||_F / ||delta||_F recomputed directly from the input files and the written file."""
    def delta(state, name, weight):
        down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
        rank = down.shape[0]
        alpha = state[f"{name}.alpha"].item() if f"{name}.alpha" in state else rank
        return weight * alpha / rank * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))

    target = sum(delta(load_file(str(spec.path)), module, spec.unet_weight) for spec in inputs
                 if f"{module}.lora_down.weight" in load_file(str(spec.path)))
    approx = delta(load_file(str(path)), module, 1.0)
    return float((target - approx).norm() / target.norm())


def test_svd_error_is_reported_true_and_falls_with_rank(world, tmp_path):
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    reports = {rank: blend(specs(world), tmp_path / f"r{rank}.safetensors", rank=rank) for rank in (1, 2, 4, 8)}
    max_errors = [reports[rank].max_error for rank in (1, 2, 4, 8)]
    assert max_errors == sorted(max_errors, reverse=True) and max_errors[0] > 0.1
    assert reports[8].max_error < 1e-6  # rank 8 >= 4 + 4: nothing is lost
    for rank in (1, 2, 4):
        reported = reports[rank].module_errors[module]
        assert reported == pytest.approx(_relative_error(specs(world), reports[rank].path, module), abs=1e-5)
        assert reports[rank].module_ranks[module] == rank
    assert "relative error max" in reports[2].summary() and module in reports[1].summary(worst=50)


def test_blend_metadata_records_sources_weights_and_hash(world, tmp_path):
    report = blend(specs(world), tmp_path / "mix.safetensors", rank=2)
    _, metadata = load_adapter_state(report.path)
    assert metadata["modelspec.merged_from"] == "stripes, pastel"
    assert metadata["modelspec.trigger_phrase"] == "stripes, pastel"
    info = json.loads(metadata[BLEND_METADATA_KEY])
    assert [(i["file"], i["unet_weight"], i["te_weight"]) for i in info["inputs"]] == [
        ("stripes.safetensors", 0.7, -0.4), ("pastel.safetensors", -0.5, 1.2)]
    assert info["mode"] == "svd" and info["rank"] == 2
    assert metadata["sshs_model_hash"] == file_model_hash(report.path)
    assert metadata["ss_network_dim"] == "2" and metadata["ss_base_model_version"] == "sd_v1"


def test_fp16_blend_halves_the_weights(world, tmp_path):
    report = blend(specs(world), tmp_path / "half.safetensors", exact=True, dtype=torch.float16)
    state = load_file(str(report.path))
    assert {t.dtype for k, t in state.items() if not k.endswith(".alpha")} == {torch.float16}


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 2, "exact": True}, "not both"),
    ({"rank": 0}, ">= 1"),
    ({"out_name": "mix.ckpt"}, ".safetensors"),
    ({"weights": (0.0, 0.0)}, "Every weight is 0"),
    ({"other_base": True}, "different base"),
])
def test_bad_blends_are_refused(world, tmp_path, kwargs, message):
    inputs = specs(world)
    if "weights" in kwargs:
        inputs = [AdapterSpec(s.path, w, w) for s, w in zip(inputs, kwargs["weights"])]
    if kwargs.get("other_base"):
        inputs.append(AdapterSpec(make_adapter(tmp_path / "wide.safetensors", 4, base_args={"cross_attention_dim": 48})))
    with pytest.raises(ValueError, match=message):
        blend(inputs, tmp_path / kwargs.get("out_name", "mix.safetensors"),
              rank=kwargs.get("rank"), exact=kwargs.get("exact", False))


def _checkpoint(path, seed: int):
    """A stand-in single-file base: only its bytes are hashed (1.5 MiB, past the 1 MiB the legacy hash skips)."""
    path.write_bytes(torch.randint(0, 256, (3 << 19,), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed)).numpy().tobytes())
    return path


def test_base_hashes_are_kohyas_for_a_single_file_and_absent_for_a_folder(tmp_path, world):
    import hashlib

    from stylelora.generate.base_identity import kohya_base_hashes

    data = _checkpoint(tmp_path / "base.safetensors", 0).read_bytes()
    assert kohya_base_hashes(tmp_path / "base.safetensors") == {
        "ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],  # A1111's old hash
        "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest(),
    }
    assert kohya_base_hashes(world["base"]) == {} and kohya_base_hashes("toy") == {}


def test_a_blend_names_the_base_its_inputs_agree_on_and_nothing_when_they_disagree(world, tmp_path):
    from stylelora.generate.base_identity import kohya_base_hashes

    def trained_on(checkpoint, name, seed):
        identity = {"ss_sd_model_name": checkpoint.name, **kohya_base_hashes(checkpoint)}
        return make_adapter(tmp_path / f"{name}.safetensors", seed, metadata=identity), identity

    base, other = _checkpoint(tmp_path / "v1-5.safetensors", 0), _checkpoint(tmp_path / "dreamy.safetensors", 1)
    (a, identity), (b, _) = trained_on(base, "a", 1), trained_on(base, "b", 2)
    (c, _), keys = trained_on(other, "c", 3), ("ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash")

    def base_of(inputs, out):
        _, metadata = load_adapter_state(blend([f"{path}:0.5" for path in inputs], tmp_path / out).path)
        return {key: metadata[key] for key in keys if key in metadata}

    assert base_of([a, b], "same.safetensors") == identity  # A1111 and model sites show which base it is for
    assert base_of([a, c], "mixed.safetensors") == {}  # neither base would be true of the blend
    assert base_of([a, world["a"]], "unknown.safetensors") == {}  # world["a"] records no base
