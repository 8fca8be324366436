"""The pinned ML stack works together: versions in range and the transformers<->peft integration actually runs."""
import pytest

from stylelora.deps import version_problems


def test_installed_versions_are_in_the_tested_ranges():
    assert version_problems() == []


def test_transformers_accepts_this_peft_for_adapters():
    # transformers refuses a too-old peft at add_adapter time; this is where a bad pair shows up.
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8))
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_version_check_reports_a_bad_pair(monkeypatch):
    import stylelora.deps as deps

    installed = {"diffusers": "0.42.1", "transformers": "5.24.0", "peft": "0.21.2", "accelerate": "1.15.0"}
    monkeypatch.setattr(deps, "version", installed.__getitem__)
    problems = deps.version_problems()
    assert problems == ["transformers 5.24.0 is outside the tested range >=5.20,<5.24"]


def test_every_dependency_runs_on_the_oldest_python_the_project_admits():
    """pyproject's requires-python must not promise a Python that a pinned package refuses (diffusers 0.42 needs
    3.11): pip would then fail mid-install on that Python instead of saying so up front."""
    import re
    import tomllib
    from importlib.metadata import metadata
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    oldest = re.fullmatch(r">=\s*(\d+\.\d+)", project["requires-python"].split("#")[0].strip()).group(1)
    refusing = {}
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = Requirement(line).name
        needs = metadata(name).get("Requires-Python")
        if needs and not SpecifierSet(needs).contains(f"{oldest}.0"):
            refusing[name] = needs
    assert refusing == {}, f"requires-python >={oldest}, but these need more: {refusing}"


def test_the_cli_hides_only_the_notices_that_say_nothing_to_act_on(caplog):
    """bitsandbytes' optional-kernels notice and transformers' torchvision notice ask for installs stylelora does not
    need, and diffusers' "kept in float32: []" names no module; they are hidden, and any other message of those
    loggers still shows."""
    import logging

    from stylelora.quiet import HIDDEN, _WithoutNotice, hide_noise_notices

    hide_noise_notices()
    hide_noise_notices()  # twice: one filter each (diffusers adds a filter of its own to its loggers)
    with caplog.at_level(logging.WARNING):
        for name, text in HIDDEN.items():
            logger = logging.getLogger(name)
            assert len([f for f in logger.filters if isinstance(f, _WithoutNotice)]) == 1
            logger.warning("Failed to load CPU gemm_4bit_forward %s", text)
            logger.warning("something else went wrong")
    shown = [record.getMessage() for record in caplog.records]
    assert shown == ["something else went wrong"] * len(HIDDEN)
