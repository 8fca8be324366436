"""Sampler names (ours and A1111's display names) -> diffusers schedulers built from the base's scheduler config.

Every scheduler is made fresh from the pipeline's own config (betas, timestep spacing, prediction type), so a
name means the same sampling on every base, and the name recorded in a PNG rebuilds the same scheduler.
"""
from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    """One sampler: our key, A1111's display name, the diffusers class and the config it overrides."""

    key: str
    display: str
    scheduler_class: str
    overrides: dict = field(default_factory=dict)
    needs: str | None = None  # an optional Python package the scheduler imports when it runs
    # A1111 1.9+ reads a PNG without "Schedule type" as "Automatic", which for some samplers means Karras or
    # Exponential sigmas (modules/sd_samplers_kdiffusion.py); those samplers' plain versions write "Uniform", the
    # evenly spaced timesteps that diffusers' own schedule is, so A1111 redraws them as drawn here.
    a1111_schedule: str | None = None


_KARRAS = {"use_karras_sigmas": True}
SAMPLERS = {s.key: s for s in (
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    # PLMS proper: no Runge-Kutta warm-up steps (which also fail below 4 steps).
    Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("heun", "Heun", "HeunDiscreteScheduler"),
    Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler", a1111_schedule="Uniform"),
    Sampler("dpm2_karras", "DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS),
    Sampler("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", a1111_schedule="Uniform"),
    Sampler("dpm++_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", a1111_schedule="Uniform"),
    Sampler("dpm++_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", _KARRAS),
    Sampler("dpm++_2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
            a1111_schedule="Uniform"),
    Sampler("dpm++_2m_sde_karras", "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", **_KARRAS}),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    Sampler("deis", "DEIS", "DEISMultistepScheduler"),
    Sampler("ddpm", "DDPM", "DDPMScheduler"),
    Sampler("lms", "LMS", "LMSDiscreteScheduler", needs="scipy"),
    Sampler("lms_karras", "LMS Karras", "LMSDiscreteScheduler", _KARRAS, needs="scipy"),
)}
# Aliases other tools write for the same samplers.
ALIASES = {"plms": "pndm", "k_euler": "euler", "k_euler_a": "euler_a", "euler_ancestral": "euler_a",
           "k_lms": "lms", "k_heun": "heun", "dpmpp_2m": "dpm++_2m", "dpmpp_2m_karras": "dpm++_2m_karras",
           "dpmpp_2m_sde": "dpm++_2m_sde", "dpmpp_2m_sde_karras": "dpm++_2m_sde_karras", "uni_pc": "unipc"}


def _normalise(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def available_samplers() -> list[str]:
    """Keys of the samplers that run in this environment (some need optional packages)."""
    return [key for key, sampler in SAMPLERS.items() if sampler.needs is None or _installed(sampler.needs)]


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_sampler(name: str, schedule_type: str | None = None) -> Sampler:
    """Our key, an alias or an A1111 display name ("DPM++ 2M Karras", or "DPM++ 2M" + schedule type "Karras")."""
    key = _normalise(name)
    if schedule_type and _normalise(schedule_type) == "karras" and not key.endswith("_karras"):
        key += "_karras"
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}. Choose one of: {', '.join(available_samplers())}.")
    sampler = SAMPLERS[key]
    if sampler.needs and not _installed(sampler.needs):
        raise ValueError(f"Sampler {sampler.display!r} needs the {sampler.needs} package: pip install {sampler.needs}")
    return sampler


def make_scheduler(base_scheduler: Any, name: str | None) -> tuple[Any, str]:
    """(scheduler, display name). None: a fresh copy of the base's own scheduler, named if we know its class."""
    import diffusers

    if name is None:
        scheduler = type(base_scheduler).from_config(base_scheduler.config)
        return scheduler, scheduler_display_name(base_scheduler)
    if name.endswith("Scheduler") and isinstance(getattr(diffusers, name, None), type):
        # A class name is what we record for a base scheduler no sampler matches: rebuild it as the base has it.
        return getattr(diffusers, name).from_config(base_scheduler.config), name
    sampler = resolve_sampler(name)
    scheduler_class = getattr(diffusers, sampler.scheduler_class)
    overrides = dict(sampler.overrides)
    # Explicit off-switch: a base config with Karras sigmas must not leak them into a plain sampler.
    if "use_karras_sigmas" in inspect.signature(scheduler_class.__init__).parameters:
        overrides.setdefault("use_karras_sigmas", False)
    return scheduler_class.from_config(base_scheduler.config, **overrides), sampler.display


def scheduler_display_name(scheduler: Any) -> str:
    """A1111's name for a scheduler instance (its class name when no sampler matches its config)."""
    class_name = type(scheduler).__name__
    config = scheduler.config
    karras = bool(config.get("use_karras_sigmas", False))
    best = None
    for sampler in SAMPLERS.values():
        if sampler.scheduler_class != class_name or bool(sampler.overrides.get("use_karras_sigmas")) != karras:
            continue
        # The most specific match wins: an SDE config matches "DPM++ 2M" (no overrides) and "DPM++ 2M SDE".
        if all(config.get(key) == value for key, value in sampler.overrides.items()):
            if best is None or len(sampler.overrides) > len(best.overrides):
                best = sampler
    return best.display if best else class_name
