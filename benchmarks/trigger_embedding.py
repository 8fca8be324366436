"""Pivotal tuning on `stylelora train`: does learning the trigger's token embedding make adapters blend better?

The diffusers advanced DreamBooth LoRA script (`--train_text_encoder_ti`) and cloneofsimo's lora train the
trigger's input embedding beside the LoRA; Mix-of-Show (Gu et al., arXiv 2305.18292) argues that a concept kept in
its own token's embedding, rather than in weights every prompt passes through, fuses better with other concepts.
An embedding row acts only where its token is in the prompt, so two adapters' rows never meet the way their
text-encoder LoRAs do ("Where the text encoders collide" in docs/results.md).

`train`: runs `stylelora train` (arguments after `--`) with the rows of the --trigger word's tokens trainable at
--lr (no weight decay, every other row's gradient masked) and writes them beside the adapter as
`NAME.emb.safetensors`. `--no-lora-text` trains the rows instead of the text-encoder LoRA (text encoders frozen,
their encodings computed every step). `run`: runs `stylelora …` or a benchmark script with every
`*.emb.safetensors` under --emb-dir written into the base's embedding table when the base loads, as A1111 loads
an embedding bundled in a LoRA file:

    for name in stripes:stripestyle pastel:pastelstyle zorb:zorb; do python benchmarks/trigger_embedding.py train \\
        --trigger ${name#*:} -- datasets/toy-${name%:*} --no-samples --output outputs/emb/toy-${name%:*}; done
    python benchmarks/trigger_embedding.py run --emb-dir outputs/emb -- benchmarks/blend_quality.py \\
        --adapters-dir outputs/emb --modes sum split --sweep '' --sweep-one '' --no-dial --no-single

Exploratory: the rows of words the base tokenizer already has (a coined trigger's pieces are shared with other
words, so it needs new tokens, which this does not add). Every loaded row applies to every prompt, so an adapter
alone on the stacked prompts reads the other trigger's learned row too.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SUFFIX = ".emb.safetensors"


def _trigger_ids(tokenizer, trigger: str) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in tokenizer(trigger).input_ids if i not in special]


def patch_training(trigger: str, lr: float, lora_text: bool) -> None:
    """Make the trigger's embedding rows train (loop._add_lora, optim.param_groups) and save them (write_adapter)."""
    import torch
    from safetensors.torch import save_file

    from stylelora.lora.components import text_encoders
    from stylelora.train import loop, optim

    rows: dict = {}  # encoder name -> (embedding weight, ids)
    add_lora, param_groups, write_adapter, build_dataset = (loop._add_lora, optim.param_groups, loop.write_adapter,
                                                            loop.build_dataset)

    def _add_lora_with_rows(config, pipe, *start):  # start: --network-weights' file and the run's printer
        lora = add_lora(config, pipe, *start)
        tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": getattr(pipe, "tokenizer_2", None)}
        for name, encoder in text_encoders(pipe).items():
            weight = encoder.get_input_embeddings().weight
            ids = _trigger_ids(tokenizers[name], trigger)
            mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
            mask[ids] = 1
            weight.requires_grad_(True)
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))
            rows[name] = (weight, ids)
        print(f"trigger embedding: {trigger!r} rows {[ids for _, ids in rows.values()]} trained at {lr}")
        return lora

    def _groups_with_rows(config, params):
        groups = param_groups(config, params)
        # Adam with a zero gradient and no weight decay leaves the other rows exactly where they are.
        return groups + [{"params": [weight], "lr": lr, "weight_decay": 0.0, "name": f"{name}_embedding"}
                         for name, (weight, _) in rows.items()]

    def _write_adapter_and_rows(run, path, step):
        written = write_adapter(run, path, step)
        tensors = {}
        for name, (weight, ids) in rows.items():
            tensors[f"{name}.ids"] = torch.tensor(ids, dtype=torch.int64)
            tensors[f"{name}.rows"] = weight.detach()[ids].float().cpu().contiguous()
        save_file(tensors, str(Path(written).with_suffix("")) + SUFFIX, metadata={"trigger": trigger})
        return written

    def _dataset_without_text_cache(config, data, pipe, accelerator):
        dataset, _cache = build_dataset(config, data, pipe, accelerator)
        return dataset, None  # the rows train, so the encodings change every step

    loop._add_lora, optim.param_groups, loop.write_adapter = _add_lora_with_rows, _groups_with_rows, \
        _write_adapter_and_rows
    if not lora_text:
        loop.build_dataset = _dataset_without_text_cache


def patch_loading(emb_dir: Path) -> list[Path]:
    """Every *.emb.safetensors under emb_dir written into the base's embedding tables when the base loads."""
    import torch
    from safetensors.torch import load_file

    from stylelora.lora.components import text_encoders
    from stylelora.models import load

    files = sorted(f for f in emb_dir.rglob("*" + SUFFIX) if "checkpoints" not in f.parts)
    load_base = load.load_base

    def _load_base_with_rows(*args, **kwargs):
        pipe = load_base(*args, **kwargs)
        encoders = text_encoders(pipe)
        for file in files:
            tensors = load_file(str(file))
            for name, encoder in encoders.items():
                if f"{name}.ids" in tensors:
                    weight = encoder.get_input_embeddings().weight
                    with torch.no_grad():
                        weight[tensors[f"{name}.ids"]] = tensors[f"{name}.rows"].to(weight.dtype)
        return pipe

    load.load_base = _load_base_with_rows
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    train.add_argument("--trigger", required=True, help="the word whose token rows train")
    train.add_argument("--lr", type=float, default=2e-4, help="the rows' learning rate (default 2e-4)")
    train.add_argument("--no-lora-text", action="store_true", help="train the rows instead of text-encoder LoRAs")
    run = sub.add_parser("run")
    run.add_argument("--emb-dir", required=True, type=Path)
    for each in (train, run):
        each.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the arguments")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    from stylelora.cli import main as stylelora

    if args.command == "train":
        patch_training(args.trigger, args.lr, not args.no_lora_text)
        return stylelora(["train", *rest, *(["--no-text-encoder"] if args.no_lora_text else [])])
    files = patch_loading(args.emb_dir)
    print(f"trigger embeddings loaded with the base: {[str(f) for f in files]}")
    if rest and rest[0].endswith(".py"):
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")
        return 0
    return stylelora(rest)


if __name__ == "__main__":
    sys.exit(main())
