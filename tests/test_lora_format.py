"""Round trips of our LoRA files through diffusers' loader and our own, on a tiny random SD pipeline."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import string

import pytest
import torch

from stylelora.lora import formats
from stylelora.lora.inject import add_lora, lora_parameters, module_ranks, unet_lora_targets
from stylelora.lora.io import (
    file_model_hash,
    kohya_metadata,
    load_adapter_into,
    load_adapter_state,
    safetensors_hashes,
    save_adapter,
)

PROMPTS = ["a red circle on a blue background", "zorb 7"]
UNET_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1.0  # mean abs difference on the 0-255 scale


def tiny_pipeline():
    """A random StableDiffusionPipeline with the real SD1.x module layout, small enough for 2 CPU cores."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    # One token per character (no merges): enough for prompts to reach the text encoder distinctly.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@contextlib.contextmanager
def library_warnings():
    """Collect WARNING+ log records of diffusers / transformers / peft (where unmatched LoRA keys are reported)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def token_ids(pipe):
    return pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids


@torch.no_grad()
def outputs(pipe):
    """TE hidden states on fixed prompts, UNet prediction on fixed latents/context, and a 2-step image."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    te = pipe.text_encoder(token_ids(pipe))[0]
    unet = pipe.unet(latents, torch.tensor([10, 500]), context).sample
    image = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 height=16, width=16, output_type="np").images[0]
    return {"te": te, "unet": unet, "image": torch.from_numpy(image * 255.0)}


def assert_same_outputs(ours, theirs):
    assert (ours["te"] - theirs["te"]).abs().max() <= UNET_TOLERANCE
    assert (ours["unet"] - theirs["unet"]).abs().max() <= UNET_TOLERANCE
    assert (ours["image"] - theirs["image"]).abs().mean() <= PIXEL_TOLERANCE


def trained_pipeline(preset="kohya", **lora_args):
    """A tiny pipeline with a random, non-zero LoRA (up weights too) on UNet and TE, alpha != rank."""
    pipe = tiny_pipeline()
    args = {"rank": 4, "alpha": 2.0, **lora_args}
    add_lora(pipe.unet, pipe.text_encoder, unet_targets=preset, init_lora_weights=False, **args)
    return pipe


LOCON = {"conv_rank": 2, "conv_alpha": 1.0}


def by_block(path: str, conv: bool):
    """kohya's block_dims / block_alphas in small: ranks and alphas that differ by block, no LoRA in the middle."""
    if path.startswith("mid_block"):
        return None
    return (2, 1.0) if path.startswith("down_blocks") else (1 if conv else 3, 4.0)


BLOCKS = {**LOCON, "unet_shape": by_block}


@pytest.fixture(scope="module")
def base_outputs():
    return outputs(tiny_pipeline())


@pytest.mark.parametrize("preset, extra", [("kohya", {}), ("locon", LOCON), ("locon", BLOCKS)])
def test_kohya_file_loads_in_diffusers_with_same_outputs(tmp_path, base_outputs, preset, extra):
    trained = trained_pipeline(preset, **extra)
    expected = outputs(trained)
    # The LoRA must really act on both models, or the comparisons below prove nothing.
    assert (expected["unet"] - base_outputs["unet"]).abs().max() > 100 * UNET_TOLERANCE
    assert (expected["te"] - base_outputs["te"]).abs().max() > 100 * UNET_TOLERANCE
    assert (expected["image"] - base_outputs["image"]).abs().mean() > 5 * PIXEL_TOLERANCE
    path = save_adapter(tmp_path / "style.safetensors", trained.unet, trained.text_encoder, metadata={})

    fresh = tiny_pipeline()
    with library_warnings() as warnings_logged:
        fresh.load_lora_weights(str(path), adapter_name="style")
    assert [r.getMessage() for r in warnings_logged] == []
    # Every module came back with its own rank and alpha (conv rank 2 / alpha 1 for LoCon convs); linear modules
    # trained at several alphas are written at one, their weight change kept (io._one_linear_alpha says why).
    assert module_ranks(fresh.unet, "style") == (module_ranks(trained.unet) if "unet_shape" not in extra else {
        path: (rank, alpha if path.endswith(("conv1", "conv2", "samplers.0.conv")) else 4.0)  # 3x3 convs
        for path, (rank, alpha) in module_ranks(trained.unet).items()})
    assert module_ranks(fresh.text_encoder, "style") == module_ranks(trained.text_encoder)
    dropped = sum(by_block(path, False) is None for path in unet_lora_targets(tiny_pipeline().unet, preset).all) \
        if "unet_shape" in extra else 0
    assert len(module_ranks(fresh.unet, "style")) == len(unet_lora_targets(trained.unet, preset).all) - dropped
    if "unet_shape" in extra:  # the file holds every block's own shapes
        assert {rank for rank, _ in module_ranks(fresh.unet, "style").values()} == {1, 2, 3} and dropped
    assert_same_outputs(expected, outputs(fresh))


