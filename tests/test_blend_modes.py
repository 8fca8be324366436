"""Blend modes: each mode's math on hand-computed cases, `sum` bit-identical to the plain weighted sum, a single
adapter unchanged in every mode, saved static blends equal to the live blend (ours and diffusers), and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, model_outputs, pixels, tiny_pipeline
from test_generate_cli import run as _run

from stylelora.generate.generate import GenerateRequest, generate, request_from_parameters
from stylelora.generate.stack import AdapterStack
from stylelora.lora import blend_modes
from stylelora.lora.blend import blend
from stylelora.lora.spec import AdapterSpec

D1 = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
D2 = torch.tensor([[2.0, 1.0], [-1.0, -1.0]])
EYE = torch.eye(2)


def terms(*deltas):
    return [(delta.clone(), EYE.clone()) for delta in deltas]  # up @ down == delta


def test_sum_is_the_plain_sum():
    assert torch.equal(blend_modes.merged_delta(terms(D1, D2), "sum"), D1 + D2)


def test_ties_keeps_the_winning_side_of_each_conflict_whole():
    # sum [[3, -1], [2, -0.5]]: (0,0) both +: 1+2; (0,1) sign -: only D1's -2; (1,0) +: only D1's 3; (1,1) -: D2's -1
    expected = torch.tensor([[3.0, -2.0], [3.0, -1.0]])
    assert torch.equal(blend_modes.merged_delta(terms(D1, D2), "ties"), expected)
    assert torch.equal(blend_modes.merged_delta(terms(D1, -D1), "ties"), torch.zeros(2, 2))  # exact cancel: nothing


def test_split_fuses_ties_with_each_sides_kept_entries_at_its_whole_strength():
    # the election as above: D1 keeps [[1, -2], [3, 0]] (norm^2 14 of 14.25), D2 [[2, 0], [0, -1]] (5 of 7), and each
    # kept part is scaled back to its delta's whole norm
    kept_1, kept_2 = torch.tensor([[1.0, -2.0], [3.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    expected = kept_1 * (14.25 / 14) ** 0.5 + kept_2 * (7 / 5) ** 0.5
    assert torch.allclose(blend_modes.merged_delta(terms(D1, D2), "split"), expected, atol=1e-6)
    assert torch.equal(blend_modes.merged_delta(terms(D1, -D1), "split"), torch.zeros(2, 2))  # exact cancel: nothing
    assert torch.equal(blend_modes.merged_delta(terms(D1, 2 * D1), "split"), 3 * D1)  # agreeing: the plain sum


def test_split_scales_a_nearly_cancelled_delta_back_by_at_most_the_cap():
    # sum [[0.5, -1], [2, 1]]: D1 agrees everywhere (kept whole); D3 keeps only its 0.5 (norm 0.5 of sqrt 2.5, a ratio
    # of 3.16), which the cap holds to twice its size instead of a spike of 1.58
    d3 = torch.tensor([[-0.5, 1.0], [-1.0, 0.5]])
    assert blend_modes.RESCALE_CAP == 2.0
    expected = D1 + torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(blend_modes.merged_delta(terms(D1, d3), "split"), expected, atol=1e-6)


@pytest.mark.parametrize("mode", blend_modes.MODES)
def test_one_term_is_the_same_in_every_mode(mode):
    up, down = torch.randn(5, 3), torch.randn(3, 7)
    assert torch.equal(blend_modes.merged_delta([(up, down)], mode), up @ down)


@pytest.mark.parametrize("mode", sorted(blend_modes.STATIC_MODES))
def test_factors_for_a_file_reproduce_the_mode(mode):
    generator = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)) for _ in range(2)]
    up, down, exact = blend_modes.merged_factors(pairs, mode)
    assert exact and torch.allclose(up @ down, blend_modes.merged_delta(pairs, mode), atol=1e-5)


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(blend_modes.BlendModeError, match="sum, ties"):
        blend_modes.check_mode("average")
    with pytest.raises(ValueError, match="Unknown blend mode"):
        GenerateRequest("x", blend_mode="nope")


# ----------------------------------------------------------------------------- on a tiny pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    root = tmp_path_factory.mktemp("modes")
    adapters = root / "adapters"
    return {"root": root, "base": tiny_sd_base, "adapters": adapters,
            "a": make_adapter(adapters / "stripes.safetensors", 1, trigger="stripes"),
            "b": make_adapter(adapters / "pastel.safetensors", 2, trigger="pastel")}


def _specs(world):
    return [AdapterSpec(world["a"], 0.9, 0.6), AdapterSpec(world["b"], 1.1, -0.4)]


def _reference_sum(stack, specs):
    """The plain weighted sum exactly as the stack computed it before blend modes (one matmul, ranks concatenated)."""
    layers = {}
    for spec in specs:
        for key, f in stack.load(spec.path).modules.items():
            layers.setdefault(key, []).append((spec.weight_for(key[0]) * f.scale * f.up, f.down))
    return {key: torch.cat([u for u, _ in t], dim=1) @ torch.cat([d for _, d in t], dim=0) for key, t in layers.items()}


def test_sum_mode_is_bit_identical_to_the_plain_weighted_sum(world):
    pipe = load_tiny_base(world["base"])
    stack = AdapterStack.for_pipe(pipe)
    originals = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    stack.apply(_specs(world), "sum")
    assert stack.mode == "sum"
    for (component, path), delta in _reference_sum(stack, _specs(world)).items():
        weight = stack._layer_weight((component, path))
        original = stack._backups[(component, path)]
        assert torch.equal(weight, (original.float() + delta.reshape(original.shape)).to(weight.dtype)), path
    def image(loras, mode=None):
        return pixels(generate(pipe, stack, GenerateRequest("a red circle", steps=2, seed=3, loras=tuple(loras),
                                                            blend_mode=mode))[0])

    # Two adapters: the default mode (split) is not the sum; one adapter: the default is the sum, bit for bit.
    assert GenerateRequest("a red circle").blend_mode == blend_modes.DEFAULT_MODE == "split"
    assert not (image(_specs(world)) == image(_specs(world), "sum")).all()
    assert (image(_specs(world)[:1]) == image(_specs(world)[:1], "sum")).all()
    stack.clear()
    assert all(torch.equal(p, originals[name]) for name, p in pipe.unet.named_parameters())


@pytest.mark.parametrize("mode", sorted(blend_modes.STATIC_MODES - {"sum"}))  # split: test_blend_split.py
def test_mode_changes_a_blend_but_not_a_single_adapter(world, mode):
    pipe = load_tiny_base(world["base"])
    stack = AdapterStack.for_pipe(pipe)
    stack.apply(_specs(world)[:1], "sum")
    single = model_outputs(pipe)
    stack.apply(_specs(world)[:1], mode)
    assert all(torch.equal(single[k], v) for k, v in model_outputs(pipe).items())
    stack.apply(_specs(world), "sum")
    summed = model_outputs(pipe)
    stack.apply(_specs(world), mode)
    assert stack.mode == mode and not torch.equal(summed["unet"], model_outputs(pipe)["unet"])


@pytest.mark.parametrize("mode", sorted(blend_modes.STATIC_MODES - {"sum"}))
def test_saved_blend_gives_the_live_blend_here_and_in_diffusers(world, tmp_path, mode):
    live = load_tiny_base(world["base"])
    live_stack = AdapterStack.for_pipe(live)
    live_stack.apply(_specs(world), mode)
    report = blend(_specs(world), tmp_path / f"{mode}.safetensors", blend_mode=mode, exact=True)
    assert report.blend_mode == mode
    from safetensors import safe_open

    from stylelora.lora.inspect import BLEND_METADATA_KEY

    with safe_open(str(report.path), "pt") as handle:
        assert json.loads(handle.metadata()[BLEND_METADATA_KEY])["blend_mode"] == mode
    from_file = load_tiny_base(world["base"])
    file_stack = AdapterStack.for_pipe(from_file)
    file_stack.apply([AdapterSpec(report.path, 1.0)])
    expected, ours = model_outputs(live), model_outputs(from_file)
    for key in ("unet", "te"):
        assert (ours[key] - expected[key]).abs().max() <= 1e-4, key
    live_image = generate(live, live_stack, GenerateRequest("a red circle", steps=3, seed=5, sampler="ddim",
                                                            loras=tuple(_specs(world)), blend_mode=mode))[0]
    file_image = generate(from_file, file_stack, GenerateRequest("a red circle", steps=3, seed=5, sampler="ddim",
                                                                 loras=(AdapterSpec(report.path, 1.0),)))[0]
    assert abs(pixels(live_image).astype(int) - pixels(file_image).astype(int)).max() <= 1
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(report.path), adapter_name="mix")  # a plain kohya LoRA: no stylelora code
    assert (model_outputs(theirs)["unet"] - expected["unet"]).abs().max() <= 1e-4


def test_a_ties_file_keeps_the_size_of_a_sum_unless_exact(world, tmp_path):
    """A ties merge is not low rank: kept whole its file grew toward the layers' full size (7x the inputs on the toy
    base, gigabytes on SD 1.5). By default it is stored at the inputs' total rank, the sum's size, with the error
    reported; --exact keeps every rank."""
    total = blend(_specs(world), tmp_path / "sum.safetensors")
    compact = blend(_specs(world), tmp_path / "ties.safetensors", blend_mode="ties")
    whole = blend(_specs(world), tmp_path / "ties-exact.safetensors", blend_mode="ties", exact=True)
    assert compact.module_ranks == total.module_ranks  # rank 4 + 4 in every module
    assert compact.mode == "svd" and 0 < compact.max_error < 1 and "at the inputs' total rank" in compact.summary()
    assert "the exact mode, --exact, keeps every rank" in compact.summary()  # the app's mode and the CLI's flag
    assert whole.mode == "exact" and whole.max_error == 0 and max(whole.module_ranks.values()) > 8
    size = {report.mode: report.path.stat().st_size for report in (compact, whole)}
    assert abs(size["svd"] - total.path.stat().st_size) < 1000 < size["exact"] - size["svd"]  # metadata differs


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("mode", [m for m in blend_modes.MODES if m != "sum"])
def test_cli_generate_and_grid_with_a_mode(world, tmp_path, capsys, mode):
    from stylelora.generate.pngmeta import read_png_parameters

    common = ["--base", str(world["base"]), "--device", "cpu", "--adapters-dir", str(world["adapters"]),
              "--steps", "2", "--seed", "4", "--sampler", "ddim"]
    code, out, _ = _run(["generate", "a cat <lora:pastel:1.1:-0.4>", "--lora", f"{world['a']}:0.9:0.6",
                         "--blend-mode", mode, "--out", str(tmp_path / f"{mode}.png"), *common], capsys)
    assert code == 0 and out == [str(tmp_path / f"{mode}.png")]
    text = read_png_parameters(out[0])
    assert f"Blend mode: {mode}" in text
    assert request_from_parameters(text, world["adapters"]).blend_mode == mode  # the PNG reproduces the mode
    code, out, _ = _run(["grid", "a cat", "--lora", str(world["a"]), "--lora", str(world["b"]), "--x",
                         "weight=0.5,1", "--blend-mode", mode, "--out", str(tmp_path / "grid.png"), *common], capsys)
    assert code == 0 and out == [str(tmp_path / "grid.png")]


def test_cli_blend_with_a_mode(world, tmp_path, capsys):
    code, out, _ = _run(["blend", f"{world['a']}:0.9:0.6", f"{world['b']}:1.1:-0.4", "--blend-mode", "ties",
                         "--out", str(tmp_path / "mix.safetensors"), "--json"], capsys)
    assert code == 0 and json.loads(out[0])["blend_mode"] == "ties"
    code, out, err = _run(["blend", str(world["a"]), "--blend-mode", "mean", "--out",
                           str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and out == [] and "Unknown blend mode 'mean'" in err


def test_app_passes_the_mode_to_generation_and_to_the_saved_blend(world, tmp_path):
    from stylelora.app.service import AdapterWeight, AppService, GenerateSettings
    from stylelora.app.ui import DEFAULT_SAMPLER, MAX_ADAPTER_ROWS, GenerateInputs

    service = AppService(world["adapters"], datasets_dir=tmp_path)
    mix = (AdapterWeight("stripes", 0.9, 0.6), AdapterWeight("pastel", 1.1, -0.4))
    assert service.request(GenerateSettings("a cat", adapters=mix, blend_mode="ties")).blend_mode == "ties"
    assert service.request(GenerateSettings("a cat", adapters=mix)).blend_mode == blend_modes.DEFAULT_MODE
    widgets = ["toy", [], *[1.0] * (2 * MAX_ADAPTER_ROWS), "a cat", "", 20, 5.0, DEFAULT_SAMPLER, -1, "native", 1]
    assert GenerateInputs.settings(widgets + ["ties"]).blend_mode == "ties"
    assert GenerateInputs.settings(widgets).blend_mode is None  # an API client that does not send it
    result = service.blend(mix, "mix-ties", blend_mode="ties")
    assert "blend mode ties" in result.summary
    expected = blend(_specs(world), tmp_path / "cli.safetensors", blend_mode="ties")
    from safetensors.torch import load_file

    ours, theirs = load_file(str(result.path)), load_file(str(expected.path))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert "exact" in service.blend(mix, "mix-ties-exact", blend_mode="ties", exact=True).summary
