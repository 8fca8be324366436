"""The split blend mode: its cross-attention against a hand-computed case, each text encoder's readings side by side,
a silent second adapter leaving the first exactly as it is alone, clear() giving the base back, and the refusal to
save it as a file (library, CLI and app)."""
from __future__ import annotations

import copy
import gc
import json
import math
from dataclasses import replace

import numpy
import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, make_silent_adapter, pixels
from test_generate_cli import run as _run

from stylelora.generate import split_attention
from stylelora.generate.generate import BLEND_MODE_FIELD, GenerateRequest, generate
from stylelora.generate.stack import AdapterStack
from stylelora.lora import blend_modes
from stylelora.lora.blend import blend
from stylelora.lora.spec import AdapterSpec


def _attended(q_w, k_w, v_w, hidden, context):
    """softmax(q k^T / sqrt(d)) v, one head, written out: the attention before the output projection."""
    q, k, v = hidden @ q_w.T, context @ k_w.T, context @ v_w.T
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _merged_by_hand(base, first, second):
    """Element by element: both changes the same sign -> the larger one; otherwise their sum."""
    out = base.clone()
    for index in numpy.ndindex(*base.shape):
        a, b = float(first[index] - base[index]), float(second[index] - base[index])
        same = (a > 0 and b > 0) or (a < 0 and b < 0) or (a == 0 and b == 0)
        out[index] += (a if abs(a) >= abs(b) else b) if same else a + b
    return out


def test_merge_keeps_the_largest_push_each_way():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0, 5.0])
    first = torch.tensor([1.0, -1.0, 2.0, 1.0, 4.0])  # changes  1, -1,  2, 0, -1
    second = torch.tensor([3.0, 2.0, -2.0, 1.0, 3.0])  # changes  3,  2, -2, 0, -2
    assert torch.equal(split_attention.merge(base, [first, second]), torch.tensor([3.0, 1.0, 0.0, 1.0, 3.0]))
    assert torch.equal(split_attention.merge(base, [first]), first)  # one adapter: exactly its output
    third = torch.tensor([-1.0, 1.0, 1.0, 3.0, 5.0])  # changes -1,  1,  1, 2,  0
    # three: the largest increase plus the largest decrease
    assert torch.equal(split_attention.merge(base, [first, second, third]), torch.tensor([2.0, 1.0, 0.0, 3.0, 3.0]))


def test_merge_of_two_adapters_takes_the_same_values_on_every_path():
    """Two adapters on a CPU take element-wise max and min instead of the reduction three or more take: the same
    merge, checked against the rule written out, with ties and zero changes in the draw."""
    generator = torch.Generator().manual_seed(0)
    parts = torch.randint(-3, 4, (3, 2, 5, 7), generator=generator).float()  # small integers: many equal entries
    expected = _merged_by_hand(parts[0], parts[1], parts[2])
    assert torch.equal(split_attention.merge_stacked(parts.clone()), expected)
    with_a_silent_third = torch.cat([parts, parts[:1]])  # a third adapter that changes nothing: the reduction path
    assert torch.equal(split_attention.merge_stacked(with_a_silent_third), expected)


