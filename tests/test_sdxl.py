"""SDXL end to end on a tiny random SDXL-architecture pipeline: conditioning as SDXL was trained, the file as
sd-scripts writes it (loaded by diffusers with no warning, same image as ours), the other family refused in one
sentence, and the CLI from training to generate / blend / inspect."""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import warnings
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from sdxl_fixtures import SDXL_NATIVE_SIZE, save_tiny_sdxl_base, tiny_sdxl_pipeline
from stylelora.lora.inject import add_lora, module_ranks
from stylelora.lora.io import load_adapter_into, save_adapter
from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate, write_kohya_dataset

SDXL_METADATA = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_base_model_version": "sdxl_base_v1-0"}
SGM_UNET_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    return save_tiny_sdxl_base(tmp_path_factory.mktemp("sdxl") / "base")


def random_lora_pipeline(preset: str = "kohya"):
    """The tiny SDXL pipeline with a random, non-zero LoRA on the UNet and both text encoders."""
    pipe = tiny_sdxl_pipeline()
    torch.manual_seed(5)
    add_lora(pipe.unet, pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, rank=2, alpha=1.0,
             unet_targets=preset, init_lora_weights=False)
    return pipe


@pytest.fixture(scope="module")
def lora_pipe():
    return random_lora_pipeline()


