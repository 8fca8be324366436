"""Blend merges measured on the toy world and not adopted as blend modes (docs/results.md, "Recipes and
generation-time merges tried"), each scored beside the plain sum on the same prompts: the set carrying both triggers
and each adapter's own set.

    learned  ZipLoRA-style (Shah et al. 2023, arXiv 2311.13600): one coefficient per output row of each adapter's
             delta on every layer both touch, fitted (Adam, 1e-2) so the merged model predicts what each adapter
             alone predicts on its own prompts, conditional and unconditional, on noised copies of that adapter's
             own generations; then fused and scored
    concat   each adapter's text-encoder LoRA encodes the prompt on its own; the UNet (both UNet LoRAs summed)
             attends to the two encodings concatenated (the negative prompt likewise); not a static file
    compose  each adapter's text-encoder LoRA encodes the prompt on its own, and the UNet (both UNet LoRAs summed)
             attends to the base's encoding plus each adapter's change to it, h0 + (hA - h0) + (hB - h0); not a
             static file
    eps      composition of noise predictions: the base UNet and each adapter's UNet (fused alone, a copy per
             adapter) each run on their own text encoding every step, eps0 + (epsA - eps0) + (epsB - eps0), or
             with --eps-merge elementwise split's `merge` of the two changes; three UNet passes per step
    window   split (stylelora.generate.split_attention) only at timesteps below --window x 1000, the late steps;
             before that one attention core per module on the readings merged per element (split's `merge`)
             with both adapters' LoRA summed, so an early step costs what a fused step does (--window-side
             early: split the first steps instead). Prints each window's CPU seconds per image beside the first
             adapter fused alone, timed in the same run
    uncond   split on the conditional half of the classifier-free-guidance batch only; the unconditional half runs
             the window's one attention core (half the extra attention cores); timed like the window
    modules  split only in the cross-attention modules whose path starts with one of the comma-separated
             prefixes of a --split-modules value, one attention core (the window's) in the others; timed like the
             window
    rule     split with another per-element merge of the adapters' attention changes (--rule): gammaG (the largest
             push plus G x the others' push the same way; 0 is split, 1 the sum), meanG (where two push the same
             way, G x their mean plus (1 - G) x the larger: 1 is the mean), oppG (where two push opposite ways,
             the larger whole and G x the smaller: 1 is split, 0 maxabs), salG (each adapter's change damped per
             pixel by (its salience / the largest salience there) ** G, salience its change's norm at the pixel
             over its mean norm on the image; then split's merge) or maxabs (the one change of largest
             magnitude, whatever its sign), vorthH (per head vector, H heads: the longer change whole plus the
             other's part orthogonal to it) or vmaxH (the longer change alone)
    order    split as it is (each adapter reads the prompt with its trigger after the other's) beside split on the
             prompt as typed for every adapter (before stylelora.generate.trigger_order); give --pairs in both
             orders (pastel+stripes carries pastelstyle first)
    othersum split with the layers outside cross-attention summed (as split fused them before they were merged as
             ties), beside split as it is
    schedule split with the layers outside cross-attention fused one way above a timestep and another way below it
             (--schedule EARLY:LATE@T, T of the 1,000 training timesteps; the sampler starts near 1,000). Each
             side is split (split as it is: ties, rescaled), ties (the plain election: split before 8a1eaa2; the
             docs' rows before then call split "ties"), sum, first or second (that adapter's delta alone), alt
             (first and second in turn, one step each: LoRA Switch, Zhong et al. 2024, arXiv 2402.16843), none
             (the base's weights), tiesG (ties with both adapters at G x their weight), normed (ties with each
             adapter's delta scaled to the mean of their norms, layer by layer), raised (scaled to the larger
             norm), rescaledP (ties with each delta's kept entries scaled by the ratio of its whole norm to
             theirs, to the power P, 1 if left out: rescaled is split), rowrescaledP (the same, row by row),
             keepinK or keepoutK (adapter K's delta whole, the other's summed with the part on K's input
             directions, or on its output directions, projected away), eqvote (split's rescaled ties with the sign
             elected by each delta divided by its norm: one vote per adapter), relmax (per entry only the push
             that is larger relative to its delta's norm, rescaled as split), dareP (DARE: each delta keeps a
             random 1 - P of its entries, scaled by 1 / (1 - P), then summed) or daretiesP (the same, then split's
             rescaled ties), or tsv (TSV-Merge, Gargiulo et al. 2025: the two deltas' singular vectors
             side by side made orthonormal, every singular value kept), or pickX (K-LoRA, Ouyang et al. 2025,
             arXiv 2502.18461: each layer both touch takes one adapter's delta alone, the first where its top
             rank_A x rank_B magnitudes, over their mean on all such layers, times X outweigh the second's; a
             K-LoRA schedule favours the character early and the style late, e.g. pick2:pick0.5@500)
    regmean  split with the layers outside cross-attention that both adapters touch fused by RegMean (Jin et al.
             2023, arXiv 2212.09849) instead of ties: per layer the delta that, on the inputs the layer sees while
             each adapter alone draws --calibration of its own prompts (prompt seed 1, not the scored prompts),
             matches each adapter's own delta best in least squares, (dA GA + dB GB)(GA + GB)^-1 with G = X^T X
             and its off-diagonal scaled by --regmean-alpha (1: plain least squares); a static weight
    gain     split with each adapter's UNet weight multiplied by G in some layers (--gain GROUPS:G, GROUPS a
             comma-separated subset of cross, other: the cross-attention projections that run per adapter, every
             other UNet layer); the text encoders stay at the adapter's weight. cross,other:G is
             `stylelora evaluate --lora A:G:1 --lora B:G:1`
    deficit  split, and in every UNet layer outside cross-attention that both adapters touch (linear and 1x1
             convolutions) each adapter's own LoRA output o_i added back where the fused layer's change o_M falls
             short of it along o_i: y + G x sum_i min(C, max(0, 1 - <o_M, o_i> / |o_i|^2)) x o_i, per token
             (token) or per image (layer), at timesteps below T (--deficit KIND:C:T:G, each after KIND optional:
             C 1, T 1000, G 1); activation-dependent, so not a static file
    region   split, and in the same layers each adapter's own LoRA output o_i damped on the tokens where the other
             adapter acts more: o_i x ((s_i / max(s_A, s_B)) ** G - 1) added, s_i the norm of o_i at the token over
             its mean over the image, at timesteps below T, on both adapters or only the first or second (--region
             G[:T[:first|second]]); activation-dependent, so not a static file

    python benchmarks/blend_experiments.py --adapters-dir outputs/blend-dc50 --samples 48 --merges learned concat compose
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges window --window 0.4 0.5 1
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges uncond rule --rule gamma0.5 maxabs
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges modules --split-modules up_blocks
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges gain --gain other:1.2 cross:1.2
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges regmean --regmean-alpha 0.9 1
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges order --pairs pastel+stripes
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges othersum --stacked-only
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges schedule --schedule second:ties@600
    python benchmarks/blend_experiments.py --adapters-dir outputs/switch/tn02 --merges deficit --deficit token layer

--stacked-only scores only the prompts carrying both triggers (a third of the images), not each adapter's own set.

Use OMP_NUM_THREADS=1 on a shared machine. Uses stylelora.generate.stack internals (this is an experiment).
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PAIRS = ("stripes+pastel", "stripes+zorb", "pastel+zorb")
REVERSED = tuple("+".join(reversed(pair.split("+"))) for pair in PAIRS)  # the second trigger first in the prompt
TRAIN_PROMPTS, NOISE_COPIES, BATCH = 16, 8, 16


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters-dir", default=str(REPO / "outputs" / "blend"))
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS + REVERSED))
    parser.add_argument("--merges", nargs="+", default=["learned", "concat", "compose"],
                        choices=["learned", "concat", "compose", "eps", "window", "uncond", "modules", "rule",
                                 "gain", "order", "othersum", "schedule", "regmean", "deficit", "region"])
    parser.add_argument("--eps-merge", choices=["sum", "elementwise"], default="sum",
                        help="eps: how the adapters' changes to the noise prediction combine")
    parser.add_argument("--window", type=float, nargs="+", default=[0.4],
                        help="window: split below this share of the training timesteps (1: every step, as split)")
    parser.add_argument("--window-side", choices=["late", "early"], default="late",
                        help="window: split the late steps (timesteps below the share) or the early ones (above 1 - it)")
    parser.add_argument("--split-modules", nargs="+", default=["up_blocks"],
                        help="modules: comma-separated prefixes of the cross-attention modules' paths to split, "
                             "one row each")
    parser.add_argument("--rule", nargs="+", default=["gamma0.5", "maxabs"],
                        help="rule: the merges to try in split's place (gammaG, meanG, oppG, maxabs)")
    parser.add_argument("--gain", nargs="+", default=["other:1.2"],
                        help="gain: GROUPS:G rows, GROUPS a comma-separated subset of cross, other")
    parser.add_argument("--schedule", nargs="+", default=["second:ties@600"],
                        help="schedule: EARLY:LATE@T rows (see the module's doc)")
    parser.add_argument("--deficit", nargs="+", default=["token"],
                        help="deficit: KIND[:C[:T[:G]]] rows, KIND token or layer (see the module's doc)")
    parser.add_argument("--region", nargs="+", default=["2"],
                        help="region: G[:T[:first|second]] rows (see the module's doc)")
    parser.add_argument("--calibration", type=int, default=16,
                        help="regmean: own prompts each adapter draws alone for its layers' input statistics")
    parser.add_argument("--regmean-alpha", type=float, nargs="+", default=[0.9],
                        help="regmean: scale of the Gram matrices' off-diagonal entries, one row each")
    parser.add_argument("--samples", type=int, default=48, help="prompts per prompt set (stylelora evaluate's)")
    parser.add_argument("--stacked-only", action="store_true",
                        help="score only the prompts carrying both triggers, not each adapter's own prompts")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the learned merge")
    return parser.parse_args(argv)


class Bench:
    def __init__(self, adapters_dir: str, samples: int):
        from stylelora.generate.stack import AdapterStack
        from stylelora.toy.evaluate import load_judged_base

        self.pipe, self.judge = load_judged_base("toy")
        self.stack = AdapterStack.for_pipe(self.pipe)
        self.dir, self.samples = Path(adapters_dir), samples

    def spec(self, style: str):
        from stylelora.lora.spec import AdapterSpec

        return AdapterSpec(str(self.dir / f"toy-{style}" / f"toy-{style}.safetensors"), 1.0)

    def ids(self, texts: list[str]):
        from stylelora.train.models import tokenize

        return tokenize(self.pipe.tokenizer, texts)

    def score(self, sets: tuple[str, ...], embeds=None) -> dict:
        return self.timed_score(sets, embeds)[0]

    def timed_score(self, sets: tuple[str, ...], embeds=None) -> tuple[dict, float]:
        """Rows per prompt set for what is fused now; embeds(texts) -> (prompt, negative) encodings overrides the
        pipeline's own text encoding."""
        import torch

        from stylelora.toy.evaluate import EvalSettings, build_prompts, generate_images, score

        settings = EvalSettings(samples=self.samples, prompt_sets=sets)
        prompts = build_prompts(self.samples, settings.seed, sets)
        start = time.process_time()  # CPU time: other jobs on a shared machine do not stretch it
        if embeds is None:
            images = generate_images(self.pipe, prompts, settings)
        else:
            images = []
            for start in range(0, len(prompts), 48):
                chunk = prompts[start:start + 48]
                positive, negative = embeds([p.prompt for p in chunk])
                images += self.pipe(prompt_embeds=positive, negative_prompt_embeds=negative, output_type="pil",
                                    num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                                    generator=[torch.Generator("cpu").manual_seed(p.seed) for p in chunk]).images
        seconds = (time.process_time() - start) / len(prompts)
        return score(prompts, self.judge.predict(images))["by_prompt_set"], seconds


