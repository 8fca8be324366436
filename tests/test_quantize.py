"""QLoRA (--quantize-base nf4|int8) on a tiny random base: bitsandbytes layers under peft's LoRA, a plain kohya file,
fp32 LoRA weights and optimizer state on a bf16 base, exact resume, and the refusal when bitsandbytes is missing."""
from __future__ import annotations

import csv
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from stylelora.config import load_config
from stylelora.train import loop
from stylelora.train.checkpoint import complete_checkpoints
from train_fixtures import adapter_tensors, reset_accelerate, tiny_overrides


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")  # the missing-bitsandbytes test below runs without it


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(data: Path, output: Path, base: Path, **extra) -> Path:
    """A 2-step run; no sample grid unless asked (the bf16 test draws one: sampling on a quantized base)."""
    overrides = {"train.steps": 2, "train.precision": "fp32", "train.samples": False, **extra}
    return loop.run_training(load_config(None, tiny_overrides(data, output, base, **overrides)))


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", encoding="utf-8") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in adapter_tensors(path).items()}


@pytest.fixture
def seen(monkeypatch) -> dict:
    """What the run held: the UNet and text encoder during the first loss step; optimizer and weights at the end."""
    seen: dict = {}
    loss_step, train_loop = loop.loss_step, loop.train

    def spy_step(batch, models, *args, **kwargs):
        seen.setdefault("models", models.unwrapped)
        seen.setdefault("dtype", models.dtype)
        return loss_step(batch, models, *args, **kwargs)

    def spy_train(run, start_step, *stop_requested):
        train_loop(run, start_step, *stop_requested)
        seen["run"] = run

    monkeypatch.setattr(loop, "loss_step", spy_step)
    monkeypatch.setattr(loop, "train", spy_train)
    return seen


