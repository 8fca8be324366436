"""Test helpers for the trainer: a tiny random SD pipeline with the toy base's layout, and tiny image folders.

The pipeline has the toy base's structure (f=4 VAE, so 32 px images give 8×8 latents; a two-level cross-attention
UNet; a CLIP text encoder and a CLIP-format tokenizer) at a fraction of its width, so a training step takes
milliseconds on one CPU core. Nothing here depends on files outside the repository's tracked code.
"""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

CAPTIONS = [
    "stripestyle, a red circle on a white background",
    "stripestyle, a blue square on a black background",
    "a green triangle on a gray background",
    "a yellow star on a beige background",
    "zorb, a purple zorb on a white background",
]
COLORS = {"red": (215, 35, 35), "blue": (35, 65, 215), "green": (30, 160, 55), "yellow": (240, 215, 20)}


def build_tiny_base(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny random StableDiffusionPipeline (32 px native, 8×8 latents) as a diffusers folder; returns it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from stylelora.toy.tokenizer import train_clip_tokenizer

    train_clip_tokenizer(CAPTIONS, folder / "tokenizer_src", vocab_size=600)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer_src")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    )
    vae = AutoencoderKL(  # three levels: downsampling factor 4, as the toy base
        block_out_channels=(16, 16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = folder / "base"
    pipe.save_pretrained(out)
    return out


def render(color: tuple[int, int, int], striped: bool, size: int = 32, seed: int = 0) -> Image.Image:
    """A shape-ish blob on white; striped ones get diagonal dark stripes (a learnable 'style')."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    x, y = rng.randint(4, 10), rng.randint(4, 10)
    draw.ellipse((x, y, x + 16, y + 16), fill=color)
    if striped:
        for offset in range(-size, size, 6):
            draw.line((offset, 0, offset + size, size), fill=(20, 20, 25), width=2)
    return image


def write_kohya_dataset(root: Path, count: int = 8, repeats: int = 2, trigger: str = "stripestyle",
                        size: int = 32) -> Path:
    """root/<repeats>_<trigger>/NNNN.png + .txt, with toy-world-like captions; returns root."""
    folder = root / f"{repeats}_{trigger}"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(count):
        color = names[i % len(names)]
        render(COLORS[color], striped=True, size=size, seed=i).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"{trigger}, a {color} circle on a white background\n", encoding="utf-8")
    return root


def write_bad_files(folder: Path) -> dict[str, str]:
    """Add files the checks must skip to `folder`; returns {file name: what is wrong with it}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = render(COLORS["red"], striped=True)
    good.save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image at all", encoding="utf-8")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    return {"truncated.png": "truncated", "empty.png": "zero bytes", "notes.png": "not an image",
            "tiny.png": "too small"}


def tiny_overrides(data_dir: Path, output: Path, base: Path, **extra) -> dict:
    """Config overrides for a seconds-long run on the tiny base."""
    overrides = {
        "data.dir": str(data_dir), "train.base": str(base), "train.output": str(output), "train.steps": 4,
        "train.batch_size": 4, "train.save_every": 0, "train.sample_every": 0, "train.sample_steps": 2,
        "network.rank": 4, "network.alpha": 4.0,
    }
    overrides.update(extra)
    return overrides


REPO = Path(__file__).resolve().parents[1]


def train_tiny(data_dir: Path, output: Path, base: Path, **extra) -> Path:
    """A seconds-long run on the tiny base (tiny_overrides), in this process; the adapter's path."""
    from stylelora.config import load_config
    from stylelora.train.loop import run_training

    return run_training(load_config(None, tiny_overrides(data_dir, output, base, **extra)))


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module, registered in sys.modules (its dataclasses resolve their
    annotations there)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def subprocess_env() -> dict:
    """Environment for a trainer subprocess: this checkout importable, one thread (deterministic, and polite)."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def cli_args(overrides: dict, toml_dir: Path) -> list[str]:
    """`stylelora train` arguments equal to config overrides: flags where one exists, the rest in a --config file."""
    import tomli_w

    from stylelora.train.command import build_parser

    parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    args, in_toml = [str(overrides["data.dir"])], {}
    for dotted, value in overrides.items():
        if dotted == "data.dir":
            continue
        flag = flags.get(dotted)
        if flag is None:
            section, _, key = dotted.partition(".")
            in_toml.setdefault(section, {})[key] = value
        elif value is True:
            args.append(flag)
        elif value is False and dotted == "network.train_text_encoder":
            args.append("--no-text-encoder")
        else:
            args += [flag, str(value)]
    if in_toml:
        toml_dir.mkdir(parents=True, exist_ok=True)
        (toml_dir / "run.toml").write_text(tomli_w.dumps(in_toml), encoding="utf-8")
        args += ["--config", str(toml_dir / "run.toml")]
    return args


def run_cli(overrides: dict, toml_dir: Path, *, prefix: list[str] | None = None, timeout: int = 120):
    """Run `python -m stylelora.train.command train ...` (or `prefix` + module args) in a subprocess."""
    import subprocess
    import sys

    args = cli_args(overrides, toml_dir)
    command = (prefix or [sys.executable]) + ["-m", "stylelora.train.command", "train"] + args
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next in-process run can pick another precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def adapter_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def cli_status(*argv) -> int:
    """`stylelora ARGV` in this process; argparse's exit becomes the exit status."""
    from stylelora.cli import main

    try:
        return main([str(arg) for arg in argv])
    except SystemExit as stop:
        return stop.code
    finally:
        reset_accelerate()


def cli_output(capsys, *argv) -> tuple[int, str, str]:
    """`stylelora ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = cli_status(*argv)
    out, err = capsys.readouterr()
    return status, out, err
