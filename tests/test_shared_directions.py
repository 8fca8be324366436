"""benchmarks/shared_directions.py: how much two adapter files read the same input directions, on hand-made files
whose answer is known (the same rows, half the rows, orthogonal rows), and a file pair with nothing in common is
refused with the likely cause."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from train_fixtures import load_benchmark

LAYER = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _adapter(path, down: torch.Tensor, layer: str = LAYER) -> str:
    rank = down.shape[0]
    save_file({f"{layer}.lora_down.weight": down.contiguous(), f"{layer}.lora_up.weight": torch.ones(3, rank),
               f"{layer}.alpha": torch.tensor(float(rank))}, str(path))
    return str(path)


@pytest.mark.parametrize("rows_b, cosine, overlap", [
    ([[1, 0, 0, 0], [0, 1, 0, 0]], 1.0, 1.0),   # the same rows
    ([[0, 1, 0, 0], [1, 0, 0, 0]], 0.0, 1.0),   # the same subspace, rows swapped: cosine 0, overlap 1
    ([[1, 0, 0, 0], [0, 0, 1, 0]], 0.5, 0.5),   # one direction shared of two
    ([[0, 0, 1, 0], [0, 0, 0, 1]], 0.0, 0.0),   # orthogonal
])
def test_cosine_and_overlap_of_hand_made_files(tmp_path, capsys, rows_b, cosine, overlap):
    bench = load_benchmark("shared_directions")
    first = _adapter(tmp_path / "a.safetensors", torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))
    second = _adapter(tmp_path / "b.safetensors", torch.tensor(rows_b, dtype=torch.float32))
    assert bench.main([first, second, "--layers"]) == 0
    out = capsys.readouterr().out
    assert f"mean cosine {cosine:.3f}, mean row-space overlap {overlap:.3f}" in out
    assert LAYER in out


def test_files_without_a_common_layer_are_refused(tmp_path):
    bench = load_benchmark("shared_directions")
    first = _adapter(tmp_path / "a.safetensors", torch.eye(2, 4))
    second = _adapter(tmp_path / "b.safetensors", torch.eye(2, 4), layer="lora_unet_mid_block_attentions_0_proj_in")
    with pytest.raises(SystemExit, match="same base"):
        bench.main([first, second])
