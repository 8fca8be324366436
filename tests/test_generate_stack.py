"""The fused adapter stack: every file layout loads with the right deltas, bad files are refused whole, weights
restore bit for bit, weight changes do not re-read files, and concurrent blends do not leak into each other."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
import pytest
import torch
from gen_fixtures import (
    adapter_pipeline,
    load_tiny_base,
    make_adapter,
    make_peft_adapter,
    model_outputs,
    pixels,
    tiny_pipeline,
)
from safetensors.torch import load_file, save_file

import stylelora.generate.stack as stack_module
from stylelora.generate.generate import GenerateRequest, generate
from stylelora.generate.stack import AdapterStack, apply_adapters
from stylelora.lora.spec import AdapterSpec, parse_lora_arg

SEED_A, SEED_B = 11, 22


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd_base):
    root = tmp_path_factory.mktemp("stack")
    return {
        "base": tiny_sd_base,
        "a": make_adapter(root / "a.safetensors", SEED_A, trigger="stripes"),
        "b": make_adapter(root / "b.safetensors", SEED_B, preset="locon", conv_rank=2, conv_alpha=1.0),
        "root": root,
    }


@pytest.fixture
def pipe(files):
    return load_tiny_base(files["base"])


def peft_deltas(seed: int, **adapter_args) -> dict[tuple[str, str], torch.Tensor]:
    """The oracle: peft's own delta weight of every adapted layer of the adapter `make_adapter(seed)` wrote."""
    from peft.tuners.lora import LoraLayer

    source = adapter_pipeline(seed, **adapter_args)
    deltas = {}
    for component, model in (("unet", source.unet), ("text_encoder", source.text_encoder)):
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                deltas[(component, path)] = module.get_delta_weight("default").detach()
    return deltas


def base_weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """{(component, module path): weight copy} of every module with a weight (the fusable layers among them)."""
    return {(c, n.removesuffix(".weight")): p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters() if n.endswith(".weight")}


def layer_weight(pipe, key) -> torch.Tensor:
    component, path = key
    return getattr(pipe, component).get_submodule(path).weight


# ----------------------------------------------------------------------------- layouts table


