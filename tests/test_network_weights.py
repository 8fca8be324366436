"""--network-weights (kohya's --network_weights): a run that starts from an existing LoRA file continues it, at this
run's alpha with the same weight change, and a file that does not fit the run is refused with the flags that fit."""
from __future__ import annotations

import pytest
import torch

from stylelora.config import ConfigError, load_config
from stylelora.train import loop
from stylelora.train.loop import run_training
from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate, tiny_overrides

STILL = {"optim.unet_lr": 1e-12, "optim.text_encoder_lr": 1e-12}  # four steps that move nothing measurable


def train(tmp_path, dataset, base, name: str, **overrides):
    try:
        return run_training(load_config(None, tiny_overrides(dataset, tmp_path / name, base, **overrides)))
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def started(tmp_path_factory, tiny_base, stripes_dataset):
    """A finished rank-4 adapter (alpha 4), UNet and text encoder, to start from."""
    return train(tmp_path_factory.mktemp("start"), stripes_dataset, tiny_base, "first")


def test_a_run_starts_from_the_files_weights_and_says_so(tmp_path, tiny_base, stripes_dataset, started, capsys):
    continued = train(tmp_path, stripes_dataset, tiny_base, "continued", **STILL, **{"network.weights": str(started)})
    fresh = train(tmp_path, stripes_dataset, tiny_base, "fresh", **STILL)
    before, after, new = adapter_tensors(started), adapter_tensors(continued), adapter_tensors(fresh)
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[key], before[key], atol=1e-6) for key in before)
    ups = [key for key in before if key.endswith("lora_up.weight")]
    assert all(new[key].abs().max() < 1e-6 < before[key].abs().max() for key in ups)  # a fresh LoRA's up is zero
    modules = len(ups)
    assert f"starting from {started.name}: {modules} of this run's {modules} LoRA modules take its weights." in \
        capsys.readouterr().err
    assert adapter_metadata(continued)["ss_training_args"].count(started.name) == 1  # by its name, not its path


def test_a_dry_run_reads_the_file_and_says_what_it_holds(tmp_path, tiny_base, stripes_dataset, started, capsys):
    from stylelora.train.dry_run import dry_run

    modules = sum(key.endswith("lora_up.weight") for key in adapter_tensors(started))
    dry_run(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "plan", tiny_base,
                                             **{"network.weights": str(started)})))
    assert f"starts from {started.name}: {modules} LoRA modules of rank 4" in capsys.readouterr().err


def test_another_alpha_keeps_each_modules_weight_change(tmp_path, tiny_base, stripes_dataset, started):
    halved = train(tmp_path, stripes_dataset, tiny_base, "alpha2", **STILL,
                   **{"network.alpha": 2.0, "network.weights": str(started)})
    before, after = adapter_tensors(started), adapter_tensors(halved)
    for key in (key for key in before if key.endswith("lora_up.weight")):
        module = key.removesuffix(".lora_up.weight")
        assert float(after[f"{module}.alpha"]) == 2.0
        change = before[key].flatten(1) @ before[f"{module}.lora_down.weight"].flatten(1) * 4.0 / 4
        again = after[key].flatten(1) @ after[f"{module}.lora_down.weight"].flatten(1) * 2.0 / 4
        torch.testing.assert_close(again, change, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"network.rank": 2, "network.alpha": 2.0}, r"has LoRA rank 4 where this run has 2 \(--rank 2\): train at the "
                                                r"file's rank"),
    ({"network.train_text_encoder": False}, "drop --no-text-encoder"),
    ({"network.unet_targets": "attn"}, "has LoRA modules on layers --unet-targets attn does not train: add "
                                       "--unet-targets kohya"),
])
def test_a_file_that_does_not_fit_the_run_is_refused_before_training(tmp_path, tiny_base, stripes_dataset, started,
                                                                     overrides, message, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the run trained")

    monkeypatch.setattr(loop, "train", no_training)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, stripes_dataset, tiny_base, "refused", **overrides, **{"network.weights": str(started)})


