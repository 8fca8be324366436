"""QA of kohya's block-wise options (--down/mid/up-lr-weight, --block-lr-zero-threshold, --block-dims,
--block-alphas, --conv-block-dims, --conv-block-alphas), the LoRA dropouts (--network-dropout, --rank-dropout,
--module-dropout) and --zero-terminal-snr, used as a kohya user would: through the CLI on the tiny base, from a
run.toml, on resume, with --network-weights / --dim-from-weights, LoRA+, LoCon, --no-text-encoder and gradient
checkpointing, and the files they write read back by `stylelora inspect`, our loader and diffusers'
load_lora_weights. The six bugs it found (a crash after the base loaded, refusals and reports that named the wrong
blocks, a block-dims file that could not be continued, a run.toml number refused, no word for zero terminal SNR on an
epsilon base) are fixed, and their tests pass."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate
from train_fixtures import cli_output as cli
from train_fixtures import cli_status as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--steps", "2", "--no-samples", "--batch-size", "4", "--rank", "4", "--alpha", "4"]
OUTPUT_ONLY = ["--down-lr-weight", "zeros", "--mid-lr-weight", "0"]
# LoCon with a rank and alpha per block (IN00 holds no module; IN02 is the downsampler, a 3x3 conv only)
BLOCK_LOCON = ["--unet-targets", "locon", "--block-dims", "0,2,4,4,8,8,8,4,2", "--block-alphas", "1,1,2,2,4,4,8,8,1",
               "--conv-block-dims", "0,1,2,2,4,4,4,2,1", "--conv-block-alphas", "1,1,1,1,2,2,2,1,1"]
DROPOUTS = ["--network-dropout", "0.2", "--rank-dropout", "0.3", "--module-dropout", "0.3"]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


def train(data: Path, base: Path, output: Path, *extra) -> list:
    return ["train", data, "--base", base, *TINY, "--output", output, *extra]


def adapter(output: Path) -> Path:
    return next(output.glob("*.safetensors"))


def unet_modules(path: Path) -> dict[str, tuple[int, float]]:
    """kohya module name -> (rank, alpha) of the file's UNet modules."""
    state = adapter_tensors(path)
    return {key[: -len(".lora_down.weight")]: (value.shape[0], float(state[key.replace("lora_down.weight", "alpha")]))
            for key, value in state.items() if key.startswith("lora_unet_") and key.endswith(".lora_down.weight")}


def block_of(kohya_name: str, base: Path) -> str:
    from stylelora.lora.block_weights import BlockLayout

    layout = BlockLayout.from_config(json.loads((base / "unet" / "config.json").read_text()))
    return layout.block_of(kohya_name)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_base, stripes_dataset) -> dict[str, Path]:
    """Adapters trained once for the module: output blocks only, and LoCon with per-block ranks and alphas."""
    root = tmp_path_factory.mktemp("qa_blocks")
    made = {}
    for name, extra in {"output_only": OUTPUT_ONLY, "block_locon": BLOCK_LOCON}.items():
        assert run(*train(stripes_dataset, tiny_base, root / name, *extra)) == 0
        made[name] = root / name
    return made


# ----------------------------------------------------------------------------- what works


def test_an_output_blocks_only_style_writes_only_output_block_modules_and_records_its_lists(files, tiny_base):
    path = adapter(files["output_only"])
    blocks = {block_of(name, tiny_base) for name in unet_modules(path)}
    assert blocks == {"OUT00", "OUT01", "OUT02", "OUT03"}
    assert json.loads(adapter_metadata(path)["ss_network_args"]) == {"down_lr_weight": "zeros", "mid_lr_weight": "0"}


def test_a_dry_run_prints_each_blocks_multiplier_after_a_curve_and_the_threshold(tmp_path, capsys, tiny_base,
                                                                                  stripes_dataset):
    (tmp_path / "run.toml").write_text('[optim]\ndown_lr_weight = "sine+0.5"\nmid_lr_weight = "0.5"\n'
                                       'block_lr_zero_threshold = 0.6\n[network]\nrank_dropout = 0.1\n'
                                       '[train]\nzero_terminal_snr = true\n')
    status, out, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "out", "--config",
                                          tmp_path / "run.toml", "--dry-run"))
    assert status == 0, err
    # sine over IN00..IN03 is 0, .5, .87, 1; +0.5; IN00 (0.5) and M00 (0.5) are at or under 0.6
    assert "learning rate × IN00 0, IN01 1, IN02 1.36603, IN03 1.5, M00 0, OUT00 1" in out + err
    assert "no LoRA in M00\n" in out + err  # IN00, also at 0, holds no module anyway