@pytest.mark.parametrize("preset, extra", [("kohya", {}), ("locon", LOCON), ("locon", BLOCKS)])
def test_our_loader_reads_kohya_file_with_same_outputs(tmp_path, preset, extra):
    trained = trained_pipeline(preset, **extra)
    path = save_adapter(tmp_path / "style.safetensors", trained.unet, trained.text_encoder, metadata={})

    fresh = tiny_pipeline()
    load_adapter_into(path, fresh.unet, fresh.text_encoder)
    assert {p: rank for p, (rank, _) in module_ranks(fresh.unet).items()} == \
        {p: rank for p, (rank, _) in module_ranks(trained.unet).items()}
    assert module_ranks(fresh.text_encoder) == module_ranks(trained.text_encoder)
    assert_same_outputs(outputs(trained), outputs(fresh))


def test_text_encoder_part_changes_prompt_embeddings(tmp_path):
    trained = trained_pipeline()
    path = save_adapter(tmp_path / "style.safetensors", trained.unet, trained.text_encoder, metadata={})
    fresh = tiny_pipeline()
    before, _ = fresh.encode_prompt(PROMPTS[0], "cpu", 1, False)
    fresh.load_lora_weights(str(path))
    after, _ = fresh.encode_prompt(PROMPTS[0], "cpu", 1, False)
    assert (after - before).abs().max() > 1e-2


def test_kohya_file_holds_real_alpha_and_kohya_names(tmp_path):
    trained = trained_pipeline("locon", **LOCON)
    path = save_adapter(tmp_path / "style.safetensors", trained.unet, trained.text_encoder, metadata={})
    state, _ = load_adapter_state(path)
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    te_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert state[f"{to_q}.alpha"].dim() == 0 and state[f"{to_q}.alpha"].item() == 2.0
    assert state[f"{to_q}.lora_down.weight"].shape == (4, 32)
    assert state[f"{conv}.alpha"].item() == 1.0
    assert state[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert state[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert state[f"{te_q}.alpha"].item() == 2.0
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in state)


def test_diffusers_format_loads_in_diffusers_and_ours(tmp_path):
    trained = trained_pipeline("locon", **LOCON)
    expected = outputs(trained)
    path = save_adapter(tmp_path / "style.safetensors", trained.unet, trained.text_encoder, metadata={},
                        fmt="diffusers")
    state, _ = load_adapter_state(path)  # converted to kohya names on read
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in state

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)

    in_diffusers = tiny_pipeline()
    with library_warnings() as warnings_logged:
        in_diffusers.load_lora_weights(str(path), adapter_name="style")
    assert [r.getMessage() for r in warnings_logged] == []
    assert module_ranks(in_diffusers.unet, "style") == module_ranks(trained.unet)
    assert_same_outputs(expected, outputs(in_diffusers))

    in_ours = tiny_pipeline()
    load_adapter_into(path, in_ours.unet, in_ours.text_encoder)
    assert_same_outputs(expected, outputs(in_ours))