def fitting_data(bench: Bench, style: str, noise_scheduler):
    """Noised copies of `style`'s own generations (its prompts, and the empty prompt) and what it alone predicts."""
    import torch

    from stylelora.toy.evaluate import EvalSettings, build_prompts

    settings = EvalSettings()
    prompts = build_prompts(TRAIN_PROMPTS, 1, (style,))  # seed 1: not the scored prompts
    texts = [p.prompt for p in prompts]
    bench.stack.apply([bench.spec(style)])
    latents = bench.pipe(texts, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                         output_type="latent",
                         generator=[torch.Generator("cpu").manual_seed(p.seed) for p in prompts]).images
    generator = torch.Generator().manual_seed(1)
    clean = latents.repeat(2 * NOISE_COPIES, 1, 1, 1)
    ids = torch.cat([bench.ids(texts).repeat(NOISE_COPIES, 1), bench.ids([""] * len(texts)).repeat(NOISE_COPIES, 1)])
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
    noisy = noise_scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), t)
    with torch.no_grad():
        target = bench.pipe.unet(noisy, t, encoder_hidden_states=bench.pipe.text_encoder(ids)[0]).sample
    bench.stack.clear()
    return noisy, t, ids, target


def learned_merge(bench: Bench, a: str, b: str, steps: int) -> float:
    """Fuse A + B with fitted per-row coefficients on the layers both touch; returns the final fitting loss."""
    import torch
    from diffusers import DDPMScheduler
    from torch.func import functional_call

    from stylelora.generate.stack import _layer_delta

    noise_scheduler = DDPMScheduler.from_config(bench.pipe.scheduler.config)
    data = [fitting_data(bench, style, noise_scheduler) for style in (a, b)]
    specs = [bench.spec(a), bench.spec(b)]
    bench.stack.apply(specs, "sum")  # the coefficients scale the fused deltas
    models = {"unet": bench.pipe.unet, "text_encoder": bench.pipe.text_encoder}
    names = {id(p): (c, n) for c, m in models.items() for n, p in m.named_parameters()}
    layers = []
    for key, terms in bench.stack._plan(specs, [bench.stack.load(s.path) for s in specs]).items():
        if len(terms) == 2:
            weight = bench.stack._layer_weight(key)
            deltas = [_layer_delta(terms[i:i + 1], "cpu", "sum") for i in range(2)]
            layers.append((*names[id(weight)], weight, bench.stack._backups[key].float(), deltas,
                           [torch.ones(d.shape[0], requires_grad=True) for d in deltas]))
    for model in models.values():
        model.requires_grad_(False)

    def merged() -> dict:
        out = {"unet": {}, "text_encoder": {}}
        for component, name, _, original, deltas, coefficients in layers:
            delta = sum(m[:, None] * d for m, d in zip(coefficients, deltas))
            out[component][name] = original + delta.reshape(original.shape)
        return out

    optimizer = torch.optim.Adam([m for *_, coefficients in layers for m in coefficients], lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        weights, loss = merged(), 0.0
        for noisy, t, ids, target in data:
            pick = torch.randint(0, len(noisy), (BATCH,), generator=generator)
            text = functional_call(models["text_encoder"], weights["text_encoder"], (ids[pick],))[0]
            prediction = functional_call(models["unet"], weights["unet"], (noisy[pick], t[pick]),
                                         {"encoder_hidden_states": text}).sample
            loss = loss + torch.nn.functional.mse_loss(prediction, target[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weights = merged()
        for component, name, weight, *_ in layers:
            weight.copy_(weights[component][name].to(weight.dtype))
    return loss.item()


def encodings(bench: Bench, styles: tuple[str, ...], texts: list[str]):
    """(prompt, empty-prompt) text encodings with only `styles` fused (none: the base); the stack is left so."""
    from stylelora.train.models import text_encode_fn

    bench.stack.apply([bench.spec(style) for style in styles])  # fused in place: the text encoder is this blend's
    encode_text = text_encode_fn(bench.pipe.text_encoder, bench.pipe.tokenizer, bench.pipe.device)
    return encode_text(texts), encode_text([""] * len(texts))


def concat_encoder(bench: Bench, a: str, b: str):
    """embeds(texts) for Bench.score: each adapter's text encoder alone, the encodings concatenated; leaves A + B
    fused (the UNet sum) afterwards."""
    import torch

    def encode(texts):
        (pos_a, neg_a), (pos_b, neg_b) = encodings(bench, (a,), texts), encodings(bench, (b,), texts)
        bench.stack.apply([bench.spec(a), bench.spec(b)], "sum")
        return torch.cat([pos_a, pos_b], dim=1), torch.cat([neg_a, neg_b], dim=1)

    return encode


def compose_encoder(bench: Bench, a: str, b: str):
    """embeds(texts) for Bench.score: the base's encoding plus each adapter's text-encoder change to it, each adapter
    encoding the prompt alone; leaves A + B fused (the UNet sum) afterwards."""

    def encode(texts):
        (pos_0, neg_0), (pos_a, neg_a), (pos_b, neg_b) = (encodings(bench, styles, texts)
                                                         for styles in ((), (a,), (b,)))
        bench.stack.apply([bench.spec(a), bench.spec(b)], "sum")
        return pos_a + pos_b - pos_0, neg_a + neg_b - neg_0

    return encode


def windowed_split(bench: Bench, a: str, b: str, window: float, side: str = "late"):
    """Apply A + B in split, then give every split cross-attention module a window: split below window x the
    training timesteps (side "early": at or above (1 - window) x them), one attention core on the merged reading
    elsewhere. Returns the hook to remove afterwards."""
    unet = bench.pipe.unet
    clock = {"t": 0.0}  # the timestep of the UNet call under way
    timesteps = bench.pipe.scheduler.config.num_train_timesteps
    inside = ((lambda t: t < window * timesteps) if side == "late" else (lambda t: t >= (1 - window) * timesteps))
    windowed = _processor_classes()["WindowedSplit"]
    _replace_split(bench, a, b, lambda _path, inner, variants: windowed(inner, variants, clock, inside))
    return unet.register_forward_pre_hook(
        lambda _module, args, kwargs: clock.update(t=float(kwargs.get("timestep", args[1] if len(args) > 1 else 0))),
        with_kwargs=True)


def uncond_split(bench: Bench, a: str, b: str) -> None:
    """Apply A + B in split with every module split on the conditional half of the guidance batch only (the
    pipeline stacks the negative prompt's rows first); bench.stack.clear() takes it out."""
    uncond = _processor_classes()["UncondOneCore"]
    _replace_split(bench, a, b, lambda _path, inner, variants: uncond(inner, variants))


def modules_split(bench: Bench, a: str, b: str, prefixes: str) -> None:
    """Apply A + B in split, then run one attention core in every cross-attention module whose path starts with
    none of the comma-separated prefixes; bench.stack.clear() takes it out."""
    one_core, kept = _processor_classes()["OneCore"], tuple(prefixes.split(","))
    _replace_split(bench, a, b,
                   lambda path, inner, variants: None if path.startswith(kept) else one_core(inner, variants))


def _replace_split(bench: Bench, a: str, b: str, make) -> None:
    """Apply A + B in split, then give each cross-attention module make(path, inner, variants) in place of its
    split processor (None: keep split there)."""
    from stylelora.generate import split_attention

    bench.stack.apply([bench.spec(a), bench.spec(b)], "split")
    for parent in split_attention.cross_attention_modules(bench.pipe.unet):
        attn = bench.pipe.unet.get_submodule(parent)
        replacement = make(parent, attn.processor.inner, attn.processor.variants)
        if replacement is not None:
            attn.set_processor(replacement)


def _processor_classes():
    import torch
    import torch.nn.functional as F

    from stylelora.generate.split_attention import SplitCrossAttention, _heads, _low_rank, merge

    class OneCore(SplitCrossAttention):
        """One attention core at every step: keys and values from the readings merged per element (once per text
        states), each projection with the adapters' LoRA summed on it."""

        def __init__(self, inner, variants) -> None:
            super().__init__(inner, variants)
            self._one_reading: dict = {}

        def _low_rank_path(self, attn, hidden_states, encoder_hidden_states):
            return self._one_core(attn, hidden_states, encoder_hidden_states)

        def _split_path(self, attn, hidden_states, encoder_hidden_states):
            return SplitCrossAttention._low_rank_path(self, attn, hidden_states, encoder_hidden_states)

        def _one_core(self, attn, hidden_states, encoder_hidden_states):
            def summed(name, x):
                return attn.get_submodule(name)(x) + sum(_low_rank(x, v.get(name)) for v in self.variants)

            cache = self._one_reading
            if cache.get("states") is not encoder_hidden_states:
                contexts = encoder_hidden_states.chunk(len(self.variants) + 1, dim=1)
                reading = merge(contexts[0], contexts[1:])
                cache.update(states=encoder_hidden_states, keys=_heads(attn, summed("to_k", reading)),
                             values=_heads(attn, summed("to_v", reading)))
            query = _heads(attn, summed("to_q", hidden_states))
            attended = F.scaled_dot_product_attention(query, cache["keys"], cache["values"]).transpose(1, 2).flatten(2)
            return attn.to_out[1](summed("to_out.0", attended.to(hidden_states.dtype)))

    class WindowedSplit(OneCore):
        """Split where inside(timestep); elsewhere one attention core."""

        def __init__(self, inner, variants, clock: dict, inside) -> None:
            super().__init__(inner, variants)
            self.clock, self.inside = clock, inside

        def _low_rank_path(self, attn, hidden_states, encoder_hidden_states):
            path = self._split_path if self.inside(self.clock["t"]) else self._one_core
            return path(attn, hidden_states, encoder_hidden_states)

    class UncondOneCore(OneCore):
        """Split on the second half of the batch (the prompt's rows under guidance), one core on the first."""

        def __init__(self, inner, variants) -> None:
            super().__init__(inner, variants)
            self._halves: dict = {}

        def _low_rank_path(self, attn, hidden_states, encoder_hidden_states):
            half = hidden_states.shape[0] // 2
            if self._halves.get("states") is not encoder_hidden_states:  # the same slices every step: cache hits
                self._halves = {"states": encoder_hidden_states, "negative": encoder_hidden_states[:half],
                                "prompt": encoder_hidden_states[half:]}
            negative = self._one_core(attn, hidden_states[:half], self._halves["negative"])
            prompt = self._split_path(attn, hidden_states[half:], self._halves["prompt"])
            return torch.cat([negative, prompt])

    return {"WindowedSplit": WindowedSplit, "UncondOneCore": UncondOneCore, "OneCore": OneCore}


def merge_rule(name: str):
    """A per-element merge with split_attention.merge's signature: gammaG, meanG, oppG or maxabs (see the module's
    doc)."""
    import torch

    from stylelora.generate.split_attention import merge_stacked as split_merge  # before split_with_rule swaps it

    kinds = ("gamma", "mean", "opp", "vorth", "vmax", "sal")
    kind = next((prefix for prefix in kinds if name.startswith(prefix)), name)
    if kind not in (*kinds, "maxabs"):
        raise SystemExit(f"--rule {name}: give gammaG, meanG, oppG or salG (a number G, e.g. gamma0.5), vorthH or "
                         "vmaxH (H heads, e.g. vorth8) or maxabs")
    share = float(name.removeprefix(kind)) if kind != "maxabs" else 0.0

    def merge(base, outputs):
        if len(outputs) == 1:
            return outputs[0]
        changes = torch.stack(list(outputs)) - base
        if kind in ("vorth", "vmax"):
            return base + vector_merge(changes, int(share), orthogonal_rest=kind == "vorth")
        if kind == "maxabs":
            return base + changes.gather(0, changes.abs().argmax(0, keepdim=True))[0]
        if kind == "sal":
            changes = changes * saliency_weights(changes, share)
            return split_merge(torch.cat([base.unsqueeze(0), base + changes]))
        up, down = changes.amax(0).clamp(min=0), changes.amin(0).clamp(max=0)
        pushes_up, pushes_down = changes.clamp(min=0), changes.clamp(max=0)
        if kind == "gamma":  # gamma0: split exactly
            rest = pushes_up.sum(0) - up + pushes_down.sum(0) - down
            return split_merge(torch.stack([base, *outputs])) + share * rest
        if kind == "mean":  # each way: G x the mean of the pushes that way + (1 - G) x the largest of them
            mean_up = pushes_up.sum(0) / (changes > 0).sum(0).clamp(min=1)
            mean_down = pushes_down.sum(0) / (changes < 0).sum(0).clamp(min=1)
            return base + share * (mean_up + mean_down) + (1 - share) * (up + down)
        larger_up = up >= -down  # opposite ways: the larger push whole, the smaller at G (two adapters)
        return base + torch.where(larger_up, up, down) + share * torch.where(larger_up, down, up)

    return merge


def saliency_weights(changes, power: float):
    """Per adapter and pixel, (s_i / max_j s_j) ** power, s_i the norm of adapter i's change at the pixel over its
    mean norm across the image's pixels: where one adapter changes the image far more than it does on average (a
    character's body), the others' changes are damped; 0 is split."""
    norms = changes.norm(dim=-1, keepdim=True)  # (adapters, batch, pixels, 1)
    salience = norms / norms.mean(dim=-2, keepdim=True).clamp(min=1e-12)
    return (salience / salience.amax(0, keepdim=True).clamp(min=1e-12)).pow(power)


def vector_merge(changes, heads: int, orthogonal_rest: bool):
    """Two adapters' attention changes (2, ..., channels) merged per head vector rather than per element: the change
    whose head vector is longer, whole, plus (orthogonal_rest) the other's part orthogonal to it, so each head keeps
    one adapter's direction intact (a per-element merge mixes the components of two directions)."""
    import torch

    if changes.shape[0] != 2:
        raise SystemExit("vorth / vmax merge two adapters")
    grouped = changes.unflatten(-1, (heads, -1))
    first_wins = grouped[0].norm(dim=-1, keepdim=True) >= grouped[1].norm(dim=-1, keepdim=True)
    winner, other = torch.where(first_wins, grouped[0], grouped[1]), torch.where(first_wins, grouped[1], grouped[0])
    if orthogonal_rest:
        along = (other * winner).sum(-1, keepdim=True) / winner.pow(2).sum(-1, keepdim=True).clamp(min=1e-12)
        winner = winner + other - along * winner
    return winner.flatten(-2)


@contextmanager
def split_with_rule(name: str):
    """Split's attention merged by merge_rule(name) instead of split_attention's merge while inside."""
    from stylelora.generate import split_attention

    rule = merge_rule(name)
    originals = split_attention.merge, split_attention.merge_stacked
    split_attention.merge, split_attention.merge_stacked = rule, lambda parts: rule(parts[0], list(parts[1:]))
    try:
        yield
    finally:
        split_attention.merge, split_attention.merge_stacked = originals


@contextmanager
def other_layers_summed():
    """While inside, split fuses the layers outside cross-attention as the plain sum, not as ties (the rows that
    use it clear the stack afterwards, so no layer fused this way outlives it)."""
    from stylelora.generate import stack

    original = stack._layer_delta
    stack._layer_delta = lambda terms, device, mode: original(terms, device, "sum" if mode == "split" else mode)
    try:
        yield
    finally:
        stack._layer_delta = original


@contextmanager
def typed_order(bench: Bench):
    """While inside, split gives every adapter the prompt as typed (no trigger moves)."""
    bench.stack._trigger_reorders = lambda _text_encoder, _identities: None  # an instance attribute: found first
    try:
        yield
    finally:
        vars(bench.stack).pop("_trigger_reorders", None)


@contextmanager
def unet_gain(bench: Bench, groups: str, gain: float):
    """While inside, a blend of two or more adapters fuses (or splits) each adapter's UNet LoRA at G x its weight in
    the layers of `groups` ("cross", "other" or both, comma-separated); a single adapter is unchanged."""
    from stylelora.generate import split_attention

    chosen = set(groups.split(","))
    if not chosen or chosen - {"cross", "other"}:
        raise SystemExit(f"--gain {groups}:{gain}: give cross, other or cross,other before the colon")
    stack, unet = bench.stack, bench.pipe.unet
    plain_plan = stack._plan

    def group(key) -> str | None:
        component, path = key
        if component != "unet":
            return None
        return "cross" if split_attention.split_parts(unet, path) else "other"

    def plan(specs, adapters):
        layers = plain_plan(specs, adapters)
        if len({identity for terms in layers.values() for identity, _, _ in terms}) < 2:
            return layers
        return {key: [(identity, weight * (gain if group(key) in chosen else 1.0), factors)
                      for identity, weight, factors in terms] for key, terms in layers.items()}

    stack._plan = plan  # an instance attribute: the stack's own methods find it first
    try:
        yield
    finally:
        vars(stack).pop("_plan", None)


SCHEDULE_SIDES = ("split", "ties", "sum", "first", "second", "alt", "none", "tiesG", "normed", "raised", "rescaled",
                  "keepin1", "keepin2", "keepout1", "keepout2", "eqvote", "relmax", "tsv")
PICK = "pick"  # pickX: K-LoRA's per-layer choice of one adapter's delta (see _picked_layers)


def _rescale_side(name: str) -> tuple[bool, float] | None:
    """(per_row, power) of a rescaledP / rowrescaledP side, None for any other name."""
    per_row = name.startswith("row")
    power = name.removeprefix("row").removeprefix("rescaled")
    if not name.removeprefix("row").startswith("rescaled") or not (not power or power.replace(".", "", 1).isdigit()):
        return None
    return per_row, float(power or 1)


def _dare_side(name: str) -> tuple[str, float] | None:
    """(then, drop) of a dareP / daretiesP side (then "sum" or "ties"), None for any other name."""
    for prefix, then in (("dareties", "ties"), ("dare", "sum")):
        drop = name.removeprefix(prefix)
        if name.startswith(prefix) and drop.replace(".", "", 1).isdigit() and 0 <= float(drop) < 1:
            return then, float(drop)
    return None


def _pick_bias(name: str) -> float | None:
    """X of a pickX side, None for any other name."""
    bias = name.removeprefix(PICK)
    return float(bias) if name.startswith(PICK) and bias.replace(".", "", 1).isdigit() else None


def _check_side(name: str) -> str:
    gain = name.removeprefix("ties")
    if _rescale_side(name) is not None or _dare_side(name) is not None or _pick_bias(name) is not None:
        return name
    if name not in SCHEDULE_SIDES and not (name.startswith("ties") and gain.replace(".", "", 1).isdigit()):
        raise SystemExit(f"--schedule: unknown side {name!r} ({', '.join(SCHEDULE_SIDES)})")
    return name


def _fused_as(name: str, terms: list, base, adapters: tuple) -> object:
    """One layer's weight with its terms [(adapter, weight, factors)] fused the way `name` says (_check_side'd)."""
    from stylelora.generate import stack as stack_module

    mode = "sum" if name == "sum" else "ties"
    if name in ("first", "second"):
        terms = [term for term in terms if term[0] == adapters[name == "second"]]
    elif name in ("normed", "raised"):
        norms = [weight * factors.scale * float((factors.up.float() @ factors.down.float()).norm())
                 for _, weight, factors in terms]
        target = sum(norms) / len(norms) if name == "normed" else max(norms)
        terms = [(identity, weight * target / norm, factors) for (identity, weight, factors), norm in zip(terms, norms)]
    elif name.startswith("ties") and name != "ties":
        terms = [(identity, weight * float(name.removeprefix("ties")), factors) for identity, weight, factors in terms]
    if name == "none" or not terms:
        return base.clone()
    if name.startswith("keep") and len(terms) == 2:
        return (base.float() + _kept_delta(name, terms, base.device).reshape(base.shape)).to(base)
    if name == "tsv" and len(terms) == 2:
        return (base.float() + _tsv_delta(terms, base.device).reshape(base.shape)).to(base)
    if name in ("eqvote", "relmax") and len(terms) == 2:
        return (base.float() + _relative_election(terms, base.device, name).reshape(base.shape)).to(base)
    if (dare := _dare_side(name)) is not None:
        return (base.float() + _dare_delta(terms, base.device, *dare).reshape(base.shape)).to(base)
    if (rescale := _rescale_side(name)) is not None:
        per_row, power = rescale
        return (base.float() + _rescaled_ties(terms, base.device, power, per_row).reshape(base.shape)).to(base)
    return (base.float() + stack_module._layer_delta(terms, base.device, mode).reshape(base.shape)).to(base)


def _kept_delta(name: str, terms: list, device) -> object:
    """keepinK / keepoutK: adapter K's delta whole, plus the other's with the part that acts on K's inputs (the row
    space of K's down) or writes into K's outputs (the column space of K's up) projected away, so that the other
    adapter cannot undo what K does there."""
    import torch

    deltas = _term_deltas(terms, device, torch.float32)
    kept = int(name[-1]) - 1
    other = deltas[1 - kept]
    _, _, factors = terms[kept]
    if name.startswith("keepin"):
        basis, _ = torch.linalg.qr(factors.down.to(device).float().T)  # (in, rank): K's input directions
        other = other - (other @ basis) @ basis.T
    else:
        basis, _ = torch.linalg.qr(factors.up.to(device).float())  # (out, rank): K's output directions
        other = other - basis @ (basis.T @ other)
    return deltas[kept] + other


def _tsv_delta(terms: list, device) -> object:
    """TSV-Merge (Gargiulo et al. 2025, arXiv 2412.00081): each delta's singular vectors side by side, [U_A U_B] and
    [V_A V_B], each replaced by its nearest matrix with orthonormal columns (the polar factor), with every singular
    value kept: the sum of the two deltas with the directions they share rotated apart."""
    import torch

    deltas = _term_deltas(terms, device, torch.float32)
    shape = deltas[0].shape
    lefts, sigmas, rights = [], [], []
    for delta in deltas:
        u, sigma, vh = torch.linalg.svd(delta.reshape(shape[0], -1), full_matrices=False)
        rank = int((sigma > sigma[0] * 1e-6).sum())  # a LoRA delta's own rank, not the layer's
        lefts.append(u[:, :rank])
        sigmas.append(sigma[:rank])
        rights.append(vh[:rank])
    us, vhs = torch.cat(lefts, 1), torch.cat(rights)

    def polar(m):
        x, _, yh = torch.linalg.svd(m, full_matrices=False)
        return x @ yh

    return (polar(us) * torch.cat(sigmas)) @ polar(vhs.T).T


def _rescaled_ties(terms: list, device, power: float = 1.0, per_row: bool = False) -> object:
    """ties, with each delta's surviving entries scaled back to its whole norm (the norm it loses where the other
    side wins the sign election; DARE's rescale, applied to TIES' disjoint step), so an adapter keeps its strength
    where it acts alone; power > 1 scales by that ratio to the power, per_row by each output row's own ratio."""
    import torch

    from stylelora.lora.blend_modes import elected_parts

    deltas = _term_deltas(terms, device, torch.float32)
    merged = torch.zeros_like(deltas[0])
    for delta, kept in elected_parts(deltas):
        if per_row:
            ratio = delta.norm(dim=1, keepdim=True) / kept.norm(dim=1, keepdim=True).clamp(min=1e-12)
        else:
            ratio = delta.norm() / kept.norm().clamp(min=1e-12)
        merged += kept * ratio ** power
    return merged


def _dare_delta(terms: list, device, then: str, drop: float) -> object:
    """DARE (Yu et al. 2023, arXiv 2311.03099): each delta keeps a random 1 - drop of its entries, scaled by
    1 / (1 - drop), then the deltas are summed ("sum") or merged as split's rescaled ties ("ties"). The masks are
    seeded by the layer's size and the term's place, so a run draws the same ones each time."""
    import torch

    from stylelora.lora.blend_modes import ties_delta

    deltas = []
    for index, delta in enumerate(_term_deltas(terms, device, torch.float32)):
        generator = torch.Generator().manual_seed(delta.numel() * 8 + index)
        keep = torch.rand(delta.shape, generator=generator).to(device) >= drop
        deltas.append(torch.where(keep, delta, 0.0) / (1 - drop))
    return sum(deltas) if then == "sum" or len(deltas) == 1 else ties_delta(deltas, rescale=True)


def _relative_election(terms: list, device, name: str) -> object:
    """eqvote: split's rescaled ties with the sign elected by the deltas each divided by its norm (each adapter one
    equal vote per entry, whatever its strength in the layer); relmax: per entry only the delta of larger magnitude
    relative to its norm; both with each delta's kept entries scaled back to its whole norm (capped as split's)."""
    import torch

    from stylelora.lora.blend_modes import rescaled_sum

    deltas = _term_deltas(terms, device, torch.float32)
    units = [delta / delta.norm().clamp(min=1e-12) for delta in deltas]
    if name == "eqvote":
        elected = torch.sign(units[0] + units[1])
        keeps = [torch.sign(delta) == elected for delta in deltas]
    else:
        first = units[0].abs() >= units[1].abs()
        keeps = [first, ~first]
    return rescaled_sum((delta, torch.where(keep, delta, 0.0)) for delta, keep in zip(deltas, keeps))


def _term_deltas(terms: list, device, dtype) -> list:
    """Each term's (adapter, weight, factors) full delta, weight x alpha/rank x up @ down, in `dtype` on `device`."""
    return [(weight * factors.scale) * factors.up.to(device, dtype) @ factors.down.to(device, dtype)
            for _, weight, factors in terms]


def _picked_layers(plan: dict, keys: list, bias: float) -> dict:
    """K-LoRA (Ouyang et al. 2025, arXiv 2502.18461) on the layers both adapters touch: each adapter's score is the
    sum of its delta's rank_A x rank_B largest magnitudes, divided by its mean score over those layers (K-LoRA's
    average ratio); the layer takes the first adapter's delta alone where its score x `bias` is larger, the
    second's alone otherwise. {key: index of the adapter kept}."""
    import torch

    scores = {}
    for key in keys:
        terms = plan[key]
        if len(terms) == 2:
            count = terms[0][2].down.shape[0] * terms[1][2].down.shape[0]
            deltas = _term_deltas(terms, "cpu", torch.float32)
            scores[key] = [float(delta.abs().flatten().topk(min(count, delta.numel())).values.sum()) for delta in deltas]
    means = [sum(score[i] for score in scores.values()) / max(len(scores), 1) for i in (0, 1)]
    return {key: 0 if score[0] / means[0] * bias > score[1] / means[1] else 1 for key, score in scores.items()}


def _other_layer_weights(bench: Bench, a: str, b: str, names: set[str]) -> dict:
    """With A + B applied in split: {layer: {name: the layer's weight fused that way}} for every UNet layer outside
    cross-attention that split fuses, for each of `names` (the schedule merge's sides, see the module's doc)."""
    import torch

    stack = bench.stack
    specs = [bench.spec(a), bench.spec(b)]
    loaded = [stack.load(spec.path) for spec in specs]
    adapters = tuple((adapter.path, adapter.signature) for adapter in loaded)
    plan = stack._plan(specs, loaded)
    keys = [key for key in stack._fused if key[0] == "unet"]
    picks = {name: _picked_layers(plan, keys, bias) for name in names if (bias := _pick_bias(name)) is not None}
    for name, picked in picks.items():
        print(f"{name}: {sum(1 for i in picked.values() if i == 0)} of {len(picked)} shared layers take {a}'s delta")
    weights: dict = {}
    with torch.no_grad():
        for key in keys:
            terms, base = plan[key], stack._backups[key]
            weights[key] = {name: stack._layer_weight(key).detach().clone() if name == "split"  # split's own fusion
                            else _fused_as(("first", "second")[picks[name][key]] if key in picks.get(name, {})
                                           else "sum" if name in picks else name, terms, base, adapters)
                            for name in names}
    return weights


def scheduled_split(bench: Bench, a: str, b: str, rows: list[str]):
    """Apply A + B in split; returns switch(row), which makes the layers outside cross-attention take the row's
    EARLY fusion above its timestep and LATE below it, and undo(), which removes the hook (then clear the stack)."""
    import torch

    parsed = {}
    for row in rows:
        sides, _, threshold = row.partition("@")
        early, _, late = sides.partition(":")
        if not (early and late and threshold):
            raise SystemExit(f"--schedule {row}: give EARLY:LATE@T, e.g. second:ties@600")
        parsed[row] = (_check_side(early), _check_side(late), float(threshold))
    bench.stack.apply([bench.spec(a), bench.spec(b)], "split")
    sides = {side for early, late, _ in parsed.values() for side in (early, late)}
    weights = _other_layer_weights(bench, a, b, (sides - {"alt"}) | ({"first", "second"} if "alt" in sides else set()))
    state = {"row": None, "fused": "split"}

    def use(name: str) -> None:
        if state["fused"] != name:
            with torch.no_grad():
                for key, rows_by_name in weights.items():
                    bench.stack._layer_weight(key).copy_(rows_by_name[name])
            state["fused"] = name

    def before_call(_module, args, kwargs):
        early, late, threshold = parsed[state["row"]]
        timestep = float(torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else 0)).flatten()[0])
        side = early if timestep > threshold else late
        if side == "alt":  # LoRA Switch: one adapter's delta a step, in turn, by the step's place in the sampler's run
            side = ("first", "second")[bench.pipe.scheduler.timesteps.tolist().index(int(timestep)) % 2]
        use(side)

    hook = bench.pipe.unet.register_forward_pre_hook(before_call, with_kwargs=True)
    return (lambda row: state.update(row=row)), hook.remove


def input_grams(bench: Bench, style: str, keys: list, prompts: int) -> dict:
    """{layer: X^T X} of every layer's inputs (rows: tokens or pixels) while `style` alone draws `prompts` of its
    own prompts (prompt seed 1, so not the prompts the rows are scored on), both halves of guidance."""
    import torch

    from stylelora.toy.evaluate import EvalSettings, build_prompts, generate_images

    grams: dict = {}

    def gather(key, _module, inputs):
        rows = inputs[0].movedim(1, -1) if inputs[0].ndim == 4 else inputs[0]  # a 1x1 conv's channels last
        rows = rows.reshape(-1, rows.shape[-1]).double()
        grams[key] = grams.get(key, 0) + rows.T @ rows

    bench.stack.apply([bench.spec(style)])
    layers = bench.stack._kohya_names("unet").layers
    hooks = [layers[key[1]].register_forward_pre_hook(lambda m, i, key=key: gather(key, m, i)) for key in keys]
    try:
        with torch.no_grad():
            generate_images(bench.pipe, build_prompts(prompts, 1, (style,)), EvalSettings(samples=prompts))
    finally:
        for hook in hooks:
            hook.remove()
        bench.stack.clear()
    return grams


def regmean_split(bench: Bench, a: str, b: str, prompts: int):
    """Apply A + B in split; returns use(alpha), which fuses every layer outside cross-attention that both adapters
    touch by RegMean at that alpha (the layers one adapter touches keep its delta, as in split)."""
    import torch

    from stylelora.generate import split_attention

    specs = [bench.spec(a), bench.spec(b)]
    plan = bench.stack._plan(specs, [bench.stack.load(spec.path) for spec in specs])
    both = [key for key, terms in plan.items() if key[0] == "unet" and len(terms) > 1
            and not split_attention.split_parts(bench.pipe.unet, key[1])]  # split runs those per adapter
    grams = [input_grams(bench, style, both, prompts) for style in (a, b)]
    bench.stack.apply(specs, "split")

    def use(alpha: float) -> None:
        with torch.no_grad():
            for key in both:
                base = bench.stack._backups[key]
                deltas = [delta.reshape(base.shape[0], -1) for delta in _term_deltas(plan[key], base.device,
                                                                                        torch.float64)]
                merged = regmean_delta(deltas, [grams[0][key], grams[1][key]], alpha)
                bench.stack._layer_weight(key).copy_((base.double() + merged.reshape(base.shape)).to(base.dtype))

    return use


def regmean_delta(deltas: list, grams: list, alpha: float):
    """RegMean's merge of (out, in) deltas: argmin_D sum_i |D X_i - d_i X_i|^2 = (sum d_i G_i)(sum G_i)^-1, each
    G_i = X_i^T X_i with its off-diagonal entries scaled by alpha (less than 1 keeps the solve well-posed)."""
    import torch

    kept = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    total = sum(kept)
    return torch.linalg.solve(total, sum(d @ g for d, g in zip(deltas, kept)).T).T  # total is symmetric


def eps_composition(bench: Bench, a: str, b: str, how: str):
    """embeds(texts) for Bench.score, with the pipeline's UNet call replaced (until the returned undo() runs) by
    three passes: the base, and a fused copy of each adapter, each on its own text encoding."""
    import copy

    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from stylelora.generate.split_attention import merge

    unet, copies = bench.pipe.unet, []
    for style in (a, b):
        bench.stack.apply([bench.spec(style)])
        copies.append(copy.deepcopy(unet))
    bench.stack.clear()
    base_forward = type(unet).forward

    def forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        base, *readings = encoder_hidden_states.chunk(3, dim=1)
        eps0 = base_forward(unet, sample, timestep, base, *args, return_dict=False, **kwargs)[0]
        eps = [model(sample, timestep, reading, *args, return_dict=False, **kwargs)[0]
               for model, reading in zip(copies, readings)]
        out = merge(eps0, eps) if how == "elementwise" else eps0 + sum(e - eps0 for e in eps)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def embeds(texts):
        (pos_0, neg_0), (pos_a, neg_a), (pos_b, neg_b) = (encodings(bench, styles, texts)
                                                         for styles in ((), (a,), (b,)))
        bench.stack.clear()  # the UNet's weights are the base's again: the copies hold the adapters
        return torch.cat([pos_0, pos_a, pos_b], dim=1), torch.cat([neg_0, neg_a, neg_b], dim=1)

    unet.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    return embeds, lambda: vars(unet).pop("forward", None)


def _deficit_row(row: str) -> tuple[str, float, float, float]:
    kind, *rest = row.split(":")
    if kind not in ("token", "layer") or len(rest) > 3:
        raise SystemExit(f"--deficit {row}: give KIND[:C[:T[:G]]], KIND token or layer, e.g. token:1:400:3")
    cap, below, gain = [float(value) for value in rest] + [1.0, 1000.0, 1.0][len(rest):]
    return kind, cap, below, gain


@contextmanager
def other_layers_corrected(bench: Bench, a: str, b: str, below: float, correction):
    """A + B applied in split, and in every UNet layer outside cross-attention that both adapters touch (linear and
    1x1 convolutions), at timesteps below `below`, correction(merged, owns) added to the layer's output: merged()
    gives the fused layer's change on its input (computed only if asked for), owns each adapter's own LoRA output,
    all channels last."""
    import torch

    stack, specs = bench.stack, [bench.spec(a), bench.spec(b)]
    stack.apply(specs, "split")
    plan, clock = stack._plan(specs, [stack.load(spec.path) for spec in specs]), {"t": 1000.0}

    def note_timestep(_module, args, kwargs):
        clock["t"] = float(torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else 0)).flatten()[0])

    def corrected(conv, factors, merged_delta, _module, inputs, output):
        if clock["t"] > below:
            return output
        x = inputs[0].movedim(1, -1) if conv else inputs[0]  # channels last
        extra = correction(lambda: x @ merged_delta.T, [(x @ down.T) @ up.T for up, down in factors])
        return output + (extra.movedim(-1, 1) if conv else extra)

    hooks = [bench.pipe.unet.register_forward_pre_hook(note_timestep, with_kwargs=True)]
    try:
        for key in [key for key in stack._fused if key[0] == "unet" and len(plan[key]) > 1]:
            layer = stack._kohya_names("unet").layers[key[1]]
            conv = isinstance(layer, torch.nn.Conv2d)
            if conv and layer.kernel_size != (1, 1):
                continue
            merged_delta = (layer.weight.detach().float() - stack._backups[key].float()).flatten(1)
            factors = [((weight * f.scale) * f.up.float().flatten(1), f.down.float().flatten(1))
                       for _, weight, f in plan[key]]
            hooks.append(layer.register_forward_hook(
                lambda module, inputs, output, c=conv, f=factors, m=merged_delta: corrected(c, f, m, module, inputs,
                                                                                             output)))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        stack.clear()


