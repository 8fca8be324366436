"""Reads LyCORIS modules (LoHa, LoKr, LoCon's Tucker middle) as the plain LoRA of the same weight change, exactly.

(A plain LoRA module with a `.scale` is read here too, as the same factors with alpha = scale · rank.)

A1111's built-in Lora extension and ComfyUI apply these files. Each module's change is built from small factors, and
every such change is itself low rank, so it is rewritten as `lora_down` / `lora_up` / `alpha` with no loss and the
rest of stylelora (generation, blend modes, split, `blend`, `inspect`) reads it as it reads any LoRA:

    LoHa    (A1 B1) ⊙ (A2 B2)              rank r1·r2: up columns a1_i ⊙ a2_j, down rows b1_i ⊙ b2_j
    LoKr    kron(W1, W2), each full or A B  rank rank(W1)·rank(W2): up kron(U1, U2), down kron(V1, V2)
    Tucker  a core t (r, r, kh, kw) between a pair's two factors (hada_t1/t2, lokr_t2, LoCon's lora_mid),
            folded into the down factor: rank r

The scale is A1111's (extensions-builtin/Lora/network.py): a `.scale` tensor if the module has one, else alpha over
the factors' rank (a LoKr's: its low-rank half's; 1 when both halves are full, or without `.alpha`). A convolution
whose factors LyCORIS stores flat, (r, in·kh·kw), stays flat here, as nothing in the file tells its kernel: the loader
fits it to the layer it lands on (`formats.fit_to_layer`, as A1111 does), and `blend` to the file's family.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from stylelora.lora.formats import group_kohya_modules

if TYPE_CHECKING:
    import torch

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOHA_CORES = ("hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOCON_CORE = "lora_mid.weight"
SCALE = "scale"
SUFFIXES = frozenset(LOHA + LOHA_CORES + LOKR + (LOCON_CORE,))
PLAIN_WITH_SCALE = frozenset(("lora_down.weight", "lora_up.weight", SCALE))  # and alpha, which .scale overrides
PLAIN_WITH_SCALE_ALPHA = PLAIN_WITH_SCALE | {"alpha"}


def needs_rewrite(keys) -> bool:
    """Whether kohya keys hold a module as_plain_lora rewrites (a LyCORIS one, or a plain one with `.scale`)."""
    return any(key.partition(".")[2] in SUFFIXES or key.endswith("." + SCALE) for key in keys)


def module_kind(suffixes) -> str | None:
    """"LoHa", "LoKr", "LoCon (Tucker)" for a module with those tensor suffixes (complete or not: the converters
    name what an incomplete one lacks), None for anything else."""
    suffixes = set(suffixes)
    if any(suffix.startswith("hada_") for suffix in suffixes):
        return "LoHa"
    if suffixes & set(LOKR):
        return "LoKr"
    if LOCON_CORE in suffixes:
        return "LoCon (Tucker)"
    return None


def kinds_in(keys) -> Counter:
    """{kind: module count} of the LyCORIS modules among kohya keys `<module>.<suffix>` (header only, no tensors)."""
    modules = group_kohya_modules(dict.fromkeys(keys)).modules
    return Counter(kind for kind in map(module_kind, modules.values()) if kind)


def as_plain_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kohya state with every LyCORIS module rewritten as lora_down / lora_up / alpha; other keys unchanged
    (DoRA, full-weight diffs and the like stay as they are, for the loaders' own refusal, and so does what a LyCORIS
    module holds beside its factors, e.g. a dora_scale). ValueError naming what an incomplete module lacks."""
    plain: dict[str, torch.Tensor] = {}
    for name, parts in group_kohya_modules(state).modules.items():
        kind = module_kind(parts)
        if kind is None:
            parts = _scale_as_alpha(parts) if set(parts) in (PLAIN_WITH_SCALE, PLAIN_WITH_SCALE_ALPHA) else parts
            plain.update({f"{name}.{suffix}": tensor for suffix, tensor in parts.items()})
            continue
        _check_complete(name, kind, parts)
        up, down, scale = _CONVERTERS[kind](name, parts)
        up, down = _at_most_full_rank(up, down)
        kernel = _kernel(parts) or ((1, 1) if any(tensor.dim() == 4 for tensor in parts.values()) else None)
        if kernel is not None:  # a convolution the file shows as one: kohya's conv shapes
            up, down = up[:, :, None, None], down.reshape(down.shape[0], -1, *kernel)
        # float32 whatever the file's dtype (as ComfyUI computes them): a LoHa's Khatri-Rao products of fp16 factors
        # rounded back to fp16 would change every weight by ~1e-3 of the change; the loaders cast to the model's dtype.
        plain[f"{name}.lora_up.weight"] = up.contiguous()
        plain[f"{name}.lora_down.weight"] = down.contiguous()
        plain[f"{name}.alpha"] = _alpha_tensor(scale * down.shape[0])
        # What the rewrite does not use (a DoRA dora_scale beside hada_*, a bias) changes what A1111 applies: kept,
        # so that the loaders refuse the module naming it, instead of applying a different change silently.
        plain.update({f"{name}.{suffix}": tensor for suffix, tensor in parts.items() if suffix not in _USED[kind]})
    return plain