def test_a_list_of_sd15_length_on_the_toy_layout_is_refused_naming_its_blocks(tmp_path, capsys, tiny_base,
                                                                              stripes_dataset):
    status, _, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "out", "--block-dims",
                                        ",".join(["4"] * 25), "--dry-run"))
    assert status == 2
    assert "IN00,IN01,IN02,IN03,M00,OUT00,OUT01,OUT02,OUT03" in err and "Traceback" not in err


def test_block_lr_weights_scale_each_blocks_first_step_with_loraplus(tmp_path, tiny_base, stripes_dataset):
    """AdamW's first step moves each up factor by about its learning rate: unet_lr × block multiplier × LoRA+."""
    out = tmp_path / "lp"
    assert run("train", stripes_dataset, "--base", tiny_base, "--steps", "1", "--no-samples", "--batch-size", "4",
               "--rank", "4", "--alpha", "4", "--lr-scheduler", "constant", "--unet-lr", "1e-3", "--no-text-encoder",
               "--loraplus-lr-ratio", "16", "--down-lr-weight", "0,0.25,0.25,1", "--up-lr-weight", "1,1,0.5,0.5",
               "--output", out) == 0
    state, largest = adapter_tensors(adapter(out)), {}
    for key, value in state.items():
        if key.startswith("lora_unet_") and key.endswith("lora_up.weight"):
            block = block_of(key, tiny_base)
            largest[block] = max(largest.get(block, 0.0), value.abs().max().item())
    expected = {"IN01": 0.25, "IN03": 1, "M00": 1, "OUT00": 1, "OUT01": 1, "OUT02": 0.5, "OUT03": 0.5}
    assert largest == pytest.approx({block: 1e-3 * 16 * w for block, w in expected.items()}, rel=0.01)
    assert not any(key.startswith("lora_te") for key in state)


def test_per_block_ranks_and_alphas_load_the_same_in_diffusers_as_in_our_loader(files, tiny_base):
    from diffusers import StableDiffusionPipeline

    from stylelora.lora.io import load_adapter_into

    path = adapter(files["block_locon"])
    modules = unet_modules(path)
    ranks = {block_of(name, tiny_base): rank for name, (rank, _) in modules.items() if not name.endswith(("conv1",
             "conv2", "samplers_0_conv")) and "attentions" in name}
    assert ranks == {"IN01": 2, "IN03": 4, "M00": 8, "OUT00": 8, "OUT01": 8, "OUT02": 4, "OUT03": 2}
    assert modules["lora_unet_down_blocks_0_downsamplers_0_conv"] == (2, 1.0)  # IN02: conv rank 2, alpha 1

    def unet_out(pipe):
        torch.manual_seed(0)
        sample = torch.randn(1, 4, 8, 8)
        ids = pipe.tokenizer(["stripestyle, a red circle"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
            return pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=text).sample

    base = StableDiffusionPipeline.from_pretrained(tiny_base)
    plain = unet_out(base)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_base)
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        theirs.load_lora_weights(str(path), adapter_name="qa")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    ours = StableDiffusionPipeline.from_pretrained(tiny_base)
    load_adapter_into(path, ours.unet, ours.text_encoder)
    ours_out = unet_out(ours)
    assert (ours_out - plain).abs().max() > 1e-4  # the adapter does something
    assert torch.allclose(unet_out(theirs), ours_out, atol=1e-5)


def test_inspect_shows_the_per_block_ranks_and_the_lists(files, capsys):
    status, out, _ = cli(capsys, "inspect", adapter(files["block_locon"]))
    assert status == 0
    assert "per module rank/alpha" in out and "conv modules" in out
    assert '"block_dims": "0,2,4,4,8,8,8,4,2"' in out  # ss_network_args (the line is cut after a width)