def deficit_restored(bench: Bench, a: str, b: str, row: str):
    """A + B applied in split, with each adapter's own output restored where the fused layers outside
    cross-attention fall short of it along its direction (the `deficit` merge, see the module's doc)."""
    kind, cap, below, gain = _deficit_row(row)

    def restore(merged_change, owns):
        merged, extra = merged_change(), 0
        for own in owns:
            dims = (-1,) if kind == "token" else tuple(range(1, own.ndim))
            share = (merged * own).sum(dims, keepdim=True) / (own * own).sum(dims, keepdim=True).clamp(min=1e-12)
            extra = extra + gain * (1 - share).clamp(min=0, max=cap) * own
        return extra

    return other_layers_corrected(bench, a, b, below, restore)


def _region_row(row: str) -> tuple[float, float, str]:
    power, _, rest = row.partition(":")
    below, _, only = rest.partition(":")
    if only not in ("", "first", "second"):
        raise SystemExit(f"--region {row}: give G[:T[:first|second]], e.g. 2:400:first")
    return float(power), float(below or 1000), only


def region_damped(bench: Bench, a: str, b: str, row: str):
    """A + B applied in split, with each adapter's own output in the layers outside cross-attention damped on the
    tokens where the other adapter acts more (the `region` merge, see the module's doc)."""
    power, below, only = _region_row(row)
    damped = {"": (0, 1), "first": (0,), "second": (1,)}[only]
    return other_layers_corrected(bench, a, b, below, lambda _merged, owns: region_damping(owns, power, damped))