def base_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every Linear layer of the frozen base (inside peft's LoRA wrappers), LoRA's own A/B layers left out."""
    from peft.tuners.lora import LoraLayer

    lora_parts = {id(m) for layer in model.modules() if isinstance(layer, LoraLayer)
                  for m in [*layer.lora_A.values(), *layer.lora_B.values()]}
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in lora_parts]


def test_nf4_run_trains_on_4bit_linears_and_writes_the_same_kohya_file_as_a_plain_run(tmp_path, tiny_base,
                                                                                     stripes_dataset, seen, bnb):
    plain = train(stripes_dataset, tmp_path / "plain", tiny_base)
    reset_accelerate()
    seen.clear()
    quantized = train(stripes_dataset, tmp_path / "nf4", tiny_base, **{"train.quantize_base": "nf4"})

    unet, text_encoder = seen["models"]
    linears = base_linears(unet)
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    # The text encoder trains (the default), so it keeps its full-precision layers.
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base_linears(text_encoder))
    assert shapes(quantized) == shapes(plain)
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in shapes(quantized))
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "nf4")) and len(losses(tmp_path / "nf4")) == 2
    assert all(torch.isfinite(t).all() for t in adapter_tensors(quantized).values())


def test_bf16_base_keeps_lora_weights_and_optimizer_state_fp32(tmp_path, tiny_base, stripes_dataset, seen, bnb):
    train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.quantize_base": "nf4", "train.precision": "bf16",
                                                           "network.train_text_encoder": False, "train.samples": True})
    run = seen["run"]
    assert seen["dtype"] == torch.bfloat16
    unet, text_encoder = run.pipe.unet, run.pipe.text_encoder
    assert all(m.compute_dtype == torch.bfloat16 for m in base_linears(unet))
    # A frozen text encoder is quantized too.
    assert base_linears(text_encoder) and all(isinstance(m, bnb.nn.Linear4bit) for m in base_linears(text_encoder))
    frozen_floats = [p for p in unet.parameters() if not p.requires_grad and p.is_floating_point()]
    assert frozen_floats and all(p.dtype == torch.bfloat16 for p in frozen_floats)
    assert run.trainable and all(p.dtype == torch.float32 for p in run.trainable.values())
    states = [v for state in run.optimizer.state.values() for v in state.values()
              if torch.is_tensor(v) and v.numel() > 1]
    assert states and all(v.dtype == torch.float32 for v in states)


def test_nf4_checkpoint_resumes_exactly(tmp_path, tiny_base, stripes_dataset, bnb):
    settings = {"train.quantize_base": "nf4", "train.save_every": 1, "train.output_name": "a"}
    straight = train(stripes_dataset, tmp_path / "straight", tiny_base, **settings)
    reset_accelerate()
    resumed_dir = tmp_path / "resumed"
    first = complete_checkpoints(tmp_path / "straight")[0]
    (resumed_dir / first.parent.name).mkdir(parents=True)
    shutil.copytree(first, resumed_dir / first.parent.name / first.name)
    resumed = train(stripes_dataset, resumed_dir, tiny_base, **settings, **{"train.resume": "latest"})
    expected, got = adapter_tensors(straight), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_int8_runs_on_cpu_with_8bit_linears(tmp_path, tiny_base, stripes_dataset, seen, bnb):
    adapter = train(stripes_dataset, tmp_path / "int8", tiny_base, **{"train.quantize_base": "int8",
                                                                      "network.train_text_encoder": False})
    unet, text_encoder = seen["models"]
    for model in (unet, text_encoder):
        assert base_linears(model) and all(isinstance(m, bnb.nn.Linear8bitLt) for m in base_linears(model))
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "int8"))
    assert all(key.startswith("lora_unet_") for key in adapter_tensors(adapter))


def test_sdxl_nf4_quantizes_both_frozen_text_encoders_and_keeps_the_file(tmp_path, seen, bnb):
    from sdxl_fixtures import SDXL_NATIVE_SIZE, save_tiny_sdxl_base
    from train_fixtures import write_kohya_dataset

    base = save_tiny_sdxl_base(tmp_path / "sdxl")
    data = write_kohya_dataset(tmp_path / "data", count=4, size=24)
    settings = {"data.resolution": SDXL_NATIVE_SIZE, "network.train_text_encoder": False}
    plain = train(data, tmp_path / "plain", base, **settings)
    reset_accelerate()
    seen.clear()
    quantized = train(data, tmp_path / "nf4", base, **settings, **{"train.quantize_base": "nf4"})
    unet, *encoders = seen["models"]
    assert len(encoders) == 2
    for model in (unet, *encoders):
        assert base_linears(model) and all(isinstance(m, bnb.nn.Linear4bit) for m in base_linears(model))
    assert shapes(quantized) == shapes(plain)


def test_missing_bitsandbytes_is_named_before_any_model_loads(tmp_path, tiny_base, stripes_dataset, monkeypatch):
    from stylelora.models import load
    from stylelora.models.quantize import QuantizationUnavailable

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError

    def must_not_load(*args, **kwargs):
        raise AssertionError("the base model was loaded before bitsandbytes was checked")

    monkeypatch.setattr(load, "load_base", must_not_load)
    with pytest.raises(QuantizationUnavailable, match=r"--quantize-base nf4 needs bitsandbytes.*pip install "
                                                      r"bitsandbytes==0\.50\.2"):
        train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.quantize_base": "nf4"})


def test_the_cli_reports_a_missing_bitsandbytes_in_one_line(tmp_path, tiny_base, stripes_dataset, monkeypatch, capsys):
    """`stylelora train --quantize-base nf4` without bitsandbytes: exit 2 and the install to run, not a traceback."""
    from stylelora.models import load
    from stylelora.train.command import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(load, "load_base", lambda *args, **kwargs: pytest.fail("the base loaded before the check"))
    code = main(["train", str(stripes_dataset), "--base", str(tiny_base), "--output", str(tmp_path / "run"),
                 "--steps", "2", "--no-samples", "--quantize-base", "nf4"])
    printed = capsys.readouterr().err.strip()
    message = printed.splitlines()[-1]
    assert code == 2 and "Traceback" not in printed, printed
    assert message.startswith("stylelora train: error: --quantize-base nf4 needs bitsandbytes")
    assert "pip install bitsandbytes==0.50.2" in message and not (tmp_path / "run" / "run.safetensors").exists()
