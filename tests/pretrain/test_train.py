"""Stages 3 and 4 without Ray: cluster-uniform batches, the training loop in both modes on real patches,
bit-exact resume from a checkpoint, and the exported hashing model and codes."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pretrain.eval.retrieval import unpack_codes
from pretrain.models.alexnet import build_trunk
from pretrain.models.inputs import to_input
from pretrain.models.weights import WeightsError, load_weights, read_meta, trunk_state
from pretrain.train import data as data_mod
from pretrain.train.data import ClusterBatches, batch_loader, other_member, sample_members, write_member_pixels
from pretrain.train.export import export_final, load_hasher, write_codes
from pretrain.train.loop import TrainSpec, build_net, data_parallel, lr_at, recipe, train_worker
from infra.session import LocalSession, local_trainer
from infra.session import fresh_storage
from pretrain.train.stage import itq_init, round_steps
from infra.ray_edge import serial_map
from shards.store import PatchStore
from tests.pretrain.train_fixtures import CAT, COFFEE, PER_PHOTO, cluster_inputs, logged, spec_dict

TRUNK_WEIGHTS = [f"conv{i}.weight" for i in range(1, 6)] + ["fc6.weight", "fc7.weight"]
BITS = 16  # fc7 of alexnet32 at width 0.25 has 128 dims


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: as fast for these tiny nets, and no stalls at OpenMP barriers when other
    processes share the 2 cores (3x slower with 2 threads then)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- batches ----------------------------------------------------------------------------------------

def test_sample_members_is_uniform_over_clusters_then_members():
    offsets = np.array([0, 1, 51])  # a singleton and a cluster of 50
    rows, cluster = sample_members(offsets, 20000, np.random.default_rng(0))
    assert rows.dtype == np.int64 and cluster.dtype == np.int64
    assert np.array_equal(cluster, (rows >= 1).astype(np.int64))  # each row lies in its cluster
    assert chisquare(np.bincount(cluster, minlength=2)).pvalue > 1e-3  # not 1:50
    assert chisquare(np.bincount(rows[cluster == 1] - 1, minlength=50)).pvalue > 1e-3


def test_other_member_stays_in_the_cluster_and_differs_from_the_row():
    offsets = np.array([0, 1, 3, 8])  # sizes 1, 2, 5
    rng = np.random.default_rng(1)
    rows, cluster = sample_members(offsets, 5000, rng)
    other = other_member(offsets, rows, cluster, rng)
    assert np.all((offsets[cluster] <= other) & (other < offsets[cluster + 1]))
    single = cluster == 0
    assert np.all(other[single] == rows[single]) and np.all(other[~single] != rows[~single])
    for r in range(3, 8):  # each other member of the cluster of 5 is drawn
        assert set(other[rows == r]) == set(range(3, 8)) - {r}


def row_pixels(path: Path, m: int) -> Path:
    """members.npy (m, 4, 4, 3) uint8 whose row i is filled with the value i, so a batch names its rows."""
    np.save(path, np.broadcast_to(np.arange(m, dtype=np.uint8)[:, None, None, None], (m, 4, 4, 3)).copy())
    return path


def as_rows(images: torch.Tensor) -> np.ndarray:
    return images[:, 0, 0, 0].numpy().astype(np.int64)


def collect(ds: ClusterBatches, workers: int) -> list[dict]:
    return list(batch_loader(ds, num_workers=workers))


def test_cluster_batches_are_seeded_per_step_for_any_worker_count_and_start(tmp_path):
    offsets = np.array([0, 1, 4, 9, 11])
    pixels = row_pixels(tmp_path / "members.npy", 11)
    make = lambda start=0: ClusterBatches(pixels, offsets, batch_size=6, steps=7, seed=5, rank=1,  # noqa: E731
                                          start_step=start, pairs=True)
    serial = collect(make(), 0)
    assert [b["step"] for b in serial] == list(range(7)) and len(make()) == 7 and len(make(3)) == 4
    for b in serial:
        rows, cluster, pos = as_rows(b["image"]), b["cluster"].numpy(), as_rows(b["positive"])
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (6, 4, 4, 3)
        assert np.all((offsets[cluster] <= rows) & (rows < offsets[cluster + 1]))
        assert np.all((offsets[cluster] <= pos) & (pos < offsets[cluster + 1]))
        assert np.all((pos != rows) | (cluster == 0))  # x+ is another member unless the cluster is a singleton
    parallel = collect(make(), 2)
    assert [b["step"] for b in parallel] == list(range(7))
    resumed = collect(make(3), 2)
    assert [b["step"] for b in resumed] == [3, 4, 5, 6]
    for got in (parallel, resumed):
        for b in got:
            want = serial[b["step"]]
            assert all(torch.equal(b[k], want[k]) for k in ("image", "cluster", "positive"))
    assert not any(torch.equal(serial[0]["image"], b["image"]) for b in collect(
        ClusterBatches(pixels, offsets, batch_size=6, steps=1, seed=5, rank=0), 0))  # another rank, other rows


def test_cluster_batches_reject_an_empty_cluster(tmp_path):
    with pytest.raises(ValueError, match="at least one member"):
        ClusterBatches(row_pixels(tmp_path / "m.npy", 5), np.array([0, 2, 2, 5]), batch_size=2, steps=1, seed=0)


def test_write_member_pixels_gathers_the_patches_in_member_order(shard_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "GATHER_CHUNK", 7)  # several chunks, the last one partial
    member_index = np.r_[np.random.default_rng(0).permutation(60)[:25], 3, 3].astype(np.int64)
    out = write_member_pixels(shard_dir, member_index, tmp_path / "members.npy")
    got = np.load(out, allow_pickle=False)
    assert got.dtype == np.uint8 and got.shape == (27, 32, 32, 3)
    assert np.array_equal(got, PatchStore(shard_dir).get(member_index))
    assert [p.name for p in tmp_path.iterdir()] == ["members.npy"]


# --- the training loop --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster_run(shard_dir, tmp_path_factory):
    """20 steps of mode "cluster" on cat vs coffee patches, checkpoints every 4 steps."""
    d = tmp_path_factory.mktemp("cluster_run")
    pixels, clusters = cluster_inputs(shard_dir, d / "in", [CAT, COFFEE])
    spec = spec_dict(pixels, clusters, d / "out", steps=20, batch_size_per_worker=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(d / "tmp"))  # where rank 0 stages its checkpoints
        (d / "tmp").mkdir()
        last = train_worker(spec, LocalSession(d / "ckpt"))
    return SimpleNamespace(dir=d, spec=spec, last=last, root=d / "ckpt",
                           model=d / "ckpt" / "checkpoint_000000020" / "model.safetensors")


def test_cluster_training_learns_the_two_photos(cluster_run):
    log = logged(cluster_run.dir / "out")
    assert [m["step"] for m in log] == list(range(1, 21)) and all(m["mode"] == "cluster" for m in log)
    loss = [m["loss"] for m in log]
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:3])
    assert np.mean([m["accuracy"] for m in log[-5:]]) > 0.7  # chance is 0.5
    assert cluster_run.last["step"] == 20 and cluster_run.last["lr"] == pytest.approx(1e-4)  # two x0.1 drops


def test_cluster_checkpoints_keep_the_newest_two_and_leave_no_temporaries(cluster_run):
    assert sorted(p.name for p in cluster_run.root.iterdir()) == ["checkpoint_000000016", "checkpoint_000000020"]
    assert not list((cluster_run.dir / "tmp").glob("discoattr-ckpt-*"))  # staged copies are removed
    for step in (16, 20):
        ckpt = cluster_run.root / f"checkpoint_{step:09d}"
        assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "step.json"]
        assert json.loads((ckpt / "step.json").read_text()) == {"step": step}
    tensors, meta = load_weights(cluster_run.model)
    assert meta["mode"] == "cluster" and meta["step"] == 20
    assert meta["model"] == {"arch": "alexnet32", "width": 0.25, "dropout": 0.5}
    assert meta["spec"] == json.loads(json.dumps(recipe(TrainSpec(**cluster_run.spec))))
    assert "pixels_path" not in meta["spec"]  # locations are not recorded: equal weights, equal files
    assert set(TRUNK_WEIGHTS) < set(tensors) and tensors["classifier.fc.weight"].shape == (2, 128)
    assert not any(k.startswith("hash.") for k in tensors)


def test_local_trainer_returns_the_final_checkpoint_and_resumes_a_finished_run(cluster_run, tmp_path):
    spec = cluster_run.spec | {"out_dir": str(tmp_path / "out"), "steps": 4}
    final = local_trainer(train_worker, spec, name="r", storage_path=tmp_path)
    assert final == tmp_path / "r" / "checkpoint_000000004"
    assert local_trainer(train_worker, spec, name="r", storage_path=tmp_path) == final
    assert [m["step"] for m in logged(tmp_path / "out")] == [1, 2, 3, 4]  # the rerun trained no step


class Killed(Exception):
    pass


class DyingSession(LocalSession):
    """Stores the checkpoint of step `die_at`, then the process 'dies'."""

    die_at = 8

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["step"] == self.die_at:
            raise Killed


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_killed_run_resumes_at_its_checkpoint_with_the_same_weights(shard_dir, tmp_path, dropout):
    pixels, clusters = cluster_inputs(shard_dir, tmp_path / "in", PER_PHOTO[:4])
    spec = lambda name, **kw: spec_dict(pixels, clusters, tmp_path / name, dropout=dropout, **kw)  # noqa: E731
    train_worker(spec("a"), LocalSession(tmp_path / "a" / "ckpt"))

    with pytest.raises(Killed):
        train_worker(spec("b"), DyingSession(tmp_path / "b" / "ckpt"))
    (tmp_path / "b" / "metrics.jsonl").rename(tmp_path / "b" / "before.jsonl")
    last = train_worker(spec("b", loader_workers=2), LocalSession(tmp_path / "b" / "ckpt"))  # any worker count
    assert [m["step"] for m in logged(tmp_path / "b")] == [9, 10, 11, 12] and last["step"] == 12

    a, _ = load_weights(tmp_path / "a" / "ckpt" / "checkpoint_000000012" / "model.safetensors")
    b, _ = load_weights(tmp_path / "b" / "ckpt" / "checkpoint_000000012" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def hash_run(shard_dir, cluster_run, tmp_path_factory):
    """6 steps of mode "hash" from the cluster run's trunk, W from PCA+ITQ on its fc7 features."""
    d = tmp_path_factory.mktemp("hash_run")
    pixels, clusters = cluster_inputs(shard_dir, d / "in", PER_PHOTO[::2] + [PER_PHOTO[1][:4]])
    init = itq_init(shard_dir, cluster_run.model, BITS, fit_patches=40, seed=0, out=d / "init.npz")
    spec = spec_dict(pixels, clusters, d / "out", mode="hash", steps=6, checkpoint_every=3, bits=BITS,
                     init_from=str(cluster_run.model), hash_init=str(init), lr=0.001)
    last = train_worker(spec, LocalSession(d / "ckpt"))
    return SimpleNamespace(dir=d, spec=spec, last=last, init=init,
                           model=d / "ckpt" / "checkpoint_000000006" / "model.safetensors")


