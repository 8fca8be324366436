"""LoRA files as other tools write them, loaded the way A1111's built-in Lora extension applies them.

Each accepted variant (kohya dtypes and alpha spellings, shapes of 1x1 and 3x3 convolutions, peft's factor names under
kohya names, LyCORIS LoHa / LoKr in every layout A1111 reads) is fused by the stack into exactly the change A1111's
formulas give (extensions-builtin/Lora: network_lora / network_hada / network_lokr, written out independently here),
described by `inspect`, and written by `blend --exact` as a plain kohya LoRA of the same change that diffusers loads.
Each refused variant (DoRA, full diffs, (IA)^3, incomplete LyCORIS modules, SDXL names on an SD base) is refused
whole, with a message saying what the file is and what to do.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, tiny_pipeline
from safetensors.torch import load_file, save_file

from stylelora.generate.stack import AdapterStack
from stylelora.lora.spec import AdapterSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
UNET_WEIGHT, TE_WEIGHT = 0.8, 0.5


# ----------------------------------------------------------------------------- A1111's formulas


def _cp(core, wa, wb):
    """lyco_helpers.make_weight_cp: the Tucker core between wa (r, out) and wb (r, in)."""
    return torch.einsum("ijkl,ir->rjkl", torch.einsum("ijkl,jr->irkl", core, wb), wa)


def _flat_product(a, b):
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def a1111_change(parts: dict, layer_shape: tuple) -> torch.Tensor:
    """The weight change A1111 applies for one module at multiplier 1 (scale: `.scale`, else alpha / dim, else 1)."""
    aliases = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # network_lora.py reads both
    f = {aliases.get(suffix, suffix): tensor.float() for suffix, tensor in parts.items()}
    dim = None
    if "lora_up.weight" in f:
        dim = f["lora_down.weight"].shape[0]
        change = _flat_product(f["lora_up.weight"], f["lora_down.weight"])
    elif "hada_w1_a" in f:
        dim = f["hada_w1_b"].shape[0]
        if "hada_t1" in f:
            first, second = _cp(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]), _cp(f["hada_t2"], f["hada_w2_a"],
                                                                                   f["hada_w2_b"])
        else:  # output_shape [w1a out, w1b in] + w1b's kernel when w1b is 4-d
            shape = (f["hada_w1_a"].shape[0], *f["hada_w1_b"].shape[1:])
            first = _flat_product(f["hada_w1_a"], f["hada_w1_b"]).reshape(shape)
            second = _flat_product(f["hada_w2_a"], f["hada_w2_b"]).reshape(shape)
        change = first * second
    else:
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        dim = next((f[key].shape[0] for key in ("lokr_w2_b", "lokr_w1_b") if key in f), None)
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        change = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2)
    if "scale" in f:
        scale = float(f["scale"])
    else:
        scale = float(f["alpha"]) / dim if dim is not None and "alpha" in f else 1.0
    return change.reshape(layer_shape) * scale


# ----------------------------------------------------------------------------- variants


def randn(*shape):
    return torch.randn(*shape) * 0.3


def _modules(state: dict) -> dict[str, dict]:
    modules: dict[str, dict] = {}
    for key, tensor in state.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
    return modules


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def each_module(make, where=lambda shape: True, dtype=None):
    """A variant with `make(layer shape)`'s tensors on every module of the plain file whose layer is `where`."""
    def build(plain, shapes):
        torch.manual_seed(1)
        state = {}
        for name in _modules(plain):
            if where(shapes[name]):
                for suffix, tensor in make(shapes[name]).items():
                    state[f"{name}.{suffix}"] = (tensor if dtype is None else tensor.to(dtype)).clone()
        return state
    return build


def loha(shape, rank=2, four_d=False):
    out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
    down = (lambda: randn(rank, inp, *kernel)) if four_d and kernel else (lambda: randn(rank, _numel(shape[1:])))
    return {"hada_w1_a": randn(out, rank), "hada_w1_b": down(), "hada_w2_a": randn(out, rank), "hada_w2_b": down(),
            "alpha": torch.tensor(1.5)}


