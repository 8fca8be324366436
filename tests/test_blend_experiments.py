"""benchmarks/blend_experiments.py's window merge (split only at late timesteps): a window over every step is split
itself, a window over none is one attention core per module, and that core with a silent partner is the adapter;
the eps merge (one UNet pass per adapter) with a silent partner is the adapter too; the uncond merge (split on
the prompt's rows only) and the other merge rules of split, checked by hand; the UNet gain in named layers; split
on the prompt as typed; split with the layers outside cross-attention summed, fused by timestep, or fused by
RegMean (checked by hand); each adapter's push outside cross-attention damped where the other acts more (the
region merge, by hand)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy
import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, make_silent_adapter
from train_fixtures import load_benchmark

from stylelora.generate.split_attention import SplitCrossAttention, cross_attention_modules
from stylelora.generate.stack import AdapterStack
from stylelora.lora.spec import AdapterSpec

TEXTS = ["stripes, pastel, a red circle"]


@pytest.fixture
def bench(tiny_sd_base, tmp_path):
    """What the experiments use of blend_experiments.Bench, on the tiny base: its pipeline, stack and spec(name)."""
    files = {"a": make_adapter(tmp_path / "a.safetensors", 1, trigger="stripes"),
             "b": make_adapter(tmp_path / "b.safetensors", 2, trigger="pastel")}
    files["silent"] = make_silent_adapter(tmp_path / "silent.safetensors", like=files["a"])
    pipe = load_tiny_base(tiny_sd_base)
    return SimpleNamespace(pipe=pipe, stack=AdapterStack.for_pipe(pipe),
                           spec=lambda name: AdapterSpec(files[name], 1.0))


def _image(pipe, embeds=None) -> numpy.ndarray:
    """The prompt drawn by whatever is applied now (embeds(texts): the experiment's own text encodings)."""
    prompt = {"prompt": TEXTS} if embeds is None else dict(zip(("prompt_embeds", "negative_prompt_embeds"),
                                                               embeds(TEXTS)))
    return pipe(**prompt, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(5)).images[0]


def _alone(bench, name: str) -> numpy.ndarray:
    bench.stack.apply([bench.spec(name)])
    try:
        return _image(bench.pipe)
    finally:
        bench.stack.clear()


def test_window_splits_only_the_steps_inside_it(bench):
    experiments = load_benchmark("blend_experiments")

    def windowed(a: str, b: str, window: float) -> numpy.ndarray:
        hook = experiments.windowed_split(bench, a, b, window)
        try:
            return _image(bench.pipe)
        finally:
            hook.remove()
            bench.stack.clear()

    bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
    split = _image(bench.pipe)
    bench.stack.clear()
    assert numpy.array_equal(windowed("a", "b", 1.0), split)  # every timestep is below 1000: split throughout
    one_core = windowed("a", "b", 0.0)
    assert abs(one_core - split).max() * 255 > 3  # no step split: a different blend
    assert not any(isinstance(p, SplitCrossAttention) for p in bench.pipe.unet.attn_processors.values())  # taken out
    assert abs(windowed("a", "silent", 0.0) - _alone(bench, "a")).max() * 255 <= 1  # merged reading, LoRA sum: a's


def test_eps_composition_with_a_silent_partner_is_the_adapter_alone(bench):
    experiments = load_benchmark("blend_experiments")

    def composed(a: str, b: str) -> numpy.ndarray:
        embeds, undo = experiments.eps_composition(bench, a, b, "sum")
        try:
            return _image(bench.pipe, embeds)
        finally:
            undo()

    alone = _alone(bench, "a")
    assert abs(composed("a", "silent") - alone).max() * 255 <= 1
    assert abs(composed("a", "b") - alone).max() * 255 > 3  # b's own pass changes the image
    assert "forward" not in vars(bench.pipe.unet)


def test_uncond_split_runs_one_core_on_the_negative_rows_only(bench):
    experiments = load_benchmark("blend_experiments")

    def uncond(a: str, b: str) -> numpy.ndarray:
        experiments.uncond_split(bench, a, b)
        try:
            return _image(bench.pipe)
        finally:
            bench.stack.clear()

    bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
    split = _image(bench.pipe)
    bench.stack.clear()
    assert abs(uncond("a", "b") - split).max() * 255 > 3  # the negative rows are no longer split
    assert abs(uncond("a", "silent") - _alone(bench, "a")).max() * 255 <= 1
    assert not any(isinstance(p, SplitCrossAttention) for p in bench.pipe.unet.attn_processors.values())


@pytest.mark.parametrize("rule, expected", [
    ("gamma0", [2.0, -3.0, -1.0]),  # split's merge: the largest push each way
    ("gamma1", [3.0, -4.0, -1.0]),  # the sum of the changes
    ("gamma0.5", [2.5, -3.5, -1.0]),
    ("maxabs", [2.0, -3.0, -2.0]),  # the larger change, whatever its sign
    ("mean0", [2.0, -3.0, -1.0]),  # split
    ("mean1", [1.5, -2.0, -1.0]),  # the same way: their mean; opposite ways: each whole
    ("mean0.5", [1.75, -2.5, -1.0]),
    ("opp1", [2.0, -3.0, -1.0]),  # split
    ("opp0.5", [2.0, -3.0, -1.5]),  # opposite ways: the larger whole, half the smaller
    ("opp0", [2.0, -3.0, -2.0]),  # maxabs
])
def test_merge_rules_by_hand(rule, expected):
    merge = load_benchmark("blend_experiments").merge_rule(rule)
    base = torch.tensor([1.0, 1.0, 1.0])
    outputs = [base + torch.tensor([2.0, -1.0, 1.0]), base + torch.tensor([1.0, -3.0, -2.0])]
    assert torch.equal(merge(base, outputs), base + torch.tensor(expected))
    assert torch.equal(merge(base, outputs[:1]), outputs[0])


def test_salience_damps_the_change_of_the_adapter_that_owns_less_of_the_pixel():
    """Two pixels of one channel (batch 1). a changes both pixels by 1 (mean 1: salience 1, 1); b changes the
    first by 3 and the second by 1 (mean 2: salience 1.5, 0.5). Pixel 1 is b's: a is damped by (1 / 1.5) ** G;
    pixel 2 is a's: b by (0.5 / 1) ** G. Then split's merge: same sign, the larger push."""
    merge = load_benchmark("blend_experiments").merge_rule
    base = torch.zeros(1, 2, 1)
    a, b = torch.tensor([1.0, 1.0]).view(1, 2, 1), torch.tensor([3.0, 1.0]).view(1, 2, 1)
    assert torch.equal(merge("sal0")(base, [a, b]), torch.tensor([3.0, 1.0]).view(1, 2, 1))  # split
    a_opposed = -a  # opposite ways: each damped change summed
    assert torch.allclose(merge("sal1")(base, [a_opposed, b]).flatten(), torch.tensor([3.0 - 1 / 1.5, -1.0 + 0.5]))
    assert torch.allclose(merge("sal2")(base, [a_opposed, b]).flatten(), torch.tensor([3.0 - 1 / 2.25, -1.0 + 0.25]))


def test_vector_merges_by_hand():
    """Two heads of two channels: in the first head b's change is longer, in the second a's."""
    merge = load_benchmark("blend_experiments").merge_rule
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])
    assert torch.equal(merge("vmax2")(base, [a, b]), torch.tensor([0.0, 2.0, 3.0, 0.0]))  # the longer, whole
    # the longer whole plus the other's part orthogonal to it: head 1 (1, 0) is orthogonal to (0, 2), kept whole;
    # head 2 keeps (0, 1) of b's (1, 1) beside a's (3, 0)
    assert torch.equal(merge("vorth2")(base, [a, b]), torch.tensor([1.0, 2.0, 3.0, 1.0]))
    assert torch.equal(merge("vorth1")(base, [a, b]), a + b - (a @ b) / (a @ a) * a)  # one head: a is longer


