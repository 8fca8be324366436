"""kohya's --max_token_length: captions past 75 tokens read in windows of 75 during training, as generation reads a
long prompt; the note on cut captions, the file's metadata and the refusal of a length kohya does not take."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from stylelora.config import ConfigError, load_config
from stylelora.generate import prompt_reading
from stylelora.train.loop import run_training
from stylelora.train.models import by_window, tokenize
from test_prompt_reading import TOY_TOKENIZER
from train_fixtures import adapter_metadata, reset_accelerate, tiny_overrides

LONG = "stripestyle, " + "a red circle on a white background, " * 12  # 97 tokens on the toy tokenizer


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


def test_long_captions_become_windows_of_75_as_a_long_prompt_does():
    tokenizer = CLIPTokenizer.from_pretrained(TOY_TOKENIZER)
    ids = tokenize(tokenizer, [LONG, "stripestyle, a red circle"], max_tokens=150)
    assert ids.shape == (2, 154)
    tokens = tokenizer(LONG, add_special_tokens=False).input_ids
    first, second = ids[0, :77].tolist(), ids[0, 77:].tolist()
    assert first == [tokenizer.bos_token_id, *tokens[:75], tokenizer.eos_token_id]  # no word lost, none twice
    assert second[:len(tokens) - 73] == [tokenizer.bos_token_id, *tokens[75:], tokenizer.eos_token_id]
    assert tokenize(tokenizer, [LONG]).shape == (1, 77)  # the default: one window, as before
    # generation reads the same caption in the same two windows when it has no comma near the first one's end
    plain = LONG.replace(",", "")
    rows = prompt_reading.rows(tokenizer, plain, 2)
    assert tokenize(tokenizer, [plain], max_tokens=150)[0].tolist() == rows[0].ids + rows[1].ids


def test_windows_are_encoded_apart_and_laid_side_by_side():
    calls = []

    def encode(window):
        calls.append(window.shape[1])
        return window[..., None].float()

    ids = torch.arange(154)[None]
    assert torch.equal(by_window(encode, ids)[..., 0], ids.float()) and calls == [77, 77]


def test_a_long_caption_run_reads_its_captions_in_three_windows(tmp_path, tiny_base, monkeypatch):
    from stylelora.train import models
    from train_fixtures import write_kohya_dataset

    dataset = write_kohya_dataset(tmp_path / "set")
    for caption in dataset.rglob("*.txt"):
        caption.write_text(LONG)
    widths, original = [], models.by_window
    monkeypatch.setattr(models, "by_window", lambda encode, ids, *more, **kw: widths.append(ids.shape[1])
                        or original(encode, ids, *more, **kw))
    config = load_config(None, tiny_overrides(dataset, tmp_path / "run", tiny_base, **{"data.max_token_length": 225}))
    adapter = run_training(config)
    assert adapter_metadata(adapter)["ss_max_token_length"] == "225"
    # each of the 4 steps encodes its captions in three windows (the one-window reads are the quiet-word survey's)
    assert widths.count(3 * 77) >= 4 and set(widths) == {77, 3 * 77}


def test_a_length_kohya_does_not_take_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.max_token_length is 75, 150 or 225 tokens"):
        load_config(None, {"data.dir": str(tmp_path), "data.max_token_length": 100})
