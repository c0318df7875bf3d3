"""Issue 12: the driver holds no bulk data. Tasks write their own write-once part files and return small
records, progress is a listing of the finished parts, and every output directory may be a bucket URI:
the stages give byte-identical arrays on a real S3 server (moto) and on a local disk."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save

from infra import storage
from infra.ray_edge import serial_map
from pretrain.cluster.discover import Clusters, Discovery, DiscoveryParams
from pretrain.features.extract import FEATURES, PARTS, encode_shard, extract_features, fit_encoder_task
from pretrain.features.fisher import FisherEncoder
from pretrain.models.alexnet import HashHead, build_trunk
from pretrain.models.weights import load_weights, read_meta, save_weights, tensor_shapes
from pretrain.parts import assemble, npy_shape
from pretrain.train.data import ClusterBatches, member_pixels_task, write_member_pixels
from pretrain.train.export import (codes_shard, export_final, load_hasher, set_feature_mean, write_codes,
                                   write_mean_task)
from shards.store import PatchStore
from tests.pretrain.test_cluster import blobs

HOG = dict(kind="hog", cell_px=8, out_dim=8, fit_sample_patches=40, seed=0)
WRITERS = {encode_shard, fit_encoder_task, assemble, codes_shard, member_pixels_task, write_mean_task}


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch):
    """A private node-local cache (local_copy, scratch) for each test."""
    monkeypatch.setenv("DISCOATTR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def arrays_in(obj) -> list[np.ndarray]:
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in arrays_in(v)]
    if isinstance(obj, (list, tuple)):
        return [a for v in obj for a in arrays_in(v)]
    return []


class Watched:
    """serial_map that records each call and checks what reaches the driver: the tasks that write outputs
    return plain records (no arrays at all), every other task a small result."""

    def __init__(self, stop=None):
        self.calls, self.stop = [], stop

    def __call__(self, fn, arg_tuples, *, desc, on_result=None, **kw):
        if fn is self.stop:
            raise KeyboardInterrupt("killed")
        self.calls.append(fn)

        def check(i, result):
            if fn in WRITERS:
                assert arrays_in(result) == [], f"{fn.__name__} returned arrays"
                assert len(pickle.dumps(result)) < 4096, fn.__name__
            else:
                assert all(a.nbytes < 64_000 for a in arrays_in(result)), fn.__name__
            if on_result is not None:
                on_result(i, result)

        return serial_map(fn, arg_tuples, desc=desc, on_result=check, **kw)


def same_bytes(a, b) -> None:
    assert storage.to_path(a).read_bytes() == storage.to_path(b).read_bytes(), (a, b)


# --- stage 1 -------------------------------------------------------------------------------------------

def test_features_on_a_bucket_equal_the_local_ones(shard_dir, bucket, tmp_path):
    local = extract_features(shard_dir, tmp_path / "features", mapper=Watched(), **HOG)
    watched = Watched()
    remote = extract_features(shard_dir, bucket + "/run/features", mapper=watched, **HOG)
    assert remote["features"] == bucket + "/run/features/" + FEATURES and remote["encoded_shards"] == 3
    assert watched.calls == [fit_encoder_task, encode_shard, assemble]
    same_bytes(remote["features"], local["features"])
    same_bytes(remote["encoder"], local["encoder"])
    assert storage.list_names(bucket + "/run/features/" + PARTS) == []  # parts removed once assembled
    enc = FisherEncoder.load(remote["encoder"])
    assert enc.kind == "hog" and FisherEncoder.read_info(remote["encoder"])[2] == enc.out_dim == 8
    assert npy_shape(remote["features"]) == ((60, 8), np.dtype(np.float16))
    again = Watched()
    assert extract_features(shard_dir, bucket + "/run/features", mapper=again, **HOG)["encoded_shards"] == 0
    assert again.calls == []  # the encoder is reused and the features are vouched for


def test_a_resumed_extraction_on_a_bucket_encodes_only_the_missing_shard(shard_dir, bucket, tmp_path):
    out = bucket + "/features"
    with pytest.raises(KeyboardInterrupt):
        extract_features(shard_dir, out, mapper=Watched(stop=assemble), **HOG)
    parts = storage.list_names(out + "/" + PARTS, "part-")
    assert len(parts) == 3
    storage.remove(out + "/" + PARTS + "/" + parts[1])
    result = extract_features(shard_dir, out, mapper=Watched(), **HOG)
    assert result["encoded_shards"] == 1
    same_bytes(result["features"], extract_features(shard_dir, tmp_path / "f", mapper=serial_map, **HOG)["features"])


# --- a small hashing model -----------------------------------------------------------------------------

BITS = 16


@pytest.fixture(scope="module")
def model_blob() -> bytes:
    """A random alexnet32 trunk (1/8 width) and a hashing layer, as the bytes of a weights file."""
    torch.manual_seed(0)
    trunk = build_trunk("alexnet32", width=0.125, dropout=0.0).eval()
    head = HashHead(trunk.feature_dim, BITS)
    tensors = {**trunk.state_dict(), **{f"hash.{k}": v for k, v in head.state_dict().items()}}
    tensors["hash.mean"] = torch.rand(trunk.feature_dim) * 0.1
    meta = {"model": {"arch": "alexnet32", "width": 0.125, "dropout": 0.0}, "mode": "hash", "spec": {"x": 1}}
    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={"format": "discoattr-weights-1", "meta": json.dumps(meta, sort_keys=True)})


def test_weights_on_a_bucket(model_blob, bucket, tmp_path):
    local = tmp_path / "m.safetensors"
    local.write_bytes(model_blob)
    uri = bucket + "/m.safetensors"
    storage.atomic_write_bytes(uri, model_blob)
    assert read_meta(uri) == read_meta(local) and tensor_shapes(uri)["hash.weight"][1] == BITS
    tensors, _ = load_weights(uri)
    for k, v in load_weights(local)[0].items():
        assert torch.equal(tensors[k], v), k
    assert load_hasher(uri)[1].bits == BITS
    final = export_final(uri, {"hash": {"code_bits": BITS}}, bucket + "/final.safetensors")
    assert str(final) == bucket + "/final.safetensors"
    assert read_meta(final)["bits"] == BITS and "spec" not in read_meta(final)
    back = save_weights(bucket + "/again.safetensors", tensors, {"model": read_meta(uri)["model"]})
    assert storage.is_remote(back) and read_meta(back)["model"]["arch"] == "alexnet32"


def test_codes_on_a_bucket_equal_the_local_ones(model_blob, shard_dir, bucket, tmp_path):
    local_model = tmp_path / "model.safetensors"
    local_model.write_bytes(model_blob)
    uri_model = bucket + "/hash/k16/model.safetensors"
    storage.atomic_write_bytes(uri_model, model_blob)

    mean_local = set_feature_mean(shard_dir, local_model, Watched())
    watched = Watched()
    mean_remote = set_feature_mean(shard_dir, uri_model, watched)
    assert np.array_equal(mean_local, mean_remote) and watched.calls[-1] is write_mean_task
    (remote_t, remote_m), (local_t, local_m) = load_weights(uri_model), load_weights(local_model)
    assert remote_m == local_m and all(torch.equal(remote_t[k], v) for k, v in local_t.items())
    assert np.array_equal(remote_t["hash.mean"].numpy(), mean_remote)  # rewritten with the mean

    local = write_codes(shard_dir, local_model, tmp_path / "codes", Watched())
    watched = Watched()
    remote = write_codes(shard_dir, uri_model, bucket + "/hash/k16", watched)
    assert [str(p) for p in remote] == [bucket + "/hash/k16/codes.npy", bucket + "/hash/k16/scores.npy"]
    assert watched.calls == [codes_shard, assemble]
    for a, b in zip(remote, local):
        same_bytes(a, b)
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["codes.npy", "scores.npy"]
    assert storage.list_names(bucket + "/hash/k16") == ["codes.npy", "model.safetensors", "scores.npy"]
    codes = np.load(storage.local_copy(remote[0]), allow_pickle=False)
    assert codes.shape == (60, BITS // 8) and codes.dtype == np.uint8

    # CNN features of a later round from a model on the bucket: the tasks fetch it by its checksum
    sha = storage.sha256_file(uri_model)
    cnn = dict(kind="cnn", layer="fc7", out_dim=8, fit_sample_patches=40, seed=0, round_=1, model_sha256=sha)
    got = extract_features(shard_dir, bucket + "/features", mapper=Watched(), model_path=uri_model, **cnn)
    want = extract_features(shard_dir, tmp_path / "features", mapper=serial_map, model_path=str(local_model), **cnn)
    assert got["features"].endswith("/round1.npy") and got["encoded_shards"] == 3
    same_bytes(got["features"], want["features"])


def test_a_killed_write_codes_encodes_only_the_shards_without_parts(model_blob, shard_dir, tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(model_blob)
    clean = write_codes(shard_dir, model, tmp_path / "clean", serial_map)
    with pytest.raises(KeyboardInterrupt):
        write_codes(shard_dir, model, tmp_path / "out", Watched(stop=assemble))
    parts = sorted(p.name for p in (tmp_path / "out" / "codes.parts").iterdir())
    assert len(parts) == 6  # scores and codes of 3 shards
    (tmp_path / "out" / "codes.parts" / parts[0]).unlink()
    calls = []

    def counting(fn, args, **kw):
        calls.append((fn, len(args)))
        return serial_map(fn, args, **kw)

    again = write_codes(shard_dir, model, tmp_path / "out", counting)
    assert calls == [(codes_shard, 1), (assemble, 1)]
    for a, b in zip(again, clean):
        same_bytes(a, b)


# --- stage 3 inputs ------------------------------------------------------------------------------------

def test_member_pixels_on_a_bucket_decoded_in_parallel_parts(shard_dir, bucket, tmp_path, node_cache):
    member_index = np.r_[np.random.default_rng(1).permutation(60)[:25], 7, 7].astype(np.int64)
    local = write_member_pixels(shard_dir, member_index, tmp_path / "members.npy")
    out = bucket + "/train/round0/members.npy"
    with pytest.raises(KeyboardInterrupt):  # killed after the decoding tasks, before the assembly
        write_member_pixels(shard_dir, member_index, out, mapper=Watched(stop=assemble), part_rows=10)
    assert len(storage.list_names(out + ".parts")) == 3  # 27 members in parts of 10
    counting = []

    def mapper(fn, args, **kw):
        counting.append((fn, len(args)))
        return Watched()(fn, args, **kw)

    remote = write_member_pixels(shard_dir, member_index, out, mapper=mapper, part_rows=10)
    assert str(remote) == out and counting == [(assemble, 1)]  # the finished parts were kept
    same_bytes(remote, local)
    assert storage.size_of(out + ".parts") is None and storage.list_names(bucket + "/train/round0") == ["members.npy"]
    counting.clear()
    other = write_member_pixels(shard_dir, member_index[::-1], tmp_path / "reversed.npy", mapper=mapper, part_rows=10)
    assert counting == [(member_pixels_task, 3), (assemble, 1)]
    assert np.array_equal(np.load(other), np.load(local)[::-1])
    assert np.array_equal(np.load(local), PatchStore(shard_dir).get(member_index))
    assert not any((node_cache / "scratch").iterdir())  # the build directory is gone

    offsets = np.array([0, 10, 27])
    kw = dict(batch_size=6, steps=3, seed=2, pairs=True)
    from_bucket = list(ClusterBatches(remote, offsets, **kw))
    from_disk = list(ClusterBatches(local, offsets, **kw))
    for a, b in zip(from_bucket, from_disk, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("image", "cluster", "positive"))
    assert len(list((node_cache / "objects").rglob("*.npy"))) == 1  # fetched once into the node cache


# --- stage 2 -------------------------------------------------------------------------------------------

def test_discovery_with_features_and_work_dir_on_a_bucket(bucket, tmp_path):
    x, _ = blobs(4, 60, 8, seed=3)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float16)
    np.save(tmp_path / "features.npy", x)
    storage.put_file(tmp_path / "features.npy", bucket + "/features/round0.npy")
    params = DiscoveryParams(device="cpu", cover=True, cover_score="centroid", rounds=2, seed=4)
    local = Discovery(tmp_path / "features.npy", tmp_path / "work", params, Watched(), key="k").run()
    watched = Watched()
    work = bucket + "/clusters/round0.work"
    disc = Discovery(bucket + "/features/round0.npy", work, params, watched, key="k")
    remote = disc.run()
    for field in ("member_index", "offsets", "member_score", "weights", "bias"):
        np.testing.assert_array_equal(getattr(remote, field), getattr(local, field))
    assert storage.list_names(work) == sorted(["key.json", "split.npz"] + [f"step{s}.npz" for s in range(5)])
    same_bytes(work + "/split.npz", tmp_path / "work" / "split.npz")
    loaded, history = Clusters.load(disc.step_path(4))
    np.testing.assert_array_equal(loaded.member_index, remote.member_index)
    assert [h["step"] for h in history if "clusters" in h][-1] == 4

    # resumed from the bucket: nothing is recomputed; another key starts the work dir over
    again = Watched()
    Discovery(bucket + "/features/round0.npy", work, params, again, key="k").run()
    assert again.calls == []
    Discovery(bucket + "/features/round0.npy", work, DiscoveryParams(device="cpu", rounds=1), Watched(), key="k2")
    assert storage.list_names(work) == ["key.json", "split.npz"]