def test_rescaled_ties_gives_each_side_its_norm_back():
    experiments = load_benchmark("blend_experiments")
    a = SimpleNamespace(up=torch.tensor([[1.0], [1.0]]), down=torch.tensor([[3.0, 4.0]]), scale=1.0)  # [[3, 4], [3, 4]]
    b = SimpleNamespace(up=torch.tensor([[1.0], [0.0]]), down=torch.tensor([[-4.0, 0.0]]), scale=1.0)  # [[-4, 0], [0, 0]]
    merged = experiments._rescaled_ties([("a", 1.0, a), ("b", 1.0, b)], "cpu")
    # the election: b wins the first entry (-1), a the rest; a keeps [., 4, 3, 4] (norm sqrt 41 of sqrt 50), b all of
    # its own
    kept_a = torch.tensor([[0.0, 4.0], [3.0, 4.0]]) * (50 ** 0.5 / 41 ** 0.5)
    assert torch.allclose(merged, kept_a + torch.tensor([[-4.0, 0.0], [0.0, 0.0]]))


def test_split_with_rule_gamma0_is_split_and_is_undone(bench):
    experiments = load_benchmark("blend_experiments")
    from stylelora.generate import split_attention

    def drawn(rule: str | None) -> numpy.ndarray:
        bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
        try:
            if rule is None:
                return _image(bench.pipe)
            with experiments.split_with_rule(rule):
                return _image(bench.pipe)
        finally:
            bench.stack.clear()

    original = split_attention.merge
    split = drawn(None)
    assert numpy.array_equal(drawn("gamma0"), split)
    assert abs(drawn("gamma1") - split).max() * 255 > 1  # the changes summed: another blend
    assert split_attention.merge is original


