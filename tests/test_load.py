"""Tests for stylelora.models.load: every kind of base spec, on a tiny random SD pipeline built here, offline."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from stylelora.models import load
from stylelora.models.load import BaseModelError, load_base
from stylelora.toy.tokenizer import train_clip_tokenizer

CAPTIONS = [
    "a red circle on a white background",
    "a blue square and a green triangle on a black background",
    "a yellow star on a gray background",
    "stripestyle, a purple circle on a beige background",
]
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def tiny_pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random StableDiffusionPipeline (real SD architecture, 16 px images) saved as a diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_sd")
    train_clip_tokenizer(CAPTIONS, root / "tokenizer_src", vocab_size=600)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer_src")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def folder_pipe(tiny_pipe_dir: Path):
    return load_base(str(tiny_pipe_dir))


@pytest.fixture(scope="module")
def single_file(tiny_pipe_dir: Path, folder_pipe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline as one .safetensors file in the original (CompVis/A1111) SD key layout."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in original_sd_layout(folder_pipe).items()}, str(path))
    return path


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Hugging Face cache at an empty folder and go offline, so no test sees the machine's real cache."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def add_to_hf_cache(cache: Path, repo_id: str, source: Path, configs_only: bool = False) -> None:
    """Lay `source` out as the cached main revision of `repo_id`, the way huggingface_hub stores downloads."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    ignore = shutil.ignore_patterns("*.safetensors", "*.bin") if configs_only else None
    shutil.copytree(source, repo / "snapshots" / revision, ignore=ignore)


def generate(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="pt").images
    return images


def assert_same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        state_a, state_b = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert state_a.keys() == state_b.keys(), name
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name}.{key}"


def test_module_import_does_not_import_torch() -> None:
    code = "import sys, stylelora.models.load; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_diffusers_folder_loads_and_generates(folder_pipe) -> None:
    assert folder_pipe.safety_checker is None
    assert folder_pipe.unet.dtype == torch.float32 and folder_pipe.device.type == "cpu"
    images = generate(folder_pipe)
    assert images.shape == (1, 3, 16, 16)
    assert torch.isfinite(images).all()


def test_bf16_precision(tiny_pipe_dir: Path) -> None:
    pipe = load_base(str(tiny_pipe_dir), precision="bf16", device="cpu")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_single_safetensors_file_with_config_dir(single_file: Path, tiny_pipe_dir: Path, folder_pipe) -> None:
    pipe = load_base(str(single_file), config_dir=str(tiny_pipe_dir))
    from stylelora.generate.base_identity import base_identity, source_hash

    # A1111's `Model` and `Model hash` in PNG parameters: the file's name and the first 10 hex digits of its sha256.
    assert base_identity(pipe).name == single_file.stem
    assert base_identity(pipe).hash == source_hash(single_file) and len(base_identity(pipe).hash) == 10
    assert_same_weights(pipe, folder_pipe)
    assert torch.equal(generate(pipe), generate(folder_pipe))


def test_a_base_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """Hashing an SDXL checkpoint reads 7 GB: a later command takes the hash from the cache file (as A1111's
    cache.json does), and a changed file is hashed again."""
    import hashlib

    from stylelora.generate import base_identity as identity

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights v1")
    reads = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    first = identity.source_hash(model)
    assert first == hashlib.sha256(b"weights v1").hexdigest()[:10] and reads.count("model.safetensors") == 1
    assert identity.source_hash(model) == first and reads.count("model.safetensors") == 1  # from the cache
    model.write_bytes(b"weights v2, longer")
    assert identity.source_hash(model) == hashlib.sha256(b"weights v2, longer").hexdigest()[:10]
    assert identity.hash_cache_path().is_relative_to(tmp_path / "cache")


