"""What the split blend mode costs per denoising step on a real architecture, measured side by side in one run.

The split mode (stylelora.generate.split_attention) runs the attention core of every UNet cross-attention module
once more per adapter, plus each adapter's LoRA products; the text encoders run once more per adapter per image,
which is small beside the steps. This times one UNet call (CFG batch of 2) of a random-init UNet built from the
published config (stylelora/models/configs/FAMILY/unet.json) at the family's native size: the plain UNet (what a
fused sum costs: the same weights, the same work) against the same UNet (one model, the processors swapped between
calls) with every cross-attention module split for ADAPTERS adapters (each with a random rank-RANK LoRA on q, k, v
and out, and its own reading of the prompt), alternating the two, median of --repeats calls each. The processors
are installed afresh for every call, so each call computes its keys and values as an image's first step does: the
figure is the dearest step. With --later-step each timed call follows an untimed one with the same text states, as
an image's later steps do (split reuses its keys and values there).

    python benchmarks/split_cost.py --family sd15 --repeats 3
    python benchmarks/split_cost.py --family sd15 --repeats 3 --later-step
    python benchmarks/split_cost.py --family sdxl --repeats 2 --adapters 2
    python benchmarks/split_cost.py --family sdxl --memory     # what split keeps per image, from the config
    python benchmarks/split_cost.py --family toy --attention-floor   # the extra attention cores alone, per step
    python benchmarks/split_cost.py --family sdxl --device cuda --dtype float16 --repeats 20   # on a GPU
    python benchmarks/split_cost.py --family sd15 --operators   # operators launched per UNet call, not seconds

Figures: docs/results.md, "The split blend mode".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NATIVE_LATENT = {"sd15": 64, "sdxl": 128, "toy": 8}  # 512 px and 1024 px through the f=8 VAE; the toy's 32 px


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(NATIVE_LATENT), default="sd15",
                        help="sd15 / sdxl: random-init UNet from the published config; toy: the toy base's config")
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of each adapter's q, k, v and out")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the family's native)")
    parser.add_argument("--later-step", action="store_true",
                        help="time a later step (the call after one with the same text states) instead of the first")
    parser.add_argument("--attention-floor", action="store_true",
                        help="only time the extra attention cores split runs per step (at the UNet's own shapes)")
    parser.add_argument("--operators", action="store_true",
                        help="only count the operators (views aside) one UNet call runs: plain, split's first step "
                             "and a later one; on a GPU each is a kernel launch, which is what split costs there")
    parser.add_argument("--memory", action="store_true",
                        help="only print what split keeps per image (the cached keys and values), from the config")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the UNet runs")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="the UNet's and the inputs' dtype (float16 is what users run on a GPU)")
    return parser.parse_args(argv)


def build_unet(family: str, meta: bool = False, device: str = "cpu", dtype: str = "float32"):
    """A random-init UNet of the family's published config (toy: the toy base's config); meta: the architecture
    without its memory, enough to read layer sizes."""
    import torch
    from diffusers import UNet2DConditionModel

    from stylelora.models.load import TOY_BASE_DIR

    configs = REPO / "stylelora" / "models" / "configs"
    path = TOY_BASE_DIR / "unet" / "config.json" if family == "toy" else configs / family / "unet.json"
    torch.manual_seed(0)
    # Built where it runs: initialising SDXL's 2.6B weights on a GPU takes seconds, on a CPU minutes.
    with torch.device("meta") if meta else torch.device(device):
        unet = UNet2DConditionModel.from_config(json.loads(path.read_text())).eval()
    return unet if meta else unet.to(device, getattr(torch, dtype))


def attention_floor(unet, latent: int, adapters: int, repeats: int = 200) -> tuple[float, float]:
    """(seconds per UNet call of the cross-attention cores at CFG batch 2, the same with the base's and each
    adapter's attention in one batch, as split runs them): what split cannot save, whatever else it does. The
    shapes are those one plain call gives each cross-attention module."""
    import torch
    import torch.nn.functional as F

    from stylelora.generate import split_attention

    shapes, hooks = [], []
    for path in split_attention.cross_attention_modules(unet):
        attn = unet.get_submodule(path)
        hooks.append(attn.register_forward_pre_hook(
            lambda module, args, kwargs: shapes.append((args[0].shape[1], module.heads,
                                                        module.to_q.out_features // module.heads)),
            with_kwargs=True))
    sample, timestep, context, kwargs = call_inputs(unet, latent, 1)
    with torch.no_grad():
        unet(sample, timestep, context, **kwargs)
    for hook in hooks:
        hook.remove()

    def cores(batch: int) -> float:
        like = {"device": unet.device, "dtype": unet.dtype}
        inputs = [(torch.randn(batch, heads, queries, dim, **like), torch.randn(batch, heads, 77, dim, **like))
                  for queries, heads, dim in shapes]
        synchronize(unet)
        start = time.perf_counter()
        for _ in range(repeats):
            for query, key in inputs:
                F.scaled_dot_product_attention(query, key, key)
        synchronize(unet)
        return (time.perf_counter() - start) / repeats

    return cores(2), cores(2 * (adapters + 1))


VIEWS = frozenset({"view", "_unsafe_view", "_reshape_alias", "as_strided", "alias", "t", "transpose", "permute",
                   "expand", "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "chunk",
                   "unbind", "detach", "reshape", "flatten"})  # no work of their own: not counted


def count_operators(call) -> int:
    """How many aten operators call() dispatches, views aside (each one a kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEWS:
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        call()
    return Counter.count


def operators_per_call(unet, latent: int, adapters: int, rank: int) -> dict[str, int]:
    """{plain, split first step, split later step: operators one UNet call runs}."""
    import torch

    plain_inputs, split_inputs = call_inputs(unet, latent, 1), call_inputs(unet, latent, adapters + 1)
    counts = {}
    with torch.no_grad():
        set_split(unet, 0, rank)
        counts["plain"] = count_operators(lambda: unet(*plain_inputs[:3], **plain_inputs[3]))
        set_split(unet, adapters, rank)  # installed afresh: the first call stacks the factors and computes the keys
        unet(*split_inputs[:3], **split_inputs[3])
        fresh = call_inputs(unet, latent, adapters + 1)  # another image's text states: its first step
        counts["split, first step"] = count_operators(lambda: unet(*fresh[:3], **fresh[3]))
        counts["split, later step"] = count_operators(lambda: unet(*fresh[:3], **fresh[3]))
        set_split(unet, 0, rank)
    return counts


def kept_keys_values_bytes(unet, adapters: int, batch: int = 2, tokens: int = 77, bytes_per_value: int = 4) -> int:
    """What split keeps while an image is drawn: every cross-attention module's keys and values for the base's
    reading and each adapter's (batch of `batch`: one image with classifier-free guidance)."""
    from stylelora.generate import split_attention

    readings = (adapters + 1) * tokens * batch
    modules = [unet.get_submodule(path) for path in split_attention.cross_attention_modules(unet)]
    return sum(2 * readings * attn.to_k.out_features * bytes_per_value for attn in modules)


def set_split(unet, adapters: int, rank: int) -> None:
    """Run every cross-attention module split for `adapters` adapters, each with a rank-`rank` LoRA on q, k, v and
    out (0 adapters: the plain processors again)."""
    import torch

    from stylelora.generate import split_attention

    generator = torch.Generator().manual_seed(0)
    for parent in split_attention.cross_attention_modules(unet):
        if not adapters:
            split_attention.uninstall_attention(unet, parent)
            continue
        attn = unet.get_submodule(parent)
        like = {"device": unet.device, "dtype": unet.dtype}
        variants = [{name: ((torch.randn(layer.out_features, rank, generator=generator) * 1e-3).to(**like),
                            (torch.randn(rank, layer.in_features, generator=generator) * 1e-3).to(**like))
                     for name in split_attention.PROJECTIONS for layer in [attn.get_submodule(name)]}
                    for _ in range(adapters)]
        split_attention.install_attention(unet, parent, variants)


def call_inputs(unet, latent: int, copies: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator)
    context = torch.randn(2, 77 * copies, unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop ids
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=generator),
                                       "time_ids": torch.zeros(2, 6)}
    like = {"device": unet.device, "dtype": unet.dtype}
    kwargs = {key: {name: value.to(**like) for name, value in inner.items()} for key, inner in kwargs.items()}
    return sample.to(**like), torch.tensor([500, 500], device=unet.device), context.to(**like), kwargs


def synchronize(unet) -> None:
    """Wait for the GPU's queued work, so that a wall-clock interval covers it (a no-op on the CPU)."""
    import torch

    if unet.device.type == "cuda":
        torch.cuda.synchronize(unet.device)


def timed_call(unet, inputs, adapters: int, rank: int, later_step: bool = False) -> float:
    """One UNet call's seconds right after the processors are installed (an image's first step), or (later_step)
    of the call after an untimed one with the same text states (a later step: split reuses its keys and values)."""
    import torch

    set_split(unet, adapters, rank)
    sample, timestep, context, kwargs = inputs
    with torch.no_grad():
        if later_step:
            unet(sample, timestep, context, **kwargs)
        synchronize(unet)
        start = time.perf_counter()
        unet(sample, timestep, context, **kwargs)
        synchronize(unet)
    return time.perf_counter() - start


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if args.memory:
        kept = kept_keys_values_bytes(build_unet(args.family, meta=True), args.adapters)
        print(f"{args.family}, {args.adapters} adapters split: keys and values kept per image (CFG batch 2) "
              f"{kept / 2**20:.0f} MiB in float32, {kept / 2**21:.0f} MiB in float16")
        return 0
    latent = args.latent or NATIVE_LATENT[args.family]
    unet = build_unet(args.family, device=args.device, dtype=args.dtype)
    if args.operators:
        from stylelora.generate.split_attention import cross_attention_modules

        counts = operators_per_call(unet, latent, args.adapters, args.rank)
        modules = len(cross_attention_modules(unet))
        print(f"{args.family} UNet, latents {latent}x{latent}, CFG batch 2, {args.adapters} adapters split, "
              f"{modules} cross-attention modules: operators per call (views aside)")
        for name, count in counts.items():
            extra = f", {(count - counts['plain']) / modules:+.1f} a module" if name != "plain" else ""
            print(f"  {name:18} {count:6d}{extra}")
        return 0
    if args.attention_floor:
        plain_s, split_s = attention_floor(unet, latent, args.adapters)
        print(f"{args.family}, latents {latent}x{latent}: cross-attention cores per UNet call {plain_s * 1e3:.2f} ms "
              f"at CFG batch 2, {split_s * 1e3:.2f} ms with {args.adapters} adapters split: "
              f"{(split_s - plain_s) * 1e3:.2f} ms more per step")
        return 0
    plain_inputs, split_inputs = call_inputs(unet, latent, 1), call_inputs(unet, latent, args.adapters + 1)
    where = torch.cuda.get_device_name(unet.device) if unet.device.type == "cuda" else "CPU"
    print(f"{args.family} UNet, latents {latent}x{latent}, CFG batch 2, {args.adapters} adapters split; "
          f"{where}, {args.dtype}; torch threads {torch.get_num_threads()}", flush=True)
    timed_call(unet, plain_inputs, 0, args.rank), timed_call(unet, split_inputs, args.adapters, args.rank)  # warm-up
    times = {"plain": [], "split": []}
    for repeat in range(args.repeats):
        times["plain"].append(timed_call(unet, plain_inputs, 0, args.rank, args.later_step))
        times["split"].append(timed_call(unet, split_inputs, args.adapters, args.rank, args.later_step))
        print(f"  call {repeat + 1}: plain {times['plain'][-1]:.4f} s, split {times['split'][-1]:.4f} s", flush=True)
    plain_s, split_s = statistics.median(times["plain"]), statistics.median(times["split"])
    print(f"UNet call: plain {plain_s:.4f} s, split {split_s:.4f} s, split / plain {split_s / plain_s:.3f}x "
          f"(target for a blend <= 1.1x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
