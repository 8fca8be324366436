"""benchmarks/trigger_embedding.py: the trigger's token rows train beside the LoRA and nothing else in the embedding
table moves; the rows are saved beside the adapter and written into the base's table when it loads."""
from __future__ import annotations

import pytest
import torch

from train_fixtures import load_benchmark

pivotal = load_benchmark("trigger_embedding")


@pytest.mark.parametrize("lora_text", [True, False])
def test_only_the_trigger_rows_train_and_they_load_with_the_base(tmp_path, tiny_base, stripes_dataset, monkeypatch,
                                                                 lora_text):
    from safetensors.torch import load_file

    from stylelora.lora import io
    from stylelora.models import load
    from stylelora.train import loop, optim

    tables = []  # the text encoder's whole table as the run saves its adapter
    save_adapter = io.save_adapter

    def save_and_record(path, unet, text_encoder, **kwargs):
        tables.append(text_encoder.get_input_embeddings().weight.detach().clone())
        return save_adapter(path, unet, text_encoder, **kwargs)

    monkeypatch.setattr(io, "save_adapter", save_and_record)

    for module, name in ((loop, "_add_lora"), (optim, "param_groups"), (loop, "write_adapter"),
                         (loop, "build_dataset"), (load, "load_base")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    output = tmp_path / "runs" / "toy-stripes"
    argv = ["train", "--trigger", "stripestyle", "--lr", "1e-2", *([] if lora_text else ["--no-lora-text"]), "--",
            str(stripes_dataset), "--base", str(tiny_base), "--output", str(output), "--steps", "3",
            "--batch-size", "4", "--rank", "4", "--alpha", "4", "--no-samples", "--save-every", "0"]
    assert pivotal.main(argv) == 0
    saved = load_file(output / "stripes.emb.safetensors")
    base = load.load_base(str(tiny_base))
    table = base.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = saved["text_encoder.ids"]
    assert ids.tolist() == pivotal._trigger_ids(base.tokenizer, "stripestyle")
    assert (saved["text_encoder.rows"] - table[ids]).abs().max() > 1e-3  # the rows moved
    adapter_keys = load_file(output / "stripes.safetensors").keys()
    assert any(key.startswith("lora_te") for key in adapter_keys) == lora_text

    assert pivotal.patch_loading(tmp_path / "runs") == [output / "stripes.emb.safetensors"]
    loaded = load.load_base(str(tiny_base)).text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(loaded[ids], saved["text_encoder.rows"])
    others = torch.ones(len(table), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(tables[-1][others], table[others])  # no other row trained
    assert torch.equal(loaded[others], table[others])  # nor is written at load