@pytest.mark.parametrize("residual", [False, True], ids=["low-rank path", "generic path"])
def test_split_cross_attention_merges_each_adapters_attention(residual):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=4, cross_attention_dim=3, heads=1, dim_head=4, residual_connection=residual)
    base = {name: attn.get_submodule(name).weight.detach().clone() for name in split_attention.PROJECTIONS}
    out_b = attn.to_out[0].bias.detach().clone()
    column = lambda *values: torch.tensor(values).reshape(-1, 1)  # noqa: E731
    # adapter a: rank-1 LoRA on the keys and values; adapter b: on the queries and the output projection
    a = {"to_k": (column(1.0, 0, -1, 2), column(0.5, 1, 0).T), "to_v": (column(0, 2.0, 1, 0), column(1.0, 1, 1).T)}
    b = {"to_q": (column(-1.0, 0, 0, 1), column(1.0, 0, 2, 0).T),
         "to_out.0": (column(1.0, 1, 0, 0), column(0, 0, 1.0, 1).T)}
    hidden = torch.randn(1, 5, 4)
    readings = [torch.randn(1, 2, 3) for _ in range(3)]  # the base's, a's and b's encoding of a 2-token prompt
    split_attention.install_attention(attn, "", [a, b])  # "" is the module itself
    calls = []

    class Counted(AttnProcessor2_0):  # the module's own processor, counting its runs
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    attn.processor.inner = Counted()
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=torch.cat(readings, dim=1))
    assert len(calls) == (4 if residual else 0)  # the low-rank path never runs the module's processor
    full = lambda lora: [base[n] + (lora[n][0] @ lora[n][1] if n in lora else 0) for n in base]  # noqa: E731
    a_0 = _attended(*full({})[:3], hidden, readings[0])
    a_a = _attended(*full(a)[:3], hidden, readings[1])
    a_b = _attended(*full(b)[:3], hidden, readings[2])
    out_delta = b["to_out.0"][0] @ b["to_out.0"][1]
    expected = _merged_by_hand(a_0, a_a, a_b) @ base["to_out.0"].T + out_b + a_b @ out_delta.T
    assert torch.allclose(got, expected + (hidden if residual else 0), atol=1e-5)
    assert all(torch.equal(attn.get_submodule(n).weight, base[n]) for n in base)  # the base weights, untouched


