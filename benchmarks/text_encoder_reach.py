"""Which prompt tokens an adapter's text-encoder LoRA moves: for each adapter (its text encoder at 1, UNet off), the
root-mean-square change of each token's hidden state against the base's, on prompts that carry two triggers.

Why: in a blend the UNet of one adapter reads every token the other adapter's text encoder has moved. A large change
on the token that follows the trigger (where another adapter's trigger sits in a stacked prompt) is how one
adapter erases another (docs/results.md, "Blending").

    python benchmarks/text_encoder_reach.py --adapters-dir outputs/switch/cd0q25

Prints one line per adapter and prompt: token:change for the first tokens (base hidden states' RMS for scale).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPTS = ("stripestyle, pastelstyle, a red circle", "pastelstyle, stripestyle, a blue square",
           "stripestyle, zorb, a green zorb", "pastelstyle, zorb, a red zorb")
SHOWN_TOKENS = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters-dir", default=str(REPO / "outputs" / "blend"),
                        help="folder with toy-NAME/toy-NAME.safetensors for each style")
    parser.add_argument("--styles", nargs="+", default=["stripes", "pastel", "zorb"])
    return parser.parse_args(argv)


def token_changes(base, adapted, tokens: list[str]) -> list[tuple[str, float]]:
    """(token, RMS over the width of adapted − base) for one prompt's (tokens, width) hidden states."""
    rms = (adapted - base).pow(2).mean(dim=-1).sqrt()
    return [(token, float(value)) for token, value in zip(tokens, rms)]


def main(argv=None) -> None:
    from stylelora.generate.stack import AdapterStack
    from stylelora.lora.spec import AdapterSpec
    from stylelora.models.load import load_base
    from stylelora.train.models import text_encode_fn, tokenize

    args = parse_args(argv)
    pipe = load_base("toy")
    stack = AdapterStack.for_pipe(pipe)
    ids = tokenize(pipe.tokenizer, list(PROMPTS))
    encode = text_encode_fn(pipe.text_encoder, pipe.tokenizer, pipe.device)  # reads whatever the stack has fused

    base = encode(list(PROMPTS))
    for style in args.styles:
        stack.apply([AdapterSpec(Path(args.adapters_dir) / f"toy-{style}" / f"toy-{style}.safetensors", 0.0, 1.0)])
        adapted = encode(list(PROMPTS))
        for row, prompt in enumerate(PROMPTS):
            tokens = [token.removesuffix("</w>") for token in pipe.tokenizer.convert_ids_to_tokens(ids[row])]
            shown = token_changes(base[row, :SHOWN_TOKENS], adapted[row, :SHOWN_TOKENS], tokens[:SHOWN_TOKENS])
            print(f"{style:8s} {prompt:42s} " + " ".join(f"{token}:{change:.2f}" for token, change in shown))
    stack.clear()
    print(f"base hidden states' RMS: {base.pow(2).mean().sqrt().item():.2f}")


if __name__ == "__main__":
    main()
