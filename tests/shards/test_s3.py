"""Shards on a bucket: build, read back, resume and bad locations against a real S3 server (moto, HTTP)."""
import hashlib
import json
import os

import boto3
import numpy as np
import pytest

from shards.build import build_shards
from shards.reader import PatchLoader, PatchStream
from shards.shardset import FORMAT, ShardSet, patch_key
from shards.sources import list_items
from tests.shards.test_build import Killed, killed_at
from shards.store import PatchStore
from tests.conftest import make_image_folder, run_cli


def objects(uri: str) -> dict[str, bytes]:
    """Every object under s3://BUCKET/PREFIX, read with boto3 (not through the code under test)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix):].lstrip("/")
            found[name] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


def put_object(uri: str, data: bytes) -> None:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(Bucket=bucket, Key=key, Body=data)


def read_stream(root, workers: int = 0, **kw):
    loader = PatchLoader(PatchStream(root, rank=0, world_size=1, **kw), batch_size=8, num_workers=workers)
    idx, imgs = [], []
    for batch in loader:
        idx += batch["index"].tolist()
        imgs.append(batch["image"].numpy())
    return np.array(idx), np.concatenate(imgs), loader.stats()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return list_items(str(make_image_folder(tmp_path_factory.mktemp("imgs"))))  # 6 images -> 3 shards of 2


def test_build_to_a_bucket_reads_back_like_the_same_build_on_disk(bucket, images, small_params, shard_dir,
                                                                  monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a URI taken for a relative path would land here
    uri = f"{bucket}/demo/shards"
    info = build_shards(images, uri, small_params, images_per_shard=2)
    local = json.loads((shard_dir / "shards.json").read_text())
    assert info["format"] == FORMAT and info["shards"] == local["shards"]  # same bytes, same sha256s
    assert list(tmp_path.iterdir()) == []
    stored = objects(uri)
    assert sorted(stored) == sorted(["shards.json"] + [f"shard-{i:06d}{ext}" for i in range(3)
                                                       for ext in (".tar", ".idx.npy", ".meta.npz", ".json")])
    assert json.loads(stored["shards.json"]) == info
    for e in info["shards"]:
        assert hashlib.sha256(stored[e["name"]]).hexdigest() == e["sha256"]
        assert stored[e["name"]] == (shard_dir / e["name"]).read_bytes()
        assert hashlib.sha256(stored[e["index"]["name"]]).hexdigest() == e["index"]["sha256"]
        assert hashlib.sha256(stored[e["meta"]["name"]]).hexdigest() == e["meta"]["sha256"]

    shards = ShardSet.open(uri)
    assert str(shards.root) == uri and str(shards.path(1)) == f"{uri}/shard-000001.tar"
    store, disk = PatchStore(uri), PatchStore(shard_dir)
    every = np.arange(len(disk))
    assert np.array_equal(store.get(every[::-1]), disk.get(every[::-1]))
    assert store.meta(every) == disk.meta(every)
    assert np.array_equal(store.labels(every), disk.labels(every)) and store.keys(every) == disk.keys(every)
    keys = [patch_key(m["key"], m["box"]) for m in disk.meta([5, 41, 0])]
    assert store.index_of(keys).tolist() == [5, 41, 0]
    for workers in (0, 2):  # loader workers are forked: each needs its own S3 client
        idx, imgs, stats = read_stream(uri, workers=workers)
        assert sorted(idx.tolist()) == list(range(60)) and stats["patches_lost"] == 0
        assert np.array_equal(imgs, disk.get(idx))


def test_killed_build_on_a_bucket_resumes_from_the_listing_of_finished_parts(bucket, images, small_params):
    from infra.ray_edge import serial_map

    uri = f"{bucket}/shards"

    with pytest.raises(Killed):
        build_shards(images, uri, small_params, images_per_shard=2, mapper=killed_at("shard-000002.tar"))
    first = objects(uri)
    assert "shards.json" not in first and "shard-000002.tar" not in first
    assert {"shard-000000.tar", "shard-000000.json", "shard-000001.tar", "shard-000001.json"} <= set(first)

    ran = []

    def counting(fn, tasks, **kw):
        ran.extend(t[0].name for t in tasks)
        return serial_map(fn, tasks, **kw)

    info = build_shards(images, uri, small_params, images_per_shard=2, mapper=counting)
    assert ran == ["shard-000002.tar"]
    after = objects(uri)
    assert all(after[n] == first[n] for n in first)
    # a finished part removed (and shards.json with it): only that shard is built again
    bucket_name, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for name in ("shard-000001.json", "shards.json"):
        client.delete_object(Bucket=bucket_name, Key=f"{prefix}/{name}")
    ran.clear()
    again = build_shards(images, uri, small_params, images_per_shard=2, mapper=counting)
    assert ran == ["shard-000001.tar"] and again == info
    # a tar whose size no longer matches its part is not reused either
    put_object(f"{uri}/shard-000000.tar", after["shard-000000.tar"][:-512])
    ran.clear()
    build_shards(images, uri, small_params, images_per_shard=2, mapper=counting)
    assert ran == ["shard-000000.tar"] and objects(uri) == after
    # fewer shards: the stale parts of the others go
    build_shards(images, uri, small_params, images_per_shard=6)
    assert sorted(objects(uri)) == ["shard-000000.idx.npy", "shard-000000.json", "shard-000000.meta.npz",
                                    "shard-000000.tar", "shards.json"]


def test_truncated_shard_on_a_bucket_is_skipped_and_counted(bucket, images, small_params):
    uri = f"{bucket}/shards"
    build_shards(images, uri, small_params, images_per_shard=2)
    tar = objects(uri)["shard-000001.tar"]
    put_object(f"{uri}/shard-000001.tar", tar[: len(tar) // 2])
    idx, _, stats = read_stream(uri)
    assert 40 <= len(idx) < 60 and stats["patches_lost"] == 60 - len(idx) and stats["record_errors"] >= 1
    assert set(range(20)) | set(range(40, 60)) <= set(idx.tolist())


def test_cli_builds_to_a_bucket(bucket, tmp_path):
    uri = f"{bucket}/demo/shards"
    out = run_cli(["-m", "shards.build", "--source", "digits", "--out", uri, "--patch-size", "16",
                   "--patches-per-image", "1", "--num-shards", "2", "--no-ray"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"in 2 shards to {uri} in" in out.stderr
    assert list(tmp_path.iterdir()) == []  # not a local folder ./s3:/...
    assert {"shards.json", "shard-000000.tar", "shard-000001.tar"} <= set(objects(uri))
    shards = ShardSet.open(uri)
    assert shards.total == 1797 and len(shards.names) == 2 and shards.patch_px == 16


@pytest.mark.ray
def test_cli_builds_to_a_bucket_with_ray_tasks(bucket, tmp_path):
    uri = f"{bucket}/shards"
    out = run_cli(["-m", "shards.build", "--source", "digits", "--out", uri, "--patch-size", "16",
                   "--patches-per-image", "1", "--num-shards", "2"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ray: a local instance" in out.stderr and list(tmp_path.iterdir()) == []
    assert PatchStore(uri).get([0, 1796]).shape == (2, 16, 16, 3)


def test_cli_bad_out_is_one_line_and_writes_nothing(bucket, tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    no_creds = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"), "AWS_CONFIG_FILE": str(home / "none"),
                "HOME": str(home)}
    cases = [
        ("ftp://host/shards", {}, "unknown URI scheme ftp://"),
        ("s3://no-such-bucket-here/shards", {}, "bucket no-such-bucket-here does not exist"),
        (f"{bucket}/shards", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the S3 endpoint"),
        (f"{bucket}/shards", no_creds, "no S3 credentials"),
    ]
    for uri, env, msg in cases:
        # no --no-ray: the check must come before Ray starts
        out = run_cli(["-m", "shards.build", "--source", "demo", "--out", uri], cwd=cwd, env_extra=env,
                      timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (uri, out.stderr)
        assert lines[0].startswith("error: ") and msg in lines[0] and uri in lines[0], lines
    assert objects(bucket) == {}
    assert list(cwd.iterdir()) == []