class _Recorder(logging.Handler):
    """What diffusers' own stderr handler would print: records that passed every filter on the way up."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_log():
    recorder = _Recorder()
    logger = logging.getLogger("diffusers")  # diffusers prints from here (it does not propagate to the root)
    logger.addHandler(recorder)
    yield recorder.messages
    logger.removeHandler(recorder)


def test_single_file_base_loads_without_the_empty_float32_notice(single_file: Path, tiny_pipe_dir: Path,
                                                                  diffusers_log) -> None:
    # diffusers warns on every cast to a dtype, naming the modules to keep in float32; for SD models the list is
    # empty, and the user saw "should be kept in float32: []" twice on every single-file load.
    load_base(str(single_file), config_dir=str(tiny_pipe_dir))
    assert not [m for m in diffusers_log if "kept in float32" in m], diffusers_log


def test_a_float32_notice_that_names_modules_still_shows(diffusers_log) -> None:
    from diffusers import ModelMixin

    class Keeps(ModelMixin):
        _keep_in_fp32_modules = ["norm"]

        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(2)

    Keeps().to(torch.float64)
    assert any("should be kept in float32: ['norm']" in m for m in diffusers_log), diffusers_log


def test_single_file_config_found_in_local_hf_cache(single_file: Path, tiny_pipe_dir: Path, folder_pipe,
                                                    empty_hf_cache: Path) -> None:
    # Only configs, no weights: what `hf download <repo> --include "*.json" --include "*.txt"` caches.
    add_to_hf_cache(empty_hf_cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_pipe_dir, configs_only=True)
    pipe = load_base(str(single_file))
    assert_same_weights(pipe, folder_pipe)


def test_single_file_without_config_offline_says_what_to_pass(single_file: Path, empty_hf_cache: Path) -> None:
    with pytest.raises(BaseModelError, match="config_dir") as error:
        load_base(str(single_file))
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(error.value)


def test_incomplete_config_dir_is_refused(single_file: Path, tmp_path: Path, tiny_pipe_dir: Path) -> None:
    shutil.copytree(tiny_pipe_dir, tmp_path / "cfg", ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(BaseModelError, match="unet/config.json"):
        load_base(str(single_file), config_dir=str(tmp_path / "cfg"))


def test_hub_id_loads_from_local_cache(tiny_pipe_dir: Path, folder_pipe, empty_hf_cache: Path) -> None:
    add_to_hf_cache(empty_hf_cache, "someone/tiny-sd", tiny_pipe_dir)
    assert_same_weights(load_base("someone/tiny-sd"), folder_pipe)


def test_uncached_hub_id_error_says_how_to_get_it(empty_hf_cache: Path) -> None:
    with pytest.raises(BaseModelError) as error:
        load_base("someone/not-cached-model")
    message = str(error.value)
    assert "not in the local Hugging Face cache" in message
    assert "download someone/not-cached-model" in message


def test_missing_path_error_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(BaseModelError, match="does not exist") as error:
        load_base(str(missing))
    assert str(missing) in str(error.value)


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_base(str(tmp_path))


def test_toy_base_not_built_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load, "TOY_BASE_DIR", tmp_path / "toy" / "base")
    with pytest.raises(BaseModelError, match="stylelora toy build-base"):
        load_base("toy")


def test_lora_file_passed_as_base_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path))
    with pytest.raises(BaseModelError, match="LoRA adapter"):
        load_base(str(path))


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(BaseModelError, match="not a readable .safetensors"):
        load_base(str(path))


def test_config_dir_with_a_folder_base_is_refused(tiny_pipe_dir: Path) -> None:
    with pytest.raises(BaseModelError, match="only applies to single-file"):
        load_base(str(tiny_pipe_dir), config_dir=str(tiny_pipe_dir))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_refused_without_flag(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(BaseModelError, match="allow_pickle=True") as error:
        load_base(str(path))
    assert "--allow-pickle" in str(error.value)


def test_pickle_loads_with_flag(tmp_path: Path, folder_pipe, tiny_pipe_dir: Path) -> None:
    path = tmp_path / "tiny-sd.ckpt"
    torch.save({"state_dict": original_sd_layout(folder_pipe), "global_step": 1}, path)
    pipe = load_base(str(path), allow_pickle=True, config_dir=str(tiny_pipe_dir))
    assert_same_weights(pipe, folder_pipe)


@dataclass
class NotATensor:
    note: str


def test_pickle_with_python_objects_refused_even_with_flag(tmp_path: Path, tiny_pipe_dir: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor("runs code when unpickled")}, path)
    with pytest.raises(BaseModelError, match="Python objects"):
        load_base(str(path), allow_pickle=True, config_dir=str(tiny_pipe_dir))


def test_bad_precision_and_fp16_on_cpu_are_refused(tiny_pipe_dir: Path) -> None:
    with pytest.raises(BaseModelError, match="fp32, fp16, bf16"):
        load_base(str(tiny_pipe_dir), precision="fp8")
    with pytest.raises(BaseModelError, match="bf16"):
        load_base(str(tiny_pipe_dir), precision="fp16", device="cpu")


# --- diffusers -> original SD layout, the inverse of what from_single_file converts (diffusers ships no
# --- writer for it). Only for building test fixtures; the prefix tables are derived from the tiny configs.

UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_sd_layout(pipe) -> dict[str, torch.Tensor]:
    text_encoder = {
        "cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): value
        for key, value in pipe.text_encoder.state_dict().items()
    }
    unet = {"model.diffusion_model." + k: v for k, v in _renamed(pipe.unet.state_dict(), _unet_prefixes(pipe.unet))}
    vae = {}
    for key, value in _renamed(pipe.vae.state_dict(), _vae_prefixes(pipe.vae)):
        if ".mid.attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        vae["first_stage_model." + key] = value
    return {**text_encoder, **unet, **vae}


def _renamed(state: dict, prefixes: dict[str, tuple[str, dict]]):
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), "")
        new_prefix, inner_names = prefixes.get(prefix, ("", {}))
        rest = key[len(prefix):]
        for old, new in inner_names.items():
            if rest.startswith(old + ".") or f".{old}." in rest:
                rest = rest.replace(old + ".", new + ".", 1)
        yield new_prefix + rest, value


def _unet_prefixes(unet) -> dict[str, tuple[str, dict]]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    per_block = unet.config.layers_per_block
    prefixes = {k: (v, {}) for k, v in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    for i, up_type in enumerate(unet.config.up_block_types):
        for j in range(per_block):
            block = 1 + i * (per_block + 1) + j
            prefixes[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{block}.0.", UNET_RESNET_NAMES)
            prefixes[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{block}.1.", {})
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * (per_block + 1)}.0.op.", {})
        for j in range(per_block + 1):
            block = i * (per_block + 1) + j
            prefixes[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{block}.0.", UNET_RESNET_NAMES)
            prefixes[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{block}.1.", {})
        upsampler_slot = 2 if "CrossAttn" in up_type else 1
        prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = (
            f"output_blocks.{i * (per_block + 1) + per_block}.{upsampler_slot}.conv.", {})
    prefixes["mid_block.resnets.0."] = ("middle_block.0.", UNET_RESNET_NAMES)
    prefixes["mid_block.attentions.0."] = ("middle_block.1.", {})
    prefixes["mid_block.resnets.1."] = ("middle_block.2.", UNET_RESNET_NAMES)
    return prefixes


def _vae_prefixes(vae) -> dict[str, tuple[str, dict]]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    blocks = len(vae.config.block_out_channels)
    shortcut = {"conv_shortcut": "nin_shortcut"}
    prefixes = {k: (v, {}) for k, v in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    for i in range(blocks):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", shortcut)
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
        prefixes[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{blocks - 1 - i}.block.", shortcut)
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{blocks - 1 - i}.upsample.conv.", {})
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", shortcut)
        prefixes[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", shortcut)
        prefixes[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION_NAMES)
    return prefixes