def test_low_rank_path_batches_adapters_of_different_ranks_like_the_generic_path():
    """The low-rank path stacks every adapter's factors (zero-padded to the largest rank) into batched products;
    it must give what the module's own processor gives run once per adapter with hooks."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(1)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    shapes = {name: (attn.get_submodule(name).out_features, attn.get_submodule(name).in_features)
              for name in split_attention.PROJECTIONS}
    variants = [{name: (torch.randn(out, rank), torch.randn(rank, inp) * 0.3) for name, (out, inp) in shapes.items()
                 if not (rank == 1 and name == "to_k")}  # ranks 1 (no key LoRA) and 3
                for rank in (1, 3)]
    hidden, context = torch.randn(2, 5, 8), torch.randn(2, 3 * 4, 6)  # three readings of a 4-token prompt
    split_attention.install_attention(attn, "", variants)
    with torch.no_grad():
        batched = attn(hidden, encoder_hidden_states=context)
        split_attention.install_attention(attn, "", variants)
        attn.processor._is_plain = False  # the generic path: the module's processor once per reading
        generic = attn(hidden, encoder_hidden_states=context)
    assert torch.allclose(batched, generic, atol=1e-5)
    assert not torch.allclose(batched, attn.processor.inner(attn, hidden, context[:, :4]), atol=1e-2)


# ----------------------------------------------------------------------------- on a tiny pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    adapters = tmp_path_factory.mktemp("split") / "adapters"
    a = make_adapter(adapters / "stripes.safetensors", 1, trigger="stripes")
    b = make_adapter(adapters / "pastel.safetensors", 2, trigger="pastel")
    silent = make_silent_adapter(adapters / "silent.safetensors", like=a)  # every module there, every delta zero
    return {"base": tiny_sd_base, "adapters": adapters, "a": a, "b": b, "silent": silent}


def _image(pipe, specs, mode, prompt="a red circle"):
    request = GenerateRequest(prompt, steps=3, seed=5, sampler="ddim", loras=tuple(specs), blend_mode=mode)
    return pixels(generate(pipe, AdapterStack.for_pipe(pipe), request)[0]).astype(int)


def test_split_keeps_an_adapter_whole_beside_one_that_changes_nothing(world):
    pipe = load_tiny_base(world["base"])
    alone = _image(pipe, [AdapterSpec(world["a"], 1.0)], "sum")
    split = _image(pipe, [AdapterSpec(world["a"], 1.0), AdapterSpec(world["silent"], 1.0)], "split")
    assert AdapterStack.for_pipe(pipe)._split  # two adapters: the split path ran
    assert abs(split - alone).max() <= 1
    with_b = _image(pipe, [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0)], "split")
    summed = _image(pipe, [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0)], "sum")
    assert abs(with_b - summed).max() > 3 and abs(with_b - alone).max() > 3  # a real, different blend


def test_split_keeps_a_locon_adapter_whole_beside_a_plain_one_that_changes_nothing(world, tmp_path):
    """A LoCon style (its 3x3 convs adapted too) stacked with a plain LoRA: the convs only one adapter touches are
    fused as that adapter alone, so beside a silent plain adapter the LoCon draws what it draws alone."""
    locon = make_adapter(tmp_path / "locon.safetensors", 3, preset="locon", trigger="grain")
    pipe = load_tiny_base(world["base"])
    alone = _image(pipe, [AdapterSpec(locon, 1.0)], "sum")
    split = _image(pipe, [AdapterSpec(locon, 1.0), AdapterSpec(world["silent"], 1.0)], "split")
    assert abs(split - alone).max() <= 1
    with_b = _image(pipe, [AdapterSpec(locon, 1.0), AdapterSpec(world["b"], 1.0)], "split")
    assert abs(with_b - alone).max() > 3


def test_split_single_adapter_is_the_adapter_and_clear_gives_the_base_back(world):
    pipe = load_tiny_base(world["base"])
    stack = AdapterStack.for_pipe(pipe)
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    base_params = {n: p.detach().clone() for n, p in [*pipe.unet.named_parameters(),
                                                       *pipe.text_encoder.named_parameters()]}
    single = _image(pipe, [AdapterSpec(world["a"], 0.8)], "sum")
    assert (_image(pipe, [AdapterSpec(world["a"], 0.8)], "split") == single).all()
    base_image = _image(pipe, [], "sum")
    _image(pipe, [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 0.7, 0.5)], "split")
    tokens = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert pipe.text_encoder(tokens)[0].shape[1] == 3 * 77  # base, a's and b's readings side by side
    stack.clear()
    assert pipe.text_encoder(tokens)[0].shape[1] == 77 and "forward" not in vars(pipe.text_encoder)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors
    assert all(torch.equal(p, base_params[n]) for n, p in [*pipe.unet.named_parameters(),
                                                          *pipe.text_encoder.named_parameters()])
    assert (_image(pipe, [], "sum") == base_image).all()


def _split_processors(pipe):
    return [p for p in pipe.unet.attn_processors.values() if isinstance(p, split_attention.SplitCrossAttention)]


def test_split_computes_keys_and_values_once_per_image_and_keeps_none_after(world):
    specs = [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 0.8)]
    fresh = load_tiny_base(world["base"])
    expected = _image(fresh, specs, "split", "a blue square")
    pipe = load_tiny_base(world["base"])
    _image(pipe, specs, "split")
    parent = split_attention.cross_attention_modules(pipe.unet)[0]
    calls = []
    hook = pipe.unet.get_submodule(parent).to_k.register_forward_hook(
        lambda _module, inputs, _output: calls.append(inputs[0].shape[0]))
    again = _image(pipe, specs, "split", "a blue square")  # 3 steps, classifier-free guidance
    hook.remove()
    # The base's and each adapter's reading (3) of the negative and the positive prompt (2): in one product, once
    # per image, not once per step.
    assert calls == [3 * 2]
    assert (again == expected).all()  # the new prompt's keys, not the last image's
    gc.collect()
    processors = _split_processors(pipe)
    assert processors and all(p._keys_values is None for p in processors)  # freed with the image's text states


def test_freeing_an_older_images_text_states_keeps_the_newer_images_keys():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = Attention(query_dim=4, cross_attention_dim=3, heads=1, dim_head=4)
    processor = split_attention.SplitCrossAttention(AttnProcessor2_0(), [{}])
    older, newer = torch.randn(1, 4, 3), torch.randn(1, 4, 3)  # two readings of 2 tokens each
    with torch.no_grad():  # as in generation: no autograd graph holds the text states
        processor._cached_keys_values(attn, older)
        kept = processor._cached_keys_values(attn, newer)
    del older
    gc.collect()
    assert processor._keys_values is not None and processor._keys_values[2] is kept
    del newer
    gc.collect()
    assert processor._keys_values is None


def test_the_memory_split_keeps_per_image_is_what_split_cost_reports(world):
    from train_fixtures import load_benchmark

    pipe = load_tiny_base(world["base"])
    stack = AdapterStack.for_pipe(pipe)
    kept = []

    def measure(_done, _total):  # during sampling: the keys and values every split module holds now
        kept.append(sum(t.nbytes for p in _split_processors(pipe) for t in p._keys_values[2]))

    specs = (AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0))
    request = GenerateRequest("a cat", steps=2, seed=1, loras=specs)
    generate(pipe, stack, request, progress=measure)
    assert kept[0] > 0 and kept == [load_benchmark("split_cost").kept_keys_values_bytes(pipe.unet, adapters=2)] * 2


def test_split_cost_counts_operators_and_split_reuses_its_keys_on_later_steps(world):
    from train_fixtures import load_benchmark

    split_cost = load_benchmark("split_cost")
    assert split_cost.count_operators(lambda: torch.ones(3).view(1, 3).t().add(1).mul(2)) == 3  # ones, add, mul
    unet = load_tiny_base(world["base"]).unet
    counts = split_cost.operators_per_call(unet, latent=4, adapters=2, rank=4)
    # A later step reads the keys and values the first step computed, so it runs fewer operators than the first;
    # both run more than the plain UNet (a second and third reading through every cross-attention module).
    assert counts["plain"] < counts["split, later step"] < counts["split, first step"]
    assert not any(isinstance(p, split_attention.SplitCrossAttention) for p in unet.attn_processors.values())


def test_switching_from_split_to_sum_is_the_plain_sum(world):
    fresh = load_tiny_base(world["base"])
    specs = [AdapterSpec(world["a"], 0.9, 0.6), AdapterSpec(world["b"], 1.1, -0.4)]
    expected = _image(fresh, specs, "sum")
    pipe = load_tiny_base(world["base"])
    _image(pipe, specs, "split")
    assert (_image(pipe, specs, "sum") == expected).all()


def test_split_merges_the_layers_outside_cross_attention_as_rescaled_ties(world):
    """Under split every UNet layer that does not run per adapter holds the ties merge of the deltas (sign election
    per entry) with each side's kept entries scaled back to its whole norm, not their sum and not plain ties; the
    cross-attention projections keep the base's weights."""
    pipe = load_tiny_base(world["base"])
    stack = AdapterStack.for_pipe(pipe)
    specs = [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0)]
    weights = lambda: {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}  # noqa: E731
    base = weights()
    by_mode = {}
    for mode in ("ties", "sum", "split"):
        stack.apply(specs, mode)
        by_mode[mode] = weights()
    stack.clear()
    cross = [f"{parent}.{projection}" for parent in split_attention.cross_attention_modules(pipe.unet)
             for projection in split_attention.PROJECTIONS]
    other = [n for n in base if n.endswith(".weight") and not n.startswith(tuple(cross))
             and not torch.equal(by_mode["sum"][n], base[n])]
    assert other and all(torch.equal(by_mode["split"][n + ".weight"], base[n + ".weight"]) for n in cross)
    assert any(not torch.equal(by_mode["split"][n], by_mode["sum"][n]) for n in other)  # the adapters do conflict
    assert any(not torch.equal(by_mode["split"][n], by_mode["ties"][n]) for n in other)  # and are scaled back
    # each such layer is the base plus the rescaled election of the two deltas, as blend_modes computes it
    loaded = [stack.load(spec.path) for spec in specs]
    plan = stack._plan(specs, loaded)
    fused = {key: terms for key, terms in plan.items() if key[0] == "unet" and len(terms) == 2
             and f"{key[1]}.weight" in other}
    assert fused
    for (_, path), terms in fused.items():
        name = f"{path}.weight"
        delta = blend_modes.merged_delta([((weight * factors.scale) * factors.up, factors.down)
                                          for _, weight, factors in terms], "split")
        assert torch.allclose(by_mode["split"][name], base[name] + delta.reshape(base[name].shape), atol=1e-6)