def test_unet_only_adapter_leaves_text_encoder_frozen(tmp_path):
    pipe = tiny_pipeline()
    params = add_lora(pipe.unet, pipe.text_encoder, rank=2, alpha=2, train_text_encoder=False)
    assert params.text_encoder == []
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    path = save_adapter(tmp_path / "unet_only.safetensors", pipe.unet, pipe.text_encoder, metadata={})
    state, _ = load_adapter_state(path)
    assert state and not any(key.startswith("lora_te_") for key in state)


def test_adapter_params_are_fp32_and_base_frozen():
    pipe = tiny_pipeline()
    pipe.unet.to(torch.float16)
    pipe.text_encoder.to(torch.bfloat16)
    params = add_lora(pipe.unet, pipe.text_encoder, rank=4, alpha=4)
    assert params.unet and params.text_encoder
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.unet + params.text_encoder)
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert len(trainable) == len(params.unet) == len(lora_parameters(pipe.unet))
    assert len([p for p in pipe.text_encoder.parameters() if p.requires_grad]) == len(params.text_encoder)


def test_presets_nest_attn_in_kohya_in_locon():
    unet = tiny_pipeline().unet
    attn, kohya, locon = (set(unet_lora_targets(unet, p).all) for p in ("attn", "kohya", "locon"))
    assert attn < kohya < locon
    # kohya adds ff.net.0.proj, ff.net.2, proj_in, proj_out around each transformer block's attention.
    assert {p.rsplit(".", 1)[-1] for p in kohya - attn} == {"proj", "2", "proj_in", "proj_out"}
    assert "down_blocks.0.resnets.0.conv1" in locon
    with pytest.raises(ValueError, match="conv_rank"):
        add_lora(unet, None, rank=4, alpha=4, conv_rank=2)


