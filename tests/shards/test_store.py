import numpy as np
import pytest

from shards.reader import PatchStream
from shards.shardset import ShardSet
from shards.store import PatchStore


def test_get_meta_and_key_lookup_agree_with_the_stream(shard_dir):
    stream = {x["index"]: x for x in PatchStream(shard_dir, rank=0, world_size=1)}
    store = PatchStore(shard_dir)
    ask = np.array([59, 0, 21, 22, 3, 21])
    got = store.get(ask)
    for i, img in zip(ask, got):
        assert np.array_equal(img, stream[int(i)]["image"])
    meta = store.meta(ask)
    assert [m["index"] for m in meta] == ask.tolist()
    assert meta[1]["key"] == "cat/cat_0.jpg" and meta[1]["label"] == 0 and meta[0]["label"] == 1
    assert store.labels(ask).tolist() == [m["label"] for m in meta] and store.labels(ask).dtype == np.int64
    keys = [stream[int(i)]["key"] for i in ask]
    assert store.index_of(keys).tolist() == ask.tolist()
    with pytest.raises(KeyError, match="unknown patch key"):
        store.index_of(["nope@0,0,1,1"])


def test_locate_and_range_checks(shard_dir):
    shards = ShardSet.open(shard_dir)
    shard, pos = shards.locate(np.array([0, 19, 20, 59]))
    assert shard.tolist() == [0, 0, 1, 2] and pos.tolist() == [0, 19, 0, 19]
    with pytest.raises(IndexError):
        shards.locate(np.array([60]))


def test_damaged_record_is_a_shard_error(shard_copy):
    from shards.shardset import ShardError, record_offsets

    path = shard_copy / "shard-000000.tar"
    offs = record_offsets(path)
    with open(path, "r+b") as f:
        f.seek(int(offs.members["json"][0][0]))
        f.write(b"{{{{")
        f.seek(int(offs.members["jpg"][1][0]))
        f.write(b"\x00" * 64)
    store = PatchStore(shard_copy)
    # metadata comes from the shard's metadata part, not the records' JSON: a damaged record JSON costs
    # the stream that record (tests/shards/test_reader.py) but not the labels and keys
    assert store.meta([0])[0]["key"] == "cat/cat_0.jpg" and store.labels([0]).tolist() == [0]
    with pytest.raises(ShardError, match="record 1 does not decode"):
        store.get([5])
    assert store.get([9]).shape == (1, 32, 32, 3)


def test_unusable_index_part_is_a_shard_error_and_damage_in_the_stream(shard_copy):
    from shards.shardset import ShardError

    from shards.shardset import record_offsets

    (shard_copy / "shard-000001.idx.npy").write_bytes(b"not an index")
    with pytest.raises(ShardError, match="shard-000001.idx.npy: not a shard record index"):
        record_offsets(shard_copy / "shard-000001.tar")
    store = PatchStore(shard_copy)
    assert store.get([0, 59]).shape == (2, 32, 32, 3)
    with pytest.raises(ShardError, match="shard-000001.idx.npy: content does not match its sha256 in shards.json"):
        store.get([25])
    stream = PatchStream(shard_copy, rank=0, world_size=1)
    assert sorted(x["index"] for x in stream) == list(range(20)) + list(range(40, 60))
    assert stream.stats()["patches_lost"] == 20 and stream.stats()["record_errors"] == 1


def test_old_format_is_a_clear_error(shard_copy):
    import json

    from shards.shardset import ShardError

    info = json.loads((shard_copy / "shards.json").read_text())
    (shard_copy / "shards.json").write_text(json.dumps({**info, "format": "discoattr-patches/1"}))
    with pytest.raises(ShardError, match="this version reads 'discoattr-patches/3'"):
        PatchStore(shard_copy)


def test_shards_without_label_arrays_are_refused_with_a_line_to_rebuild(shard_copy):
    """Format /2 (before the metadata parts): one line saying to build again, not a slow JSON fallback."""
    import json

    from shards.shardset import ShardError

    info = json.loads((shard_copy / "shards.json").read_text())
    for e in info["shards"]:
        (shard_copy / e.pop("meta")["name"]).unlink()
    (shard_copy / "shards.json").write_text(json.dumps({**info, "format": "discoattr-patches/2"}))
    with pytest.raises(ShardError, match=r"format 'discoattr-patches/2' \(no label/key arrays\); .*\(build the "
                                         r"shards again: python -m shards.build, or --force shard") as err:
        PatchStore(shard_copy)
    assert "\n" not in str(err.value)


def test_labels_and_keys_come_from_the_metadata_parts(shard_dir, monkeypatch):
    """The arrays written at build time give what the records' JSON holds, with no record read."""
    from shards.shardset import patch_key

    stream = {x["index"]: x for x in PatchStream(shard_dir, rank=0, world_size=1)}
    store = PatchStore(shard_dir)

    def no_records(*a, **k):
        raise AssertionError("a record was read for metadata")

    monkeypatch.setattr(store, "_members", no_records)
    every = np.arange(len(store))
    assert store.labels(every).tolist() == [stream[i]["label"] for i in range(60)]
    assert store.keys(every[::-1]) == [stream[i]["key"] for i in range(59, -1, -1)]
    meta = store.meta([7, 33])
    assert [patch_key(m["key"], m["box"]) for m in meta] == store.keys([7, 33])
    sources, image = store.sources()
    assert sources[image].tolist() == [m["key"] for m in store.meta(every)] and len(sources) == 6
    assert store.index_of(store.keys([41, 2])).tolist() == [41, 2]


def test_damaged_or_missing_metadata_part_is_a_shard_error(shard_copy):
    from shards.shardset import ShardError

    part = shard_copy / "shard-000001.meta.npz"
    part.write_bytes(part.read_bytes()[:-7])
    store = PatchStore(shard_copy)
    assert store.labels([0, 59]).shape == (2,)  # the other shards' parts are fine
    with pytest.raises(ShardError, match="shard-000001.meta.npz: content does not match its sha256"):
        store.labels([25])
    part.unlink()
    with pytest.raises(ShardError, match="1 shard part.* missing, first: shard-000001.meta.npz"):
        PatchStore(shard_copy)


def test_missing_index_part_is_a_clear_error(shard_copy):
    from shards.shardset import ShardError

    (shard_copy / "shard-000002.idx.npy").unlink()
    with pytest.raises(ShardError, match="1 shard part.* missing, first: shard-000002.idx.npy"):
        PatchStore(shard_copy)
