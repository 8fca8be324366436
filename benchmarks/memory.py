"""Peak memory of a training step, side by side in one run: a full UNet fine-tune vs the LoRA modes of the trainer.

    full           full UNet fine-tune: every UNet weight trains with AdamW in fp32, text encoder(s) and VAE frozen
                   (fp32), the VAE encoding each batch; a small loop in this file, written independently of
                   stylelora's trainer, as diffusers' examples/text_to_image/train_text_to_image.py does it
    lora           `stylelora train`: LoRA rank 16 (alpha 16) on the UNet (kohya targets) and the text encoder(s),
                   fp32 base (--precision fp32): the default on CPU, with the family preset's gradient
                   checkpointing (on for SD 1.x/2.x and SDXL)
    no-checkpointing  lora with --no-gradient-checkpointing
    bf16           the same with --precision bf16: frozen weights in bf16, LoRA weights and AdamW state in fp32
    nf4            lora + --quantize-base nf4 --precision bf16: the frozen UNet's Linear layers stored 4-bit
                   (bitsandbytes), everything else frozen in bf16 (QLoRA)

Bases: random weights in the published architectures, saved once as fp32 diffusers folders (in a temp dir, or
--base-dir): SD 1.5 (UNet and CLIP text encoder from stylelora/models/configs/sd15, the VAE and scheduler configs
below) and SDXL base (stylelora/models/configs/sdxl, its VAE config below), each with the toy base's CLIP tokenizer
(its ids all fall inside the text encoders' 49408-token embeddings). Every mode trains batch 1 at 256 px on CPU
(512 px on CUDA) for 2 steps (--no-samples --save-every 0, base preservation off so that every mode runs one UNet
pass per sample), each in a fresh subprocess, one after another. Peak memory: on CPU the subprocess's peak resident
set (ru_maxrss from wait4, the same figure as VmHWM), loading included; on CUDA torch.cuda.max_memory_allocated.
s/step: the last step's wall time (the first warms up). A full fine-tune that cannot fit (SDXL's needs ~16 bytes per
UNet weight: ~45 GB) is skipped with its estimate, and that base's rows then have no ratio.

    python benchmarks/memory.py                              # SD 1.5 and SDXL, every mode
    python benchmarks/memory.py --bases sd15 --modes full,lora,nf4 --json memory.json
    python benchmarks/memory.py --base-dir /tmp/bases        # keep (or reuse) the built bases
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
STEPS = 2
RANK = 16
CPU_RESOLUTION, CUDA_RESOLUTION = 256, 512
IMAGES = 4
TARGET_DEFAULT_LORA = 0.35  # the default LoRA run's peak / the full fine-tune's
TARGET_BEST_LORA = 0.20  # the best LoRA mode's peak / the full fine-tune's
FULL_BYTES_PER_UNET_WEIGHT = 16  # fp32 weight + gradient + AdamW's two moments
FIT_MARGIN = 0.9  # a mode runs when its estimate is under this share of the memory available

# runwayml/stable-diffusion-v1-5 vae/config.json, as published (diffusers' defaults fill what it leaves out).
SD15_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM), as published.
SD15_SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: SD's VAE layout, its own scaling, upcast for decoding.
SDXL_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (Euler), as published.
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class Mode:
    label: str
    trainer_flags: tuple[str, ...] | None  # None: the full fine-tune worker of this file


MODES: dict[str, Mode] = {
    "full": Mode("full UNet fine-tune (AdamW, fp32)", None),
    "lora": Mode("LoRA r16 UNet+TE, fp32 base, preset (checkpointing)", ("--precision", "fp32")),
    "no-checkpointing": Mode("LoRA r16 UNet+TE, fp32, --no-gradient-checkpointing",
                             ("--precision", "fp32", "--no-gradient-checkpointing")),
    "bf16": Mode("LoRA r16 UNet+TE, --precision bf16", ("--precision", "bf16")),
    "nf4": Mode("LoRA r16 UNet+TE, --quantize-base nf4 --precision bf16",
                ("--precision", "bf16", "--quantize-base", "nf4")),
}
DEFAULT_LORA, BASELINE = "lora", "full"


@dataclass(frozen=True)
class Base:
    label: str
    folder: str  # under the scratch (or --base-dir) folder
    build: Callable[[Path], Path]


@dataclass
class Result:
    mode: str
    label: str
    peak_mib: float | None  # None: skipped (see note)
    step_s: float | None
    loss: float | None = None
    note: str = ""
    base: str = "sd15"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    device = "cuda" if cuda_available() else "cpu"
    resolution = args.resolution or (CUDA_RESOLUTION if device == "cuda" else CPU_RESOLUTION)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="stylelora-memory-") as scratch:
        scratch = Path(scratch)
        data = write_dataset(scratch / "data", resolution)
        print(f"{device}; {resolution} px, batch 1, {STEPS} steps per mode, each in a fresh subprocess", flush=True)
        for name in args.bases:
            base = BASES[name]
            folder = (Path(args.base_dir) if args.base_dir else scratch) / base.folder
            if not (folder / "model_index.json").is_file():
                print(f"building a random-weight {base.label}-architecture base in {folder} ...", flush=True)
                base.build(folder)
            for key in args.modes:
                print(f"{base.label}: {key} ({MODES[key].label}) ...", flush=True)
                results.append(run_mode(key, name, folder, data, scratch / f"run-{name}-{key}", resolution))
    print()
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "resolution": resolution, "steps": STEPS,
                                               "results": [asdict(r) for r in results]}, indent=2) + "\n",
                                   encoding="utf-8")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", type=choices_of(MODES), default=list(MODES),
                        help=f"comma-separated subset of {','.join(MODES)} (default: all, in that order)")
    parser.add_argument("--bases", type=choices_of(BASES), default=list(BASES),
                        help=f"comma-separated subset of {','.join(BASES)} (default: all)")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--base-dir", help="where the random bases are built, or found if already built there "
                        "(default: a temp dir, removed at the end)")
    parser.add_argument("--resolution", type=int, help=f"training size (default {CPU_RESOLUTION} on CPU, "
                        f"{CUDA_RESOLUTION} on CUDA)")
    parser.add_argument("--worker", choices=["full", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def choices_of(table: dict) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        picked = [m.strip() for m in text.split(",") if m.strip()]
        unknown = [m for m in picked if m not in table]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or '(none given)'}; choose from "
                                             f"{', '.join(table)}")
        return list(dict.fromkeys(picked))

    return parse


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- report


def format_table(results: list[Result]) -> str:
    """Per base: mode, peak MiB, ratio to that base's full fine-tune (when it ran), s/step; the targets' verdicts."""
    width = max([len("mode")] + [len(r.label) for r in results])
    lines = []
    for base in dict.fromkeys(r.base for r in results):
        rows = [r for r in results if r.base == base]
        baseline = next((r for r in rows if r.mode == BASELINE and r.peak_mib), None)
        lines += [f"{BASES[base].label if base in BASES else base}",
                  f"{'mode':{width}s} {'peak MiB':>9s} {'× full':>7s} {'s/step':>7s}"]
        for r in rows:
            if r.peak_mib is None:
                lines.append(f"{r.label:{width}s} {'skipped':>9s} {'-':>7s} {'-':>7s}  {r.note}")
                continue
            ratio = f"{r.peak_mib / baseline.peak_mib:7.3f}" if baseline else f"{'-':>7s}"
            lines.append(f"{r.label:{width}s} {r.peak_mib:9.0f} {ratio} {r.step_s:7.2f}")
        if baseline:
            lines.extend(verdicts(rows, baseline))
        lines.append("")
    return "\n".join(lines).rstrip()


def verdicts(results: list[Result], baseline: Result) -> list[str]:
    lines = []
    default = next((r for r in results if r.mode == DEFAULT_LORA and r.peak_mib), None)
    if default:
        ratio = default.peak_mib / baseline.peak_mib
        lines.append(f"default LoRA / full = {ratio:.3f} (target ≤ {TARGET_DEFAULT_LORA}: "
                     f"{'met' if ratio <= TARGET_DEFAULT_LORA else 'NOT met'})")
    loras = [r for r in results if r.mode != BASELINE and r.peak_mib]
    if loras:
        best = min(loras, key=lambda r: r.peak_mib)
        ratio = best.peak_mib / baseline.peak_mib
        lines.append(f"best LoRA mode ({best.mode}) / full = {ratio:.3f} (target ≤ {TARGET_BEST_LORA}: "
                     f"{'met' if ratio <= TARGET_BEST_LORA else 'NOT met'})")
    return lines


# ----------------------------------------------------------------------------- running the modes


def run_mode(key: str, base_name: str, base: Path, data: Path, output: Path, resolution: int) -> Result:
    """One mode in a fresh subprocess; its own peak RSS from wait4 (CPU) or the peak it reports (CUDA)."""
    mode = MODES[key]
    if mode.trainer_flags is None:
        too_big = full_finetune_misfit(base)
        if too_big:
            print(f"  skipped: {too_big}", flush=True)
            return Result(mode=key, label=mode.label, peak_mib=None, step_s=None, note=too_big, base=base_name)
    command = [sys.executable, str(Path(__file__).resolve()), "--base", str(base), "--data", str(data),
               "--output", str(output), "--resolution", str(resolution)]
    if mode.trainer_flags is None:
        command += ["--worker", "full"]
    else:
        command += ["--worker", "train", "--", *mode.trainer_flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise SystemExit(f"mode {key} on {base_name} failed (exit {process.returncode}):\n{stderr[-4000:]}")
    reported = json.loads(lines[-1][len("RESULT "):])
    peak_mib = reported.get("cuda_peak_mib") or usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    return Result(mode=key, label=mode.label, peak_mib=peak_mib, step_s=reported["step_s"],
                  loss=reported.get("loss"), base=base_name)


def full_finetune_misfit(base: Path) -> str:
    """Why the full fine-tune of `base` cannot fit in this machine's memory ("" when it can)."""
    import torch

    files = [p for component in ("unet", "vae", "text_encoder", "text_encoder_2")
             for p in (base / component).glob("*.safetensors")]
    unet_bytes = sum(p.stat().st_size for p in (base / "unet").glob("*.safetensors"))  # fp32 files: 4 bytes/weight
    need = unet_bytes // 4 * FULL_BYTES_PER_UNET_WEIGHT + sum(p.stat().st_size for p in files) - unet_bytes
    if torch.cuda.is_available():
        available, where = torch.cuda.mem_get_info()[0], "free on the GPU"
    else:
        available, where = available_ram(), "RAM available"
    if need < FIT_MARGIN * available:
        return ""
    return (f"needs ~{need / 2**30:.0f} GiB ({FULL_BYTES_PER_UNET_WEIGHT} bytes per UNet weight), "
            f"{available / 2**30:.0f} GiB {where}")