def loha_tucker(shape, rank=2):
    out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
    return {"hada_w1_a": randn(rank, out), "hada_w1_b": randn(rank, inp), "hada_t1": randn(rank, rank, *kernel),
            "hada_w2_a": randn(rank, out), "hada_w2_b": randn(rank, inp), "hada_t2": randn(rank, rank, *kernel),
            "alpha": torch.tensor(1.5)}


def _halves(size: int) -> tuple[int, int]:
    small = next(factor for factor in (2, 3, 4, 1) if size % factor == 0)
    return small, size // small


def lokr(shape, w1="full", w2="low rank", rank=2, w2_four_d=True):
    (a, b), (c, d), kernel = _halves(shape[0]), _halves(shape[1]), tuple(shape[2:])
    parts = {"alpha": torch.tensor(3.0)}
    parts.update({"lokr_w1": randn(a, c)} if w1 == "full" else {"lokr_w1_a": randn(a, 1), "lokr_w1_b": randn(1, c)})
    if w2 == "full":
        parts["lokr_w2"] = randn(b, d, *kernel) if kernel and w2_four_d else randn(b, d * _numel(kernel))
    elif w2 == "tucker":
        parts.update(lokr_w2_a=randn(rank, b), lokr_w2_b=randn(rank, d), lokr_t2=randn(rank, rank, *kernel))
    else:
        parts.update(lokr_w2_a=randn(b, rank), lokr_w2_b=randn(rank, d * _numel(kernel)))
    return parts


def with_parts(make, **extra):
    return lambda shape: {**make(shape), **extra}


def without(make, suffix):
    return lambda shape: {k: v for k, v in make(shape).items() if k != suffix}


def kohya(edit):
    """A variant of the plain kohya file: `edit(key, tensor)` gives the key and tensor to write (None: drop it)."""
    def build(plain, shapes):
        pairs = (edit(key, tensor) for key, tensor in plain.items())
        return {key: tensor.clone() for key, tensor in (pair for pair in pairs if pair is not None)}
    return build


def with_scale(keep_alpha: bool):
    """The plain kohya file with A1111's `.scale` on every module (applied in place of alpha / rank)."""
    def build(plain, shapes):
        state = {key: tensor.clone() for key, tensor in plain.items() if keep_alpha or not key.endswith(".alpha")}
        state.update({f"{name}.scale": torch.tensor(0.3) if keep_alpha else torch.tensor([0.3])
                      for name in _modules(plain)})
        return state
    return build


def per_module_ranks(plain, shapes):
    torch.manual_seed(2)
    state = {}
    for index, (name, parts) in enumerate(_modules(plain).items()):
        rank, alpha = [(1, 1.0), (3, 6.0), (8, 2.0)][index % 3]  # alpha equal to, above and below the rank
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        state.update({f"{name}.lora_down.weight": randn(rank, *down.shape[1:]),
                      f"{name}.lora_up.weight": randn(up.shape[0], rank, *up.shape[2:]),
                      f"{name}.alpha": torch.tensor(alpha)})
    return state


def with_modules_the_base_lacks(plain, shapes):
    return {**plain, "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": randn(4, 32),
            "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": randn(32, 4),
            "lora_te_text_model_encoder_layers_7_mlp_fc1.lora_down.weight": randn(4, 32),
            "lora_te_text_model_encoder_layers_7_mlp_fc1.lora_up.weight": randn(37, 4)}


def _is_conv(shape):
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def _is_1x1(shape):
    return len(shape) == 4 and tuple(shape[2:]) == (1, 1)


def _is_linear(shape):
    return len(shape) == 2


def _alpha_as(dtype, shape=None):
    def edit(key, tensor):
        if key.endswith(".alpha"):
            tensor = tensor.to(dtype)
            return key, tensor.reshape(shape) if shape is not None else tensor
        return key, tensor.to(dtype)
    return edit


def _as_sdxl_names(key, tensor):
    """sd-scripts' SDXL spelling: lora_te1_ for the first text encoder, SAI input_blocks for the UNet."""
    return key.replace("lora_te_", "lora_te1_").replace("down_blocks_0_attentions_0", "input_blocks_1_1"), tensor


