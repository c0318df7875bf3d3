import itertools

import numpy as np
import pytest
import torch

from shards.reader import PatchLoader, PatchStream, plan_epoch
from shards.shardset import ShardError, record_offsets
from shards.store import PatchStore


@pytest.mark.parametrize("world,workers,shuffle", itertools.product([1, 2, 3], [1, 2, 4], [False, True]))
def test_plan_partitions_every_epoch(world, workers, shuffle):
    counts = np.array([7, 0, 13, 5, 21])
    per_rank = counts.sum() // world
    for epoch in range(3):
        seen = []
        for rank in range(world):
            n_rank = 0
            for w in range(workers):
                for sl in plan_epoch(counts, rank=rank, world_size=world, worker=w, num_workers=workers,
                                     epoch=epoch, seed=5, shuffle=shuffle):
                    assert 0 <= sl.start < sl.stop <= counts[sl.shard]
                    seen += [(sl.shard, j) for j in range(sl.start, sl.stop)]
                    n_rank += sl.stop - sl.start
            assert n_rank == per_rank
        assert len(seen) == len(set(seen)) == per_rank * world


def _read_all(root, world, workers, **kw):
    per_rank = []
    for rank in range(world):
        loader = PatchLoader(PatchStream(root, rank=rank, world_size=world, **kw), batch_size=7, num_workers=workers)
        idx, imgs, batches = [], [], 0
        for batch in loader:
            batches += 1
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (32, 32, 3)
            idx += batch["index"].tolist()
            imgs.append(batch["image"].numpy())
        if loader.stats()["patches_lost"] == 0:
            assert batches == len(loader)
        per_rank.append((np.array(idx), np.concatenate(imgs), loader.stats()))
    return per_rank


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_read_every_patch_once(shard_dir, shuffle):
    ranks = _read_all(shard_dir, world=2, workers=2, shuffle=shuffle, shuffle_buffer=16, seed=1)
    counts = [len(idx) for idx, _, _ in ranks]
    assert counts == [30, 30]
    everything = np.concatenate([idx for idx, _, _ in ranks])
    assert sorted(everything.tolist()) == list(range(60))
    store = PatchStore(shard_dir)
    for idx, imgs, stats in ranks:
        assert np.array_equal(imgs, store.get(idx))  # decoded pixels match random access
        assert stats == {"patches": 30, "patches_lost": 0, "patches_repeated": 0, "record_errors": 0}


def test_shuffle_changes_with_epoch_and_is_seeded(shard_dir):
    def order(epoch, seed):
        s = PatchStream(shard_dir, rank=0, world_size=1, shuffle=True, shuffle_buffer=16, seed=seed)
        s.set_epoch(epoch)
        return [x["index"] for x in s]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(1, 1) and sorted(order(1, 1)) == list(range(60))


def test_truncated_shard_is_skipped_and_counted(shard_copy):
    path = shard_copy / "shard-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ranks = _read_all(shard_copy, world=1, workers=2)
    idx, imgs, stats = ranks[0]
    assert 40 <= len(idx) < 60 and stats["patches"] == len(idx)
    assert stats["patches_lost"] == 60 - len(idx)
    assert stats["record_errors"] >= 1
    intact = PatchStore(shard_copy)
    good = idx[(idx < 20) | (idx >= 40)]
    assert len(good) == 40 and np.array_equal(intact.get(good), imgs[np.isin(idx, good)])


def test_corrupt_jpeg_is_skipped_and_counted(shard_copy):
    path = shard_copy / "shard-000002.tar"
    offset, _ = record_offsets(path).members["jpg"][2]
    with open(path, "r+b") as f:
        f.seek(int(offset))
        f.write(b"\x00" * 64)  # the SOI marker and headers are gone: not a JPEG any more
    idx, _, stats = _read_all(shard_copy, world=1, workers=1)[0]
    assert stats == {"patches": 56, "patches_lost": 4, "patches_repeated": 0, "record_errors": 1}
    assert set(range(60)) - set(idx.tolist()) == {48, 49, 50, 51}  # shard 2, record 2, slots 0-3


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 3)])
def test_pad_keeps_per_rank_counts_equal_when_a_whole_shard_is_lost(shard_copy, world, workers):
    path = shard_copy / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:1000])  # shard 0 (patches 0-19) is gone
    ranks = _read_all(shard_copy, world=world, workers=workers, pad=True)
    assert [len(idx) for idx, _, _ in ranks] == [60 // world] * world
    lost = sum(s["patches_lost"] for _, _, s in ranks)
    repeated = sum(s["patches_repeated"] for _, _, s in ranks)
    assert lost == repeated == 20
    every = np.concatenate([idx for idx, _, _ in ranks])
    assert every.min() >= 20 and set(every.tolist()) == set(range(20, 60))


def test_damaged_header_mid_shard_costs_only_its_record(shard_copy):
    path = shard_copy / "shard-000001.tar"
    header = record_offsets(path).header[2]
    with open(path, "r+b") as f:
        f.seek(int(header))
        f.write(b"\xff" * 512)  # record 2's first tar header is garbage
    idx, _, stats = _read_all(shard_copy, world=1, workers=1)[0]
    assert set(range(60)) - set(idx.tolist()) == {28, 29, 30, 31}
    assert stats["patches_lost"] == 4 and stats["record_errors"] >= 1


def test_metadata_that_disagrees_with_the_strip_is_damage(shard_copy):
    import json
    import tarfile

    path = shard_copy / "shard-000000.tar"
    off, size = record_offsets(path).members["json"][3]
    with open(path, "r+b") as f:
        f.seek(int(off))
        meta = json.loads(f.read(int(size)))
        text = json.dumps(meta).replace('"first"', '"firsT"').encode()
        assert len(text) == size
        f.seek(int(off))
        f.write(text)
    assert tarfile.is_tarfile(path)
    idx, _, stats = _read_all(shard_copy, world=1, workers=1)[0]
    assert set(range(60)) - set(idx.tolist()) == {12, 13, 14, 15} and stats["record_errors"] == 1


def test_no_readable_sample_is_a_clear_error(shard_copy):
    for p in shard_copy.glob("*.tar"):
        p.write_bytes(b"\x00" * 1024)
    loader = PatchLoader(PatchStream(shard_copy, rank=0, world_size=1), batch_size=4)
    with pytest.raises(ShardError, match="no readable sample"):
        list(loader)


def test_missing_index_or_shard_is_a_clear_error(shard_copy, tmp_path):
    with pytest.raises(ShardError, match="no shards.json"):
        PatchStream(tmp_path / "nothing-here")
    (shard_copy / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match="missing, first: shard-000001.tar"):
        PatchStream(shard_copy)
