"""Weights on disk: safetensors files that carry their own model description, loaded without pickle.

Keys follow the transfer contract: the trunk's layers are `conv1.*` .. `conv5.*`, `fc6.*`, `fc7.*`
(plus their BatchNorms) with no prefix, the cluster classifier is `classifier.*`, the hashing layer
`hash.weight` (d, K) and `hash.mean` (d,). The metadata holds `format`, `model` (arch, width,
dropout: enough to rebuild the trunk) and whatever else the writer adds (the resolved config, step).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from pretrain.models.alexnet import build_trunk
from infra.storage import atomic_write_bytes

FORMAT = "discoattr-weights-1"


class WeightsError(ValueError):
    """A weights file that cannot be used; the message is one line for the user."""


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Writes `tensors` (contiguous CPU copies) and `meta` (JSON-able) atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "meta": json.dumps(meta, sort_keys=True, default=str)}
    atomic_write_bytes(path, save(flat, metadata=metadata))
    return Path(path)


def read_meta(path: str | Path) -> dict:
    """The metadata of a weights file. Raises WeightsError for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path} is not a safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if md.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a discoattr weights file (format {md.get('format')!r})")
    return json.loads(md["meta"])


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors on CPU, metadata)."""
    meta = read_meta(path)
    return load_file(str(path)), meta


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def trunk_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trunk's entries: every key without a head prefix."""
    return {k: v for k, v in tensors.items() if not k.startswith(("classifier.", "hash."))}


def load_trunk(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuilds the trunk a weights file describes and loads it (strict) -> (trunk in eval mode, meta)."""
    tensors, meta = load_weights(path)
    try:
        trunk = build_trunk(**meta["model"])
        trunk.load_state_dict(trunk_state(tensors), strict=True)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise WeightsError(f"{path}: weights do not match the model they describe ({str(exc)[:200]})") from None
    return trunk.to(device).eval(), meta