def test_metadata_keys_alpha_and_hash(tmp_path):
    trained = trained_pipeline()
    metadata = kohya_metadata(
        rank=4, alpha=2.0, output_name="toy-stripes", tag_frequency={"10_stripes": {"stripes": 30, "circle": 12}},
        dataset_dirs={"10_stripes": {"n_repeats": 10, "img_count": 30}}, num_train_images=300, steps=500,
        learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, resolution=64, training_started_at=1700000000.5,
        title="Toy stripes", trigger_phrase="stripes style",
    )
    path = save_adapter(tmp_path / "toy-stripes.safetensors", trained.unet, trained.text_encoder, metadata=metadata)
    state, stored = load_adapter_state(path)
    required = ["ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_base_model_version",
                "ss_output_name", "ss_tag_frequency", "ss_dataset_dirs", "ss_num_train_images", "ss_steps",
                "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_resolution", "ss_training_started_at",
                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
                "modelspec.trigger_phrase", "modelspec.resolution", "modelspec.date", "sshs_model_hash",
                "sshs_legacy_hash"]
    assert [key for key in required if key not in stored] == []
    assert stored["ss_network_dim"] == "4" and stored["ss_network_alpha"] == "2.0"
    assert stored["ss_network_module"] == "networks.lora" and stored["ss_base_model_version"] == "sd_v1"
    assert stored["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert stored["modelspec.sai_model_spec"] == "1.0.0" and stored["modelspec.resolution"] == "64x64"
    assert json.loads(stored["ss_tag_frequency"])["10_stripes"]["stripes"] == 30
    assert {t.item() for k, t in state.items() if k.endswith(".alpha")} == {2.0}

    # Independent recomputation: sha256 of everything after the 8-byte length + JSON header.
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    assert stored["sshs_model_hash"] == hashlib.sha256(raw[8 + header_size:]).hexdigest() == file_model_hash(path)
    assert (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == safetensors_hashes(state, stored)


def test_pickle_and_foreign_files_are_refused(tmp_path):
    ckpt = tmp_path / "old_lora.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        load_adapter_state(ckpt)
    pipe = trained_pipeline()
    with pytest.raises(ValueError, match=".safetensors"):
        save_adapter(tmp_path / "out.ckpt", pipe.unet, pipe.text_encoder, metadata={})
    with pytest.raises(TypeError, match="must be str"):
        save_adapter(tmp_path / "out.safetensors", pipe.unet, pipe.text_encoder, metadata={"ss_steps": 5})

    names = formats.kohya_names(tiny_pipeline().unet, formats.UNET_PREFIX)
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(1)}
    with pytest.raises(ValueError, match="LoHa"):
        formats.kohya_to_peft(loha, names)
    unknown = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(1, 1),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(1, 1)}
    with pytest.raises(ValueError, match="1 unknown"):
        formats.kohya_to_peft(unknown, names)
    with pytest.raises(ValueError, match="SDXL"):
        formats.split_kohya_state({"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)})


class DiskFullFile(io.FileIO):
    """A file that takes half of what is written to it, then fails like a full disk."""

    def write(self, data):
        super().write(bytes(data)[: len(data) // 2])
        raise OSError("disk full")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import stylelora.atomic

    pipe = trained_pipeline()
    path = save_adapter(tmp_path / "style.safetensors", pipe.unet, pipe.text_encoder, metadata={})
    old_bytes = path.read_bytes()

    monkeypatch.setattr(stylelora.atomic, "open", DiskFullFile, raising=False)  # the atomic writer's own open()
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, pipe.unet, pipe.text_encoder, metadata={})
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask-022", "umask-027"])
def test_adapter_file_gets_the_umask_permissions(tmp_path, umask, mode):
    pipe = trained_pipeline()
    previous = os.umask(umask)
    try:
        path = save_adapter(tmp_path / "style.safetensors", pipe.unet, pipe.text_encoder, metadata={})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_half_precision_file_keeps_fp32_alpha(tmp_path):
    trained = trained_pipeline()
    path = save_adapter(tmp_path / "half.safetensors", trained.unet, trained.text_encoder, metadata={},
                        dtype=torch.float16)
    state, _ = load_adapter_state(path)
    assert {t.dtype for k, t in state.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in state.items() if k.endswith(".alpha")} == {torch.float32}
    fresh = tiny_pipeline()
    load_adapter_into(path, fresh.unet, fresh.text_encoder)
    assert (outputs(fresh)["unet"] - outputs(trained)["unet"]).abs().max() < 1e-2


@pytest.mark.parametrize("overrides, batches, step, epochs, done", [
    ({"train.steps": 322, "optim.grad_accum": 4}, 429, 322, "3", "3"),  # 108 steps an epoch; the last one short
    ({"train.steps": 322, "optim.grad_accum": 4}, 429, 108, "3", "1"),  # a checkpoint after the first epoch
    ({"train.steps": 6, "train.epochs": 2, "optim.grad_accum": 3}, 8, 6, "2", "2"),  # 18 batches of 16: not 3 of 2
    ({"train.steps": 1000}, 188, 1000, "6", "5"),  # 5.3 epochs: kohya counts the sixth, and 5 done
])
def test_epoch_metadata_counts_as_sd_scripts_does(overrides, batches, step, epochs, done):
    """ss_num_epochs: the epochs the run takes (what model sites show); ss_epoch: those completed at this file."""
    import time

    from stylelora.config import load_config, with_values
    from stylelora.presets import apply_preset
    from stylelora.train.metadata import RunFacts, adapter_metadata

    config = with_values(apply_preset(load_config(None, {"data.dir": "d", **overrides}), "toy", cuda=False),
                         {"data.resolution": 32})
    facts = RunFacts(items=(), num_train_images=10, num_reg_images=0, trigger="x", prediction_type="epsilon",
                     started_at=time.time(), world_size=1, batches_per_epoch=batches)
    metadata = adapter_metadata(config, facts, step)
    assert (metadata["ss_num_epochs"], metadata["ss_epoch"]) == (epochs, done)