def test_modules_split_splits_only_the_matching_modules(bench):
    experiments = load_benchmark("blend_experiments")

    def only(pattern: str) -> tuple[numpy.ndarray, list[str]]:
        experiments.modules_split(bench, "a", "b", pattern)
        try:
            split = [name for name, p in bench.pipe.unet.attn_processors.items() if type(p) is SplitCrossAttention]
            return _image(bench.pipe), split
        finally:
            bench.stack.clear()

    bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
    split = _image(bench.pipe)
    bench.stack.clear()
    everywhere, split_everywhere = only("down_blocks,mid_block,up_blocks")
    assert numpy.array_equal(everywhere, split) and len(split_everywhere) > 1  # every module: split itself
    up, split_up = only("up_blocks")
    assert split_up and all(name.startswith("up_blocks") for name in split_up) and len(split_up) < len(split_everywhere)
    assert abs(up - split).max() * 255 > 1
    nowhere, split_nowhere = only("no module is called this")
    assert not split_nowhere and abs(nowhere - split).max() * 255 > 3
    assert not any(isinstance(p, SplitCrossAttention) for p in bench.pipe.unet.attn_processors.values())


def test_unet_gain_is_the_unet_weight_in_the_layers_named(bench):
    experiments = load_benchmark("blend_experiments")

    def drawn(unet_weight: float, gain: tuple[str, float] | None = None, names=("a", "b")) -> numpy.ndarray:
        specs = [AdapterSpec(bench.spec(name).path, unet_weight, 1.0) for name in names]
        try:
            if gain is None:
                bench.stack.apply(specs, "split")
                return _image(bench.pipe)
            with experiments.unet_gain(bench, *gain):
                bench.stack.apply(specs, "split")
                return _image(bench.pipe)
        finally:
            bench.stack.clear()

    split, boosted = drawn(1.0), drawn(1.5)
    assert numpy.array_equal(drawn(1.0, ("cross,other", 1.5)), boosted)  # every UNet layer: the UNet weight
    assert numpy.array_equal(drawn(1.0, ("cross,other", 1.0)), split)
    cross, other = drawn(1.0, ("cross", 1.5)), drawn(1.0, ("other", 1.5))
    for part in (cross, other):
        assert abs(part - split).max() * 255 > 1 and abs(part - boosted).max() * 255 > 1
    assert numpy.array_equal(drawn(1.0, ("other", 1.5), names=("a",)), drawn(1.0, names=("a",)))  # one adapter: as is
    assert "_plan" not in vars(bench.stack)  # undone
    with pytest.raises(SystemExit, match="cross, other"):
        with experiments.unet_gain(bench, "attn", 1.5):
            pass


def test_typed_order_turns_the_trigger_move_off_and_back_on(bench):
    experiments = load_benchmark("blend_experiments")

    def drawn(typed: bool) -> numpy.ndarray:
        try:
            if not typed:
                bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
                return _image(bench.pipe)
            with experiments.typed_order(bench):
                bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
                return _image(bench.pipe)
        finally:
            bench.stack.clear()

    split = drawn(False)
    assert abs(drawn(True) - split).max() * 255 > 1  # "stripes, pastel, …": adapter a reads its trigger moved
    assert numpy.array_equal(drawn(False), split) and "_trigger_reorders" not in vars(bench.stack)