@contextlib.contextmanager
def every_warning():
    """WARNING+ log records of diffusers / transformers / peft and every Python warning, as messages."""
    messages: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    # Garbage from earlier tests (a Gradio client's event loop) can be finalized inside the window and warn
    # ResourceWarning there: collect it first, and leave that category out, as it never comes from loading a file.
    gc.collect()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught if not issubclass(w.category, ResourceWarning))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def image(pipe, prompt: str = "a red circle") -> numpy.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_training_conditions_the_unet_as_the_sdxl_pipeline_does(tmp_path, sdxl_base):
    from diffusers import StableDiffusionXLPipeline

    from stylelora.data.latent_cache import TextEmbeddingCache
    from stylelora.models.family import detect_family
    from stylelora.models.load import load_base
    from stylelora.train.models import SdxlText, TrainModels, text_encode_fn

    pipe = load_base(str(sdxl_base), device="cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline) and detect_family(str(sdxl_base)) == "sdxl"
    models = TrainModels(unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, vae=None,
                         device=torch.device("cpu"), dtype=torch.float32, sdxl=True,
                         text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    captions = ["zorb, a red circle", ""]  # "" is what caption dropout trains: both encoders get the empty caption
    with torch.no_grad():
        text = models.encode_captions(captions)
        hidden, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert isinstance(text, SdxlText)
    torch.testing.assert_close(text.hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(text.pooled, pooled, rtol=0, atol=1e-6)
    # A frozen pair of encoders is cached like kohya's: (hidden, pooled) per caption, the same values from disk.
    cache = TextEmbeddingCache(text_encode_fn(pipe.text_encoder, pipe.tokenizer, torch.device("cpu"),
                                              pipe.text_encoder_2, pipe.tokenizer_2), "tiny-sdxl@1", tmp_path)
    cache.get_or_encode(captions)
    models.text_cache = TextEmbeddingCache(cache.encode_fn, "tiny-sdxl@1", tmp_path)
    cached = models.encode_captions(list(reversed(captions)))
    assert models.text_cache.stats.encode_calls == 0
    torch.testing.assert_close(cached.hidden, hidden.flip(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.pooled, pooled.flip(0), rtol=0, atol=1e-6)
    # add_time_ids: each image's original size, its crop offset and its bucket, in diffusers' order.
    batch = {"original_size": [(40, 30), (16, 16)], "crops_coords_top_left": [(2, 0), (0, 0)],
             "target_size": [(16, 16), (16, 16)]}
    expected = [pipe._get_add_time_ids(o, c, t, torch.float32, text_encoder_projection_dim=pooled.shape[-1])[0]
                for o, c, t in zip(*batch.values())]
    assert torch.equal(models.time_ids(batch), torch.stack(expected))


def test_an_fp16_sdxl_vae_encodes_in_fp32():
    from stylelora.train.models import encode_pixels

    vae = tiny_sdxl_pipeline().vae.to(torch.float16)
    pixels = torch.rand(1, 3, SDXL_NATIVE_SIZE, SDXL_NATIVE_SIZE) * 2 - 1
    expected = encode_pixels(copy.deepcopy(vae).float(), pixels)  # the same fp16 weights, run in fp32
    assert torch.equal(encode_pixels(vae, pixels, upcast=True), expected) and vae.dtype == torch.float16


@pytest.mark.parametrize("fmt, preset", [("kohya", "kohya"), ("diffusers", "kohya"), ("kohya", "locon")])
def test_sdxl_file_loads_in_diffusers_with_no_warning_and_gives_our_image(tmp_path, sdxl_base, lora_pipe, fmt,
                                                                          preset):
    from diffusers import StableDiffusionXLPipeline

    from stylelora.generate.stack import AdapterStack

    if preset != "kohya":  # LoCon: the resnets' and samplers' convs too, under their SAI names
        lora_pipe = random_lora_pipeline(preset)
    path = save_adapter(tmp_path / f"{fmt}.safetensors", lora_pipe.unet, lora_pipe.text_encoder,
                        text_encoder_2=lora_pipe.text_encoder_2, metadata=SDXL_METADATA, fmt=fmt)
    keys = {key.split(".")[0] for key in adapter_tensors(path)}
    if fmt == "kohya":  # as sd-scripts writes SDXL: SAI/SGM UNet names, lora_te1_ and lora_te2_, never lora_te_
        unet = [key for key in keys if key.startswith("lora_unet_")]
        assert unet and all(key.startswith(SGM_UNET_PREFIXES) for key in unet)
        assert {key.split("_text_model")[0] for key in keys if not key.startswith("lora_unet_")} == \
            {"lora_te1", "lora_te2"}
    else:
        assert {key.split(".")[0] for key in adapter_tensors(path)} == {"unet", "text_encoder", "text_encoder_2"}

    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    with every_warning() as messages:
        theirs.load_lora_weights(str(path), adapter_name="file")
    assert messages == []
    counts = [len(module_ranks(model, "file")) for model in (theirs.unet, theirs.text_encoder, theirs.text_encoder_2)]
    assert counts == [len(module_ranks(m)) for m in (lora_pipe.unet, lora_pipe.text_encoder, lora_pipe.text_encoder_2)]

    ours = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    load_adapter_into(path, ours.unet, ours.text_encoder, text_encoder_2=ours.text_encoder_2)
    reference = image(theirs)
    assert numpy.array_equal(image(ours), reference)
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    plain = image(base)
    AdapterStack.for_pipe(base).apply([str(path)])  # fused into the weights: the same image up to rounding
    assert numpy.abs(image(base) - reference).max() < 1e-3 < numpy.abs(plain - reference).max()


def test_third_party_sdxl_layouts_fuse_to_the_same_image(tmp_path, sdxl_base, lora_pipe):
    """diffusers' own save_lora_weights output, and a kohya file with diffusers-path UNet names (as some converters
    write them), apply as our SAI-named file does."""
    from diffusers import StableDiffusionXLPipeline
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from stylelora.generate.stack import AdapterStack
    from stylelora.lora import formats
    from stylelora.lora.components import component_names, pipeline_models

    ours = save_adapter(tmp_path / "ours.safetensors", lora_pipe.unet, lora_pipe.text_encoder,
                        text_encoder_2=lora_pipe.text_encoder_2, metadata=SDXL_METADATA)
    models = {"unet": lora_pipe.unet, "text_encoder": lora_pipe.text_encoder, "text_encoder_2": lora_pipe.text_encoder_2}
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "diffusers", weight_name="theirs.safetensors",
        **{f"{name}_lora_layers": get_peft_model_state_dict(model) for name, model in models.items()},
        **{f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict() for name, model in models.items()})
    diffusers_names = formats.kohya_names(lora_pipe.unet, "lora_unet").by_path
    paths = component_names(pipeline_models(lora_pipe), "unet").by_name
    renamed = {}
    for key, tensor in adapter_tensors(ours).items():
        module, _, suffix = key.partition(".")
        module = diffusers_names[paths[module]] if module.startswith("lora_unet_") else module
        renamed[f"{module}.{suffix}"] = tensor
    assert any(key.startswith("lora_unet_down_blocks_") for key in renamed)
    save_file(renamed, str(tmp_path / "converted.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    stack = AdapterStack.for_pipe(pipe)
    images = []
    for path in (ours, tmp_path / "diffusers" / "theirs.safetensors", tmp_path / "converted.safetensors"):
        stack.apply([str(path)])
        images.append(image(pipe))
    assert numpy.abs(images[1] - images[0]).max() < 1e-5 and numpy.abs(images[2] - images[0]).max() < 1e-5


def test_a_lora_of_the_other_family_is_refused_in_one_sentence(tmp_path, sdxl_base, lora_pipe):
    from diffusers import StableDiffusionXLPipeline

    from gen_fixtures import make_adapter, tiny_pipeline
    from stylelora.generate.stack import AdapterStack, AdapterStackError
    from stylelora.lora.components import AdapterFamilyError

    sd1_file = make_adapter(tmp_path / "sd1.safetensors", 1)
    sdxl_file = save_adapter(tmp_path / "sdxl.safetensors", lora_pipe.unet, lora_pipe.text_encoder,
                             text_encoder_2=lora_pipe.text_encoder_2, metadata=SDXL_METADATA)
    sdxl = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    sd1 = tiny_pipeline()
    refusals = []
    for pipe, file in ((sdxl, sd1_file), (sd1, sdxl_file)):
        with pytest.raises(AdapterStackError) as stacked:
            AdapterStack.for_pipe(pipe).load(file)
        with pytest.raises(AdapterFamilyError) as loaded:
            load_adapter_into(file, pipe.unet, pipe.text_encoder, text_encoder_2=getattr(pipe, "text_encoder_2", None))
        refusals += [str(stacked.value), str(loaded.value)]
    assert refusals[1] == (f"sd1.safetensors is an SD 1.x/2.x-architecture LoRA and cannot be used with this SDXL "
                           "base model: use a LoRA trained for SDXL, or an SD 1.x/2.x-architecture base.")
    assert refusals[3].startswith("sdxl.safetensors is an SDXL LoRA and cannot be used with this SD 1.x/2.x")
    assert all(text.count(". ") <= 1 and "\n" not in text and len(text) < 250 for text in refusals)
    assert not getattr(sdxl.unet, "peft_config", None) and not getattr(sd1.unet, "peft_config", None)
    # The same data trained on both bases gives two files of one name: a blend of them is refused, not written.
    from stylelora.lora.blend import blend

    (tmp_path / "xl").mkdir()
    same_name = sdxl_file.rename(tmp_path / "xl" / "sd1.safetensors")
    with pytest.raises(ValueError, match="made for different base models and cannot be blended"):
        blend([f"{sd1_file}:1", f"{same_name}:1"], tmp_path / "mixed.safetensors")
    assert not (tmp_path / "mixed.safetensors").exists()


def test_cli_trains_sdxl_then_generates_blends_and_inspects(tmp_path, sdxl_base, capsys):
    from stylelora.cli import main
    from stylelora.generate.pngmeta import parse_parameters, read_png_parameters

    data = write_kohya_dataset(tmp_path / "data", count=4, size=24)
    run = tmp_path / "run"
    try:
        assert main(["train", str(data), "--base", str(sdxl_base), "--resolution", str(SDXL_NATIVE_SIZE),
                     "--steps", "2", "--batch-size", "2", "--output", str(run), "--output-name", "style",
                     "--sample-steps", "2", "--rank", "4", "--text-encoder-lr", "1e-4"]) == 0
    finally:
        reset_accelerate()
    adapter = run / "style.safetensors"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(adapter)
    keys = {key.split(".")[0] for key in adapter_tensors(adapter)}
    assert all(key.startswith(SGM_UNET_PREFIXES + ("lora_te1_", "lora_te2_")) for key in keys)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    metadata = adapter_metadata(adapter)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert (metadata["ss_base_model_version"], metadata["ss_stylelora_base_family"]) == ("sdxl_base_v1-0", "sdxl")
    assert json.loads(metadata["ss_training_args"])["optim"]["text_encoder_2_lr"] == 1e-4  # --text-encoder-lr: both

    png = tmp_path / "out.png"
    generate = ["generate", "stripestyle, a red circle", "--base", str(sdxl_base), "--device", "cpu", "--steps", "2",
                "--seed", "3", "--adapters-dir", str(run)]
    assert main([*generate, "--lora", f"{adapter}:0.8", "--out", str(png)]) == 0
    params = parse_parameters(read_png_parameters(png))
    assert (params.width, params.height, params.model) == (SDXL_NATIVE_SIZE, SDXL_NATIVE_SIZE, "base")
    assert [(lora.name, lora.unet_weight) for lora in params.loras] == [("style", 0.8)] and params.loras[0].hash

    exact, ranked = run / "exact.safetensors", run / "rank2.safetensors"
    assert main(["blend", f"{adapter}:0.5", f"{adapter}:0.3", "--exact", "--out", str(exact)]) == 0
    assert main(["blend", f"{adapter}:0.5", "--rank", "2", "--out", str(ranked)]) == 0
    assert main([*generate, "--lora", str(exact), "--out", str(tmp_path / "blend.png")]) == 0
    blended, live = (numpy.asarray(Image.open(file), dtype=float) for file in (tmp_path / "blend.png", png))
    assert numpy.abs(blended - live).max() <= 2  # the exact blend of 0.5 + 0.3 is the adapter at 0.8
    grid = tmp_path / "grid.png"
    assert main(["grid", "stripestyle, a red circle", "--base", str(sdxl_base), "--device", "cpu", "--steps", "2",
                 "--lora", str(adapter), "--x", "weight=0,1", "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] >= 2 * SDXL_NATIVE_SIZE
    capsys.readouterr()
    assert main(["inspect", str(ranked), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "stable-diffusion-xl-v1-base" and info["rank"] == 2
    assert info["modules"]["text_encoder_1"] > 0 and info["modules"]["text_encoder_2"] > 0

    # Frozen text encoders: both are encoded once per caption into the cache, and the file is UNet-only.
    try:
        assert main(["train", str(data), "--base", str(sdxl_base), "--resolution", str(SDXL_NATIVE_SIZE),
                     "--steps", "1", "--batch-size", "2", "--output", str(tmp_path / "frozen"), "--no-samples",
                     "--no-text-encoder", "--cache", "disk"]) == 0
    finally:
        reset_accelerate()
    assert len(list((tmp_path / "frozen" / "cache" / "text").glob("*/*.safetensors"))) >= 2
    frozen = next((tmp_path / "frozen").glob("*.safetensors"))
    assert {key.split("_")[1] for key in adapter_tensors(frozen)} == {"unet"}


def test_second_text_encoder_lr_follows_the_first_unless_given():
    from stylelora.config import ConfigError, load_config
    from stylelora.presets import apply_preset

    def resolved(**overrides):
        config = load_config(None, {"data.dir": "data", **overrides})
        return apply_preset(config, "sdxl", cuda=False).optim

    assert (resolved().text_encoder_lr, resolved().text_encoder_2_lr) == (1e-5, 1e-5)
    both = resolved(**{"optim.text_encoder_lr": 3e-5})
    assert (both.text_encoder_lr, both.text_encoder_2_lr) == (3e-5, 3e-5)
    apart = resolved(**{"optim.text_encoder_lr": 3e-5, "optim.text_encoder_2_lr": 2e-6})
    assert (apart.text_encoder_lr, apart.text_encoder_2_lr) == (3e-5, 2e-6)
    with pytest.raises(ConfigError, match="text_encoder_2_lr is set but network.train_text_encoder is false"):
        load_config(None, {"data.dir": "data", "optim.text_encoder_2_lr": 1e-5, "network.train_text_encoder": False})


def test_sdxl_single_file_configs_and_a_wrong_family_flag_are_refused_up_front(tmp_path, sdxl_base, tiny_sd_base):
    from stylelora.config import ConfigError, load_config
    from stylelora.models.load import BaseModelError, _check_config_folder
    from stylelora.train.loop import check_family

    assert _check_config_folder(sdxl_base, "xl_base") == sdxl_base
    with pytest.raises(BaseModelError, match="text_encoder_2/config.json"):
        _check_config_folder(tiny_sd_base, "xl_base")
    with pytest.raises(BaseModelError, match="describes a StableDiffusionXLPipeline, but the file is an SD 1.x/2.x"):
        _check_config_folder(sdxl_base, "v1")
    config = load_config(None, {"data.dir": "data", "train.base": str(sdxl_base), "train.family": "sd1"})
    with pytest.raises(ConfigError, match="train.family is 'sd1' .* is an SDXL model; .* or pass an SD 1.x base"):
        check_family(config, tiny_sdxl_pipeline())
