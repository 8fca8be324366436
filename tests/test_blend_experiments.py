"""benchmarks/blend_experiments.py's window merge (split only at late timesteps): a window over every step is split
itself, a window over none is one attention core per module, and that core with a silent partner is the adapter;
the eps merge (one UNet pass per adapter) with a silent partner is the adapter too."""
from __future__ import annotations

from types import SimpleNamespace

import numpy
import torch
from gen_fixtures import load_tiny_base, make_adapter
from train_fixtures import load_benchmark

from stylelora.generate.split_attention import SplitCrossAttention
from stylelora.generate.stack import AdapterStack
from stylelora.lora.spec import AdapterSpec


def test_window_splits_only_the_steps_inside_it(tiny_sd_base, tmp_path):
    from safetensors.torch import load_file, save_file

    experiments = load_benchmark("blend_experiments")
    files = {"a": make_adapter(tmp_path / "a.safetensors", 1, trigger="stripes"),
             "b": make_adapter(tmp_path / "b.safetensors", 2, trigger="pastel"),
             "silent": tmp_path / "silent.safetensors"}  # every module there, every delta zero
    state = {k: (torch.zeros_like(v) if "lora_up" in k else v) for k, v in load_file(str(files["a"])).items()}
    save_file(state, str(files["silent"]), metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0"})
    pipe = load_tiny_base(tiny_sd_base)
    stack = AdapterStack.for_pipe(pipe)
    bench = SimpleNamespace(pipe=pipe, stack=stack, spec=lambda name: AdapterSpec(files[name], 1.0))

    def image() -> numpy.ndarray:
        return pipe("stripes, pastel, a red circle", num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(5)).images[0]

    def windowed(a: str, b: str, window: float) -> numpy.ndarray:
        hook = experiments.windowed_split(bench, a, b, window)
        try:
            return image()
        finally:
            hook.remove()
            stack.clear()

    stack.apply([bench.spec("a"), bench.spec("b")], "split")
    split = image()
    stack.clear()
    assert numpy.array_equal(windowed("a", "b", 1.0), split)  # every timestep is below 1000: split throughout
    one_core = windowed("a", "b", 0.0)
    assert abs(one_core - split).max() * 255 > 3  # no step split: a different blend
    assert not any(isinstance(p, SplitCrossAttention) for p in pipe.unet.attn_processors.values())  # taken out
    stack.apply([bench.spec("a")])
    alone = image()
    stack.clear()
    assert abs(windowed("a", "silent", 0.0) - alone).max() * 255 <= 1  # merged reading = a's, LoRA sum = a's


def test_eps_composition_with_a_silent_partner_is_the_adapter_alone(tiny_sd_base, tmp_path):
    from safetensors.torch import load_file, save_file

    experiments = load_benchmark("blend_experiments")
    files = {"a": make_adapter(tmp_path / "a.safetensors", 1, trigger="stripes"),
             "b": make_adapter(tmp_path / "b.safetensors", 2, trigger="pastel"),
             "silent": tmp_path / "silent.safetensors"}
    state = {k: (torch.zeros_like(v) if "lora_up" in k else v) for k, v in load_file(str(files["a"])).items()}
    save_file(state, str(files["silent"]), metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0"})
    pipe = load_tiny_base(tiny_sd_base)
    stack = AdapterStack.for_pipe(pipe)
    bench = SimpleNamespace(pipe=pipe, stack=stack, spec=lambda name: AdapterSpec(files[name], 1.0))
    texts = ["stripes, pastel, a red circle"]

    def image(embeds=None) -> numpy.ndarray:
        kwargs = {"prompt": texts} if embeds is None else dict(zip(("prompt_embeds", "negative_prompt_embeds"),
                                                                    embeds(texts)))
        return pipe(**kwargs, num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(5)).images[0]

    def composed(a: str, b: str) -> numpy.ndarray:
        embeds, undo = experiments.eps_composition(bench, a, b, "sum")
        try:
            return image(embeds)
        finally:
            undo()

    stack.apply([bench.spec("a")])
    alone = image()
    stack.clear()
    assert abs(composed("a", "silent") - alone).max() * 255 <= 1
    assert abs(composed("a", "b") - alone).max() * 255 > 3  # b's own pass changes the image
    assert "forward" not in vars(pipe.unet)