FP32 = 1e-5  # relative to the largest change; an fp16 or bf16 LyCORIS module is rewritten in float32
ACCEPTED = {  # name: (builder(plain state, layer shapes) -> state, relative tolerance)
    "kohya fp16, alpha fp16 []": (kohya(_alpha_as(torch.float16)), FP32),
    "kohya bf16, alpha bf16 [1]": (kohya(_alpha_as(torch.bfloat16, (1,))), FP32),
    "kohya fp16, alpha fp32 [1]": (kohya(lambda k, t: (k, t.reshape(1)) if k.endswith(".alpha") else (k, t.half())),
                                   FP32),
    "kohya without alpha (alpha = rank)": (kohya(lambda k, t: None if k.endswith(".alpha") else (k, t)), FP32),
    "kohya alpha 16 > rank 4": (kohya(lambda k, t: (k, torch.tensor(16.0)) if k.endswith(".alpha") else (k, t)),
                                FP32),
    "kohya rank and alpha per module": (per_module_ranks, FP32),
    "kohya 1x1 conv stored Linear-shaped": (kohya(lambda k, t: (k, t.flatten(1) if _is_1x1(t.shape) else t)), FP32),
    "kohya Linear stored 1x1-conv-shaped": (kohya(lambda k, t: (k, t[:, :, None, None] if t.dim() == 2 else t)),
                                            FP32),
    "kohya LoCon 3x3 stored flat": (kohya(lambda k, t: (k, t.flatten(1) if t.dim() == 4 else t)), FP32),
    "kohya UNet only": (kohya(lambda k, t: (k, t) if k.startswith("lora_unet_") else None), FP32),
    "kohya text encoder only": (kohya(lambda k, t: (k, t) if k.startswith("lora_te_") else None), FP32),
    "kohya names with peft's lora_A / lora_B": (
        kohya(lambda k, t: (k.replace("lora_down.weight", "lora_A.weight").replace("lora_up.weight", "lora_B.weight"),
                            t)), FP32),
    "kohya with .scale beside alpha": (with_scale(keep_alpha=True), FP32),
    "kohya with .scale [1], no alpha": (with_scale(keep_alpha=False), FP32),
    "LoHa": (each_module(lambda s: loha_tucker(s) if _is_conv(s) else loha(s)), FP32),
    "LoHa 3x3 with 4-d hada_w1_b / hada_w2_b": (each_module(lambda s: loha(s, four_d=True), _is_conv), FP32),
    "LoHa 3x3 stored flat": (each_module(loha, _is_conv), FP32),
    "LoHa 3x3, flat hada_w1_b, 4-d hada_w2_b": (each_module(lambda s: {**loha(s), "hada_w2_b": randn(2, *s[1:])},
                                                            _is_conv), FP32),
    "LoHa 1x1 conv, (r, in, 1, 1) factors": (each_module(lambda s: loha(s, four_d=True), _is_1x1), FP32),
    "LoHa 1x1 conv, flat factors": (each_module(loha, _is_1x1), FP32),
    "LoHa with .scale": (each_module(with_parts(loha, scale=torch.tensor(0.25)), _is_linear), FP32),
    "LoHa fp16": (each_module(loha, dtype=torch.float16), FP32),
    "LoHa bf16": (each_module(loha, dtype=torch.bfloat16), FP32),
    "LoKr, lokr_w1 full, lokr_w2 low rank": (each_module(lokr, _is_linear), FP32),
    "LoKr, lokr_w1_a / lokr_w1_b, lokr_w2 full": (each_module(lambda s: lokr(s, "low rank", "full"), _is_linear), FP32),
    "LoKr, both halves full (scale 1)": (each_module(lambda s: lokr(s, "full", "full"), _is_linear), FP32),
    "LoKr, both halves full with .scale [1]": (
        each_module(with_parts(lambda s: lokr(s, "full", "full"), scale=torch.tensor([0.25])), _is_linear), FP32),
    "LoKr 1x1 conv, 4-d lokr_w2": (each_module(lambda s: lokr(s, "full", "full"), _is_1x1), FP32),
    "LoKr 1x1 conv, flat lokr_w2": (each_module(lambda s: lokr(s, "full", "full", w2_four_d=False), _is_1x1), FP32),
    "LoKr 1x1 conv, low rank": (each_module(lokr, _is_1x1), FP32),
    "LoKr 3x3, low rank stored flat": (each_module(lokr, _is_conv), FP32),
    "LoKr 3x3, lokr_w1_a / lokr_w1_b, Tucker": (each_module(lambda s: lokr(s, "low rank", "tucker"), _is_conv), FP32),
    "LoKr fp16": (each_module(lokr, dtype=torch.float16), FP32),
    "a few modules the base lacks (skipped with a warning)": (with_modules_the_base_lacks, FP32),
}

