"""Weights on disk: safetensors files that carry their own model description, loaded without pickle.

Keys follow the transfer contract: the trunk's layers are `conv1.*` .. `conv5.*`, `fc6.*`, `fc7.*`
(plus their BatchNorms) with no prefix, the cluster classifier is `classifier.*`, the hashing layer
`hash.weight` (d, K) and `hash.mean` (d,). The metadata holds `format`, `model` (arch, width,
dropout: enough to rebuild the trunk) and whatever else the writer adds (the resolved config, step).
A file may be a local path or a bucket URI: the header (metadata, shapes) is read with ranged reads,
the tensors from a node-local copy (`infra.storage.local_copy`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from pretrain.models.alexnet import build_trunk
from infra.storage import atomic_write_bytes, local_copy, read_range, size_of

FORMAT = "discoattr-weights-1"
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class WeightsError(ValueError):
    """A weights file that cannot be used; the message is one line for the user."""


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Writes `tensors` (contiguous CPU copies) and `meta` (JSON-able) atomically, at a path or a
    bucket URI -> its location (a Path, or a UPath for a URI)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "meta": json.dumps(meta, sort_keys=True, default=str)}
    return atomic_write_bytes(path, _canonical_header(save(flat, metadata=metadata)))


def _canonical_header(data: bytes) -> bytes:
    """safetensors writes its header's keys in hash-map order, so equal weights gave files with other
    bytes (and checksums) from run to run; the same header with sorted keys, same length, fixes that."""
    n = int.from_bytes(data[:8], "little")
    canon = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    canon = canon.encode("utf-8")
    if len(canon) > n:  # cannot happen for serde's compact JSON; keep the file as written
        return data
    return data[:8] + canon.ljust(n) + data[8 + n :]


def _not_safetensors(path, why: str) -> WeightsError:
    return WeightsError(f"{path} is not a safetensors file ({why.splitlines()[0][:120] if why else 'unreadable'})")


def read_header(path: str | Path) -> dict:
    """The safetensors header of a weights file: {name: {"dtype", "shape", "data_offsets"}, ...,
    "__metadata__": {...}}, read with two ranged reads (a bucket URI is not downloaded). Raises
    WeightsError for a missing, truncated or foreign file."""
    size = size_of(path)
    if size is None:
        raise WeightsError(f"weights file not found: {path}")
    try:
        head = read_range(path, 0, 8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER):
            raise _not_safetensors(path, "no header")
        header = json.loads(read_range(path, 8, n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except WeightsError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _not_safetensors(path, str(exc) or type(exc).__name__) from None
    if 8 + n + max(ends, default=0) != size:
        raise _not_safetensors(path, f"{size} bytes, the header describes {8 + n + max(ends, default=0)}: truncated?")
    return header


def read_meta(path: str | Path) -> dict:
    """The metadata of a weights file (a path or a URI). Raises WeightsError for a missing or foreign file."""
    md = read_header(path).get("__metadata__") or {}
    if md.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a discoattr weights file (format {md.get('format')!r})")
    return json.loads(md["meta"])


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a weights file's tensors, from its header alone."""
    return {k: tuple(v["shape"]) for k, v in read_header(path).items() if k != "__metadata__"}


def load_weights(path: str | Path, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors on CPU, metadata). A bucket URI is read through this node's cache (`local_copy`,
    keyed and checked by `sha256` when given)."""
    meta = read_meta(path)
    try:
        return load_file(str(local_copy(path, sha256))), meta
    except (SafetensorError, OSError) as exc:
        raise _not_safetensors(path, str(exc)) from None


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def trunk_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trunk's entries: every key without a head prefix."""
    return {k: v for k, v in tensors.items() if not k.startswith(("classifier.", "hash."))}


def load_trunk(path: str | Path, device: str | torch.device = "cpu", sha256: str | None = None
               ) -> tuple[torch.nn.Module, dict]:
    """Rebuilds the trunk a weights file describes and loads it (strict) -> (trunk in eval mode, meta)."""
    tensors, meta = load_weights(path, sha256)
    try:
        trunk = build_trunk(**meta["model"])
        trunk.load_state_dict(trunk_state(tensors), strict=True)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise WeightsError(f"{path}: weights do not match the model they describe ({str(exc)[:200]})") from None
    return trunk.to(device).eval(), meta
