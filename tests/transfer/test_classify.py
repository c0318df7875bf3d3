"""Classification transfer: the protocols' readers, the probes, `transfer/classify.py` end to end and its
one-line errors, `scripts/classify_table.py` over the four variants."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.models.alexnet import build_trunk
from scripts import classify_table
from tests.transfer.fixtures import trained_like_trunk, write_final
from transfer import classify
from transfer.image_features import pool_maps, trunk_features
from transfer.labelled import (CALTECH_BACKGROUND, read_caltech101, read_folder, read_stl10, read_stl10_images,
                               write_stl10)
from transfer.probes import knn_probe, linear_probe

QUICK = ["--set", "tracking.wandb=disabled", "--set", "data.splits=2", "--set", "probe.cs=[0.1,1.0]",
         "--set", "probe.knn_k=[1,3]", "--set", "probe.cv_folds=2", "--set", "ray.num_cpus=2"]


def _stl10_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_stl10_binary_round_trips_with_its_folds(tmp_path):
    (x_tr, y_tr), (x_te, y_te) = _stl10_arrays(12, 0), _stl10_arrays(7, 1)
    folds = [np.array([0, 3, 5]), np.array([1, 2, 11, 4]), np.array([6, 7, 8, 9, 10])]
    d = write_stl10(tmp_path / "stl10_binary", (x_tr, y_tr), (x_te, y_te), folds, classes=[f"c{i}" for i in range(10)])
    # the release's byte order: 3 planes, each 96 x 96 column-major; labels 1-based
    raw = np.frombuffer((d / "train_X.bin").read_bytes(), np.uint8)
    assert raw[1] == x_tr[0, 1, 0, 0] and raw[96 * 96] == x_tr[0, 0, 0, 1]
    assert (d / "test_y.bin").read_bytes()[0] == y_te[0] + 1

    s = read_stl10(tmp_path)  # the folder holding stl10_binary/ works too
    assert s.protocol == "stl10" and s.classes == tuple(f"c{i}" for i in range(10))
    assert np.array_equal(s.labels, np.concatenate([y_tr, y_te]))
    assert [tr.tolist() for tr, _ in s.splits] == [f.tolist() for f in folds]
    assert all(te.tolist() == list(range(12, 19)) for _, te in s.splits)
    assert np.array_equal(s.source.load(5), x_tr[5]) and np.array_equal(s.source.load(12 + 6), x_te[6])
    assert np.array_equal(read_stl10_images(d / "train_X.bin", 3, 4), x_tr[3:7])


def _write_images(root, per_class: dict[str, int], px=40, seed=0):
    """Class c: a bright square at a class-dependent place on noise, so the classes can be told apart."""
    rng = np.random.default_rng(seed)
    for k, (cls, n) in enumerate(per_class.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 80, (px, px + 6 * (i % 3), 3), dtype=np.uint8)
            y, x = (k % 2) * px // 2, (k // 2) * px // 2
            img[y : y + px // 2, x : x + px // 2, k % 3] = 230
            Image.fromarray(img).save(root / cls / f"{cls}_{i:03d}.png")
    return root


def test_caltech101_splits_are_seeded_per_class_and_leave_out_the_background(tmp_path):
    root = _write_images(tmp_path / "101_ObjectCategories", {"ant": 5, "bee": 4, CALTECH_BACKGROUND: 6})
    s = read_caltech101(tmp_path, train_per_class=2, test_per_class=1, splits=3, seed=7)
    assert s.classes == ("ant", "bee") and len(s.labels) == 9
    for train, test in s.splits:
        assert not set(train) & set(test)
        assert np.bincount(s.labels[train]).tolist() == [2, 2] and np.bincount(s.labels[test]).tolist() == [1, 1]
    assert len({tuple(tr) for tr, _ in s.splits}) > 1  # each split its own draw
    again = read_caltech101(root, train_per_class=2, test_per_class=1, splits=3, seed=7)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(s.splits, again.splits))


def test_a_folder_with_train_and_val_keeps_its_split(tmp_path):
    _write_images(tmp_path / "train", {"a": 3, "b": 2})
    _write_images(tmp_path / "val", {"a": 1, "b": 2})
    s = read_folder(tmp_path)
    (train, test), = s.splits
    assert s.labels[train].tolist() == [0, 0, 0, 1, 1] and s.labels[test].tolist() == [0, 1, 1]
    assert s.source.load(int(test[0])).shape == (40, 40, 3)


def test_the_probes_separate_separable_features_perfectly():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 32)) * 10
    y = np.repeat(np.arange(4), 30)
    x = centres[y] + rng.normal(0, 0.5, (len(y), 32))
    train, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    for kind in ("logreg", "svm"):
        r = linear_probe(x[train], y[train], x[test], y[test], kind=kind, cs=(0.01, 1.0), cv_folds=3)
        assert r.accuracy == 1.0 and r.chosen["C"] in (0.01, 1.0), kind
    k = knn_probe(x[train], y[train], x[test], y[test], ks=(1, 5))
    assert k.accuracy == 1.0 and k.chosen["k"] in (1, 5)
    # and they are no oracle: labels unrelated to the features score near chance
    shuffled = rng.permutation(y)
    assert linear_probe(x[train], shuffled[train], x[test], shuffled[test], cs=(1.0,)).accuracy < 0.6


def test_conv_features_pool_every_layer_over_its_grid_at_any_image_size():
    trunk = build_trunk("alexnet96", width=0.25).eval()
    x = torch.randn(2, 3, 96, 96)
    maps = trunk.conv_maps(x, ("conv1", "conv5"))
    assert torch.equal(maps["conv5"].flatten(1), trunk.features(x, "conv5"))
    pooled = pool_maps(maps, (1, 2))
    c1, c5 = maps["conv1"].shape[1], maps["conv5"].shape[1]
    assert pooled.shape == (2, (c1 + c5) * 5)
    assert torch.equal(pooled[:, :c1], maps["conv1"].amax((2, 3)))  # level 1 = global max
    images = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)  # Caltech's size
    feats = trunk_features(trunk, images, ("conv3", "fc7"), (2,), batch=2)
    assert feats.shape == (3, trunk.layer_shapes["conv3"][0] * 4 + trunk.feature_dim)
    with pytest.raises(ValueError, match="conv1..conv5"):
        trunk.conv_maps(x, ("fc7",))


@pytest.mark.ray
def test_the_four_variants_run_end_to_end_and_a_rerun_reuses_the_cache(tmp_path, capsys, caplog):
    data = _write_images(tmp_path / "set", {"a": 6, "b": 6, "c": 6})
    ckpt = write_final(tmp_path / "final.safetensors", trained_like_trunk())
    assert classify_table.main(["--ckpt", str(ckpt), "--data", str(data), "--root", str(tmp_path / "runs"),
                                "--json", "--", *QUICK]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert set(figures) == {"pretrained", "random", "pixels", "hog", "ours_above_floors"}
    assert "| features | dim | linear % | k-NN % |" in out and "ours above every floor" in out
    run = tmp_path / "runs" / "set-pretrained"
    r = json.loads((run / "results.json").read_text())
    assert r["protocol"] == "folder" and r["splits"] == 2 and r["classes"] == ["a", "b", "c"]
    assert r["train_per_split"] == [9] and r["test_per_split"] == [9] and r["features"]["images_per_s"] > 0
    assert r["features"]["dim"] == sum(c * 4 for c in (24, 64, 96, 96, 64))  # conv1-5 x 4 quadrants, width 0.25
    for probe in ("linear", "knn"):
        assert len(r[probe]["per_split"]) == 2 and 0 <= r[probe]["accuracy"] <= 1
        assert set(r[probe]["per_class"]) == {"a", "b", "c"} and np.sum(r[probe]["confusion"]) == 18
    for name in ("results.md", "figures/confusion.png", "eval/predictions.npz", "features/features.npy",
                 "metrics.jsonl", "manifest.json", "config.yaml"):
        assert (run / name).is_file(), name
    assert not (run / "features" / "parts").exists()
    assert "| linear |" in (run / "results.md").read_text()

    # the rerun skips every stage; then the same features as Ray tasks over 4-image parts
    features = (run / "features" / "features.npy").read_bytes()
    caplog.set_level("INFO")
    assert classify.main(["--ckpt", str(ckpt), "--data", str(data), "--run-dir", str(run), *QUICK]) == 0
    assert sum("up to date, skipped" in m for m in caplog.messages) == 3
    ray_run = tmp_path / "runs" / "ray"
    assert classify.main(["--ckpt", str(ckpt), "--data", str(data), "--run-dir", str(ray_run), *QUICK,
                          "--set", "features.ray_min_images=1", "--set", "features.part_images=4"]) == 0
    meta = json.loads((ray_run / "features" / "meta.json").read_text())
    assert meta["where"] == "ray tasks" and meta["parts"] == 5
    ours, theirs = np.load(run / "features" / "features.npy"), np.load(ray_run / "features" / "features.npy")
    assert np.allclose(ours, theirs, atol=1e-5) and (run / "features" / "features.npy").read_bytes() == features


def test_bad_inputs_fail_in_one_line_before_anything_is_written(tmp_path, capsys):
    data = _write_images(tmp_path / "set", {"a": 3, "b": 3})
    ckpt = write_final(tmp_path / "final.safetensors", trained_like_trunk())
    stl = write_stl10(tmp_path / "stl", _stl10_arrays(4, 0), _stl10_arrays(3, 1), [np.array([0, 1])])
    short = tmp_path / "short"
    short.mkdir()
    for f in stl.iterdir():
        (short / f.name).write_bytes(f.read_bytes())
    with open(short / "train_X.bin", "r+b") as f:
        f.truncate(3 * 96 * 96 * 3 + 100)
    nolabels = tmp_path / "nolabels"
    nolabels.mkdir()
    for f in stl.iterdir():
        (nolabels / f.name).write_bytes(f.read_bytes()[:2] if f.name == "test_y.bin" else f.read_bytes())
    one_class = _write_images(tmp_path / "one", {"a": 3})
    cases = [
        (["--ckpt", str(ckpt), "--data", str(short), "--protocol", "stl10"], "not a whole number of 96x96x3 images"),
        (["--ckpt", str(ckpt), "--data", str(nolabels), "--protocol", "stl10"], "2 labels for 3 images"),
        (["--ckpt", str(ckpt), "--data", str(data), "--protocol", "stl10"], "not an STL-10 binary folder"),
        (["--ckpt", str(ckpt), "--data", str(one_class)], "at least 2 needed"),
        (["--ckpt", str(ckpt), "--data", str(data), "--protocol", "caltech101"], "no image left for testing"),
        (["--ckpt", str(ckpt), "--data", str(tmp_path / "nope")], "no such folder"),
        (["--ckpt", str(tmp_path / "nope.safetensors"), "--data", str(data)], "weights file not found"),
        (["--data", str(data)], "--init pretrained needs --ckpt"),
        (["--ckpt", str(ckpt)], "no data folder"),
        (["--ckpt", str(ckpt), "--data", str(data), "--set", "features.layers=[conv9]"], "features.layers"),
        (["--ckpt", str(ckpt), "--data", str(data), "--force", "train"], "unknown stage(s) train"),
    ]
    for args, message in cases:
        run_dir = tmp_path / "runs" / "x"
        assert classify.main([*args, "--run-dir", str(run_dir), *QUICK]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (args, err)
        assert not run_dir.exists(), args


def test_checkpoint_and_run_directory_in_a_bucket(tmp_path, bucket, capsys):
    from infra import storage

    data = _write_images(tmp_path / "set", {"a": 4, "b": 4})
    ckpt = f"{bucket}/runs/demo/final.safetensors"
    storage.put_file(write_final(tmp_path / "final.safetensors", trained_like_trunk()), ckpt)
    run = f"{bucket}/classify/set"
    assert classify.main(["--ckpt", ckpt, "--data", str(data), "--run-dir", run, *QUICK]) == 0
    assert "| linear |" in capsys.readouterr().out
    r = json.loads(storage.to_path(f"{run}/results.json").read_text())
    assert r["variant"] == "pretrained" and r["images_used"] == 8 and r["features"]["rows"] == 8
    for name in ("features/features.npy", "figures/confusion.png", "manifest.json", "eval/predictions.npz"):
        assert storage.size_of(f"{run}/{name}"), name
    assert not storage.list_names(f"{run}/features/parts")
