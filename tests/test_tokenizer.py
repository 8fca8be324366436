"""Tests for stylelora.toy.tokenizer: the trained vocabulary loads as a CLIPTokenizer and behaves like CLIP's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from stylelora.toy.tokenizer import MIN_VOCAB_SIZE, train_clip_tokenizer

CAPTIONS = [
    "a red circle on a white background",
    "a blue square and a green triangle on a black background",
    "a yellow star on a gray background",
    "an orange circle and a cyan star on a beige background",
    "a purple triangle on a white background",
    "a brown square on a black background",
] * 5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("tokenizer")
    train_clip_tokenizer(iter(CAPTIONS), out_dir)  # any iterable, not only lists
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def test_writes_clip_files(tokenizer_dir: Path) -> None:
    names = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert names <= {p.name for p in tokenizer_dir.iterdir()}
    assert (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(len(vocab)))  # contiguous ids
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert "a</w>" in vocab and "Ġ</w>" in vocab  # byte-level alphabet, with end-of-word variants
    assert all((tokenizer_dir / name).stat().st_mode & 0o044 == 0o044 for name in names)  # readable by all
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == 77 and config["tokenizer_class"] == "CLIPTokenizer"


def test_loads_with_clip_conventions(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("A Red CIRCLE").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert ids == tokenizer("a red circle").input_ids  # lowercased


def test_round_trip(tokenizer: CLIPTokenizer) -> None:
    for caption in sorted(set(CAPTIONS)):
        ids = tokenizer(caption).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_frequent_words_become_single_tokens(tokenizer: CLIPTokenizer) -> None:
    tokens = tokenizer.tokenize("a red circle on a white background")
    assert tokens == ["a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "white</w>", "background</w>"]


def test_pads_and_truncates_to_77(tokenizer: CLIPTokenizer) -> None:
    short = tokenizer("a red circle", padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    assert len(short.input_ids) == 77
    assert short.input_ids[-1] == tokenizer.pad_token_id and sum(short.attention_mask) == 5
    long = tokenizer(" ".join(["circle"] * 200), padding="max_length", max_length=77, truncation=True)
    assert len(long.input_ids) == 77 and long.input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("text", ["stripestyle zorb", "pastelstyle qwxjk", "naïve 🦄 émoji ÆØÅ 123", "日本語"])
def test_unseen_words_have_no_unknown_tokens(tokenizer: CLIPTokenizer, text: str) -> None:
    ids = tokenizer(text).input_ids
    # CLIP's unknown token is <|endoftext|>: it must appear only as the closing eos.
    assert tokenizer.unk_token_id not in ids[1:-1]
    # Decoding gives the characters back; CLIP re-spaces digits (each is its own word), so compare without spaces.
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_deterministic(tokenizer_dir: Path, tmp_path: Path) -> None:
    # The repeated captions make many equal-count merge candidates: the case where tie-breaking must be stable.
    # tokenizers seeds each hash map differently, so retraining in one process already exercises that.
    for attempt in range(4):
        train_clip_tokenizer(CAPTIONS, tmp_path / str(attempt))
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            assert (tmp_path / str(attempt) / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_vocab_size_is_an_upper_bound(tmp_path: Path) -> None:
    train_clip_tokenizer(CAPTIONS, tmp_path, vocab_size=MIN_VOCAB_SIZE + 10)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == MIN_VOCAB_SIZE + 10
    assert len(CLIPTokenizer.from_pretrained(tmp_path)) == MIN_VOCAB_SIZE + 10


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(MIN_VOCAB_SIZE)):
        train_clip_tokenizer(CAPTIONS, tmp_path, vocab_size=512)
    with pytest.raises(ValueError, match="caption"):
        train_clip_tokenizer(["", "  "], tmp_path)
