"""The toy base's tokenizer: a byte-level BPE vocabulary trained on captions, written in CLIP's file format."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from ..atomic import write_text_atomic

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also CLIP's pad and unk token
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
MERGES_HEADER = "#version: 0.2"
# Every byte, alone and as a word ending, plus the two special tokens: the floor that makes any string encodable.
MIN_VOCAB_SIZE = 2 * 256 + 2


def train_clip_tokenizer(captions: Iterable[str], out_dir: Path, vocab_size: int = 1024) -> None:
    """Learn BPE merges from `captions` and write a folder that `CLIPTokenizer.from_pretrained` loads.

    `vocab_size` is the total vocabulary size, at most: the 512 byte symbols and 2 special tokens are always
    included (so any text encodes without unknown tokens), the rest are learned merges. Training stops earlier
    when every caption word is already a single token. The same captions give byte-identical files.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a CLIP byte-level vocabulary always holds the 512 byte symbols "
            f"and 2 special tokens, so use at least {MIN_VOCAB_SIZE} (plus room for learned merges, e.g. 1024)."
        )
    texts = [str(caption) for caption in captions]
    if not any(text.strip() for text in texts):
        raise ValueError("No caption text to train the tokenizer on: pass at least one non-empty caption.")
    merges = _learn_merges(texts, max_merges=vocab_size - MIN_VOCAB_SIZE)
    vocab, merges = _clip_vocab(merges, vocab_size)
    _write_tokenizer_folder(Path(out_dir), vocab, merges)


def _learn_merges(texts: list[str], max_merges: int) -> list[tuple[str, str]]:
    """BPE merges in learning order, from text split exactly the way CLIPTokenizer splits it when encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    # Borrow the normalizer and pre-tokenizer from a CLIPTokenizer so that training sees the same words
    # (lowercased, CLIP's word regex, byte-to-unicode alphabet) that encoding will see.
    clip_pipeline = CLIPTokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = clip_pipeline.normalizer
    bpe.pre_tokenizer = clip_pipeline.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        # The trainer counts alphabet and special tokens in vocab_size; room for both leaves max_merges merges.
        vocab_size=2 * 256 + max_merges,
        end_of_word_suffix=END_OF_WORD,
        initial_alphabet=alphabet,
        # Why the word endings are declared up front: otherwise the trainer numbers them in hash-map order, which
        # changes per process, and equal-count merges are ranked by those numbers, so the same captions could give
        # different merges (huggingface/tokenizers#1794). Pre-registered, they get fixed ids; only merges are kept.
        special_tokens=[symbol + END_OF_WORD for symbol in alphabet],
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    learned = json.loads(bpe.to_str())["model"]["merges"]
    # Older tokenizers serialise a merge as "a b", newer ones as ["a", "b"].
    return [tuple(m.split(" ")) if isinstance(m, str) else (m[0], m[1]) for m in learned]


def _clip_vocab(merges: list[tuple[str, str]], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: bytes, bytes + </w>, merge results in merge order, then the special tokens last."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_symbol = bytes_to_unicode()
    byte_symbols = [byte_to_symbol[byte] for byte in range(256)]
    tokens = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
    seen = set(tokens)
    kept_merges = []
    for left, right in merges:
        merged = left + right
        if merged not in seen and len(tokens) + 2 >= vocab_size:
            break  # a prefix of the merge list is still a valid BPE model, so truncating here is safe
        kept_merges.append((left, right))
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, kept_merges


def _write_tokenizer_folder(out_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    write_text_atomic(out_dir / "merges.txt", "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n")
    write_text_atomic(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    write_text_atomic(out_dir / "special_tokens_map.json", json.dumps(special_tokens, indent=2) + "\n")


UNKNOWN_WORD_RATE = 0.5  # share of captions that get an unknown word in front


def unknown_words(tokenizer, captions: list[str]) -> list[str]:
    """Whole-word tokens of the vocabulary (lowercase ASCII) that no training caption of the base contains."""
    seen = {word for caption in captions for word in re.findall(r"[a-z]+", caption.lower())}
    vocab = (token[: -len(END_OF_WORD)] for token in tokenizer.get_vocab() if token.endswith(END_OF_WORD))
    return sorted(word for word in vocab if re.fullmatch(r"[a-z]+", word) and word not in seen)


def with_unknown_word(caption: str, words: list[str], generator, rate: float = UNKNOWN_WORD_RATE) -> str:
    """`word, caption` with a random unknown word, with probability `rate`; else the caption unchanged."""
    import torch

    if float(torch.rand((), generator=generator)) >= rate:
        return caption
    return f"{words[int(torch.randint(0, len(words), (), generator=generator))]}, {caption}"