def _scale_as_alpha(parts: dict) -> dict:
    """A plain LoRA module with A1111's `.scale` (applied instead of alpha / rank; ComfyUI ignores it) as the same
    module with alpha = scale · rank, which every loader reads alike."""
    rank = parts["lora_down.weight"].shape[0]
    return {"lora_down.weight": parts["lora_down.weight"], "lora_up.weight": parts["lora_up.weight"],
            "alpha": _alpha_tensor(float(parts[SCALE].item()) * rank)}


def _at_most_full_rank(up, down):
    """The same change at rank min(out, in·kh·kw) where the rewrite's is higher (a LoHa of dim r has r², a LoKr of
    two full halves the layer's full rank): the product whole on the smaller side, the identity on the other, so the
    factors never hold more than that side's square beside the change itself."""
    import torch

    out, inner = up.shape[0], down.shape[1]
    if down.shape[0] <= min(out, inner):
        return up, down
    change = up @ down
    return (torch.eye(out), change) if out <= inner else (change, torch.eye(inner))


def _check_complete(name: str, kind: str, parts: dict) -> None:
    """ValueError naming the tensors a LyCORIS module lacks (A1111 would skip the module, or fail on it)."""
    missing = [suffix for suffix in _REQUIRED[kind] if suffix not in parts]
    if kind == "LoHa" and ("hada_t1" in parts) != ("hada_t2" in parts):  # Tucker cores come in pairs
        missing.append("hada_t2" if "hada_t1" in parts else "hada_t1")
    if kind == "LoKr":
        missing += [f"its {half} factor (lokr_{half}, or lokr_{half}_a with lokr_{half}_b)" for half in ("w1", "w2")
                    if f"lokr_{half}" not in parts and not {f"lokr_{half}_a", f"lokr_{half}_b"} <= set(parts)]
    if missing:
        raise ValueError(f"LyCORIS {kind} module {name} lacks {', '.join(missing)}; it has {', '.join(sorted(parts))}. "
                         "The file is incomplete or damaged: download it again, or ask its author for a complete file.")


def _kernel(parts: dict) -> tuple[int, ...] | None:
    """(kh, kw) of a convolution the module's tensors show (a core, or a 4-d factor), None for 1x1 or unknown."""
    for suffix in (*LOHA_CORES, "lokr_t2", LOCON_CORE, "lokr_w2", "hada_w1_b", "hada_w2_b", "lokr_w2_b"):
        tensor = parts.get(suffix)
        if tensor is not None and tensor.dim() == 4 and tuple(tensor.shape[2:]) != (1, 1):
            return tuple(tensor.shape[2:])
    return None


def _alpha_tensor(value: float):
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def _scale(parts: dict, rank: int | None) -> float:
    if SCALE in parts:
        return float(parts[SCALE].item())
    if rank is None or "alpha" not in parts:
        return 1.0
    return float(parts["alpha"].item()) / rank