def available_ram() -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024


def worker(args) -> int:
    steps = full_finetune(args) if args.worker == "full" else stylelora_train(args)
    report = {"step_s": steps[-1]["seconds"], "loss": steps[-1]["loss"]}
    import torch

    if torch.cuda.is_available():
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(report), flush=True)
    return 0


def stylelora_train(args) -> list[dict]:
    """`stylelora train` in this process (so CUDA's peak counter can be read after it), each step's time recorded."""
    from stylelora import cli
    from stylelora.train.logs import RunLog

    steps, record = [], RunLog.record

    def timed_record(self, step, loss, lrs, grad_norm, seconds, *more, **kw):
        steps.append({"loss": float(loss), "seconds": float(seconds)})
        return record(self, step, loss, lrs, grad_norm, seconds, *more, **kw)

    RunLog.record = timed_record
    flags = [f for f in args.rest if f != "--"]
    code = cli.main(["train", args.data, *train_arguments(args.base, args.output, args.resolution), *flags])
    if code:
        raise SystemExit(code)
    return steps


def train_arguments(base: str, output: str, resolution: int) -> list[str]:
    """What every LoRA mode passes to `stylelora train` (its own flags follow)."""
    return ["--base", base, "--output", output, "--steps", str(STEPS), "--batch-size", "1", "--resolution",
            str(resolution), "--no-samples", "--save-every", "0", "--preserve-base", "0", "--overwrite",
            "--rank", str(RANK), "--alpha", str(RANK)]


