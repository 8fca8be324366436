"""LyCORIS files (LoHa, LoKr, LoCon with a Tucker core) load as A1111 applies them: each module's change, computed
here the way A1111's network_hada / network_lokr / network_lora do, is what the stack fuses into the layer, what
`inspect` reports and what `blend` writes as a plain kohya LoRA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter
from safetensors.torch import load_file, save_file

from stylelora.generate.stack import AdapterStack
from stylelora.lora import lycoris
from stylelora.lora.spec import AdapterSpec


def a1111_change(parts: dict, shape: tuple[int, ...]) -> torch.Tensor:
    """The weight change A1111 computes for one LyCORIS module (its formulas, written out independently)."""
    def pair(a, b, core):
        if core is not None:  # lyco_helpers.make_weight_cp: einsum("i j k l, j r, i p -> p r k l")
            return torch.einsum("ijkl,jr,ip->prkl", core, b, a)
        return a @ b.flatten(1)

    def scale(rank):
        if "scale" in parts:
            return float(parts["scale"])
        return float(parts["alpha"]) / rank if rank is not None and "alpha" in parts else 1.0

    if "hada_w1_a" in parts:
        change = pair(parts["hada_w1_a"], parts["hada_w1_b"], parts.get("hada_t1")).reshape(shape) * pair(
            parts["hada_w2_a"], parts["hada_w2_b"], parts.get("hada_t2")).reshape(shape)
        return change * scale(parts["hada_w1_b"].shape[0])
    if "lora_mid.weight" in parts:  # lyco_helpers.rebuild_cp_decomposition
        up, down = parts["lora_up.weight"].flatten(1), parts["lora_down.weight"].flatten(1)
        change = torch.einsum("nmkl,in,mj->ijkl", parts["lora_mid.weight"], up, down)
        return change.reshape(shape) * scale(down.shape[0])
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts.get("lokr_w2")
    if w2 is None:
        w2 = pair(parts["lokr_w2_a"], parts["lokr_w2_b"], parts.get("lokr_t2"))
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    rank = next((parts[key].shape[0] for key in ("lokr_w2_b", "lokr_w1_b") if key in parts), None)
    return torch.kron(w1, w2.contiguous()).reshape(shape) * scale(rank)


def randn(*shape):
    return torch.randn(*shape) * 0.3


def loha(out, inp, kernel=(), rank=2, alpha=1.5, tucker=False):
    if tucker:
        return {"hada_w1_a": randn(rank, out), "hada_w1_b": randn(rank, inp), "hada_t1": randn(rank, rank, *kernel),
                "hada_w2_a": randn(rank, out), "hada_w2_b": randn(rank, inp), "hada_t2": randn(rank, rank, *kernel),
                "alpha": torch.tensor(alpha)}
    flat = inp * (kernel[0] * kernel[1] if kernel else 1)
    return {"hada_w1_a": randn(out, rank), "hada_w1_b": randn(rank, flat), "hada_w2_a": randn(out, rank),
            "hada_w2_b": randn(rank, flat), "alpha": torch.tensor(alpha)}


def lokr(out, inp, kernel=(), rank=2, alpha=3.0, how="w1 full, w2 low rank"):
    a, c = 2, 2  # LyCORIS factors each side in two; the small factor is W1
    b, d = out // a, inp // c
    w2_full = randn(b, d, *kernel) if kernel else randn(b, d)
    flat = d * (kernel[0] * kernel[1] if kernel else 1)
    parts = {"alpha": torch.tensor(alpha)}
    parts.update({"lokr_w1": randn(a, c)} if how != "w1 low rank" else {"lokr_w1_a": randn(a, 1), "lokr_w1_b": randn(1, c)})
    if how == "both full" or how == "w1 low rank":
        parts["lokr_w2"] = w2_full
    elif how == "tucker":
        parts.update(lokr_w2_a=randn(rank, b), lokr_w2_b=randn(rank, d), lokr_t2=randn(rank, rank, *kernel))
    else:
        parts.update(lokr_w2_a=randn(b, rank), lokr_w2_b=randn(rank, flat))
    return parts


def locon_tucker(out, inp, kernel, rank=3, alpha=2.0):
    return {"lora_down.weight": randn(rank, inp, 1, 1), "lora_mid.weight": randn(rank, rank, *kernel),
            "lora_up.weight": randn(out, rank, 1, 1), "alpha": torch.tensor(alpha)}


MODULES = {  # name: (parts maker, layer weight shape)
    "LoHa linear": (lambda: loha(6, 5), (6, 5)),
    "LoHa, ranks 2 and 3": (lambda: {**loha(6, 5), "hada_w2_a": randn(6, 3), "hada_w2_b": randn(3, 5)}, (6, 5)),
    "LoHa 3x3 conv, stored flat": (lambda: loha(4, 3, (3, 3)), (4, 3, 3, 3)),
    "LoHa 3x3 conv, Tucker": (lambda: loha(4, 3, (3, 3), tucker=True), (4, 3, 3, 3)),
    "LoHa of dim 3 on a 6x5 layer (rank 9 held at 5)": (lambda: loha(6, 5, rank=3), (6, 5)),
    "LoHa with a scale tensor": (lambda: {**loha(6, 5), "scale": torch.tensor(0.25)}, (6, 5)),
    "LoHa without alpha": (lambda: {k: v for k, v in loha(6, 5).items() if k != "alpha"}, (6, 5)),
    "LoKr, W1 full, W2 low rank": (lambda: lokr(8, 10), (8, 10)),
    "LoKr, both full (scale 1)": (lambda: lokr(8, 10, how="both full"), (8, 10)),
    "LoKr, W1 low rank, W2 full": (lambda: lokr(8, 10, how="w1 low rank"), (8, 10)),
    "LoKr 3x3 conv, W2 full": (lambda: lokr(6, 4, (3, 3), how="both full"), (6, 4, 3, 3)),
    "LoKr 3x3 conv, W2 low rank, stored flat": (lambda: lokr(6, 4, (3, 3)), (6, 4, 3, 3)),
    "LoKr 3x3 conv, Tucker": (lambda: lokr(6, 4, (3, 3), how="tucker"), (6, 4, 3, 3)),
    "LoCon 3x3 conv, Tucker": (lambda: locon_tucker(5, 4, (3, 3)), (5, 4, 3, 3)),
}


def plain_change(state: dict, name: str, shape) -> torch.Tensor:
    up, down = state[f"{name}.lora_up.weight"].float(), state[f"{name}.lora_down.weight"].float()
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * (float(state[f"{name}.alpha"]) / down.shape[0])


@pytest.mark.parametrize("case", list(MODULES))
def test_each_lycoris_module_becomes_the_plain_lora_of_the_change_a1111_applies(case):
    torch.manual_seed(0)
    make, shape = MODULES[case]
    parts = make()
    name = "lora_unet_layer"
    plain = lycoris.as_plain_lora({f"{name}.{suffix}": tensor for suffix, tensor in parts.items()})
    assert sorted(plain) == [f"{name}.alpha", f"{name}.lora_down.weight", f"{name}.lora_up.weight"]
    assert torch.allclose(plain_change(plain, name, shape), a1111_change(parts, shape), atol=1e-5, rtol=1e-4)
    flat = plain[f"{name}.lora_down.weight"].flatten(1)
    assert flat.shape[0] <= min(shape[0], flat.shape[1])  # never above the layer's full rank
    if "Tucker" in case or case == "LoKr 3x3 conv, W2 full":  # the kernel is in the file: down is a kohya conv down
        assert plain[f"{name}.lora_down.weight"].shape[2:] == (3, 3)


def test_plain_keys_and_other_kinds_pass_through_and_a_half_precision_module_is_rewritten_in_float32():
    state = {"lora_te_a.lora_down.weight": torch.ones(2, 3), "lora_te_a.lora_up.weight": torch.ones(4, 2),
             "lora_te_a.alpha": torch.tensor(2.0), "lora_unet_b.dora_scale": torch.ones(1, 3),
             **{f"lora_unet_c.{k}": v.half() if v.dim() else v for k, v in loha(6, 5).items()}}
    plain = lycoris.as_plain_lora(state)
    assert all(torch.equal(plain[key], state[key]) for key in ("lora_te_a.lora_down.weight", "lora_unet_b.dora_scale"))
    assert plain["lora_unet_c.lora_up.weight"].dtype == torch.float32
    half = {k: v.float() for k, v in state.items() if k.startswith("lora_unet_c.")}  # the fp16 factors, exactly
    exact = lycoris.as_plain_lora(half)
    for suffix in ("lora_up.weight", "lora_down.weight"):  # no rounding beyond the file's own
        assert torch.equal(plain[f"lora_unet_c.{suffix}"], exact[f"lora_unet_c.{suffix}"])
    assert lycoris.kinds_in(state) == {"LoHa": 1}


def test_an_incomplete_lokr_module_names_what_it_lacks():
    with pytest.raises(ValueError, match="lacks its w2 factor"):
        lycoris.as_plain_lora({"lora_unet_x.lokr_w1": torch.ones(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)})


def lycoris_file(path: Path, like: Path) -> tuple[Path, dict]:
    """A LyCORIS file on every module the plain kohya file `like` adapts, kinds taken in turn (LoHa, LoKr, LoHa
    Tucker and LoCon Tucker on kh x kw convolutions), with {module: the change A1111 applies, at the layer's shape}."""
    torch.manual_seed(3)
    plain = load_file(str(like))
    state, changes = {}, {}
    for index, name in enumerate(sorted({key.partition(".")[0] for key in plain})):
        up, down = plain[f"{name}.lora_up.weight"], plain[f"{name}.lora_down.weight"]
        kernel = tuple(down.shape[2:]) if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else ()
        shape = (up.shape[0], down.shape[1], *kernel)
        halves = shape[0] % 2 == 0 and shape[1] % 2 == 0  # LoKr's kron needs each side in two here
        if kernel:
            parts = [loha(*shape[:2], kernel, tucker=True), loha(*shape[:2], kernel),
                     lokr(*shape[:2], kernel) if halves else loha(*shape[:2], kernel),
                     locon_tucker(*shape[:2], kernel)][index % 4]
        else:
            parts = [loha(*shape), lokr(*shape) if halves else loha(*shape),
                     lokr(*shape, how="both full") if halves else loha(*shape)][index % 3]
        parts = {k: v * 0.3 if k.startswith(("hada_w1_a", "lokr_w1", "lora_up")) else v for k, v in parts.items()}
        state.update({f"{name}.{suffix}": tensor for suffix, tensor in parts.items()})
        changes[name] = a1111_change(parts, shape).reshape(up.shape[0], *down.shape[1:])  # the layer's shape
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path, changes


@pytest.fixture(scope="module")
def lyco(tmp_path_factory, tiny_sd_base):
    root = tmp_path_factory.mktemp("lycoris")
    like = make_adapter(root / "plain.safetensors", 5, preset="locon", conv_rank=2, conv_alpha=1.0)
    path, changes = lycoris_file(root / "loha.safetensors", like)
    return path, changes, tiny_sd_base


def test_the_stack_fuses_what_a1111_applies_on_unet_and_text_encoder(lyco):
    from stylelora.lora.components import component_names, pipeline_models

    path, changes, base = lyco
    pipe = load_tiny_base(base)
    models = pipeline_models(pipe)
    names = {component: component_names(models, component) for component in ("unet", "text_encoder")}
    before = {name: names[c].layers[names[c].by_name[name]].weight.detach().clone()
              for name in changes for c in names if name in names[c].by_name}
    assert len(before) == len(changes) and any(w.dim() == 4 and w.shape[2:] == (3, 3) for w in before.values())
    AdapterStack.for_pipe(pipe).apply([AdapterSpec(path, 0.8, 0.5)], "sum")
    for name, change in changes.items():
        component = "unet" if name.startswith("lora_unet_") else "text_encoder"
        weight = names[component].layers[names[component].by_name[name]].weight
        want = before[name] + (0.8 if component == "unet" else 0.5) * change
        assert torch.allclose(weight, want, atol=1e-5, rtol=1e-4), name


def test_inspect_names_the_lycoris_kinds(lyco):
    from stylelora.lora.inspect import format_inspect, inspect_adapter

    path, changes, _ = lyco
    info = inspect_adapter(path)
    assert set(info["lycoris"]) == {"LoHa", "LoKr", "LoCon (Tucker)"} and sum(info["lycoris"].values()) == len(changes)
    assert "LyCORIS" in format_inspect(info) and "read as plain LoRA" in format_inspect(info)


def test_blend_writes_a_plain_kohya_lora_that_diffusers_loads_to_the_same_model(lyco, tmp_path):
    from gen_fixtures import model_outputs, tiny_pipeline

    from stylelora.lora.blend import blend

    path, changes, base = lyco
    pipe = load_tiny_base(base)
    out = tmp_path / "plain.safetensors"
    blend([AdapterSpec(path, 1.0)], out, exact=True, unet_config=dict(pipe.unet.config))
    state = load_file(str(out))
    assert {key.partition(".")[2] for key in state} == {"lora_down.weight", "lora_up.weight", "alpha"}
    for name, change in changes.items():
        down = state[f"{name}.lora_down.weight"]
        assert down.shape[1:] == change.shape[1:], name  # kohya's conv shapes, (r, in, kh, kw), where the layer is one
        assert torch.allclose(plain_change(state, name, change.shape), change, atol=1e-5, rtol=1e-4), name
    AdapterStack.for_pipe(pipe).apply([AdapterSpec(path, 1.0)], "sum")
    reference = tiny_pipeline()
    reference.load_lora_weights(str(out))
    ours, theirs = model_outputs(pipe), model_outputs(reference)
    assert (ours["unet"] - theirs["unet"]).abs().max() <= 1e-4
    assert (ours["te"] - theirs["te"]).abs().max() <= 1e-4


def test_a_plain_module_with_a_scale_reads_as_alpha_scale_times_rank_and_a_scale_beside_other_tensors_stays():
    down, up = torch.ones(4, 3), torch.ones(5, 4)
    state = {"lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": up,
             "lora_unet_a.alpha": torch.tensor(4.0), "lora_unet_a.scale": torch.tensor(0.25),  # .scale wins, as A1111
             "lora_te_b.lora_down.weight": down, "lora_te_b.lora_up.weight": up, "lora_te_b.scale": torch.tensor([2.0]),
             "lora_unet_c.diff": torch.ones(5, 3), "lora_unet_c.scale": torch.tensor(1.0)}
    assert lycoris.needs_rewrite(state)
    plain = lycoris.as_plain_lora(state)
    assert float(plain["lora_unet_a.alpha"]) == 1.0 and "lora_unet_a.scale" not in plain
    assert float(plain["lora_te_b.alpha"]) == 8.0 and "lora_te_b.scale" not in plain
    assert torch.equal(plain["lora_unet_a.lora_up.weight"], up)
    assert set(plain) >= {"lora_unet_c.diff", "lora_unet_c.scale"}  # not LoRA: left for the loaders to refuse
    assert not lycoris.needs_rewrite({"lora_unet_a.lora_down.weight": down, "lora_unet_a.alpha": torch.tensor(1.0)})
