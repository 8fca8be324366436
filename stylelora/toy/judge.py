"""The toy-world judge: its network, its self-describing weights file, and scoring images (shape, color, stripes, pastel, zorb)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .world import COLORS, IMAGE_SIZE, SHAPES

DEFAULT_JUDGE_PATH = Path(__file__).parents[1] / "models" / "toy" / "judge.safetensors"
FORMAT_NAME = "stylelora-toy-judge"
FORMAT_VERSION = "1"
BINARY_HEADS = ("stripes", "pastel", "zorb")  # order of the outputs of the network's "binary" head
PREDICT_BATCH = 256  # images per forward pass; bounds memory for large inputs
FLOAT_RANGE_SLACK = 0.02  # generated float images may overshoot [0, 1] slightly; beyond this it is a wrong range


@dataclass(frozen=True)
class JudgeSpec:
    """Everything needed to rebuild the network and name its outputs; stored in the weights file's metadata."""

    widths: tuple[int, ...] = (16, 32, 64)  # channels per resolution stage (32, 16, 8 px)
    hidden: int = 64
    image_size: int = IMAGE_SIZE
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    binary_heads: tuple[str, ...] = BINARY_HEADS

    def to_metadata(self) -> dict[str, str]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "spec": json.dumps(asdict(self))}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: Path) -> JudgeSpec:
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{source} is not a stylelora judge file (metadata 'format' is {metadata.get('format')!r})")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{source} has judge format version {metadata.get('format_version')!r}; this code reads "
                f"{FORMAT_VERSION!r}. Retrain it with `python -m stylelora.toy.judge_train`."
            )
        fields = json.loads(metadata["spec"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def build_network(spec: JudgeSpec):
    """A small VGG-style CNN: two 3×3 convs per stage, max-pool between stages, avg+max pooled features, shared neck."""
    from torch import nn

    layers: list = []
    in_channels = 3
    for stage, width in enumerate(spec.widths):
        if stage:
            layers.append(nn.MaxPool2d(2))
        for _ in range(2):
            layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            in_channels = width
    return nn.ModuleDict(
        {
            "trunk": nn.Sequential(*layers),
            # avg pooling sees the overall palette (pastel, color); max pooling sees small local evidence (stripes, eyes)
            "neck": nn.Sequential(nn.Linear(2 * in_channels, spec.hidden), nn.ReLU()),
            "shape": nn.Linear(spec.hidden, len(spec.shapes)),
            "color": nn.Linear(spec.hidden, len(spec.colors)),
            "binary": nn.Linear(spec.hidden, len(spec.binary_heads)),
        }
    )


def network_logits(network, images) -> dict:
    """Logits per head for a float batch N×3×S×S in [0, 1]."""
    import torch

    features = network["trunk"]((images - 0.5) * 4.0)  # center and scale so the first conv sees roughly unit range
    pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
    hidden = network["neck"](pooled)
    return {head: network[head](hidden) for head in ("shape", "color", "binary")}


def save_judge(network, spec: JudgeSpec, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write weights + spec atomically (the adapter writer: old file or new one, umask permissions)."""
    from stylelora.lora.io import write_safetensors_atomic

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in network.state_dict().items()}
    metadata = {**(extra_metadata or {}), **spec.to_metadata()}
    return write_safetensors_atomic(path, state, metadata)


def read_judge_metadata(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The weights file's metadata (spec, training seed/steps, measured accuracy) without building the network."""
    from safetensors import safe_open

    path = _existing_judge_path(path)
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_judge(path: str | os.PathLike | None = None) -> Judge:
    """Load a judge from a weights file (default: the shipped one)."""
    from safetensors.torch import load_file

    path = _existing_judge_path(path)
    spec = JudgeSpec.from_metadata(read_judge_metadata(path), path)
    network = build_network(spec)
    network.load_state_dict(load_file(str(path)))
    return Judge(network, spec)


def _existing_judge_path(path: str | os.PathLike | None) -> Path:
    path = Path(path) if path is not None else DEFAULT_JUDGE_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"judge weights not found at {path}; train them with `python -m stylelora.toy.judge_train --out {path}`"
        )
    return path


class Judge:
    """Scores images of the toy world. Deterministic: eval mode, no sampling, fixed preprocessing."""

    def __init__(self, network, spec: JudgeSpec):
        self.network = network.eval()
        self.spec = spec

    def probabilities(self, images) -> dict[str, np.ndarray]:
        """Per-head probabilities: "shape" N×len(shapes), "color" N×len(colors), and N-vectors for binary heads."""
        import torch

        batch = images_to_array(images, self.spec.image_size)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(batch), PREDICT_BATCH):
                pixels = torch.from_numpy(batch[start : start + PREDICT_BATCH]).permute(0, 3, 1, 2)
                logits = network_logits(self.network, pixels)
                chunks.append(
                    {
                        "shape": logits["shape"].softmax(dim=1).numpy(),
                        "color": logits["color"].softmax(dim=1).numpy(),
                        "binary": logits["binary"].sigmoid().numpy(),
                    }
                )
        return _joined_heads(chunks, self.spec)

    def predict(self, images) -> list[dict]:
        """One verdict per image: {"shape", "color", "stripes", "pastel", "zorb"} plus their probabilities."""
        probs = self.probabilities(images)
        return [self._verdict(probs, i) for i in range(len(probs["shape"]))]

    def _verdict(self, probs: dict[str, np.ndarray], i: int) -> dict:
        spec = self.spec
        verdict: dict = {
            "shape": spec.shapes[int(probs["shape"][i].argmax())],
            "color": spec.colors[int(probs["color"][i].argmax())],
        }
        for head in spec.binary_heads:
            verdict[head] = bool(probs[head][i] >= 0.5)
        verdict["shape_probs"] = {name: float(p) for name, p in zip(spec.shapes, probs["shape"][i])}
        verdict["color_probs"] = {name: float(p) for name, p in zip(spec.colors, probs["color"][i])}
        for head in spec.binary_heads:
            verdict[f"{head}_prob"] = float(probs[head][i])
        return verdict


def _joined_heads(chunks: list[dict], spec: JudgeSpec) -> dict[str, np.ndarray]:
    if not chunks:  # no images: empty arrays keep the caller's shapes consistent
        chunks = [
            {
                "shape": np.zeros((0, len(spec.shapes)), np.float32),
                "color": np.zeros((0, len(spec.colors)), np.float32),
                "binary": np.zeros((0, len(spec.binary_heads)), np.float32),
            }
        ]
    binary = np.concatenate([c["binary"] for c in chunks])
    joined = {head: np.concatenate([c[head] for c in chunks]) for head in ("shape", "color")}
    joined.update({head: binary[:, k] for k, head in enumerate(spec.binary_heads)})
    return joined


def images_to_array(images, size: int = IMAGE_SIZE) -> np.ndarray:
    """PIL images, a list of arrays, or an N×H×W×C array batch → float32 N×size×size×3 in [0, 1].

    uint8 arrays are 0..255, float arrays 0..1. Larger images are box-downsampled, smaller ones bilinearly upsampled;
    every path goes through the same float resize so a PIL image and its array give the same numbers.
    """
    if isinstance(images, Image.Image):
        images = [images]
    elif isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(
                f"an array batch must be N×H×W×C (got shape {images.shape}); wrap a single image as array[None]"
            )
        images = list(images)
    rgbs = [_resized(_as_float_rgb(image), size) for image in images]
    if not rgbs:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack(rgbs).astype(np.float32)


def _as_float_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"each image must be H×W×3 (RGB) or H×W×4 (RGBA); got shape {array.shape}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        return _checked_unit_range(array.astype(np.float32))
    raise ValueError(f"image arrays must be uint8 (0..255) or float (0..1); got dtype {array.dtype}")


def _checked_unit_range(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    if low < -FLOAT_RANGE_SLACK or high > 1 + FLOAT_RANGE_SLACK:
        raise ValueError(
            f"float images must be in [0, 1]; got values in [{low:.3f}, {high:.3f}] "
            "(for [-1, 1] images pass (x + 1) / 2, for 0..255 floats pass x / 255 or a uint8 array)"
        )
    return np.clip(array, 0.0, 1.0)


def _resized(rgb: np.ndarray, size: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    if (height, width) == (size, size):
        return rgb
    method = Image.Resampling.BOX if height >= size and width >= size else Image.Resampling.BILINEAR
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c])).resize((size, size), method))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1)