def test_other_layers_summed_fuses_split_as_it_was_and_is_undone(bench):
    experiments = load_benchmark("blend_experiments")
    from stylelora.generate import stack as stack_module

    def unet_weights() -> dict:
        return {name: p.detach().clone() for name, p in bench.pipe.unet.named_parameters()}

    specs = [bench.spec("a"), bench.spec("b")]
    try:
        bench.stack.apply(specs, "sum")
        summed = unet_weights()
        bench.stack.clear()
        with experiments.other_layers_summed():
            bench.stack.apply(specs, "split")
            old_split = unet_weights()
        bench.stack.clear()
        bench.stack.apply(specs, "split")
        split = unet_weights()
    finally:
        bench.stack.clear()
    cross = tuple(f"{parent}." for parent in cross_attention_modules(bench.pipe.unet))
    other = [name for name in summed if not name.startswith(cross)]
    assert all(torch.equal(old_split[name], summed[name]) for name in other)  # outside cross-attention: the sum
    assert any(not torch.equal(split[name], summed[name]) for name in other)  # split itself merges them as ties
    assert stack_module._layer_delta.__module__ == "stylelora.generate.stack"  # the patch is undone


def test_schedule_fuses_the_other_layers_by_timestep_and_is_undone(bench):
    experiments = load_benchmark("blend_experiments")
    rows = ["split:split@0", "rescaled:rescaled@0", "ties:ties@0", "second:second@0", "split:second@1000",
            "none:none@0", "sum:sum@0", "alt:alt@0"]

    def scheduled() -> dict[str, numpy.ndarray]:
        switch, undo = experiments.scheduled_split(bench, "a", "b", rows)
        try:
            drawn = {}
            for row in rows:
                switch(row)
                drawn[row] = _image(bench.pipe)
            return drawn
        finally:
            undo()
            bench.stack.clear()

    bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
    split = _image(bench.pipe)
    bench.stack.clear()
    before = {name: p.detach().clone() for name, p in bench.pipe.unet.named_parameters()}
    drawn = scheduled()
    assert numpy.array_equal(drawn["split:split@0"], split)  # split's own fusion at every step: split itself
    assert abs(drawn["rescaled:rescaled@0"] - split).max() * 255 <= 1  # the same merge, computed here
    assert numpy.array_equal(drawn["split:second@1000"], drawn["second:second@0"])  # every timestep is below 1000
    for row in ("ties:ties@0", "second:second@0", "none:none@0", "sum:sum@0", "alt:alt@0"):
        assert abs(drawn[row] - split).max() * 255 > 1, row
    assert all(torch.equal(p, before[name]) for name, p in bench.pipe.unet.named_parameters())  # the base again
    assert not bench.pipe.unet._forward_pre_hooks
    with pytest.raises(SystemExit, match="unknown side"):
        experiments.scheduled_split(bench, "a", "b", ["split:louder@500"])
    bench.stack.clear()


@pytest.mark.parametrize("side, b_first, expected", [
    # a = 8 everywhere (norm 16), b = -5 at the first entry: the plain sum elects a's sign there, one vote each elects
    # b's (-1 against 0.5); a keeps three entries, scaled by 16 / sqrt 192
    ("eqvote", -5.0, [[-5.0, 8 * 16 / 192 ** 0.5], [8 * 16 / 192 ** 0.5, 8 * 16 / 192 ** 0.5]]),
    ("eqvote", 5.0, [[13.0, 8.0], [8.0, 8.0]]),  # both push the same way: both kept whole, as in ties
    # relmax keeps the larger push relative to its delta's norm, even where both agree: b's 5 / 5 against a's 8 / 16
    ("relmax", 5.0, [[5.0, 8 * 16 / 192 ** 0.5], [8 * 16 / 192 ** 0.5, 8 * 16 / 192 ** 0.5]]),
])
def test_relative_elections_give_each_adapter_one_vote(side, b_first, expected):
    experiments = load_benchmark("blend_experiments")
    a = SimpleNamespace(up=torch.tensor([[1.0], [1.0]]), down=torch.tensor([[8.0, 8.0]]), scale=1.0)
    b = SimpleNamespace(up=torch.tensor([[1.0], [0.0]]), down=torch.tensor([[b_first, 0.0]]), scale=1.0)
    merged = experiments._relative_election([("a", 1.0, a), ("b", 1.0, b)], "cpu", side)
    assert torch.allclose(merged, torch.tensor(expected), atol=1e-5)


