"""Image-level features for the classification transfer (paper sec. 4.2, after Exemplar-CNN [13]).

    trunk   a pretrained (or random) trunk run fully convolutionally on the whole image: each conv
            layer's maps max-pooled over a grid per pyramid level (level 2 = the 4 quadrants, STL-10's
            pooling; levels 1, 2, 4 = a 3-level spatial pyramid, Caltech-101's), concatenated over
            layers; fc6/fc7 from the image resized to the trunk's input size
    pixels  raw pixels of the image resized to `pixels_px`, the floor every table should beat
    hog     VLFeat's UoCTTI HOG of the image (31 values a cell), the hand-crafted floor

Images are resized to a square `image_px` first (Caltech-101's protocol: 150 x 150). Plain functions:
`extract_part` is what one Ray task (or this process) runs on a slice of a set's images.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from cyvlfeat.hog import hog

from infra.storage import put_part
from pretrain.models.alexnet import LAYERS, AlexNetTrunk, build_trunk
from pretrain.models.inputs import to_input
from pretrain.models.weights import load_trunk, read_meta
from shards.patches import crop_patches
from transfer.labelled import ImageSource

METHODS = ("trunk", "pixels", "hog")
CONV_LAYERS = LAYERS[:5]


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that decides a feature vector (hashed into the run's manifest)."""

    method: str = "trunk"
    ckpt: str = ""  # method trunk: the weights file; "" with init random: build `arch` at `width`
    init: str = "pretrained"  # pretrained | random (He-normal, the same trunk)
    arch: str = "alexnet96"
    width: float = 1.0
    seed: int = 0
    layers: tuple[str, ...] = CONV_LAYERS
    pool_levels: tuple[int, ...] = (2,)
    image_px: int = 96
    pixels_px: int = 32
    hog_cell_px: int = 12
    batch: int = 128

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        bad = [n for n in self.layers if n not in LAYERS]
        if self.method == "trunk" and (bad or not self.layers):
            raise ValueError(f"layers must be among {', '.join(LAYERS)}, got {list(self.layers)}")


def resize_square(image: np.ndarray, px: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (px, px, 3) uint8, the whole image resized as the shard builder resizes a patch
    (`shards.patches.crop_patches`: area averaging when shrinking, linear when enlarging)."""
    if image.shape[:2] == (px, px):
        return image
    return crop_patches(image, np.array([[0, 0, image.shape[1], image.shape[0]]]), px)[0]


def load_images(source: ImageSource, indices: np.ndarray, px: int) -> np.ndarray:
    """The images at `indices`, each resized to px x px -> (n, px, px, 3) uint8."""
    out = np.empty((len(indices), px, px, 3), np.uint8)
    for j, i in enumerate(indices):
        out[j] = resize_square(source.load(int(i)), px)
    return out


@torch.no_grad()
def random_trunk(arch: str, width: float, seed: int) -> AlexNetTrunk:
    """The no-pretraining baseline: He-normal conv and fc weights (fan-in, ReLU gain), seeded; BatchNorm
    at its initial identity statistics."""
    trunk = build_trunk(arch, width)
    gen = torch.Generator().manual_seed(seed)
    for name in LAYERS:
        w = getattr(trunk, name).weight
        w.normal_(0.0, (2.0 / w[0].numel()) ** 0.5, generator=gen)
    return trunk.eval()


def trunk_arch(ckpt: str, arch: str, width: float) -> tuple[str, float]:
    """(arch, width) of the trunk to use: the checkpoint's when there is one (its header alone is read)."""
    if ckpt:
        model = read_meta(ckpt)["model"]
        return model["arch"], float(model["width"])
    return arch, width


@lru_cache(maxsize=2)
def _trunk(spec: FeatureSpec, device: str) -> AlexNetTrunk:
    if spec.init == "pretrained":
        return load_trunk(spec.ckpt, device)[0]
    return random_trunk(spec.arch, spec.width, spec.seed).to(device)


def pool_maps(maps: dict[str, torch.Tensor], levels: tuple[int, ...]) -> torch.Tensor:
    """{layer: (B, C, h, w)} -> (B, sum over layers and levels of C g^2): each map max-pooled over a g x g
    grid per level g, flattened, in the order given."""
    return torch.cat([F.adaptive_max_pool2d(m, g).flatten(1) for m in maps.values() for g in levels], 1)


@torch.no_grad()
def trunk_features(trunk: AlexNetTrunk, images: np.ndarray, layers: tuple[str, ...], levels: tuple[int, ...],
                   batch: int = 128) -> np.ndarray:
    """images: (N, S, S, 3) uint8 -> (N, D) float32: pooled conv maps at S, then fc layers at the trunk's
    input size, in the order of `layers`."""
    device = next(trunk.parameters()).device
    convs = tuple(n for n in layers if n in CONV_LAYERS)
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch])).to(device)
        parts = {}
        if convs:
            maps = trunk.conv_maps(to_input(x), convs)
            parts.update({n: pool_maps({n: maps[n]}, levels) for n in convs})
        for n in layers:
            if n not in CONV_LAYERS:
                parts[n] = trunk.features(to_input(x, trunk.input_px), n)
        out.append(torch.cat([parts[n] for n in layers], 1).float().cpu().numpy())
    return np.concatenate(out)


def pixel_features(images: np.ndarray, px: int) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, px * px * 3) float32 in [0, 1]."""
    return np.stack([resize_square(im, px) for im in images]).reshape(len(images), -1).astype(np.float32) / 255.0


def hog_features(images: np.ndarray, cell_px: int) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, cells^2 * 31) float32, VLFeat's UoCTTI HOG with `cell_px` cells."""
    return np.stack([hog(im.astype(np.float32) / 255.0, cell_px).ravel() for im in images]).astype(np.float32)


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def extract(spec: FeatureSpec, images: np.ndarray) -> np.ndarray:
    """(N, image_px, image_px, 3) uint8 -> (N, D) float32 features of `spec`."""
    if spec.method == "pixels":
        return pixel_features(images, spec.pixels_px)
    if spec.method == "hog":
        return hog_features(images, spec.hog_cell_px)
    return trunk_features(_trunk(spec, device_name()), images, spec.layers, spec.pool_levels, spec.batch)


def extract_part(spec: FeatureSpec, source: ImageSource, indices: np.ndarray, out) -> dict:
    """One task: the features of `indices` -> written to `out` (an .npy path or URI, write-once) ->
    {key, size, sha256, rows, decode_s, compute_s, device}."""
    t0 = time.perf_counter()
    images = load_images(source, indices, spec.image_px)
    t1 = time.perf_counter()
    feats = extract(spec, images)
    t2 = time.perf_counter()
    buf = io.BytesIO()
    np.save(buf, feats)
    return {**put_part(out, buf.getvalue()), "rows": len(indices), "dim": int(feats.shape[1]),
            "decode_s": round(t1 - t0, 4), "compute_s": round(t2 - t1, 4), "device": device_name()}