def third_party_kohya(path: Path, source: Path) -> Path:
    """What other trainers write: fp16, no .alpha keys (alpha = rank), 1x1 convs stored Linear-shaped, no metadata."""
    state = load_file(str(source))
    odd = {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            continue
        if tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
            tensor = tensor.flatten(1)
        odd[key] = tensor.half()
    save_file(odd, str(path))
    return path


LAYOUTS = {
    # name: (writer(tmp, seed) -> file, components, delta scale relative to peft's own, tolerance)
    "kohya-ours": (lambda tmp, seed: make_adapter(tmp / "ours.safetensors", seed), ("unet", "text_encoder"), 1.0, 1e-6),
    "kohya-third-party": (lambda tmp, seed: third_party_kohya(tmp / "other.safetensors", make_adapter(tmp / "src.safetensors", seed)),
                          ("unet", "text_encoder"), 4 / 2.0, 2e-3),  # no alpha: scale 1 instead of alpha/rank = 2/4
    "diffusers": (lambda tmp, seed: make_adapter(tmp / "diff.safetensors", seed, fmt="diffusers"), ("unet", "text_encoder"), 1.0, 1e-6),
    "peft-unet": (lambda tmp, seed: make_peft_adapter(tmp / "peft_unet", seed, "unet").parent, ("unet",), 1.0, 1e-6),
    "peft-text-encoder": (lambda tmp, seed: make_peft_adapter(tmp / "peft_te", seed, "text_encoder"), ("text_encoder",), 1.0, 1e-6),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_fuses_peft_deltas_at_unet_and_te_weights(tmp_path, files, pipe, layout):
    writer, components, scale, tolerance = LAYOUTS[layout]
    path = writer(tmp_path, SEED_A)
    before = base_weights(pipe)
    expected = {k: v for k, v in peft_deltas(SEED_A).items() if k[0] in components}
    stack = AdapterStack.for_pipe(pipe)
    stack.apply([AdapterSpec(path, 0.7, -0.3)])
    assert stack.fused_module_count == len(expected)
    for key, delta in expected.items():
        weight = 0.7 if key[0] == "unet" else -0.3
        want = before[key] + weight * scale * delta.reshape(before[key].shape)
        assert torch.allclose(layer_weight(pipe, key), want, atol=tolerance, rtol=0), key
    untouched = [k for k in before if k not in expected and not torch.equal(layer_weight(pipe, k), before[k])]
    assert untouched == []


def test_fused_blend_matches_diffusers_set_adapters(files, pipe):
    apply_adapters(pipe, [AdapterSpec(files["a"], 0.8), AdapterSpec(files["b"], -0.5, 0.3)], "sum")
    ours = model_outputs(pipe)
    reference = tiny_pipeline()
    reference.load_lora_weights(str(files["a"]), adapter_name="a")
    reference.load_lora_weights(str(files["b"]), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.8, {"unet": -0.5, "text_encoder": 0.3}])
    theirs = model_outputs(reference)
    assert (ours["unet"] - theirs["unet"]).abs().max() <= 1e-4
    assert (ours["te"] - theirs["te"]).abs().max() <= 1e-4


def _kohya_variant(tmp: Path, source: Path, name: str, edit) -> Path:
    state = load_file(str(source))
    path = tmp / name
    save_file(edit(state), str(path))
    return path


def _rename_first_module(state, new_name):
    old = next(iter(state)).partition(".")[0]
    return {(new_name + k[len(old):] if k.startswith(old + ".") else k): v for k, v in state.items()}


REFUSALS = {
    "pickle-ckpt": (lambda tmp, src: _write_bytes(tmp / "old.ckpt"), "pickle"),
    "pickle-bin": (lambda tmp, src: _write_bytes(tmp / "pytorch_lora_weights.bin"), "pickle"),
    "missing": (lambda tmp, src: tmp / "nope.safetensors", "not found"),
    "a-name-not-a-path": (lambda tmp, src: tmp / "toy-stripes", r"not found: .*toy-stripes \(give the file's path"),
    "missing-pickle": (lambda tmp, src: tmp / "gone.ckpt", "not found"),
    "other-architecture": (lambda tmp, src: make_adapter(tmp / "wide.safetensors", 3, base_args={"cross_attention_dim": 48}),
                           r"different base architecture: \d+ of \d+ unet LoRA modules"),
    "sdxl-keys": (lambda tmp, src: _kohya_variant(tmp, src, "xl.safetensors",
                  lambda s: {**s, "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}), "SDXL"),
    "mostly-unknown-modules": (lambda tmp, src: _kohya_variant(tmp, src, "sd15.safetensors", _rename_unet_modules),
                               r"\d+ unknown"),
    "loha": (lambda tmp, src: _kohya_variant(tmp, src, "loha.safetensors",
             lambda s: {**s, "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}), "LoHa"),
    "not-a-lora": (lambda tmp, src: _kohya_variant(tmp, src, "model.safetensors", lambda s: {"model.weight": torch.zeros(2)}),
                   "not a LoRA"),
}


def _rename_unet_modules(state):
    """Every UNet module renamed to a layer this base lacks: the file clearly targets another base."""
    def renamed(key):
        name, _, suffix = key.partition(".")
        return f"{name}_of_another_base.{suffix}" if name.startswith("lora_unet_") else key

    return {renamed(k): v for k, v in state.items()}


def test_a_few_modules_the_base_lacks_are_skipped_with_a_warning_and_the_rest_applied(files, pipe, tmp_path):
    """As A1111 and ComfyUI do: one extra module does not throw the whole file away."""
    extra = _kohya_variant(tmp_path, files["a"], "extra.safetensors",
                           lambda s: _rename_first_module(s, "lora_unet_up_blocks_3_attentions_2_proj_in"))
    with pytest.warns(UserWarning, match=r"1 of \d+ unet LoRA modules have no layer in this base and are skipped "
                                         r"\(e.g. lora_unet_up_blocks_3_attentions_2_proj_in\)"):
        loaded = AdapterStack.for_pipe(pipe).load(extra)
    full = AdapterStack.for_pipe(load_tiny_base(files["base"])).load(files["a"])
    assert len(loaded.modules) == len(full.modules) - 1


def _write_bytes(path: Path) -> Path:
    path.write_bytes(b"\x80\x04not really a pickle")
    return path


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_files_are_refused_whole_and_the_previous_blend_stays(tmp_path, files, pipe, case):
    writer, message = REFUSALS[case]
    bad = writer(tmp_path, files["a"])
    stack = AdapterStack.for_pipe(pipe)
    stack.apply([AdapterSpec(files["a"], 0.5)])
    fused = base_weights(pipe)
    with pytest.raises(ValueError, match=message):
        stack.apply([AdapterSpec(files["b"], 1.0), AdapterSpec(bad, 1.0)])
    assert stack.active == (AdapterSpec(files["a"], 0.5),)
    assert all(torch.equal(layer_weight(pipe, k), v) for k, v in fused.items())


def test_mismatch_error_names_counts_and_examples(tmp_path, files, pipe):
    wide = make_adapter(tmp_path / "wide.safetensors", 3, base_args={"cross_attention_dim": 48})
    with pytest.raises(ValueError) as error:
        AdapterStack.for_pipe(pipe).apply([wide])
    text = str(error.value)
    assert "wide.safetensors" in text and "attn2_to_k" in text and "Nothing was applied" in text


# ----------------------------------------------------------------------------- exact restore and caching


def images(pipe, seeds=(0, 1)):
    """Images straight from the pipeline with whatever the stack has fused now."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    out = pipe(["a red circle"] * len(seeds), num_inference_steps=3, generator=generators, output_type="np")
    return (out.images * 255).round().astype(numpy.uint8)


def test_base_then_blend_then_base_is_bit_identical(files, pipe):
    before = base_weights(pipe)
    base_images = images(pipe)
    stack = AdapterStack.for_pipe(pipe)
    stack.apply([AdapterSpec(files["a"], 1.0), AdapterSpec(files["b"], -0.7, 0.4)])
    assert numpy.abs(images(pipe).astype(int) - base_images).mean() > 1.0
    stack.apply([AdapterSpec(files["b"], 2.0)])  # switching blends goes through the originals, not the last blend
    stack.clear()
    assert numpy.array_equal(images(pipe), base_images)
    assert all(torch.equal(layer_weight(pipe, k), v) for k, v in before.items())
    stack.apply([AdapterSpec(files["a"], 0.0)])  # weight 0 is the base exactly
    assert numpy.array_equal(images(pipe), base_images) and stack.fused_module_count == 0


def test_weight_changes_do_not_reread_files(files, pipe, monkeypatch):
    reads = []
    real_read = stack_module.read_adapter_file
    monkeypatch.setattr(stack_module, "read_adapter_file", lambda path: reads.append(Path(path).name) or real_read(path))
    stack = AdapterStack.for_pipe(pipe)
    for unet_w, te_w in [(1.0, None), (0.5, None), (-1.0, 0.2), (0.0, 1.0), (1.5, 1.5)]:
        stack.apply([AdapterSpec(files["a"], unet_w, te_w), AdapterSpec(files["b"], 1.0 - unet_w)])
    assert sorted(reads) == ["a.safetensors", "b.safetensors"]
    # A file replaced on disk (same name, new contents) is read again, once.
    changed = files["root"] / "changed.safetensors"
    make_adapter(changed, 5)
    stack.apply([changed])
    stack.apply([parse_lora_arg(f"{changed}:0.3")])
    first = base_weights(pipe)
    make_adapter(files["root"] / "new.safetensors", 6).replace(changed)
    stack.apply([parse_lora_arg(f"{changed}:0.3")])
    assert reads.count("changed.safetensors") == 2
    assert not all(torch.equal(layer_weight(pipe, k), v) for k, v in first.items())


def test_apply_adapters_reuses_the_pipes_stack(files, pipe):
    first = apply_adapters(pipe, [f"{files['a']}:0.5"])
    once = base_weights(pipe)
    second = apply_adapters(pipe, [f"{files['a']}:0.5"])
    assert first is second
    assert all(torch.equal(layer_weight(pipe, k), v) for k, v in once.items())


@pytest.mark.parametrize("text, expected", [
    ("a.safetensors", ("a.safetensors", 1.0, None)),
    ("dir/a.safetensors:0.5", ("dir/a.safetensors", 0.5, None)),
    ("a.safetensors:0.5:-1", ("a.safetensors", 0.5, -1.0)),
    ("C:\\loras\\a.safetensors:-0.25", ("C:\\loras\\a.safetensors", -0.25, None)),
])
def test_parse_lora_arg(text, expected):
    spec = parse_lora_arg(text)
    assert (str(spec.path), spec.unet_weight, spec.te_weight) == expected


@pytest.mark.parametrize("text, message", [("a.safetensors:abc", "Bad weight 'abc'"), (":0.5", "No file"),
                                           ("a.safetensors:nan", "Bad weight 'nan'"),
                                           ("a.safetensors:1:1:1", "Too many weights")])
def test_parse_lora_arg_refuses_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_lora_arg(text)


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_blends_each_get_the_image_they_get_alone(files, pipe):
    blends = [(w_a, w_b) for w_a in (0.0, 1.0, -0.5, 0.7) for w_b in (0.0, 0.6)]
    requests = [GenerateRequest("a blue square", steps=2, seed=100 + i, sampler="euler",
                                loras=(AdapterSpec(files["a"], w_a), AdapterSpec(files["b"], w_b, -w_b)))
                for i, (w_a, w_b) in enumerate(blends)]
    alone = [pixels(generate(pipe, None, request)[0]) for request in requests]
    start = threading.Barrier(len(requests))

    def run(request):
        start.wait()  # all 8 threads ask at once
        return pixels(generate(pipe, None, request)[0])

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(run, requests))
    assert len({image.tobytes() for image in alone}) == len(alone)  # the blends really differ
    assert all(numpy.array_equal(a, b) for a, b in zip(alone, together))


def test_peft_folder_without_config_is_refused(tmp_path):
    path = make_peft_adapter(tmp_path / "p", 1)
    (path.parent / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="adapter_config.json"):
        AdapterStack.for_pipe(tiny_pipeline()).load(path.parent)


def test_rslora_peft_config_scales_like_peft(tmp_path, files, pipe):
    path = make_peft_adapter(tmp_path / "p", SEED_A)
    config_path = path.parent / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_rslora"] = True
    config_path.write_text(json.dumps(config))
    before = base_weights(pipe)
    AdapterStack.for_pipe(pipe).apply([path])
    key, delta = next(iter((k, v) for k, v in peft_deltas(SEED_A).items() if k[0] == "unet"))
    rank, alpha = 4, 2.0
    want = before[key] + delta.reshape(before[key].shape) * (alpha / rank ** 0.5) / (alpha / rank)
    assert torch.allclose(layer_weight(pipe, key), want, atol=1e-6)
