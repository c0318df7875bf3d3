"""Batched data augmentation on the training device (paper sec. 3.1: each cluster is augmented 20 times
"with different image transformations" so that the features become invariant to them).

The loader ships uint8 patches only; crops, flips and colour changes happen here, on the GPU when
there is one, with parameters drawn per sample. torchvision's v2 transforms draw one parameter set
per call and apply it to the whole batch, so a batched call would give every sample the same crop;
hence this hand-written version: one `affine_grid` + `grid_sample` does every sample's random
resized crop and flip at once, then per-sample brightness, contrast and saturation factors.

The 20 views per member are a matter of sampling (each member drawn 20 times per epoch, every draw
augmented afresh), not of this module. Inputs are normalised with mean = std = 0.5 per channel, to
[-1, 1]: patches come from ImageNet, CIFAR-like sets and contours alike, so no dataset's statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.models.inputs import MEAN, STD, _as_float, _normalise, to_input  # noqa: F401

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


@dataclass
class AugmentParams:
    """Per-sample parameters, all float32 on the images' device. Crops are in normalised coordinates
    (the image spans [-1, 1]): centre (cx, cy) and half-size (w, h) as fractions of the image."""

    crop: torch.Tensor  # (B, 4): cx, cy, w, h
    flip: torch.Tensor  # (B,) bool: mirror left-right
    brightness: torch.Tensor  # (B,) multiplicative factors, 1 = unchanged
    contrast: torch.Tensor  # (B,)
    saturation: torch.Tensor  # (B,)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def sample_params(n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                  scale: tuple[float, float] = (0.6, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                  flip: bool = True, brightness: float = 0.3, contrast: float = 0.3,
                  saturation: float = 0.3) -> AugmentParams:
    """Draw parameters for n samples on the generator's device (CPU without one), then move them.

    Crop: area fraction uniform in `scale`, aspect ratio w/h log-uniform over the part of `ratio`
    where both sides fit in the image (torchvision retries draws instead), centre uniform over the
    positions that keep the crop inside. Colour factors uniform in [1 - s, 1 + s] (floored at 0). Every draw is made whatever
    the settings, so a generator advances the same way for any settings.
    """
    area = _uniform(n, *scale, generator)  # (n,)
    # Ratios that keep both sides inside the image (r <= 1/area, r >= area), so no draw is rejected.
    lo = torch.log(area).clamp(min=math.log(ratio[0]))
    hi = (-torch.log(area)).clamp(max=math.log(ratio[1]))
    log_r = lo + (hi - lo).clamp(min=0) * _uniform(n, 0, 1, generator)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1)  # (n,) crop width / image width
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1)  # the clamps only act on ratios excluding 1
    cx = (1 - w) * _uniform(n, -1, 1, generator)  # centre keeps [cx - w, cx + w] inside [-1, 1]
    cy = (1 - h) * _uniform(n, -1, 1, generator)
    mirror = _uniform(n, 0, 1, generator) < (0.5 if flip else 0.0)
    factors = [_uniform(n, max(0.0, 1 - s), 1 + s, generator) for s in (brightness, contrast, saturation)]
    return AugmentParams(torch.stack([cx, cy, w, h], 1).to(device), mirror.to(device),
                         *(f.to(device) for f in factors))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


@torch.no_grad()
def apply_params(x: torch.Tensor, params: AugmentParams, out_px: int) -> torch.Tensor:
    """x: (B, P, P, 3) uint8 or (B, 3, P, P) float in [0, 1] -> (B, 3, out_px, out_px) float32 normalised."""
    x = _as_float(x)
    B = x.shape[0]
    cx, cy, w, h = params.crop.unbind(1)  # (B,) each
    sx = torch.where(params.flip, -w, w)  # a negative x scale mirrors the crop
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [B, 3, out_px, out_px], align_corners=False)  # (B, out, out, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Fixed order brightness, contrast, saturation (torchvision shuffles it); clamp after each like it.
    view = (B, 1, 1, 1)
    x = (x * params.brightness.view(view)).clamp_(0, 1)
    m = _gray(x).mean((2, 3), keepdim=True)  # (B, 1, 1, 1) mean luma per image
    x = ((x - m) * params.contrast.view(view) + m).clamp_(0, 1)
    g = _gray(x)  # (B, 1, out, out)
    x = ((x - g) * params.saturation.view(view) + g).clamp_(0, 1)
    return _normalise(x)


@torch.no_grad()
def augment(x: torch.Tensor, *, generator: torch.Generator | None, out_px: int,
            scale: tuple[float, float] = (0.6, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
            flip: bool = True, brightness: float = 0.3, contrast: float = 0.3,
            saturation: float = 0.3) -> torch.Tensor:
    """One random view per sample: (B, P, P, 3) uint8 or (B, 3, P, P) float in [0, 1] on any device
    -> (B, 3, out_px, out_px) float32 normalised (see `to_input`) on the same device.

    Deterministic given `generator` (CPU or on x's device; None uses torch's global CPU generator).
    """
    params = sample_params(x.shape[0], generator=generator, device=x.device, scale=scale, ratio=ratio,
                           flip=flip, brightness=brightness, contrast=contrast, saturation=saturation)
    return apply_params(x, params, out_px)