def test_text_encoder_readings_side_by_side_and_pooled_composed(world):
    pipe = load_tiny_base(world["base"])
    model = pipe.text_encoder
    tokens = pipe.tokenizer(["a cat", "zorb"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    layer = "text_model.encoder.layers.0.self_attn.q_proj" if hasattr(model, "text_model") else \
        "encoder.layers.0.self_attn.q_proj"
    generator = torch.Generator().manual_seed(0)
    width = model.get_submodule(layer).weight.shape[0]
    factors = (torch.randn(width, 2, generator=generator), torch.randn(2, width, generator=generator))
    changed_model = copy.deepcopy(model)  # the same text encoder with the LoRA merged into its weight
    with torch.no_grad():
        changed_model.get_submodule(layer).weight += factors[0] @ factors[1]
        base, changed = model(tokens), changed_model(tokens)
        split_attention.install_text_encoder(model, [{layer: factors}, {}])
        try:
            both = model(tokens)
            padded = model(torch.cat([tokens] * 3, dim=1)[:, : 3 * 77])  # a negative prompt padded to 3 x 77
        finally:
            split_attention.uninstall_text_encoder(model)
    readings = both.last_hidden_state.chunk(3, dim=1)
    assert torch.equal(readings[0], base.last_hidden_state) and torch.equal(readings[2], base.last_hidden_state)
    assert torch.allclose(readings[1], changed.last_hidden_state, atol=1e-5)
    assert torch.allclose(both.pooler_output, changed.pooler_output, atol=1e-5)  # p0 + the one change there is
    assert not torch.allclose(base.last_hidden_state, changed.last_hidden_state, atol=1e-3)  # the LoRA matters
    assert torch.equal(padded.last_hidden_state, both.last_hidden_state)


# ----------------------------------------------------------------------------- saving, CLI and app


def test_split_cannot_be_saved_and_says_what_to_do(world, tmp_path, capsys):
    specs = [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0)]
    with pytest.raises(blend_modes.BlendModeError, match="no static LoRA file can hold it.*save with one of sum, ties"):
        blend(specs, tmp_path / "mix.safetensors", blend_mode="split")
    assert not (tmp_path / "mix.safetensors").exists()
    code, out, err = _run(["blend", str(world["a"]), str(world["b"]), "--blend-mode", "split", "--out",
                           str(tmp_path / "mix.safetensors")], capsys)
    assert code == 2 and out == [] and "generate with it live" in err


def test_grid_compares_blend_modes_side_by_side(world, tmp_path):
    from stylelora.generate.pngmeta import read_png_parameters
    from stylelora.generate.xy_grid import parse_axis, xy_grid

    pipe = load_tiny_base(world["base"])
    request = GenerateRequest("a cat", steps=2, seed=4, sampler="ddim",
                              loras=(AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0)))
    result = xy_grid(pipe, AdapterStack.for_pipe(pipe), request, parse_axis("blend_mode=sum,split"),
                     out_path=tmp_path / "modes.png")
    assert [image.params.extra.get(BLEND_MODE_FIELD, "sum") for image in result.images] == ["sum", "split"]
    assert not (pixels(result.images[0]) == pixels(result.images[1])).all()
    fresh = load_tiny_base(world["base"])  # each cell is the plain request's image in that mode
    for image, mode in zip(result.images, ("sum", "split")):
        alone = generate(fresh, AdapterStack.for_pipe(fresh), replace(request, blend_mode=mode))[0]
        assert (pixels(image) == pixels(alone)).all()
    assert "X Type: blend_mode" in read_png_parameters(result.path)
    with pytest.raises(ValueError, match="Unknown blend mode 'mean'"):
        parse_axis("blend_mode=sum,mean")