def _factor_pair(parts: dict, first: str, second: str, core: str | None):
    """(up (out, r), down (r, in·kh·kw)) of one `first @ second` pair, its Tucker core folded into down; with a
    core LyCORIS stores the pair transposed, first (r, out) and second (r, in)."""
    import torch

    a, b = parts[first].float(), parts[second].float()
    if core is None or core not in parts:
        return a.flatten(1), b.flatten(1)
    folded = torch.einsum("ijkl,jc->ickl", parts[core].float(), b.flatten(1))  # (r, in, kh, kw)
    return a.flatten(1).T.contiguous(), folded.flatten(1)


def _loha(name: str, parts: dict):
    up1, down1 = _factor_pair(parts, "hada_w1_a", "hada_w1_b", "hada_t1")
    up2, down2 = _factor_pair(parts, "hada_w2_a", "hada_w2_b", "hada_t2")
    _check_fits(name, "LoHa", (up1.shape[0], down1.shape[1]), (up2.shape[0], down2.shape[1]))
    # (sum_i a1_i b1_i) ⊙ (sum_j a2_j b2_j) = sum_ij (a1_i ⊙ a2_j)(b1_i ⊙ b2_j): a Khatri-Rao product each side.
    up = (up1[:, :, None] * up2[:, None, :]).flatten(1)
    down = (down1[:, None, :] * down2[None, :, :]).flatten(0, 1)
    return up, down, _scale(parts, parts["hada_w1_b"].shape[0])


def _lokr_half(parts: dict, half: str):
    """(U, V) with U @ V = the half's matrix W (flattened to 2-d): its own factors, or W and an identity."""
    import torch

    full = parts.get(f"lokr_{half}")
    if full is not None:
        matrix = full.float().flatten(1)
        rows, columns = matrix.shape
        return (torch.eye(rows), matrix) if rows <= columns else (matrix, torch.eye(columns))
    return _factor_pair(parts, f"lokr_{half}_a", f"lokr_{half}_b", "lokr_t2" if half == "w2" else None)


def _lokr(name: str, parts: dict):
    import torch

    (u1, v1), (u2, v2) = _lokr_half(parts, "w1"), _lokr_half(parts, "w2")
    # kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2); a 4-d W2 flattened to (b, d·kh·kw) gives the same kron as
    # A1111's kron of W1[:, :, None, None] with it.
    rank = next((parts[key].shape[0] for key in ("lokr_w2_b", "lokr_w1_b") if key in parts), None)
    return torch.kron(u1, u2), torch.kron(v1, v2), _scale(parts, rank)


def _locon_tucker(name: str, parts: dict):
    import torch

    up, down, core = parts["lora_up.weight"].float(), parts["lora_down.weight"].float(), parts[LOCON_CORE].float()
    # down is a 1x1 conv to r channels, the core an r -> r conv with the layer's kernel: together one conv.
    folded = torch.einsum("ijkl,jc->ickl", core, down.flatten(1))
    return up.flatten(1), folded.flatten(1), _scale(parts, down.shape[0])


def _check_fits(name: str, kind: str, first: tuple[int, int], second: tuple[int, int]) -> None:
    if first != second:
        raise ValueError(f"LyCORIS {kind} module {name}: its two factor pairs make {first} and {second} changes; "
                         "they must be the same shape. The file is damaged or not a LyCORIS file.")


_CONVERTERS = {"LoHa": _loha, "LoKr": _lokr, "LoCon (Tucker)": _locon_tucker}
_REQUIRED = {"LoHa": LOHA, "LoKr": (), "LoCon (Tucker)": ("lora_down.weight", "lora_up.weight")}
_USED = {"LoHa": frozenset(LOHA + LOHA_CORES + ("alpha", SCALE)), "LoKr": frozenset(LOKR + ("alpha", SCALE)),
         "LoCon (Tucker)": frozenset(("lora_down.weight", "lora_up.weight", LOCON_CORE, "alpha", SCALE))}
