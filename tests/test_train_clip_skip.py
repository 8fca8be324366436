"""Training with kohya's --clip_skip: captions read from the layer before the last, no LoRA on the layers after it,
the file saying so (ss_clip_skip), generation noting it; refused where it means nothing (SDXL) or is not a count."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stylelora.config import ConfigError, load_config
from stylelora.generate.generate import GenerateRequest, clip_skip_notes
from stylelora.generate.prompt_reading import skip_last_layers
from stylelora.lora.inject import text_encoder_lora_targets
from stylelora.train.loop import run_training
from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate, tiny_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


def test_a_clip_skip_run_reads_the_layer_before_the_last_and_adapts_only_the_layers_that_run(
        tmp_path, tiny_base, stripes_dataset):
    config = load_config(None, tiny_overrides(stripes_dataset, tmp_path / "run", tiny_base, **{"train.clip_skip": 2}))
    adapter = run_training(config)
    assert adapter_metadata(adapter)["ss_clip_skip"] == "2"
    text_keys = [key for key in adapter_tensors(adapter) if key.startswith("lora_te_")]
    assert text_keys and all("_layers_0_" in key for key in text_keys)  # two layers: the last one is skipped
    note = clip_skip_notes(Path(adapter), adapter_metadata(adapter), GenerateRequest("x").clip_skip)
    assert note and "--clip-skip 2" in note[0]
    plain = run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "plain", tiny_base)))
    assert adapter_metadata(plain)["ss_clip_skip"] == "1"
    assert any("_layers_1_" in key for key in adapter_tensors(plain) if key.startswith("lora_te_"))


def test_lora_targets_leave_out_skipped_layers_and_the_layers_come_back():
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                           num_hidden_layers=3, vocab_size=10))
    ids = torch.tensor([[0, 3, 4, 1]])
    with torch.no_grad():
        full = encoder(ids, output_hidden_states=True)
        restore = skip_last_layers(encoder, 1)
        assert {path.split(".")[2] for path in text_encoder_lora_targets(encoder).linear} == {"0", "1"}
        skipped = encoder(ids)[0]
        restore()
        assert torch.allclose(skipped, encoder.final_layer_norm(full.hidden_states[-2]), atol=1e-6)
        assert torch.equal(encoder(ids)[0], full.last_hidden_state)
    assert {path.split(".")[2] for path in text_encoder_lora_targets(encoder).linear} == {"0", "1", "2"}


@pytest.mark.parametrize("overrides, message", [
    ({"train.clip_skip": 0}, "train.clip_skip"),
    ({"train.clip_skip": 2, "train.family": "sdxl"}, "an SDXL base reads both text encoders' layer before the last"),
])
def test_a_clip_skip_that_means_nothing_is_refused_before_the_base_loads(tmp_path, stripes_dataset, overrides,
                                                                          message):
    from stylelora.presets import apply_preset

    with pytest.raises(ConfigError, match=message):
        config = load_config(None, {"data.dir": str(stripes_dataset), **overrides})
        apply_preset(config, config.train.family or "sd1", cuda=False)