def test_evaluate_blends_two_adapters_in_split_by_default_and_says_so(world, capsys):
    from stylelora.cli import main

    def scores(*extra):
        args = ["evaluate", "--base", str(world["base"]), "--lora", f"{world['a']}:1", "--samples", "2", "--steps",
                "2", "--prompt-set", "stripes", "--json", *extra]
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)["settings"]

    assert scores()["blend_mode"] is None  # one adapter: the same in every mode
    assert scores("--lora", f"{world['b']}:1")["blend_mode"] == "split"
    assert scores("--lora", f"{world['b']}:1", "--blend-mode", "sum")["blend_mode"] == "sum"


def test_app_generates_in_split_mode_and_refuses_to_save_it(world, tmp_path):
    from stylelora.app.service import AdapterWeight, AppService, GenerateSettings

    service = AppService(world["adapters"], datasets_dir=tmp_path, bases=(str(world["base"]),))
    mix = (AdapterWeight("stripes", 1.0, 1.0), AdapterWeight("pastel", 1.0, 1.0))
    assert service.request(GenerateSettings("a cat", adapters=mix, blend_mode="split")).blend_mode == "split"
    split, summed = (service.generate(GenerateSettings("a cat", adapters=mix, base=str(world["base"]), steps=2, seed=3,
                                                       blend_mode=mode))[0] for mode in ("split", "sum"))
    assert "Blend mode: split" in split.parameters_text
    assert not (pixels(split) == pixels(summed)).all()
    with pytest.raises(Exception, match="no static LoRA file can hold it"):
        service.blend(mix, "mix-split", blend_mode="split")
    assert not list(world["adapters"].glob("mix-split*"))