def region_damping(owns: list, power: float, damped: tuple[int, ...]):
    """What the region merge adds to a layer's output: sum over the damped adapters of ((s_i / max_j s_j) ** power -
    1) x o_i, s_i the norm of adapter i's own output o_i (batch, tokens..., channels) at each token over its mean."""
    norms = [own.norm(dim=-1, keepdim=True) for own in owns]
    salience = [n / n.mean(dim=tuple(range(1, n.ndim)), keepdim=True).clamp(min=1e-12) for n in norms]
    top = salience[0].maximum(salience[1]).clamp(min=1e-12)
    return sum(((s / top) ** power - 1) * own for index, (s, own) in enumerate(zip(salience, owns)) if index in damped)


def line(rows: dict, a: str, b: str) -> str:
    stacked = rows[f"{a}+{b}"]
    both = (f"both {stacked['all_styles_rate']:.2f} ({a} {stacked[f'{a}_rate']:.2f}, {b} {stacked[f'{b}_rate']:.2f}; "
            f"shape {_fmt(stacked['shape_accuracy'])}, color {_fmt(stacked['color_accuracy'])})")
    if a not in rows:  # --stacked-only
        return both
    own_a, own_b = rows[a], rows[b]
    return (f"{both} | "
            f"{a} prompts: {a} {own_a[f'{a}_rate']:.2f}, {b} {own_a[f'{b}_rate']:.2f}, shape {_fmt(own_a['shape_accuracy'])} | "
            f"{b} prompts: {b} {own_b[f'{b}_rate']:.2f}, {a} {own_b[f'{a}_rate']:.2f}, shape {_fmt(own_b['shape_accuracy'])}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def window_rows(bench: Bench, a: str, b: str, windows: list[float], side: str, alone: float) -> None:
    """One row per window, and seconds per image against A fused alone (`alone_seconds`)."""
    for window in windows:
        timed_row(bench, a, b, f"{side} {window:.2f}", lambda: windowed_split(bench, a, b, window, side).remove,
                  alone)


def split_row(bench: Bench, a: str, b: str, label: str, sets: tuple[str, ...]) -> None:
    """A row for A + B in split as whatever is patched in now makes it; the stack is cleared afterwards."""
    pair = f"{a}+{b}"
    bench.stack.apply([bench.spec(a), bench.spec(b)], "split")
    try:
        print(f"{pair:15s} {label} {line(bench.score(sets), a, b)}", flush=True)
    finally:
        bench.stack.clear()


def alone_seconds(bench: Bench, a: str, b: str) -> float:
    """CPU seconds per image of A fused alone on the prompts carrying both triggers."""
    bench.stack.apply([bench.spec(a)])
    return bench.timed_score((f"{a}+{b}",))[1]


def timed_row(bench: Bench, a: str, b: str, label: str, apply, alone: float) -> None:
    """A row for what apply() installs (it returns the undo, or None), with CPU seconds per image against A fused
    alone on the pair's prompts (alone: `alone_seconds`)."""
    pair = f"{a}+{b}"
    undo = apply()
    try:
        rows, seconds = bench.timed_score((pair, a, b))
    finally:
        if undo is not None:
            undo()
        bench.stack.clear()  # takes any replaced processors out with the split
    print(f"{pair:15s} {label} {line(rows, a, b)} | {seconds / alone:.2f}x {a} fused alone", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    bench, start = Bench(args.adapters_dir, args.samples), time.perf_counter()
    print(f"{args.samples} prompts per set, seed 0; both-present (each rate) | each adapter's own prompts in the blend")
    for pair in args.pairs:
        a, b = pair.split("+")
        sets = (pair,) if args.stacked_only else (pair, a, b)
        bench.stack.apply([bench.spec(a), bench.spec(b)], "sum")
        print(f"{pair:15s} sum      {line(bench.score(sets), a, b)}", flush=True)
        if "concat" in args.merges:
            print(f"{pair:15s} concat   {line(bench.score(sets, concat_encoder(bench, a, b)), a, b)}", flush=True)
        if "compose" in args.merges:
            print(f"{pair:15s} compose  {line(bench.score(sets, compose_encoder(bench, a, b)), a, b)}", flush=True)
        if "eps" in args.merges:
            embeds, undo = eps_composition(bench, a, b, args.eps_merge)
            try:
                print(f"{pair:15s} eps {args.eps_merge} {line(bench.score(sets, embeds), a, b)}", flush=True)
            finally:
                undo()
        alone = alone_seconds(bench, a, b) if {"window", "uncond", "modules"} & set(args.merges) else None
        if "window" in args.merges:
            window_rows(bench, a, b, args.window, args.window_side, alone)
        if "uncond" in args.merges:
            timed_row(bench, a, b, "split", lambda: bench.stack.apply([bench.spec(a), bench.spec(b)], "split"), alone)
            timed_row(bench, a, b, "uncond", lambda: uncond_split(bench, a, b), alone)
        if "modules" in args.merges:
            for pattern in args.split_modules:
                timed_row(bench, a, b, pattern, lambda pattern=pattern: modules_split(bench, a, b, pattern), alone)
        if "rule" in args.merges:
            for rule in args.rule:
                with split_with_rule(rule):
                    split_row(bench, a, b, f"{rule:8s}", sets)
        if "order" in args.merges:
            with typed_order(bench):
                split_row(bench, a, b, "typed   ", sets)
        if "othersum" in args.merges:
            with other_layers_summed():
                split_row(bench, a, b, "othersum", sets)
        if {"order", "othersum"} & set(args.merges):  # split as it is, beside either (drawn once for both)
            split_row(bench, a, b, "split   ", sets)
        if "schedule" in args.merges:
            switch, undo = scheduled_split(bench, a, b, args.schedule)
            try:
                for row in args.schedule:
                    switch(row)
                    print(f"{pair:15s} {row} {line(bench.score(sets), a, b)}", flush=True)
            finally:
                undo()
                bench.stack.clear()
        if "regmean" in args.merges:
            split_row(bench, a, b, "split   ", sets)
            use = regmean_split(bench, a, b, args.calibration)
            try:
                for alpha in args.regmean_alpha:
                    use(alpha)
                    print(f"{pair:15s} regmean {alpha:g} {line(bench.score(sets), a, b)}", flush=True)
            finally:
                bench.stack.clear()
        if "gain" in args.merges:
            for row in args.gain:
                groups, _, gain = row.rpartition(":")
                with unet_gain(bench, groups, float(gain)):
                    split_row(bench, a, b, f"gain {row}", sets)
        if "deficit" in args.merges:
            split_row(bench, a, b, "split   ", sets)
            for row in args.deficit:
                with deficit_restored(bench, a, b, row):
                    print(f"{pair:15s} deficit {row} {line(bench.score(sets), a, b)}", flush=True)
        if "region" in args.merges:
            for row in args.region:
                with region_damped(bench, a, b, row):
                    print(f"{pair:15s} region {row} {line(bench.score(sets), a, b)}", flush=True)
        if "learned" in args.merges:
            loss = learned_merge(bench, a, b, args.steps)
            print(f"{pair:15s} learned  {line(bench.score(sets), a, b)} (fit loss {loss:.4f})", flush=True)
        bench.stack.clear()
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