def test_generate_draws_with_a_per_block_locon_file(files, tiny_base, tmp_path, capsys):
    image = tmp_path / "img.png"
    status, _, err = cli(capsys, "generate", "stripestyle, a red circle", "--base", tiny_base, "--lora",
                         adapter(files["block_locon"]), "--steps", "2", "--seed", "1", "--out", image)
    assert status == 0, err
    assert image.is_file()


def test_dropouts_with_block_lists_resume_exactly_and_gradient_checkpointing_replays_the_same_drops(
        tmp_path, tiny_base, stripes_dataset):
    common = ["train", stripes_dataset, "--base", tiny_base, "--steps", "3", "--save-every", "2", "--no-samples",
              "--batch-size", "4", "--rank", "4", "--alpha", "4", "--up-lr-weight", "1,1,0.5,0.5", *DROPOUTS]
    assert run(*common, "--gradient-checkpointing", "--output", tmp_path / "full") == 0
    assert run(*common, "--gradient-checkpointing", "--output", tmp_path / "resumed", "--resume",
               tmp_path / "full" / "checkpoints" / "step-000002") == 0
    assert run(*common, "--output", tmp_path / "no_gc") == 0
    full = adapter_tensors(adapter(tmp_path / "full"))
    for other in ("resumed", "no_gc"):
        state = adapter_tensors(adapter(tmp_path / other))
        assert all(torch.equal(full[key], state[key]) for key in full), other
    meta = adapter_metadata(adapter(tmp_path / "full"))
    assert meta["ss_network_dropout"] == "0.2"
    assert json.loads(meta["ss_network_args"]) == {"up_lr_weight": "1,1,0.5,0.5", "rank_dropout": "0.3",
                                                   "module_dropout": "0.3"}


def test_dropouts_change_what_a_run_learns(tmp_path, tiny_base, stripes_dataset):
    assert run(*train(stripes_dataset, tiny_base, tmp_path / "plain")) == 0
    assert run(*train(stripes_dataset, tiny_base, tmp_path / "dropped", *DROPOUTS)) == 0
    plain, dropped = adapter_tensors(adapter(tmp_path / "plain")), adapter_tensors(adapter(tmp_path / "dropped"))
    assert any(not torch.equal(plain[key], dropped[key]) for key in plain)


def test_attn_targets_without_text_encoder_take_block_dims_and_dropouts(tmp_path, tiny_base, stripes_dataset):
    out = tmp_path / "attn"
    assert run(*train(stripes_dataset, tiny_base, out, "--unet-targets", "attn", "--no-text-encoder",
                      "--gradient-checkpointing", "--block-dims", "0,2,0,2,0,4,4,8,8", *DROPOUTS)) == 0
    modules = unet_modules(adapter(out))
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out_0")) for name in modules)
    assert {block_of(name, tiny_base): rank for name, (rank, _) in modules.items()} == \
        {"IN01": 2, "IN03": 2, "OUT00": 4, "OUT01": 4, "OUT02": 8, "OUT03": 8}
    assert not any(key.startswith("lora_te") for key in adapter_tensors(adapter(out)))


def test_a_resume_with_a_changed_block_list_or_dropout_is_refused_naming_it(tmp_path, capsys, tiny_base,
                                                                           stripes_dataset):
    first = train(stripes_dataset, tiny_base, tmp_path / "run", "--up-lr-weight", "1,1,0.5,0.5",
                  "--network-dropout", "0.1")
    assert run(*first) == 0
    status, _, err = cli(capsys, *first, "--steps", "3", "--resume", "latest", "--up-lr-weight", "1,1,0.25,0.25")
    assert status == 2 and "optim.up_lr_weight: '1,1,0.5,0.5' → '1,1,0.25,0.25'" in err
    status, _, err = cli(capsys, *first, "--steps", "3", "--resume", "latest", "--network-dropout", "0")
    assert status == 2 and "network.dropout: 0.1 → 0.0" in err
    status, _, err = cli(capsys, "train", stripes_dataset, "--config", tmp_path / "run" / "config.toml", "--steps",
                         "3", "--resume", "latest")
    assert status == 0, err