def test_hash_net_starts_from_the_cluster_trunk_and_the_itq_projection(hash_run, cluster_run):
    net = build_net(TrainSpec(**hash_run.spec), num_clusters=4)
    trunk, _ = load_weights(cluster_run.model)
    for k, v in net.trunk.state_dict().items():
        assert torch.equal(v, trunk[k]), k
    with np.load(hash_run.init, allow_pickle=False) as z:
        assert z["mean"].shape == (128,) and z["proj"].shape == (128, BITS)
        assert np.array_equal(net.head.weight.detach().numpy(), z["proj"])
        assert np.array_equal(net.head.mean.numpy(), z["mean"])


def test_hash_training_logs_finite_triplet_and_regularizer_terms(hash_run, cluster_run):
    log = logged(hash_run.dir / "out")
    assert [m["step"] for m in log] == list(range(1, 7)) and all(m["mode"] == "hash" for m in log)
    for key in ("loss", "triplet", "variance", "variance_term", "decorrelation_term", "decay_term", "active"):
        assert all(np.isfinite(m[key]) for m in log), key
    assert "negatives" not in log[0]  # per-sample tensors are not logged
    tensors, meta = load_weights(hash_run.model)
    assert meta["mode"] == "hash" and tensors["hash.weight"].shape == (128, BITS)
    assert not any(k.startswith("classifier.") for k in tensors)
    start, _ = load_weights(cluster_run.model)
    assert not torch.equal(tensors["conv1.weight"], start["conv1.weight"])  # the trunk is fine-tuned too