REFUSED = {  # name: (builder, what the message must say)
    "DoRA": (each_module(lambda s: {"lora_down.weight": randn(2, s[1]), "lora_up.weight": randn(s[0], 2),
                                    "alpha": torch.tensor(1.0), "dora_scale": randn(1, s[1])}, _is_linear),
             r"^variant\.safetensors holds DoRA .* in \d+ modules .*Use this file in A1111 or ComfyUI"),
    "LoHa with dora_scale": (each_module(with_parts(loha, dora_scale=randn(1, 4)), _is_linear), r"holds DoRA"),
    "full-weight diff": (each_module(lambda s: {"diff": randn(*s), "diff_b": randn(s[0])}, _is_linear),
                         r"holds LyCORIS full-weight diff"),
    "(IA)^3": (each_module(lambda s: {"weight": randn(s[1]), "on_input": torch.tensor(True)}, _is_linear),
               r"holds LyCORIS \(IA\)\^3 in \d+ modules"),
    "LoHa missing hada_w2_b": (each_module(without(loha, "hada_w2_b"), _is_linear),
                               r"variant\.safetensors: LyCORIS LoHa module \w+ lacks hada_w2_b; .*download it again"),
    "LoHa Tucker missing hada_t2": (each_module(without(loha_tucker, "hada_t2"), _is_conv), r"lacks hada_t2"),
    "LoKr missing lokr_w1_b": (each_module(without(lambda s: lokr(s, "low rank", "full"), "lokr_w1_b"), _is_linear),
                               r"LoKr module \w+ lacks its w1 factor \(lokr_w1, or lokr_w1_a with lokr_w1_b\)"),
    "LoCon Tucker missing lora_up": (
        each_module(lambda s: {"lora_down.weight": randn(2, s[1], 1, 1), "lora_mid.weight": randn(2, 2, *s[2:])},
                    _is_conv), r"LoCon \(Tucker\) module \w+ lacks lora_up.weight"),
    "SDXL names on an SD base": (kohya(_as_sdxl_names),
                                 r"is an SDXL LoRA and cannot be used with this .* base model: use a LoRA trained for"),
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    """The tiny SD base loaded once, its adaptable layers by kohya name, their original weights and a plain LoCon
    kohya file (rank 4 / alpha 2, 3x3 convolutions at rank 2) whose module shapes the variants take."""
    from stylelora.lora.components import component_names, pipeline_models

    root = tmp_path_factory.mktemp("qa_files")
    plain = load_file(str(make_adapter(root / "locon.safetensors", 5, preset="locon", conv_rank=2, conv_alpha=1.0)))
    pipe = load_tiny_base(tiny_sd_base)
    models = pipeline_models(pipe)
    layers, paths = {}, {}
    for component in ("unet", "text_encoder"):
        names = component_names(models, component)
        layers.update({name: (component, names.layers[path]) for path, name in names.by_path.items()})
        paths.update({name: (component, path) for path, name in names.by_path.items()})
    shapes = {name: tuple(layers[name][1].weight.shape) for name in _modules(plain)}
    before = {name: layer.weight.detach().clone() for name, (_, layer) in layers.items()}
    return {"root": root, "plain": plain, "pipe": pipe, "layers": layers, "paths": paths, "shapes": shapes,
            "before": before}


def _write(world, tmp_path, builder) -> tuple:
    state = builder(world["plain"], world["shapes"])
    path = tmp_path / "variant.safetensors"
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path, state


def _a1111_changes(state: dict, world) -> dict[str, torch.Tensor]:
    """{module: A1111's change} for every module of `state` this base has a layer for."""
    return {name: a1111_change(parts, world["shapes"].get(name) or tuple(world["layers"][name][1].weight.shape))
            for name, parts in _modules(state).items() if name in world["layers"]}


def _relative_error(got, want) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_variant_fuses_a1111s_change_and_blends_to_plain_kohya(world, tmp_path, case):
    from stylelora.lora.blend import blend
    from stylelora.lora.inspect import format_inspect, inspect_adapter

    builder, tolerance = ACCEPTED[case]
    path, state = _write(world, tmp_path, builder)
    want = _a1111_changes(state, world)
    stack = AdapterStack.for_pipe(world["pipe"])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            stack.apply([AdapterSpec(path, UNET_WEIGHT, TE_WEIGHT)], "sum")
        skipped = [str(w.message) for w in caught if "have no layer in this base and are skipped" in str(w.message)]
        assert len(skipped) == (2 if "the base lacks" in case else 0)  # one per model: UNet, text encoder
        assert stack.fused_module_count == len(want)
        for name, (component, layer) in world["layers"].items():
            change = layer.weight.detach() - world["before"][name]
            if name not in want:
                assert not change.any(), f"{name} changed"
                continue
            weight = UNET_WEIGHT if component == "unet" else TE_WEIGHT
            assert _relative_error(change, weight * want[name]) <= tolerance, name
    finally:
        stack.clear()

    info = inspect_adapter(path)
    assert not info.get("unsupported") and "NOT LOADABLE" not in format_inspect(info)
    assert info["modules"]["unet"] + info["modules"]["text_encoder"] == len(_modules(state))

    out = tmp_path / "blend.safetensors"
    blend([AdapterSpec(path, 1.0)], out, exact=True, unet_config=dict(world["pipe"].unet.config))
    written = load_file(str(out))
    assert {key.partition(".")[2] for key in written} == {"lora_down.weight", "lora_up.weight", "alpha"}
    for name, change in _a1111_changes(written, world).items():
        assert _relative_error(change, want[name]) <= tolerance, name
        dims = 4 if isinstance(world["layers"][name][1], torch.nn.Conv2d) else 2  # kohya's shapes for the layer
        assert written[f"{name}.lora_down.weight"].dim() == written[f"{name}.lora_up.weight"].dim() == dims


SHAPE_VARIANTS = ["kohya 1x1 conv stored Linear-shaped", "kohya Linear stored 1x1-conv-shaped",
                  "kohya LoCon 3x3 stored flat", "LoHa 3x3 stored flat"]


@pytest.mark.parametrize("case", SHAPE_VARIANTS)
def test_a_blend_of_a_reshaped_file_loads_in_diffusers(world, tmp_path, case):
    """A1111 and ComfyUI fit factors to the layer; diffusers needs kohya's shapes, which the blend writes."""
    from stylelora.lora.blend import blend

    path, _ = _write(world, tmp_path, ACCEPTED[case][0])
    out = tmp_path / "blend.safetensors"
    blend([AdapterSpec(path, 1.0)], out, exact=True, unet_config=dict(world["pipe"].unet.config))
    tiny_pipeline().load_lora_weights(str(out))  # raises on a size mismatch


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_variant_names_what_it_is_and_changes_nothing(world, tmp_path, case):
    builder, message = REFUSED[case]
    path, _ = _write(world, tmp_path, builder)
    stack = AdapterStack.for_pipe(world["pipe"])
    try:
        with pytest.raises(ValueError, match=message) as error:
            stack.apply([AdapterSpec(path, 1.0)])
        assert stack.fused_module_count == 0
        assert all(torch.equal(layer.weight, world["before"][name]) for name, (_, layer) in world["layers"].items())
    finally:
        stack.clear()  # a variant loaded by mistake must not leak into the next case
    assert "does not fit this base" not in str(error.value)  # a DoRA file is that on every base


@pytest.mark.parametrize("case", ["DoRA", "full-weight diff", "(IA)^3"])
def test_inspect_and_blend_name_a_kind_stylelora_cannot_apply(world, tmp_path, case):
    from stylelora.lora.blend import blend
    from stylelora.lora.inspect import format_inspect, inspect_adapter

    builder, message = REFUSED[case]
    path, state = _write(world, tmp_path, builder)
    info = inspect_adapter(path)
    assert sum(info["unsupported"].values()) == len(_modules(state))
    assert "NOT LOADABLE" in format_inspect(info) and "use this file in A1111 or ComfyUI" in format_inspect(info)
    with pytest.raises(ValueError, match=message) as error:
        blend([AdapterSpec(path, 1.0)], tmp_path / "out.safetensors", exact=True)
    assert str(error.value).startswith("variant.safetensors holds ")


@pytest.mark.parametrize("text_encoder_root", ["text_model.", ""])
def test_diffusers_layout_with_either_clip_path_spelling_fuses_a1111s_change(world, tmp_path, text_encoder_root):
    """diffusers / peft keys (`unet.<path>.lora_A.weight`), text-encoder paths with the classic `text_model.` root or
    without it (transformers 5's flattened CLIPTextModel), no `lora_adapter_metadata`: alpha = rank, as in kohya."""
    plain = {key: tensor for key, tensor in world["plain"].items() if not key.endswith(".alpha")}
    state = {}
    for key, tensor in plain.items():
        name, _, suffix = key.partition(".")
        component, path = world["paths"][name]
        if component == "text_encoder":
            path = text_encoder_root + path.removeprefix("text_model.")
        peft_suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[suffix]
        state[f"{component}.{path}.{peft_suffix}"] = tensor.clone()
    path = tmp_path / "diffusers.safetensors"
    save_file(state, str(path))
    want = _a1111_changes(plain, world)
    stack = AdapterStack.for_pipe(world["pipe"])
    try:
        stack.apply([AdapterSpec(path, UNET_WEIGHT, TE_WEIGHT)], "sum")
        assert stack.fused_module_count == len(want)
        for name, change in want.items():
            component, layer = world["layers"][name]
            weight = UNET_WEIGHT if component == "unet" else TE_WEIGHT
            assert _relative_error(layer.weight.detach() - world["before"][name], weight * change) <= FP32, name
    finally:
        stack.clear()


def test_an_sd_file_with_sai_unet_names_fuses_the_change_of_its_diffusers_names(world, tmp_path):
    """A1111 and ComfyUI read an SD 1.x/2.x UNet's modules under SAI/LDM names (lora_unet_input_blocks_1_1_…) as
    well as kohya's diffusers ones; so does stylelora, which knows the file is not SDXL by its blocks."""
    from stylelora.lora.sai_names import sai_kohya_names

    sai = sai_kohya_names(world["pipe"].unet).by_path
    renamed = {}
    for key, tensor in world["plain"].items():
        name, _, suffix = key.partition(".")
        component, path = world["paths"][name]
        renamed[f"{sai[path] if component == 'unet' else name}.{suffix}"] = tensor.clone()
    assert any(key.startswith("lora_unet_input_blocks_1_1_") for key in renamed)
    path = tmp_path / "sai.safetensors"
    save_file(renamed, str(path))
    want = _a1111_changes(world["plain"], world)
    stack = AdapterStack.for_pipe(world["pipe"])
    try:
        stack.apply([AdapterSpec(path, UNET_WEIGHT, TE_WEIGHT)], "sum")
        assert stack.fused_module_count == len(want)
        for name, (component, layer) in world["layers"].items():
            change = layer.weight.detach() - world["before"][name]
            weight = UNET_WEIGHT if component == "unet" else TE_WEIGHT
            assert _relative_error(change, weight * want[name]) <= FP32 if name in want else not change.any(), name
    finally:
        stack.clear()
    from stylelora.lora.blend import blend

    out = tmp_path / "blend.safetensors"  # written in kohya's SD names, which diffusers reads (it refuses SAI ones)
    blend([AdapterSpec(path, 1.0)], out, exact=True, unet_config=dict(world["pipe"].unet.config))
    written = load_file(str(out))
    assert {key.partition(".")[0] for key in written} == {key.partition(".")[0] for key in world["plain"]}
    tiny_pipeline().load_lora_weights(str(out))
