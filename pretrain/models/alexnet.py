"""AlexNet-style trunks and the two heads trained on them (paper sec. 3.1-3.2, sec. 4.1).

Huang, Loy, Tang, "Unsupervised Learning of Discriminative Attributes and Visual Representations",
CVPR 2016. The trunk for 96x96 patches follows the patch network of Doersch et al. 2015 (the paper's
[12]) with BatchNorm after every layer; `alexnet32` is the small variant for 32x32 (CIFAR) inputs.

The layer names conv1..conv5, fc6, fc7 are the transfer contract: Fast R-CNN copies conv1..conv5 by
state-dict key (`conv1.weight`, ...). BatchNorm lives in separately named modules (bn1..bn7) so those
keys hold the Conv2d weights themselves; `fold_batchnorm` turns a trained trunk into the BN-free
weights of the same network (`batchnorm=False`), which is what a Caffe-style detector expects.

Heads: `ClusterHead` is the softmax classifier over visual-concept clusters (sec. 3.1); `HashHead` is
the bias-free hashing layer W of Eq. 1/3 over zero-meaned features (DESIGN.md: running mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")


@dataclass(frozen=True)
class ArchSpec:
    input_px: int
    convs: tuple[tuple[int, int, int, int], ...]  # conv1..conv5: (channels at width 1, kernel, stride, pad)
    pooled: tuple[int, ...]  # convs followed by max pool 3x3, stride 2
    fc_dim: int  # fc6 and fc7 width at width 1


ARCHS = {
    # 96 -conv1-> 24 -pool-> 11 -conv2-> 11 -pool-> 5 -conv3,4,5-> 5 -pool-> 2: fc6 sees 256 x 2 x 2
    "alexnet96": ArchSpec(96, ((96, 11, 4, 5), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)),
                          (1, 2, 5), 4096),
    # 32 -conv1-> 32 -pool-> 15 -conv2-> 15 -pool-> 7 -conv3,4,5-> 7 -pool-> 3: fc6 sees 128 x 3 x 3
    "alexnet32": ArchSpec(32, ((64, 5, 1, 2), (128, 5, 1, 2), (192, 3, 1, 1), (192, 3, 1, 1), (128, 3, 1, 1)),
                          (1, 2, 5), 512),
}


def _scaled(n: int, width: float) -> int:
    return max(1, round(n * width))


class AlexNetTrunk(nn.Module):
    """conv1..conv5 (+BN, ReLU, pools) -> fc6 -> fc7; `forward` gives fc7 post-ReLU activations.

    Attributes: `input_px` (square input side), `feature_dim` (fc7 width), `layer_shapes` (per layer
    name, the shape of one sample's activation as `features` sees it before flattening).
    """

    def __init__(self, spec: ArchSpec, width: float = 1.0, dropout: float = 0.5, batchnorm: bool = True):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.input_px = spec.input_px
        self.layer_shapes: dict[str, tuple[int, ...]] = {}
        c_in, px = 3, spec.input_px
        for i, (c, k, s, p) in enumerate(spec.convs, 1):
            c_out = _scaled(c, width)
            # A bias before BatchNorm is cancelled by the batch mean, so it only exists without BN.
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, k, s, p, bias=not batchnorm))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out) if batchnorm else nn.Identity())
            px = (px + 2 * p - k) // s + 1
            if i in spec.pooled:
                setattr(self, f"pool{i}", nn.MaxPool2d(3, 2))
                px = (px - 3) // 2 + 1
            self.layer_shapes[f"conv{i}"] = (c_out, px, px)
            c_in = c_out
        d = _scaled(spec.fc_dim, width)
        self.fc6 = nn.Linear(c_in * px * px, d, bias=not batchnorm)
        self.bn6 = nn.BatchNorm1d(d) if batchnorm else nn.Identity()
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(d, d, bias=not batchnorm)
        self.bn7 = nn.BatchNorm1d(d) if batchnorm else nn.Identity()
        self.layer_shapes.update(fc6=(d,), fc7=(d,))
        self.feature_dim = d

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (self.input_px, self.input_px):
            raise ValueError(f"expected input (B, 3, {self.input_px}, {self.input_px}), got {tuple(x.shape)}")

    def _conv_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return getattr(self, f"pool{i}")(x) if hasattr(self, f"pool{i}") else x

    def _run(self, x: torch.Tensor, stop: str) -> torch.Tensor:
        self._check(x)
        for i in range(1, 6):
            x = self._conv_block(i, x)
            if stop == f"conv{i}":
                return x.flatten(1)
        x = F.relu(self.bn6(self.fc6(x.flatten(1))))  # (B, d)
        if stop == "fc6":
            return x
        return F.relu(self.bn7(self.fc7(self.drop6(x))))  # (B, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, P, P) float, P = input_px -> fc7 post-ReLU activations (B, feature_dim)."""
        return self._run(x, "fc7")

    def features(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """x: (B, 3, P, P) float -> (B, prod(layer_shapes[layer])) flattened post-ReLU activations.

        conv1, conv2 and conv5 are taken after their max pool, conv3 and conv4 have none; fc6 is
        taken before its dropout. These feed the PCA of the next clustering round.
        """
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
        return self._run(x, layer)

    def conv_maps(self, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) float of any size the convolutions accept -> {layer: (B, C, h, w)} post-ReLU
        maps of the named conv layers (after their pools, as `features`): the fully convolutional use
        of the trunk on images larger than its training patches (paper sec. 4.2, after [13])."""
        bad = [n for n in layers if n not in LAYERS[:5]]
        if bad or not layers:
            raise ValueError(f"conv_maps takes conv1..conv5, got {', '.join(bad) or 'none'}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input (B, 3, H, W), got {tuple(x.shape)}")
        out, last = {}, max(int(n[-1]) for n in layers)
        for i in range(1, last + 1):
            x = self._conv_block(i, x)
            if f"conv{i}" in layers:
                out[f"conv{i}"] = x
        return out


def build_trunk(arch: str, width: float = 1.0, dropout: float = 0.5, batchnorm: bool = True) -> AlexNetTrunk:
    """The trunk named `arch` (one of ARCHS) with every channel and feature count scaled by `width`."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return AlexNetTrunk(ARCHS[arch], width=width, dropout=dropout, batchnorm=batchnorm)


@torch.no_grad()
def fold_batchnorm(trunk: AlexNetTrunk) -> dict[str, torch.Tensor]:
    """BN-free weights of the same function as `trunk.eval()`: {conv1..conv5, fc6, fc7}.{weight, bias}.

    Loads with strict=True into `build_trunk(arch, width, batchnorm=False)`; BatchNorm uses its running
    statistics, so the folded network equals the trunk in eval mode.
    """
    out = {}
    for name in LAYERS:
        layer, bn = getattr(trunk, name), getattr(trunk, "bn" + name[-1])  # conv1 -> bn1, fc6 -> bn6
        w = layer.weight.detach().clone()
        b = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(w.shape[0], device=w.device)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
            w = w * scale.view(-1, *[1] * (w.ndim - 1))
            b = (b - bn.running_mean) * scale + bn.bias
        out[f"{name}.weight"], out[f"{name}.bias"] = w, b
    return out


class ClusterHead(nn.Module):
    """Softmax classifier over visual-concept clusters (sec. 3.1): (B, d) features -> (B, C) logits."""

    def __init__(self, feature_dim: int, num_clusters: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, num_clusters)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(f))


class HashHead(nn.Module):
    """The hashing layer of Eq. 1/3: h(x) = sign(W^T (f(x) - mean)), relaxed to 2 sigmoid(.) - 1.

    `weight` is the paper's W, (d, K). There is no bias because the features are zero-meaned (sec.
    3.2); the mean is a buffer, so the codes of a sample do not depend on the rest of its batch. It
    is set with `init_from` (the mean PCA+ITQ was fitted with) or, with `track_mean`, kept as an
    exponential running mean of the training batches, like BatchNorm's; the hashing stage sets it
    to the eval-mode mean of all patches before it writes the codes.
    """

    def __init__(self, feature_dim: int, bits: int, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.track_mean = True
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(feature_dim, bits)))  # W^T W = I_K
        self.register_buffer("mean", torch.zeros(feature_dim))
        # 0 until the first training batch or init_from: the first batch mean replaces the zero start.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def bits(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def init_from(self, mean: torch.Tensor, proj: torch.Tensor) -> None:
        """Set the feature mean (d,) and W (d, K), e.g. from PCA+ITQ on the features (paper: [37])."""
        if mean.shape != self.mean.shape or proj.shape != self.weight.shape:
            raise ValueError(f"init_from expects mean {tuple(self.mean.shape)} and proj "
                             f"{tuple(self.weight.shape)}, got {tuple(mean.shape)} and {tuple(proj.shape)}")
        self.mean.copy_(mean)
        self.weight.copy_(proj)
        self.num_updates.fill_(1)

    @torch.no_grad()
    def _update_mean(self, f: torch.Tensor) -> None:
        batch_mean = f.detach().float().mean(0)  # (d,)
        # A tensor weight rather than `.item()`: no device sync in the training step.
        m = torch.where(self.num_updates == 0, 1.0, self.momentum).to(self.mean.dtype)
        self.mean.lerp_(batch_mean, m)
        self.num_updates += 1

    def center(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d) features -> (B, d) zero-meaned features (the buffer's mean; no update)."""
        return f - self.mean

    def scores(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d) features -> (B, K) float W^T (f - mean); the sign of each score is a bit (Eq. 1)."""
        return self.center(f) @ self.weight

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d) features -> (B, K) relaxed codes in (-1, 1) (Eq. 3); updates the mean in train mode."""
        if self.training and (self.track_mean or self.num_updates == 0):
            self._update_mean(f)
        # tanh(s/2) == 2 sigmoid(s) - 1 exactly, and keeps the sign of tiny s that sigmoid rounds to 0.5.
        return torch.tanh(self.scores(f) / 2)

    @torch.no_grad()
    def codes(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d) features -> (B, K) uint8 in {0, 1}: bit k is 1 where score k > 0 (Eq. 1)."""
        return (self.scores(f) > 0).to(torch.uint8)