def full_finetune(args) -> list[dict]:
    """Full UNet fine-tuning as diffusers' train_text_to_image.py (and its SDXL version) does it: fp32, AdamW,
    frozen text encoder(s) and VAE, 2 steps at batch 1."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base, size = Path(args.base), args.resolution
    sdxl = (base / "text_encoder_2").is_dir()
    encoders = [(CLIPTokenizer.from_pretrained(base / "tokenizer"),
                 CLIPTextModel.from_pretrained(base / "text_encoder").to(device).requires_grad_(False))]
    if sdxl:
        encoders.append((CLIPTokenizer.from_pretrained(base / "tokenizer_2"), CLIPTextModelWithProjection
                         .from_pretrained(base / "text_encoder_2").to(device).requires_grad_(False)))
    vae = AutoencoderKL.from_pretrained(base / "vae").to(device).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(base / "unet").to(device)
    noise_scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    images = sorted(Path(args.data).rglob("*.png"))
    steps = []
    for step in range(STEPS):
        started = time.perf_counter()
        path = images[step % len(images)]
        image = Image.open(path).convert("RGB").resize((size, size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
        caption = [path.with_suffix(".txt").read_text(encoding="utf-8")]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            outputs = [encoder(tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length,
                                         truncation=True, return_tensors="pt").input_ids.to(device),
                               output_hidden_states=sdxl) for tokenizer, encoder in encoders]
        if sdxl:  # both encoders' penultimate layers side by side, encoder 2's pooled projection, size conditioning
            hidden = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=hidden.dtype)
            conditioning = {"text_embeds": outputs[1].text_embeds, "time_ids": time_ids}
        else:
            hidden, conditioning = outputs[0][0], None
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden, added_cond_kwargs=conditioning).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        steps.append({"loss": loss.item(), "seconds": time.perf_counter() - started})
    return steps


# ----------------------------------------------------------------------------- bases and data


def clip_config(published: dict, tokenizer):
    """A CLIPTextConfig from a published config.json, with the tokenizer's special ids so padding and the
    end-of-text position mean what they say (the vocabulary stays the published 49408, a superset of its ids)."""
    from transformers import CLIPTextConfig

    fields = {k: v for k, v in published.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype")}
    if len(tokenizer) > fields["vocab_size"]:
        raise SystemExit(f"the toy tokenizer has {len(tokenizer)} tokens, more than the text encoder embeds")
    fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(**fields)


def build_sd15_base(out: Path) -> Path:
    """A StableDiffusionPipeline with SD 1.5's architecture and random weights, saved (fp32) as a diffusers folder."""
    from stylelora.lora.sd15 import sd15_config

    return save_random_pipeline(out, "StableDiffusionPipeline", sd15_config("unet"), SD15_VAE_CONFIG,
                                ("PNDMScheduler", SD15_SCHEDULER_CONFIG),
                                {"text_encoder": ("CLIPTextModel", sd15_config("text_encoder"))},
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl_base(out: Path) -> Path:
    """A StableDiffusionXLPipeline with SDXL base's architecture and random weights, saved (fp32) as a folder."""
    from stylelora.lora.sdxl import sdxl_config

    return save_random_pipeline(out, "StableDiffusionXLPipeline", sdxl_config("unet"), SDXL_VAE_CONFIG,
                                ("EulerDiscreteScheduler", SDXL_SCHEDULER_CONFIG),
                                {"text_encoder": ("CLIPTextModel", sdxl_config("text_encoder")),
                                 "text_encoder_2": ("CLIPTextModelWithProjection", sdxl_config("text_encoder_2"))},
                                add_watermarker=False)


def save_random_pipeline(out: Path, pipeline: str, unet_config: dict, vae_config: dict,
                         scheduler: tuple[str, dict], encoders: dict[str, tuple[str, dict]], **extra) -> Path:
    """Build `pipeline` from the configs with random weights (seeded) and the toy tokenizer for every text encoder;
    save it as a diffusers folder. A scheduler config's keys that its class has no use for are dropped."""
    import diffusers
    import torch
    import transformers
    from transformers import CLIPTokenizer

    from stylelora.models.load import TOY_BASE_DIR

    tokenizer = CLIPTokenizer.from_pretrained(TOY_BASE_DIR / "tokenizer")
    torch.manual_seed(0)
    models = {name: getattr(transformers, model_class)(clip_config(config, tokenizer))
              for name, (model_class, config) in encoders.items()}
    tokenizers = {name.replace("text_encoder", "tokenizer"): tokenizer for name in encoders}
    pipe = getattr(diffusers, pipeline)(
        vae=diffusers.AutoencoderKL(**vae_config), unet=diffusers.UNet2DConditionModel.from_config(unet_config),
        scheduler=getattr(diffusers, scheduler[0]).from_config(scheduler[1]), **models, **tokenizers, **extra)
    pipe.save_pretrained(out)
    return out


BASES: dict[str, Base] = {
    "sd15": Base("SD 1.5", "sd15-random", build_sd15_base),
    "sdxl": Base("SDXL", "sdxl-random", build_sdxl_base),
}


def write_dataset(root: Path, resolution: int) -> Path:
    """A few square images with captions (no trigger folder: a plain caption dataset)."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    colors = {"red": (215, 35, 35), "blue": (35, 65, 215), "green": (30, 160, 55), "yellow": (240, 215, 20)}
    for i, (name, color) in enumerate(list(colors.items())[:IMAGES]):
        image = Image.new("RGB", (resolution, resolution), (245, 245, 245))
        r = resolution // 4
        ImageDraw.Draw(image).ellipse((r, r, 3 * r, 3 * r), fill=color)
        image.save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"a {name} circle on a white background\n", encoding="utf-8")
    return root


if __name__ == "__main__":
    sys.exit(main())
