import hashlib
import json
import tarfile

import numpy as np
import pytest

from shards.build import build_shards
from shards.shardset import ShardSet
from shards.sources import list_items
from shards.writer import PatchParams
from tests.conftest import make_image_folder, run_cli


def test_index_lists_counts_sizes_checksums(shard_dir, small_params):
    info = json.loads((shard_dir / "shards.json").read_text())
    assert info["patch_size_px"] == 32 and info["patches_per_record"] == 4
    assert info["source"]["kind"] == "imagenet" and info["classes"] == ["cat", "coffee"]
    assert [s["patches"] for s in info["shards"]] == [20, 20, 20]
    assert [s["records"] for s in info["shards"]] == [5, 5, 5]
    for s in info["shards"]:
        assert (shard_dir / s["name"]).stat().st_size == s["bytes"]
        assert hashlib.sha256((shard_dir / s["name"]).read_bytes()).hexdigest() == s["sha256"]
        idx = shard_dir / s["index"]["name"]
        assert idx.name == s["name"].replace(".tar", ".idx.npy")
        assert hashlib.sha256(idx.read_bytes()).hexdigest() == s["index"]["sha256"]
        meta = shard_dir / s["meta"]["name"]
        assert meta.name == s["name"].replace(".tar", ".meta.npz")
        assert hashlib.sha256(meta.read_bytes()).hexdigest() == s["meta"]["sha256"]
        part = json.loads((shard_dir / s["name"].replace(".tar", ".json")).read_text())
        assert part["entry"] == s and len(part["task"]) == 16
    with tarfile.open(shard_dir / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == ["r0000000.jpg", "r0000000.json", "r0000001.jpg", "r0000001.json"]
    # the index part recorded at build time is the layout the tar has
    table = np.load(shard_dir / "shard-000000.idx.npy")
    assert table.shape == (5, 6) and table.dtype == np.int64
    for r in range(5):
        jpg, meta = members[2 * r], members[2 * r + 1]
        assert table[r].tolist() == [jpg.offset, meta.offset_data + -(-meta.size // 512) * 512, jpg.offset_data,
                                     jpg.size, meta.offset_data, meta.size]


def test_same_source_and_seed_give_identical_shards(tmp_path, shard_dir, small_params):
    src = make_image_folder(tmp_path / "imgs")
    info = build_shards(list_items(str(src)), tmp_path / "again", small_params, images_per_shard=2)
    first = json.loads((shard_dir / "shards.json").read_text())
    assert [s["sha256"] for s in info["shards"]] == [s["sha256"] for s in first["shards"]]
    assert [s["meta"]["sha256"] for s in info["shards"]] == [s["meta"]["sha256"] for s in first["shards"]]


def test_unreadable_image_is_skipped_and_reported(tmp_path, small_params):
    src = make_image_folder(tmp_path / "imgs", classes=("cat",), per_class=3)
    (src / "cat" / "cat_1.jpg").write_bytes(b"not a jpeg at all")
    info = build_shards(list_items(str(src)), tmp_path / "out", small_params, images_per_shard=10)
    assert info["shards"][0]["skipped_images"] == ["cat/cat_1.jpg"]
    assert info["total_patches"] == 20 and ShardSet.open(tmp_path / "out").total == 20


def test_rebuild_with_fewer_shards_removes_stale_ones(tmp_path, small_params):
    src = make_image_folder(tmp_path / "imgs", classes=("cat",), per_class=3)
    build_shards(list_items(str(src)), tmp_path / "out", small_params, images_per_shard=1)
    build_shards(list_items(str(src)), tmp_path / "out", small_params, images_per_shard=3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "shard-000000.idx.npy", "shard-000000.json", "shard-000000.meta.npz", "shard-000000.tar", "shards.json"]


def test_cli_builds_digits_and_rejects_missing_source(tmp_path):
    ok = run_cli(["-m", "shards.build", "--source", "digits", "--out", str(tmp_path / "d"), "--patch-size", "16",
                  "--patches-per-image", "1", "--num-shards", "3", "--no-ray"])
    assert ok.returncode == 0, ok.stderr
    shards = ShardSet.open(tmp_path / "d")
    assert shards.total == 1797 and len(shards.names) == 3 and shards.patch_px == 16
    bad = run_cli(["-m", "shards.build", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: source not found: {tmp_path / 'missing'}"]
    assert not (tmp_path / "x").exists()
    odd = run_cli(["-m", "shards.build", "--source", "demo", "--out", str(tmp_path / "y"), "--patch-size", "30"])
    assert odd.returncode == 2 and "multiple of 8" in odd.stderr


class Killed(Exception):
    pass


def killed_at(shard_name: str):
    """A mapper that runs the build's tasks in this process and is 'killed' at the task of `shard_name`."""
    from infra.ray_edge import serial_map

    def mapper(fn, tasks, **kw):
        def run(*args):
            if args[0].name == shard_name:
                raise Killed
            return fn(*args)
        return serial_map(run, tasks, **kw)

    return mapper


def test_killed_build_resumes_with_the_shards_it_had_not_finished(tmp_path, small_params):
    from infra.ray_edge import serial_map

    src = list_items(str(make_image_folder(tmp_path / "imgs")))  # 6 images -> 3 shards of 2

    with pytest.raises(Killed):
        build_shards(src, tmp_path / "out", small_params, images_per_shard=2, mapper=killed_at("shard-000002.tar"))
    assert not (tmp_path / "out" / "shards.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    assert sorted(written) == ["shard-000000.tar", "shard-000001.tar"]

    ran = []

    def counting(fn, tasks, **kw):
        ran.extend(t[0].name for t in tasks)
        return serial_map(fn, tasks, **kw)

    info = build_shards(src, tmp_path / "out", small_params, images_per_shard=2, mapper=counting)
    assert ran == ["shard-000002.tar"]
    assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in written} == written
    clean = build_shards(src, tmp_path / "clean", small_params, images_per_shard=2)
    assert info["shards"] == clean["shards"]
    assert not list((tmp_path / "out").glob(".*"))  # no progress log, no temporary files
    # progress is the listing of finished parts: without shard 1's part (and shards.json) only it is redone
    (tmp_path / "out" / "shard-000001.json").unlink()
    (tmp_path / "out" / "shards.json").unlink()
    ran.clear()
    assert build_shards(src, tmp_path / "out", small_params, images_per_shard=2, mapper=counting) == info
    assert ran == ["shard-000001.tar"]
    assert (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns == written["shard-000000.tar"]
    # other settings make other shards: nothing is reused
    ran.clear()
    build_shards(src, tmp_path / "out", PatchParams(**{**small_params.__dict__, "seed": 9}),
                 images_per_shard=2, mapper=counting)
    assert len(ran) == 3


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    src = make_image_folder(tmp_path / "imgs", classes=("cat",), per_class=2)
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(src / "cat", arcname="cat")
    (tmp_path / "afile").write_text("x")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"garbage")
    cases = [
        (["--source", str(tmp_path / "imgs.tar.gz"), "--out", str(tmp_path / "o1")], "decompress it first"),
        (["--source", str(junk), "--out", str(tmp_path / "o2"), "--no-ray"], "no patch could be made"),
        (["--source", str(src), "--out", str(tmp_path / "afile")], "exists and is not a directory"),
        (["--source", str(src), "--out", str(tmp_path / "o3"), "--num-shards", "0"], "must be >= 1"),
        (["--source", str(src), "--out", str(tmp_path / "o4"), "--jpeg-quality", "500"], "1..100"),
        (["--source", "digits", "--out", str(tmp_path / "o5"), "--patches-per-record", "1000"], "65500"),
    ]
    for args, msg in cases:
        out = run_cli(["-m", "shards.build", *args])
        assert out.returncode == 2, (args, out.stderr[-500:])
        last = out.stderr.strip().splitlines()[-1]  # after the progress bar, when the build started
        assert last.startswith("error: ") and msg in last and "Traceback" not in out.stderr, (args, out.stderr)
    assert not (tmp_path / "o2" / "shards.json").exists()
