"""Blend modes: how the weighted low-rank deltas of several adapters on one layer become that layer's one delta
(sum, and the interference-aware modes); used by the adapter stack (generation) and `stylelora blend` (files)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# sum and ties are functions of one layer's weighted deltas only, so they are static: the stack fuses them into the
# weights and `stylelora blend` writes them as a plain kohya LoRA. split runs each adapter's text encoder and
# cross-attention on its own at generation (stylelora.generate.split_attention): it depends on the prompt's
# activations, so no file can hold it. A layer that only one adapter touches gets that adapter's delta unchanged,
# and a single adapter is the same in every mode.
MODES = ("sum", "ties", "split")
STATIC_MODES = frozenset({"sum", "ties"})  # modes a saved file can hold ("split" depends on the prompt's activations)
# Generation defaults to split: it keeps both adapters more often than the sum on every pair of the default-trained
# adapters, lifts the pair where the sum collapses, and is never more than 0.03 below the sum on a second seed's
# (docs/results.md "The default adapters"); one adapter is the same in every mode. A file defaults to the sum, what
# A1111, ComfyUI and diffusers do, since split cannot be a file.
DEFAULT_MODE = "split"
DEFAULT_FILE_MODE = "sum"
DESCRIPTIONS = {
    "sum": "plain weighted sum of the deltas (A1111/ComfyUI/diffusers)",
    "ties": "TIES-style sign election per weight entry: where the adapters push an entry in opposite directions, "
            "only the side that wins the sum is kept (no cancelling); agreeing entries add up",
    "split": "each adapter reads the prompt with its own text-encoder LoRA, its trigger moved after the other "
             "adapters' (their order does not matter), and runs its own cross-attention on it, so a character no "
             "longer pulls the attention off a style's trigger; the attention outputs merge per element (the "
             "largest increase plus the largest decrease); other layers are merged as in ties, each adapter's kept "
             "entries scaled back to its whole strength in the layer; generation only (not a static file)",
}


class BlendModeError(ValueError):
    """An unknown mode, or a dynamic mode asked to become a static file; the message says what to use instead."""


def check_mode(mode: str | None) -> str:
    """The mode name (None: the default), or BlendModeError listing the modes."""
    mode = DEFAULT_MODE if mode is None else str(mode).strip().lower()
    if mode not in MODES:
        raise BlendModeError(f"Unknown blend mode {mode!r}: use one of {', '.join(MODES)}.")
    return mode


def mode_help(saving: bool = False) -> str:
    """The modes for a --blend-mode help text: those of generation, or (saving) those a file can hold."""
    if saving:
        static = [mode for mode in MODES if mode in STATIC_MODES]
        return f"{' | '.join(static)} (default {DEFAULT_FILE_MODE}: what A1111/ComfyUI/diffusers do)"
    return (f"{' | '.join(MODES)} (default {DEFAULT_MODE}; one adapter is the same in every mode; "
            "sum is what A1111/ComfyUI/diffusers do)")


def check_static(mode: str) -> str:
    """The mode, if a saved kohya file can hold it; otherwise BlendModeError saying why."""
    mode = check_mode(mode)
    if mode not in STATIC_MODES:
        static = ", ".join(sorted(STATIC_MODES))
        raise BlendModeError(f"Blend mode {mode!r} runs each adapter's text encoder and cross-attention on their "
                             "own at generation, which depends on the prompt, so no static LoRA file can hold it; "
                             f"generate with it live (generate/grid --blend-mode {mode}, or the app's Generate tab), "
                             f"or save with one of {static}.")
    return mode


# split's rescale gives a delta that lost entries in the election at most this factor on the entries it kept: a delta
# that nearly cancels against the other keeps a few entries, and scaling those to its whole norm would put spikes in
# the weights. The default-trained toy adapters need at most 1.21 in any layer (all three pairs, three seeds), so the
# cap changes none of the measured blends.
RESCALE_CAP = 2.0

Term = tuple[Any, Any]  # (up (out, r) with weight * alpha/rank folded in, down (r, in)); fp32 tensors


def sum_delta(terms: Sequence[Term]):
    """sum_i up_i @ down_i as one matmul over the concatenated ranks (the stack's plain path, bit for bit)."""
    import torch

    return torch.cat([up for up, _ in terms], dim=1) @ torch.cat([down for _, down in terms], dim=0)


def merged_delta(terms: Sequence[Term], mode: str):
    """The layer's delta (out, in) under `mode`. One term, or mode "sum": the plain sum. "split": the delta of a
    layer split fuses (one that does not run per adapter): ties, rescaled."""
    mode = check_mode(mode)
    if mode == "sum" or len(terms) == 1:
        return sum_delta(terms)
    return ties_delta([up @ down for up, down in terms], rescale=mode == "split")


def merged_factors(terms: Sequence[Term], mode: str) -> tuple[Any, Any, bool]:
    """(up, down, exact) with up @ down the layer's delta under `mode`, for a file.

    sum stays low rank (concatenated factors: exact). ties is a full matrix in general: it is
    factored by SVD, keeping every singular value above float noise, so it is exact to float precision too.
    """
    import torch

    mode = check_static(mode)
    if mode == "sum" or len(terms) == 1:
        return torch.cat([up for up, _ in terms], dim=1), torch.cat([down for _, down in terms], dim=0), True
    delta = merged_delta(terms, mode).double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = max(1, int((s > s[0] * 1e-7).sum())) if s.numel() and s[0] > 0 else 1
    root = s[:keep].sqrt()
    return (u[:, :keep] * root).float(), (root[:, None] * vh[:keep]).float(), True


def ties_delta(deltas: Sequence[Any], rescale: bool = False):
    """TIES-merging's elect + disjoint step on full deltas, summing (not averaging) the agreeing entries; with
    `rescale`, each delta's kept entries scaled back to that delta's whole norm (by at most RESCALE_CAP).

    Per entry: the elected sign is the sign of the plain sum; each delta contributes only where its sign agrees.
    Entries where all agree equal the plain sum; where they conflict, the winning side is kept whole instead of
    being cancelled down. (TIES' trim step is left out: LoRA deltas are dense and low rank, trimming them changes
    what a single adapter does; TIES' mean would halve every agreeing entry.)

    Why split rescales (DARE's rescale, arXiv 2311.03099, on the entries the election drops rather than random ones):
    a delta that loses entries to the other side loses that much of its strength in the layer (the toy adapters keep
    92-98 % of their norm), and a style or character a little short of its strength is drawn much less often (the
    rates rise as a step with the weight). With split's layers outside cross-attention scaled back, the character
    beside pastel shows on 0.79 / 0.74 / 0.68 of the images against 0.75 / 0.70 / 0.64 at three seeds, the other pairs
    within 0.02. The ties mode, which merges the text encoders and cross-attention this way too, keeps the plain
    election: rescaled there, stripes+pastel fell from 0.73 to 0.635 (docs/results.md, "Ties rescaled").
    """
    import torch

    if rescale:
        return rescaled_sum(elected_parts(deltas))
    merged = torch.zeros_like(deltas[0])
    for _, kept in elected_parts(deltas):
        merged += kept
    return merged


def rescaled_sum(parts):
    """The sum of each (delta, kept part) pair's kept part scaled back to its delta's whole norm, by at most
    RESCALE_CAP (a part that kept nothing adds nothing)."""
    import torch

    merged = None
    for delta, kept in parts:
        merged = torch.zeros_like(delta) if merged is None else merged
        kept_norm = float(kept.norm())
        if kept_norm > 0:
            merged.add_(kept, alpha=min(float(delta.norm()) / kept_norm, RESCALE_CAP))
    return merged


def elected_parts(deltas: Sequence[Any]):
    """(delta, its kept part) for each delta: TIES' sign election, the kept part holding the delta's entries whose sign
    is the sign of the deltas' sum (zero elsewhere)."""
    import torch

    # Added in place one delta at a time rather than stacked: half the memory traffic, and the split mode runs this
    # on every layer outside cross-attention at each weight change (SD 1.5 on one CPU thread: seconds).
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    elected = torch.sign(total)
    for delta in deltas:
        yield delta, torch.where(torch.sign(delta) == elected, delta, 0.0)


def uniform_alpha(state: dict, alpha: float) -> None:
    """Give every module of a kohya state the same alpha, folding alpha/rank into lora_up so the deltas stay equal.

    A merged file has a different rank in each module; with alpha = rank per module, diffusers' kohya loader drops
    the per-module alphas of attention layers (its alpha_pattern keys do not match) and scales them wrongly. One
    alpha for all (the file's ss_network_alpha) loads the same in A1111, ComfyUI, diffusers and here.
    """
    import torch

    for key in [k for k in state if k.endswith(".alpha")]:
        name = key[: -len(".alpha")]
        up, old_alpha = state[f"{name}.lora_up.weight"], float(state[key].item())
        state[f"{name}.lora_up.weight"] = (up.float() * (old_alpha / alpha)).to(up.dtype).contiguous()
        state[key] = torch.tensor(float(alpha), dtype=state[key].dtype)
