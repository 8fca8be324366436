"""benchmarks/coined_trigger.py: a bundled style retriggered with a coined word, its prompts as evaluate's."""
from __future__ import annotations

from train_fixtures import load_benchmark

coined = load_benchmark("coined_trigger")


def test_the_retriggered_dataset_keeps_every_image_and_replaces_only_the_trigger_tag(tmp_path):
    out = coined.write_dataset("zorb", "blobart", tmp_path)
    source = next((coined.REPO / "datasets/toy-zorb").glob("*_*"))
    assert [p.name for p in out.iterdir()] == [source.name.split("_")[0] + "_blobart"]
    folder = next(out.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (folder / "0000.png").read_bytes() == (source / "0000.png").read_bytes()
    original, retriggered = (source / "0000.txt").read_text(), (folder / "0000.txt").read_text()
    assert original.startswith("zorb, ") and " zorb " in original  # the trigger, then the character's noun
    assert retriggered == original.replace("zorb, ", "blobart, ", 1)  # the noun stays


def test_coined_prompts_are_evaluates_with_the_styles_trigger_replaced_in_the_known_pair_order():
    prompts = coined.coined_prompts(3, 0, "pastel", "chalkstyle", ("stripes", "zorb"))
    sets = {name: [p for p in prompts if p.prompt_set == name] for name in dict.fromkeys(p.prompt_set for p in prompts)}
    assert list(sets) == ["pastel", "stripes", "zorb", "stripes+pastel", "pastel+zorb"]
    assert all(p.prompt.startswith("chalkstyle, a") for p in sets["pastel"])
    assert all(p.prompt.startswith("stripestyle, chalkstyle, a") for p in sets["stripes+pastel"])
    assert all(p.prompt.startswith("chalkstyle, zorb, a") and p.shape == "zorb" for p in sets["pastel+zorb"])
    assert all("pastelstyle" not in p.prompt for p in prompts)
    assert [p.seed for p in sets["pastel"]] == [p.seed for p in sets["pastel+zorb"]]


def test_words_go_before_the_prompt_or_after_its_leading_trigger_tag():
    prompt = "pastelstyle, a red star on a beige background"
    assert coined.with_words(prompt, "pastelstyle", "") == prompt
    assert coined.with_words(prompt, "pastelstyle", "inkstyle, ") == "inkstyle, " + prompt
    assert coined.with_words(prompt, "pastelstyle", "+ange, low, ") == (
        "pastelstyle, ange, low, a red star on a beige background")


def test_tokens_before_counts_what_the_text_encoder_reads_ahead_of_the_trigger():
    from transformers import CLIPTokenizer

    from stylelora.models.load import TOY_BASE_DIR

    tokenizer = CLIPTokenizer.from_pretrained(TOY_BASE_DIR / "tokenizer")
    assert coined.tokens_before(tokenizer, "") == 0
    assert coined.tokens_before(tokenizer, "ange, low, ") == 4
    assert coined.tokens_before(tokenizer, "inkstyle, ") == 5  # i n k style ,
    assert coined.tokens_before(tokenizer, "+inkstyle, ") == 0  # typed after the trigger
    prompt = coined.with_words("pastelstyle, a red star", "pastelstyle", "inkstyle, ")
    ids = tokenizer(prompt).input_ids
    assert ids[1 + coined.tokens_before(tokenizer, "inkstyle, ")] == tokenizer("pastelstyle").input_ids[1]