def test_split_on_sdxl_keeps_an_adapter_beside_a_silent_one(tmp_path):
    """SDXL: two text encoders (their readings side by side on the token axis, then joined on the feature axis by
    the pipeline) and the pooled add-on embedding (composed)."""
    from sdxl_fixtures import make_sdxl_adapter, tiny_sdxl_pipeline

    files = {name: make_sdxl_adapter(tmp_path / f"{name}.safetensors", seed, scale=scale)
             for name, seed, scale in (("a", 5, 1.0), ("b", 6, 1.0), ("silent", 5, 0.0))}

    def image(specs, mode):
        pipe = tiny_sdxl_pipeline()
        pipe.set_progress_bar_config(disable=True)
        AdapterStack.for_pipe(pipe).apply(specs, mode)
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    alone = image([AdapterSpec(files["a"], 1.0)], "sum")
    beside_silent = image([AdapterSpec(files["a"], 1.0), AdapterSpec(files["silent"], 1.0)], "split")
    assert abs(beside_silent - alone).max() < 1e-3
    both = image([AdapterSpec(files["a"], 1.0), AdapterSpec(files["b"], 1.0)], "split")
    summed = image([AdapterSpec(files["a"], 1.0), AdapterSpec(files["b"], 1.0)], "sum")
    assert abs(both - summed).max() > 1e-2 and abs(both - alone).max() > 1e-2


def test_benchmarks_draw_one_blend_after_another_on_one_loaded_pipe(world):
    """stylelora.toy.evaluate.draw_blend (every toy benchmark's way of drawing a blend): the images are the ones the
    blend draws when applied by hand, and the base's weights are back, bit for bit, once they are drawn."""
    from stylelora.toy.evaluate import EvalSettings, build_prompts, draw_blend, generate_images

    pipe = load_tiny_base(world["base"])
    settings = EvalSettings(samples=2, prompt_sets=("stripes+pastel",), steps=3)
    prompts = build_prompts(settings.samples, settings.seed, settings.prompt_sets)
    blend = [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0)]
    base_images = [pixels(image) for image in generate_images(pipe, prompts, settings)]
    base_weights = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}

    drawn = [pixels(image) for image in draw_blend(pipe, blend, prompts, settings, "split")]
    assert all(torch.equal(tensor, base_weights[name]) for name, tensor in pipe.unet.state_dict().items())
    assert [pixels(image).tolist() for image in generate_images(pipe, prompts, settings)] == \
        [image.tolist() for image in base_images]
    stack = AdapterStack.for_pipe(pipe)
    stack.apply(blend, "split")
    by_hand = [pixels(image) for image in generate_images(pipe, prompts, settings)]
    stack.clear()
    assert [image.tolist() for image in drawn] == [image.tolist() for image in by_hand]
    assert any(not numpy.array_equal(a, b) for a, b in zip(drawn, base_images))  # the blend changed the images