def test_tsv_rotates_shared_directions_apart_and_keeps_every_singular_value():
    """TSV-Merge on two rank-1 deltas: where their directions are already orthogonal it is their sum; where they
    overlap (45 degrees apart) the merged delta keeps both singular values, 1 and 2, which the sum does not (its are
    (3 +- 5 ** 0.5) / 2)."""
    experiments = load_benchmark("blend_experiments")
    e1, e2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    diagonal = torch.tensor([[1.0], [1.0]]) / 2 ** 0.5
    a = SimpleNamespace(up=e1, down=e1.T, scale=1.0)
    apart = SimpleNamespace(up=e2, down=2 * e2.T, scale=1.0)
    assert torch.allclose(experiments._tsv_delta([("a", 1.0, a), ("b", 1.0, apart)], "cpu"),
                          torch.tensor([[1.0, 0.0], [0.0, 2.0]]), atol=1e-6)
    shared = SimpleNamespace(up=diagonal, down=2 * diagonal.T, scale=1.0)
    merged = experiments._tsv_delta([("a", 1.0, a), ("b", 1.0, shared)], "cpu")
    assert torch.allclose(torch.linalg.svdvals(merged), torch.tensor([2.0, 1.0]), atol=1e-5)
    assert not torch.allclose(merged, torch.tensor([[2.0, 1.0], [1.0, 1.0]]), atol=0.1)  # not the sum
    assert experiments._check_side("tsv") == "tsv"


def test_dare_keeps_a_random_share_of_each_delta_scaled_back():
    """Two deltas of 10,000 entries each: DARE at 0.5 keeps about half of each, doubled, on masks drawn again the
    same way; at 0 it is the plain sum; then ties elects among the dropped deltas."""
    experiments = load_benchmark("blend_experiments")
    a = SimpleNamespace(up=torch.ones(100, 1), down=torch.ones(1, 100), scale=1.0)  # all 1
    b = SimpleNamespace(up=torch.ones(100, 1), down=-0.5 * torch.ones(1, 100), scale=1.0)  # all -0.5
    terms = [("a", 1.0, a), ("b", 1.0, b)]
    assert torch.equal(experiments._dare_delta(terms, "cpu", "sum", 0.0), torch.full((100, 100), 0.5))
    dropped = experiments._dare_delta(terms, "cpu", "sum", 0.5)
    assert torch.equal(dropped, experiments._dare_delta(terms, "cpu", "sum", 0.5))  # the same masks each time
    values, counts = torch.unique(dropped, return_counts=True)  # a's 2, b's -1, both 1, neither 0
    assert values.tolist() == [-1.0, 0.0, 1.0, 2.0] and all(2200 < c < 2800 for c in counts.tolist())
    tied = experiments._dare_delta(terms, "cpu", "ties", 0.5)
    # where both kept an entry a's sign wins it: a keeps all of its own (2 wherever kept), b only what it holds alone,
    # scaled back to the norm of all it kept (split's rescale)
    assert torch.equal(tied[dropped >= 1.0], torch.full_like(tied[dropped >= 1.0], 2.0))
    b_kept, b_alone = int((dropped == 1.0).sum() + (dropped == -1.0).sum()), int((dropped == -1.0).sum())
    assert torch.allclose(tied[dropped == -1.0], torch.tensor(-(b_kept / b_alone) ** 0.5))
    assert experiments._check_side("dare0.5") == "dare0.5" and experiments._check_side("dareties0.9") == "dareties0.9"
    with pytest.raises(SystemExit, match="unknown side"):
        experiments._check_side("dare1.5")