def test_network_weights_with_every_block_multiplier_above_zero_continues_the_file(files, tmp_path, capsys,
                                                                                   tiny_base, stripes_dataset):
    status, _, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "more", "--network-weights",
                                        adapter(files["output_only"]), "--down-lr-weight", "zeros+0.5",
                                        "--mid-lr-weight", "0.5"))
    assert status == 0, err


def test_network_weights_with_block_dims_is_refused_naming_the_option(files, tmp_path, capsys, tiny_base,
                                                                      stripes_dataset):
    status, _, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "more", "--network-weights",
                                        adapter(files["output_only"]), "--block-dims", ",".join(["4"] * 9),
                                        "--dry-run"))
    assert status == 2 and "drop --block-dims" in err


def test_zero_terminal_snr_trains_finite_on_the_pure_noise_step_with_huber_snr(tmp_path, tiny_base, stripes_dataset):
    out = tmp_path / "zt"
    assert run(*train(stripes_dataset, tiny_base, out, "--zero-terminal-snr", "--min-timestep", "999",
                      "--max-timestep", "1000", "--loss-type", "huber", "--huber-schedule", "snr")) == 0
    losses = [float(line.split(",")[1]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert adapter_metadata(adapter(out))["ss_zero_terminal_snr"] == "True"


# ----------------------------------------------------------------------------- bugs


def test_block_dims_that_leave_no_adapted_layer_are_refused_up_front_not_a_traceback(tmp_path, capsys, tiny_base,
                                                                                    stripes_dataset):
    args = train(stripes_dataset, tiny_base, tmp_path / "empty", "--block-dims", "0,0,4,0,0,0,0,0,0")
    status, _, err = cli(capsys, *args, "--dry-run")
    assert status == 2 and "IN02" in err
    assert run(*args) == 2  # today: ValueError traceback after the base loads


def test_network_weights_accepts_the_sine_curve_whose_zero_falls_on_a_block_without_modules(
        files, tmp_path, capsys, tiny_base, stripes_dataset):
    status, _, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "more", "--network-weights",
                                        adapter(files["output_only"]), "--down-lr-weight", "sine", "--dry-run"))
    assert status == 0, err


def test_dim_from_weights_continues_a_file_trained_with_block_dims(files, tmp_path, capsys, tiny_base,
                                                                    stripes_dataset):
    status, _, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "more", "--unet-targets", "locon",
                                        "--network-weights", adapter(files["block_locon"]), "--dim-from-weights",
                                        "--dry-run"))
    assert status == 0, err


def test_the_block_line_tells_the_truth_about_locon_convs(tmp_path, capsys, tiny_base, stripes_dataset):
    status, out, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "a", "--unet-targets", "locon",
                                          "--block-dims", "0,0,0,0,0,4,4,4,4", "--dry-run"))
    assert status == 0, err
    assert "no LoRA in IN00, IN01" not in out + err  # IN01's resnet convs do get a LoRA (rank 4)
    status, out, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "b", "--unet-targets", "locon",
                                          "--conv-block-dims", "0,1,2,2,4,4,4,2,1", "--dry-run"))
    assert status == 0, err
    assert "UNet blocks:" in out + err  # the conv ranks per block, as the docs promise for the dry run


def test_run_toml_mid_lr_weight_as_a_number_is_accepted_or_the_hint_quotes_it(tmp_path):
    from stylelora.config import ConfigError, load_config

    (tmp_path / "run.toml").write_text("[optim]\nmid_lr_weight = 0.5\n")
    try:
        config = load_config(tmp_path / "run.toml")
    except ConfigError as error:
        assert "mid_lr_weight = 0.5 under" not in str(error)
    else:
        assert float(config.optim.mid_lr_weight) == 0.5


def test_zero_terminal_snr_on_an_epsilon_base_warns(tmp_path, capsys, tiny_base, stripes_dataset):
    status, out, err = cli(capsys, *train(stripes_dataset, tiny_base, tmp_path / "zt", "--zero-terminal-snr",
                                          "--dry-run"))
    assert status == 0, err
    said = [line for line in (out + err).splitlines() if "epsilon" in line.lower() or "v-prediction" in line.lower()
            or "v_prediction" in line.lower()]
    assert any("terminal" in line.lower() or "snr" in line.lower() for line in said)
