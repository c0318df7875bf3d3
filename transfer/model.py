"""Fast R-CNN (Girshick 2015) on our AlexNet's conv1-5, and the converter from `final.safetensors`.

Paper sec. 4.1: "we copy our pre-trained weights up to the conv5 layer and initialize the fully
connected layers with Gaussian random weights". The detector keeps the pretraining trunk's layer names
(conv1..conv5: the transfer contract); pool5 becomes RoI max pooling to 6x6 on conv5 (stride 16 for
alexnet96), then fc6, fc7 and a 21-way classifier, plus class-specific box deltas when asked for.

The pretrained convs were trained with BatchNorm (pretrain/models/alexnet.py); the converter folds
each BatchNorm into its conv with the running statistics, giving the BN-free Caffe-style network that
Fast R-CNN fine-tunes. Like moco's detection converter, loading checks exact key sets both ways: the
checkpoint must hold exactly the trunk its metadata describes, and the detector must receive exactly
conv1-5 and miss exactly its new layers.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool

from pretrain.models.alexnet import ARCHS, build_trunk, fold_batchnorm
from pretrain.models.weights import WeightsError, load_weights, trunk_state

CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
HEADS = ("fc6", "fc7", "cls_score", "bbox_pred")


class FastRCNN(nn.Module):
    """conv1-5 (pools after conv1, conv2) -> RoI max pool -> fc6 -> fc7 -> class scores (+ box deltas).

    `feature_stride`: input pixels per conv5 cell (16 for alexnet96), the RoI pooling's 1 / scale.
    """

    def __init__(self, arch: str = "alexnet96", width: float = 1.0, *, num_classes: int = 21, fc_dim: int = 4096,
                 dropout: float = 0.5, box_regression: bool = False, roi_px: int = 6):
        super().__init__()
        spec = ARCHS[arch]
        c_in, stride = 3, 1
        for i, (c, k, s, p) in enumerate(spec.convs, 1):
            c_out = max(1, round(c * width))
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, k, s, p))
            stride *= s
            if i in spec.pooled and i < 5:  # pool5 is replaced by RoI pooling
                setattr(self, f"pool{i}", nn.MaxPool2d(3, 2))
                stride *= 2
            c_in = c_out
        self.arch, self.width, self.roi_px, self.feature_stride = arch, width, roi_px, stride
        self.num_classes = num_classes
        self.fc6 = nn.Linear(c_in * roi_px * roi_px, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.drop = nn.Dropout(dropout)
        self.cls_score = nn.Linear(fc_dim, num_classes)
        self.bbox_pred = nn.Linear(fc_dim, 4 * num_classes) if box_regression else None

    def conv_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) normalised like pretraining -> conv5 post-ReLU (B, C5, ~H/16, ~W/16)."""
        x = images
        for i in range(1, 6):
            x = F.relu(getattr(self, f"conv{i}")(x))
            if hasattr(self, f"pool{i}"):
                x = getattr(self, f"pool{i}")(x)
        return x

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images: (B, 3, H, W); rois: (R, 5) float [batch index, x1, y1, x2, y2] in input pixels ->
        (class logits (R, num_classes), box deltas (R, 4 num_classes) or None)."""
        conv5 = self.conv_features(images)
        # Caffe's RoI pooling (inclusive, rounded corners), which torchvision's roi_pool reproduces.
        x = roi_pool(conv5, rois, output_size=self.roi_px, spatial_scale=1.0 / self.feature_stride)
        x = self.drop(F.relu(self.fc6(x.flatten(1))))  # (R, fc_dim)
        x = self.drop(F.relu(self.fc7(x)))
        return self.cls_score(x), (self.bbox_pred(x) if self.bbox_pred is not None else None)

    def head_keys(self) -> set[str]:
        """The state-dict keys that pretraining does not provide."""
        return {k for k in self.state_dict() if k.split(".")[0] in HEADS}


@torch.no_grad()
def init_heads(model: FastRCNN, *, std: float = 0.01, generator: torch.Generator | None = None) -> None:
    """Gaussian fc6, fc7 and classifier (std), box deltas (std / 10, as Fast R-CNN); zero biases."""
    for name in HEADS:
        layer = getattr(model, name)
        if layer is not None:
            layer.weight.normal_(0.0, std / 10 if name == "bbox_pred" else std, generator=generator)
            layer.bias.zero_()


@torch.no_grad()
def init_random_convs(model: FastRCNN, generator: torch.Generator | None = None) -> None:
    """The no-pretraining baseline: He-normal conv1-5 (fan-in, ReLU gain), zero biases."""
    for name in CONVS:
        conv = getattr(model, name)
        fan_in = conv.weight[0].numel()
        conv.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
        conv.bias.zero_()


def read_conv_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A pretraining weights file -> ({conv1..conv5}.{weight, bias} with BatchNorm folded in, its meta).

    Raises WeightsError (one line) when the file's trunk keys are not exactly those of the model its
    metadata describes."""
    tensors, meta = load_weights(path)
    try:
        trunk = build_trunk(**meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: metadata names no buildable trunk ({str(exc)[:120]})") from None
    expected, got = set(trunk.state_dict()), set(trunk_state(tensors))
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise WeightsError(f"{path}: not the {meta['model'].get('arch')} trunk its metadata names: "
                           f"missing {_names(missing)}; unexpected {_names(extra)}")
    try:
        trunk.load_state_dict(trunk_state(tensors), strict=True)
    except RuntimeError as exc:  # same keys, wrong shapes
        raise WeightsError(f"{path}: tensor shapes do not match the trunk ({_first_line(exc)})") from None
    folded = fold_batchnorm(trunk)
    return {k: v for k, v in folded.items() if k.split(".")[0] in CONVS}, meta


def load_conv_weights(model: FastRCNN, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copies conv1-5 into `model`, asserting the exact contract: nothing unexpected, and missing
    exactly the detector's own layers (fc6, fc7, cls_score, bbox_pred). Raises WeightsError."""
    try:
        msg = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: conv1-5 shapes do not fit the detector ({_first_line(exc)})") from None
    if msg.unexpected_keys or set(msg.missing_keys) != model.head_keys():
        missing = sorted(set(msg.missing_keys) - model.head_keys())
        raise WeightsError(f"{source}: conv1-5 key set mismatch: missing {_names(missing)}; "
                           f"unexpected {_names(sorted(msg.unexpected_keys))}")


def build_detector(*, ckpt: str = "", init: str = "pretrained", arch: str = "alexnet96", width: float = 1.0,
                   num_classes: int = 21, fc_dim: int = 4096, dropout: float = 0.5, box_regression: bool = False,
                   fc_init_std: float = 0.01, seed: int = 0) -> FastRCNN:
    """The detector to fine-tune. init "pretrained": conv1-5 from `ckpt`; "random": He-normal conv1-5
    (with `ckpt`, its arch and width, so both inits train the same network)."""
    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be pretrained or random, got {init!r}")
    if init == "pretrained" and not ckpt:
        raise WeightsError("--init pretrained needs --ckpt (a final.safetensors); --init random needs none")
    state = None
    if ckpt:
        state, meta = read_conv_weights(ckpt)
        arch, width = meta["model"]["arch"], meta["model"]["width"]
    model = FastRCNN(arch, width, num_classes=num_classes, fc_dim=fc_dim, dropout=dropout,
                     box_regression=box_regression)
    gen = torch.Generator().manual_seed(seed)
    init_heads(model, std=fc_init_std, generator=gen)
    if init == "pretrained":
        load_conv_weights(model, state, source=str(ckpt))
    else:
        init_random_convs(model, generator=gen)
    return model


def _names(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[1] if len(lines) > 1 else lines[0])[:160] if lines else type(exc).__name__