@pytest.mark.parametrize("side, expected", [
    ("keepin1", [[1.0, 1.0], [0.0, 1.0]]),  # b loses what it does to a's input direction (the first column)
    ("keepout1", [[1.0, 0.0], [1.0, 1.0]]),  # b loses what it writes into a's output direction (the first row)
    # b kept: a's delta [[1, 0], [0, 0]] less its part on b's input direction (1, 1)/sqrt 2, i.e. [[.5, -.5], [0, 0]]
    ("keepin2", [[1.5, 0.5], [1.0, 1.0]]),
])
def test_kept_delta_projects_the_other_adapter_off_the_kept_ones_directions(side, expected):
    experiments = load_benchmark("blend_experiments")
    a = SimpleNamespace(up=torch.tensor([[1.0], [0.0]]), down=torch.tensor([[1.0, 0.0]]), scale=1.0)
    b = SimpleNamespace(up=torch.tensor([[1.0], [1.0]]), down=torch.tensor([[1.0, 1.0]]), scale=1.0)
    terms = [("a", 1.0, a), ("b", 1.0, b)]
    assert torch.allclose(experiments._kept_delta(side, terms, "cpu"), torch.tensor(expected), atol=1e-6)


def test_regmean_delta_by_hand():
    experiments = load_benchmark("blend_experiments")
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    # equal statistics: the mean of the two deltas
    assert torch.allclose(experiments.regmean_delta([a, b], [torch.eye(2), torch.eye(2)], 1.0), (a + b) / 2)
    # a's inputs only on the first direction, b's only on the second: each keeps its own delta there
    only_first, only_second = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
    assert torch.allclose(experiments.regmean_delta([a, b], [only_first, only_second], 1.0), torch.tensor([[2.0, 4.0]]))
    # alpha scales the off-diagonal: with alpha 0 correlated inputs count as if independent
    correlated = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(experiments.regmean_delta([a, b], [correlated, correlated], 0.0), (a + b) / 2)


def test_regmean_split_fuses_only_the_shared_layers_outside_cross_attention_and_is_undone(bench):
    experiments = load_benchmark("blend_experiments")
    styled = SimpleNamespace(pipe=bench.pipe, stack=bench.stack,  # the toy's prompt sets are named by style
                             spec=lambda name: bench.spec({"stripes": "a", "pastel": "b"}[name]))
    before = {name: p.detach().clone() for name, p in bench.pipe.unet.named_parameters()}
    bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
    split = {name: p.detach().clone() for name, p in bench.pipe.unet.named_parameters()}
    bench.stack.clear()
    use = experiments.regmean_split(styled, "stripes", "pastel", 1)
    try:
        use(1.0)
        merged = {name: p.detach().clone() for name, p in bench.pipe.unet.named_parameters()}
    finally:
        bench.stack.clear()
    cross = tuple(f"{parent}." for parent in cross_attention_modules(bench.pipe.unet))
    changed = [name for name in merged if not torch.equal(merged[name], split[name])]
    assert changed and not any(name.startswith(cross) for name in changed)
    assert all(torch.equal(p, before[name]) for name, p in bench.pipe.unet.named_parameters())


def test_region_damps_each_adapter_where_the_other_acts_more_by_hand():
    experiments = load_benchmark("blend_experiments")
    first = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # the same everywhere: salience 1, 1
    second = torch.tensor([[[0.0, 3.0], [0.0, 1.0]]])  # norms 3, 1 (mean 2): salience 1.5, 0.5
    both = experiments.region_damping([first, second], 1.0, (0, 1))
    # token 0: the first is damped by 1 / 1.5; token 1: the second by 0.5 / 1
    assert torch.allclose(both, torch.tensor([[[-1 / 3, 0.0], [0.0, -0.5]]]))
    assert torch.allclose(experiments.region_damping([first, second], 1.0, (0,)), torch.tensor([[[-1 / 3, 0.0], [0.0, 0.0]]]))
    assert torch.equal(experiments.region_damping([first, second], 0.0, (0, 1)), torch.zeros(1, 2, 2))


def test_other_layers_corrected_adds_to_split_and_is_undone(bench):
    experiments = load_benchmark("blend_experiments")
    plain = _image(bench.pipe)
    bench.stack.apply([bench.spec("a"), bench.spec("b")], "split")
    split = _image(bench.pipe)
    bench.stack.clear()
    with experiments.other_layers_corrected(bench, "a", "b", 1000, lambda merged, owns: 0 * merged()):
        assert numpy.array_equal(_image(bench.pipe), split)
    with experiments.region_damped(bench, "a", "b", "2"):
        damped = _image(bench.pipe)
    assert not numpy.array_equal(damped, split)
    assert numpy.array_equal(_image(bench.pipe), plain)  # the hooks and the blend are gone
