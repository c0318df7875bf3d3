"""How pixels become network inputs: uint8 patches -> float in [0, 1] -> normalised with mean = std = 0.5
per channel, to [-1, 1] (no dataset's statistics). Shared by training, feature extraction and transfer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

MEAN = 0.5
STD = 0.5


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """(B, P, P, 3) uint8 or (B, 3, P, P) float in [0, 1] -> (B, 3, P, P) float32 in [0, 1]."""
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[3] != 3:
            raise ValueError(f"uint8 patches must be (B, P, P, 3), got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float().div_(255).contiguous()
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"float patches must be (B, 3, P, P), got {tuple(x.shape)}")
    return x.float()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


@torch.no_grad()
def to_input(x: torch.Tensor, out_px: int | None = None) -> torch.Tensor:
    """Un-augmented network input: (B, P, P, 3) uint8 or (B, 3, P, P) float in [0, 1] ->
    (B, 3, out_px, out_px) float32 normalised like `augment` (bilinear resize when out_px != P)."""
    x = _as_float(x)
    if out_px is not None and out_px != x.shape[-1]:
        # Bilinear without antialiasing: what grid_sample does for augment's identity crop.
        x = F.interpolate(x, size=(out_px, out_px), mode="bilinear", align_corners=False)
    return _normalise(x)