def test_a_loha_file_starts_as_the_plain_lora_of_its_weight_change_and_says_so(tmp_path, tiny_base, stripes_dataset,
                                                                               started, capsys):
    from safetensors.torch import load_file, save_file

    from test_lycoris import loha  # LyCORIS' tensors: a Hadamard product of two rank-2 pairs, read as rank 4

    torch.manual_seed(0)
    plain = load_file(str(started))
    state = {}
    for module in sorted({key.partition(".")[0] for key in plain}):
        out, inp = plain[f"{module}.lora_up.weight"].shape[0], plain[f"{module}.lora_down.weight"].shape[1]
        state.update({f"{module}.{suffix}": tensor for suffix, tensor in loha(out, inp).items()})
    save_file(state, str(tmp_path / "loha.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    continued = train(tmp_path, stripes_dataset, tiny_base, "from-loha", **STILL,
                      **{"network.weights": str(tmp_path / "loha.safetensors")})
    err = capsys.readouterr().err
    modules = len(state) // 5
    assert f"loha.safetensors: its LyCORIS modules ({modules} LoHa) start as the plain LoRA of the same weight " \
           "change; the run trains and writes plain LoRA." in err
    assert f"{modules} of this run's {modules} LoRA modules take its weights" in err
    assert all(key.endswith(("lora_up.weight", "lora_down.weight", "alpha")) for key in adapter_tensors(continued))


def test_dim_from_weights_takes_the_files_rank_alpha_and_targets_and_resumes(tmp_path, tiny_base, stripes_dataset,
                                                                            started, capsys):
    options = {"network.rank": 2, "network.alpha": 1.0, "network.unet_targets": "attn",  # not the file's
               "network.weights": str(started), "network.dim_from_weights": True, "train.save_every": 2}
    continued = train(tmp_path, stripes_dataset, tiny_base, "dims", **STILL, **options)
    assert f"rank 4, alpha 4, --unet-targets kohya from {started.name} (--dim-from-weights)" in capsys.readouterr().err
    metadata = adapter_metadata(continued)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    assert adapter_tensors(continued).keys() == adapter_tensors(started).keys()
    # A resume typed as the run was started keeps the file's shapes, without reading the file.
    resumed = train(tmp_path, stripes_dataset, tiny_base, "dims", **STILL, **{**options, "train.steps": 5,
                                                                             "train.resume": "latest"})
    assert adapter_metadata(resumed)["ss_steps"] == "5" and adapter_metadata(resumed)["ss_network_dim"] == "4"


def test_dim_from_weights_refuses_a_file_of_several_ranks(tmp_path, tiny_base, stripes_dataset, started):
    from safetensors.torch import load_file, save_file

    state = load_file(str(started))
    module = next(key for key in state if key.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    state[f"{module}.lora_down.weight"] = state[f"{module}.lora_down.weight"][:2].contiguous()
    state[f"{module}.lora_up.weight"] = state[f"{module}.lora_up.weight"][:, :2].contiguous()
    save_file(state, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ConfigError, match=r"--dim-from-weights reads one rank and alpha per UNet block \(kohya's "
                                          r"block_dims\), but mixed.safetensors has several in (the text encoders|"
                                          r"[A-Z]+\d\d) \(2/4, 4/4\)"):
        train(tmp_path, stripes_dataset, tiny_base, "mixed", **{"network.weights": str(tmp_path / "mixed.safetensors"),
                                                                 "network.dim_from_weights": True})


def test_a_missing_file_is_refused_before_the_base_loads(tmp_path, tiny_base, stripes_dataset, monkeypatch):
    def no_base(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(loop, "_load_base", no_base)
    with pytest.raises(ConfigError, match=r"network.weights \(--network-weights\): .*nothing.safetensors does not "
                                          "exist; give the .safetensors LoRA file to start from"):
        train(tmp_path, stripes_dataset, tiny_base, "missing",
              **{"network.weights": str(tmp_path / "nothing.safetensors")})
    (tmp_path / "notes.safetensors").write_text("not a LoRA")
    with pytest.raises(ConfigError, match="network.weights"):
        train(tmp_path, stripes_dataset, tiny_base, "unreadable",
              **{"network.weights": str(tmp_path / "notes.safetensors")})


def test_dim_from_weights_continues_a_file_trained_with_block_dims(tmp_path, tiny_base, stripes_dataset, capsys):
    """A file of kohya's block_dims (a rank per UNet block) is continued with each module at its own rank."""
    blocks = {"network.block_dims": "4,2,4,4,8,8,4,4,2", "network.block_alphas": "4,2,4,4,8,8,4,4,2"}
    first = train(tmp_path, stripes_dataset, tiny_base, "blocks", **blocks)
    continued = train(tmp_path, stripes_dataset, tiny_base, "more", **STILL, **{
        "network.weights": str(first), "network.dim_from_weights": True})
    # IN00 and IN02 hold no attention layer, so the file has no module there; linear alphas are one in the file
    assert f"--block-dims 0,2,0,4,8,8,4,4,2 from {first.name} (--dim-from-weights)" in capsys.readouterr().err
    before, after = adapter_tensors(first), adapter_tensors(continued)
    assert after.keys() == before.keys()
    assert all(after[key].shape == before[key].shape for key in before)
    assert all(torch.allclose(after[key], before[key], atol=1e-6) for key in before)
