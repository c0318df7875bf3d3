"""Per-patch metadata as arrays, written once per shard at build time: `shard-NNNNNN.meta.npz`.

What a driver reads per patch (labels for evaluation and purity, source keys and boxes for the cluster
files and the natural world's glob) comes from these arrays, one read per shard, never from the records'
JSON: parsing every record on the driver is linear in N with a large constant, and was run again for
every subset asked for. (The records keep their JSON: the streaming reader checks it inside its workers.)
Members, loaded with np.load(allow_pickle=False):

    labels  (n,) int64      the label kept only for evaluation, -1 if none
    image   (n,) int32      the patch's source image, a row of `sources`
    boxes   (n, 4) int32    x0, y0, x1, y1 in source-image pixels
    sources (I,) str        the shard's source keys, in the order of their first patch

Keys are stored per image, not per patch (10 patches per ImageNet image: 20 bytes a patch instead of a
100-byte string). The zip members carry a fixed timestamp, so a shard's part has the same bytes, and
sha256, every time it is built.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np

from shards.shardset import ShardError, one_line, patch_key

MEMBERS = ("labels", "image", "boxes", "sources")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no build time in the bytes


def meta_bytes(keys: list[str], boxes, labels) -> bytes:
    """A shard's patches' source keys (n,), boxes (n, 4) and labels (n,) -> the bytes of its metadata
    part (a deterministic .npz; see the module docstring)."""
    first: dict[str, int] = {}
    image = np.array([first.setdefault(k, len(first)) for k in keys], np.int32)
    arrays = {"labels": np.asarray(labels, np.int64).reshape(-1), "image": image,
              "boxes": np.asarray(boxes, np.int32).reshape(-1, 4), "sources": np.array(list(first), dtype=np.str_)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in MEMBERS:
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), member.getvalue())
    return buf.getvalue()


def _load(local_path, name: str, members: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(local_path, allow_pickle=False) as z:
            return {m: z[m] for m in members}
    except FileNotFoundError:
        raise ShardError(f"{name}: the shard's metadata part is missing (build the shards again)") from None
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ShardError(f"{name}: not a shard metadata part ({one_line(exc)})") from None


def _misfit(name: str, patches: int) -> ShardError:
    return ShardError(f"{name}: metadata arrays do not fit the shard's {patches} patches (build the shards again)")


def read_labels(local_path, name: str, patches: int) -> np.ndarray:
    """A metadata part (a local file, already checked against its sha256) -> its (patches,) int64
    labels, read-only; one-line ShardError when it is not one or does not fit the shard."""
    labels = _load(local_path, name, ("labels",))["labels"]
    if labels.shape != (patches,) or labels.dtype != np.int64:
        raise _misfit(name, patches)
    labels.setflags(write=False)
    return labels


@dataclass(frozen=True)
class ShardKeys:
    """One shard's patch identities: image (n,) int32 rows of sources (I,) str, boxes (n, 4) int32."""

    image: np.ndarray
    boxes: np.ndarray
    sources: np.ndarray

    def keys(self, pos: np.ndarray) -> list[str]:
        """pos: (m,) int positions in the shard -> their patch keys (`patch_key`)."""
        src, boxes = self.sources[self.image[pos]], self.boxes[pos]
        return [patch_key(s, b) for s, b in zip(src.tolist(), boxes.tolist())]


def read_keys(local_path, name: str, patches: int) -> ShardKeys:
    """As `read_labels`, for the source keys and boxes."""
    k = ShardKeys(**_load(local_path, name, ("image", "boxes", "sources")))
    ok = (k.image.shape == (patches,) and k.boxes.shape == (patches, 4) and k.sources.ndim == 1
          and k.sources.dtype.kind == "U" and (patches == 0 or (0 <= k.image.min() and k.image.max() < len(k.sources))))
    if not ok:
        raise _misfit(name, patches)
    for a in (k.image, k.boxes, k.sources):
        a.setflags(write=False)
    return k