# --- export -------------------------------------------------------------------------------------------

def test_codes_and_final_model_agree_bit_for_bit(hash_run, shard_dir, tmp_path):
    codes_path, scores_path = write_codes(shard_dir, hash_run.model, tmp_path, serial_map)
    codes, scores = np.load(codes_path, allow_pickle=False), np.load(scores_path, allow_pickle=False)
    assert codes.dtype == np.uint8 and codes.shape == (60, BITS // 8)
    assert scores.dtype == np.float16 and scores.shape == (60, BITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "scores.npy"]

    config = {"hash": {"code_bits": BITS}, "run": {"seed": 0}}
    final = export_final(hash_run.model, config, tmp_path / "final.safetensors")
    meta = read_meta(final)
    assert meta["config"] == config and meta["bits"] == BITS and "spec" not in meta
    tensors, _ = load_weights(final)
    assert set(TRUNK_WEIGHTS) | {"hash.weight", "hash.mean"} <= set(tensors)
    trunk, head, meta2 = load_hasher(final)
    assert head.bits == BITS and not trunk.training and not head.training and meta2 == meta

    # an independent path to the codes: the training checkpoint's trunk built here (not load_hasher or
    # hash_scores), Eq. 1 written out in float64, bits packed per row
    ckpt, _ = load_weights(hash_run.model)
    assert all(torch.equal(tensors[k], v) for k, v in ckpt.items())  # the final model is the checkpoint's
    spec = TrainSpec(**hash_run.spec)
    direct = build_trunk(spec.arch, width=spec.width, dropout=spec.dropout)
    direct.load_state_dict(trunk_state(ckpt), strict=True)
    direct.eval()
    w, mean = ckpt["hash.weight"].double(), ckpt["hash.mean"].double()
    store = PatchStore(shard_dir)
    for start, count in zip(store.shards.starts, store.shards.counts):  # one shard per batch, like write_codes
        rows = slice(int(start), int(start + count))
        with torch.no_grad():
            f = direct(to_input(torch.from_numpy(store.get(np.arange(rows.start, rows.stop)))))
        expect = ((f.double() - mean) @ w).numpy()  # (n, K): W^T (f(x) - mean)
        bits = (expect > 0).astype(np.uint8)
        assert np.array_equal(codes[rows], np.array([[int("".join(map(str, r[i:i + 8])), 2) for i in range(0, BITS, 8)]
                                                     for r in bits], dtype=np.uint8))  # MSB first, like np.packbits
        assert np.array_equal(unpack_codes(codes[rows], BITS), bits)
        np.testing.assert_allclose(scores[rows].astype(np.float32), expect, rtol=1e-3, atol=1e-3)


def test_load_hasher_refuses_a_cluster_checkpoint(cluster_run):
    with pytest.raises(WeightsError, match="no hashing layer"):
        load_hasher(cluster_run.model)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_fail_in_one_line(hash_run, tmp_path, damage):
    blob = hash_run.model.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    for load in (load_weights, load_hasher):
        with pytest.raises(WeightsError) as err:
            load(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


# --- stage helpers ------------------------------------------------------------------------------------

def test_fresh_storage_keeps_the_same_run_and_empties_another(tmp_path):
    store = tmp_path / "ray"
    fresh_storage(store, "key-a")
    (store / "checkpoint_1").mkdir()
    fresh_storage(store, "key-a")
    assert (store / "checkpoint_1").is_dir() and (store / "spec.key").read_text() == "key-a"
    fresh_storage(store, "key-b")
    assert sorted(p.name for p in store.iterdir()) == ["spec.key"] and (store / "spec.key").read_text() == "key-b"
    (store / "spec.key").unlink()
    (store / "stale").write_text("x")
    fresh_storage(store, "key-b")  # no stamp: not ours
    assert sorted(p.name for p in store.iterdir()) == ["spec.key"]


def test_round_steps_cover_the_views_at_the_global_batch():
    assert round_steps(members=100, views=20, epochs=1, global_batch=128, cap=0) == 16  # ceil(2000 / 128)
    assert round_steps(members=100, views=20, epochs=0.5, global_batch=128, cap=0) == 8
    assert round_steps(members=100, views=20, epochs=1, global_batch=128, cap=10) == 10
    assert round_steps(members=0, views=20, epochs=1, global_batch=128, cap=0) == 1


def test_the_recipe_does_not_change_with_the_number_of_workers():
    from pretrain.config import load_config
    from pretrain.train.stage import resources, step_recipe

    def recipe(*sets):
        cfg = load_config(None, ["train.global_batch=256", "train.lr_base_batch=64", *sets])
        return step_recipe(cfg, cfg.train), resources(cfg, cfg.train)

    (one, res1), (eight, res8) = recipe("train.num_workers=1"), recipe("train.num_workers=8")
    assert one["batch_size_per_worker"] == 256 and eight["batch_size_per_worker"] == 32
    assert one["lr"] == eight["lr"] == pytest.approx(0.04)  # 0.01 at 64, linear to 256
    assert res8["global_batch"] == res1["global_batch"] == 256 and res8["num_workers"] == 8
    assert recipe("train.lr_scaling=sqrt")[0]["lr"] == pytest.approx(0.02)
    assert recipe("train.lr_scaling=none")[0]["lr"] == pytest.approx(0.01)


def test_a_global_batch_the_workers_cannot_share_is_refused():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.global_batch.*multiple of train.num_workers=3"):
        load_config(None, ["train.num_workers=3", "train.global_batch=64"])
    with pytest.raises(ConfigError, match="hash.global_batch.*multiple of train.num_workers=4"):
        load_config(None, ["train.num_workers=4", "train.global_batch=64", "hash.global_batch=18"])
    with pytest.raises(ConfigError, match="'train.batch_size_per_worker' is gone: use train.global_batch"):
        load_config(None, ["train.batch_size_per_worker=64"])


def _ddp_grads(rank: int, port: int, compression: str, out: str) -> None:
    """One of two gloo processes: DDP (with `compression`) over a small net, rank-dependent inputs."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    spec = TrainSpec(mode="cluster", pixels_path="", clusters_path="", out_dir="", grad_compression=compression)
    model = data_parallel(net, spec)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank + 1))
    model(x).square().mean().backward()
    torch.save([p.grad for p in net.parameters()], f"{out}/{compression}-{rank}.pt")
    dist.destroy_process_group()


def test_bf16_gradient_compression_all_reduces_the_same_gradient_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    for compression in ("none", "bf16"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_grads, args=(port, compression, str(tmp_path)), nprocs=2)
    grads = {(c, r): torch.load(tmp_path / f"{c}-{r}.pt") for c in ("none", "bf16") for r in (0, 1)}
    for exact, r0, r1 in zip(grads["none", 0], grads["bf16", 0], grads["bf16", 1]):
        assert torch.equal(r0, r1)  # every rank steps with the same (rounded) mean gradient
        assert torch.allclose(r0, exact, rtol=2e-2, atol=1e-4)  # bf16 keeps ~3 significant digits
    assert any(not torch.equal(a, b) for a, b in zip(grads["none", 0], grads["bf16", 0]))  # it did compress


def test_warmup_rises_linearly_to_the_rate_then_the_step_drops_apply():
    spec = TrainSpec(mode="cluster", pixels_path="", clusters_path="", out_dir="", steps=100, lr=0.1,
                     warmup_steps=10)
    assert [round(lr_at(spec, s), 6) for s in (0, 4, 9, 10, 59, 60, 85)] == [0.01, 0.05, 0.1, 0.1, 0.1, 0.01, 0.001]


def test_member_pixels_are_rewritten_for_other_clusters_of_the_same_size(shard_dir, tmp_path):
    from pretrain.train.stage import ensure_member_pixels
    from shards.store import PatchStore

    clusters, out = tmp_path / "clusters.npz", tmp_path / "members.npy"
    for rows in ([0, 1, 2, 3], [10, 11, 12, 13], [10, 11, 12, 13]):
        np.savez(clusters, member_index=np.array(rows, np.int64), offsets=np.array([0, 2, 4]))
        ensure_member_pixels(shard_dir, clusters, out)
        assert np.array_equal(np.load(out), PatchStore(shard_dir).get(rows))
