"""The storage seam on a local directory and on a real S3 server (moto, its own process)."""
import os

import numpy as np
import pytest

from infra import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return tmp_path / "store"
    return request.getfixturevalue("bucket") + "/store"


def test_parts_are_atomic_and_listed(root):
    rec = storage.put_part(storage.to_path(root) / "parts" / "part-000001.bin", b"abc")
    assert rec["size"] == 3 and rec["sha256"] == storage.sha256_file(rec["key"])
    storage.put_part(storage.to_path(root) / "parts" / "part-000000.bin", b"xy")
    assert storage.list_names(storage.to_path(root) / "parts", "part-") == ["part-000000.bin", "part-000001.bin"]
    assert storage.read_range(rec["key"], 1, 2) == b"bc"
    assert storage.size_of(rec["key"]) == 3 and storage.size_of(storage.to_path(root) / "nothing") is None


def test_create_once_refuses_a_second_writer(root):
    p = storage.to_path(root) / "lease"
    assert storage.create_once(p, b"first")
    assert not storage.create_once(p, b"second")
    assert p.read_bytes() == b"first"


def test_local_copy_is_cached_by_content(root, tmp_path, monkeypatch):
    monkeypatch.setenv("DISCOATTR_CACHE", str(tmp_path / "cache"))
    p = storage.to_path(root) / "x.npy"
    arr = np.arange(10, dtype=np.float16)
    rec = storage.put_part(p, storage.npz_bytes(a=arr))
    local = storage.local_copy(p, rec["sha256"])
    assert np.array_equal(np.load(local)["a"], arr)
    assert storage.local_copy(p, rec["sha256"]) == local
    if storage.is_remote(p):
        assert str(local).startswith(str(tmp_path / "cache"))
        with pytest.raises(storage.StorageError, match="sha256"):
            storage.local_copy(p, "0" * 64)


def test_unknown_scheme_is_one_line():
    with pytest.raises(storage.StorageError, match="unknown URI scheme ftp://"):
        storage.to_path("ftp://host/x")


def test_bad_locations_are_one_line(s3_endpoint, bucket, monkeypatch):
    storage.check_location(bucket + "/runs/x")
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_location("s3://no-such-bucket-here/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(storage.StorageError, match="cannot reach"):
        storage.check_location(bucket + "/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    with pytest.raises(storage.StorageError, match="no S3 credentials"):
        storage.check_location(bucket + "/x")
