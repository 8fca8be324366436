"""Trainer speed vs. its floor, measured side by side in one run: time per step, ratios, peak RSS.

    floor            UNet + text-encoder forward and backward with LoRA on fixed, already-noised latents: the work
                     no LoRA trainer can avoid (plus a variant with the AdamW step, which every trainer also does)
    trainer (cache)  the full `stylelora train` loop with the latent cache: data, loss step, clip, optimizer,
                     schedule, logging; time between consecutive steps, so every per-step cost is counted
    trainer (none)   the same with --cache none: images decoded, resized and VAE-encoded every step

Each mode runs in its own subprocess (so its peak RSS is its own), one after the other with the same thread count.
Steady-state medians exclude the first steps (allocator warm-up). Both the process CPU time per step and the wall
time per step are measured: on a shared machine other jobs stretch wall time at random, while CPU time counts only
this process's own work, so the CPU-time ratio is the one to trust there (with one thread they agree on an idle
machine). Target: trainer (cache) / floor ≤ 1.10.

    python benchmarks/train_speed.py                   # toy base if built, else a random base of the same shape
    python benchmarks/train_speed.py --base PATH --steps 40 --batch-size 16 --rank 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
WARMUP_STEPS = 5
TARGET_RATIO = 1.10


def main() -> int:
    args = parse_args()
    if args.worker:
        result = {"floor": floor_worker, "trainer": trainer_worker}[args.worker](args)
        print("RESULT " + json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="stylelora-bench-") as scratch:
        base = args.base or default_base(Path(scratch))
        print(f"base {base}; data {args.data}; batch {args.batch_size}; rank {args.rank}; {args.steps} timed steps; "
              f"{os.environ.get('OMP_NUM_THREADS', 'default')} threads", flush=True)
        results = {
            "floor (UNet+TE fwd+bwd)": run_worker(args, base, "floor", ["--optimizer-step", "0"]),
            "floor + AdamW step": run_worker(args, base, "floor", ["--optimizer-step", "1"]),
            "trainer, latent cache": run_worker(args, base, "trainer", ["--cache", "ram"], scratch),
            "trainer, no cache": run_worker(args, base, "trainer", ["--cache", "none"], scratch),
        }
    report(results)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model (default: toy if built, else a random toy-shaped base)")
    parser.add_argument("--data", default=str(REPO / "datasets" / "toy-stripes"))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per mode (after warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--worker", choices=["floor", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--optimizer-step", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="ram", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_worker(args, base: str, mode: str, extra: list[str], scratch: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--base", base, "--data", args.data, "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--rank", str(args.rank), *extra]
    if scratch:
        command += ["--scratch", scratch]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"benchmark worker {mode} {extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(results: dict[str, dict]) -> None:
    floor = results["floor (UNet+TE fwd+bwd)"]
    print(f"\n{'mode':26s} {'CPU s/step':>10s} {'× floor':>8s} {'wall s/step':>11s} {'× floor':>8s} {'peak RSS':>10s}")
    for name, r in results.items():
        print(f"{name:26s} {r['cpu_median_s']:10.4f} {r['cpu_median_s'] / floor['cpu_median_s']:8.3f} "
              f"{r['median_s']:11.4f} {r['median_s'] / floor['median_s']:8.3f} {r['peak_rss_mb']:7.0f} MB")
    cached, uncached = results["trainer, latent cache"], results["trainer, no cache"]
    ratio = cached["cpu_median_s"] / floor["cpu_median_s"]
    with_optimizer = cached["cpu_median_s"] / results["floor + AdamW step"]["cpu_median_s"]
    print(f"\ntrainer (cache) / floor = {ratio:.3f} CPU time, {cached['median_s'] / floor['median_s']:.3f} wall time "
          f"(target ≤ {TARGET_RATIO:.2f}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}); "
          f"vs floor + AdamW: {with_optimizer:.3f}")
    print(f"trainer (no cache) / trainer (cache) = {uncached['cpu_median_s'] / cached['cpu_median_s']:.2f} CPU time")
    print(f"trainer (cache): mean {cached['cpu_mean_s']:.4f} CPU s/step incl. stalls; run wall time "
          f"{cached['wall_s']:.1f} s, of which {cached['startup_s']:.1f} s before the first step")


# ----------------------------------------------------------------------------- workers


def floor_worker(args) -> dict:
    import torch

    from stylelora.data.scan import scan_folder
    from stylelora.lora.inject import add_lora
    from stylelora.models.load import load_base
    from stylelora.train.models import tokenize

    torch.manual_seed(0)
    pipe = load_base(args.base, device="cpu")
    lora = add_lora(pipe.unet, pipe.text_encoder, rank=args.rank, alpha=args.rank, unet_targets="kohya")
    optimizer = torch.optim.AdamW(lora.unet + lora.text_encoder, lr=1e-4)
    items, _ = scan_folder(args.data)
    ids = tokenize(pipe.tokenizer, [item.caption for item in items[: args.batch_size]])
    size = pipe.unet.config.sample_size
    noisy = torch.randn(args.batch_size, pipe.unet.config.in_channels, size, size)
    target = torch.randn_like(noisy)
    timesteps = torch.randint(0, 1000, (args.batch_size,))
    clock = [(time.perf_counter(), time.process_time())]
    for _ in range(WARMUP_STEPS + args.steps):
        prediction = pipe.unet(noisy, timesteps, pipe.text_encoder(ids)[0]).sample
        torch.nn.functional.mse_loss(prediction, target).backward()
        if args.optimizer_step:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.append((time.perf_counter(), time.process_time()))
    return summary(clock[WARMUP_STEPS:], wall=clock[-1][0] - clock[0][0], startup=0.0)


def trainer_worker(args) -> dict:
    from stylelora.config import load_config
    from stylelora.train.logs import RunLog
    from stylelora.train.loop import run_training

    clock, record = [], RunLog.record

    def timed_record(self, *record_args, **record_kwargs):  # called once per step, after all of its work
        clock.append((time.perf_counter(), time.process_time()))
        return record(self, *record_args, **record_kwargs)

    RunLog.record = timed_record

    output = Path(args.scratch) / f"trainer-{args.cache}"
    config = load_config(None, {
        "data.dir": args.data, "data.cache": args.cache, "train.base": args.base, "train.output": str(output),
        "train.steps": WARMUP_STEPS + args.steps, "train.batch_size": args.batch_size, "network.rank": args.rank,
        "network.alpha": float(args.rank), "train.save_every": 0, "train.sample_every": 0,
        "train.sample_prompts": [], "train.overwrite": True,
    })
    started = time.perf_counter()
    run_training(config)
    wall = time.perf_counter() - started
    # From one step's end to the next: everything the loop does per step (data, step, logging) is inside.
    return summary(clock[WARMUP_STEPS - 1:], wall=wall, startup=clock[0][0] - started)


def summary(clock: list[tuple[float, float]], *, wall: float, startup: float) -> dict:
    """Per-step medians of wall and CPU time from (perf_counter, process_time) marks taken at step boundaries."""
    import resource

    walls = [b[0] - a[0] for a, b in zip(clock, clock[1:])]
    cpus = [b[1] - a[1] for a, b in zip(clock, clock[1:])]
    return {"median_s": statistics.median(walls), "mean_s": statistics.mean(walls),
            "cpu_median_s": statistics.median(cpus), "cpu_mean_s": statistics.mean(cpus), "wall_s": wall,
            "startup_s": startup, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- base


def default_base(scratch: Path) -> str:
    """The toy base when built; otherwise random weights in its exact architecture (speed does not need training)."""
    from stylelora.models.load import TOY_BASE_DIR

    if (TOY_BASE_DIR / "model_index.json").is_file():
        return "toy"
    print("toy base not built: timing a random-weight base of the same architecture", flush=True)
    return str(build_toy_shaped_base(scratch / "toy-shaped-base"))


def build_toy_shaped_base(out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from stylelora.toy.denoiser_train import SCHEDULER_CONFIG, UNET_CONFIG, text_encoder_config
    from stylelora.toy.tokenizer import train_clip_tokenizer
    from stylelora.toy.vae_train import VAE_CONFIG

    captions = [p.read_text(encoding="utf-8") for p in sorted(Path(REPO / "datasets").glob("*/*/*.txt"))]
    train_clip_tokenizer(captions or ["a red circle on a white background"], out.parent / "tokenizer", vocab_size=1024)
    tokenizer = CLIPTokenizer.from_pretrained(out.parent / "tokenizer")
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
                                **UNET_CONFIG)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_encoder_config(tokenizer)),
                                   tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


if __name__ == "__main__":
    sys.exit(main())
